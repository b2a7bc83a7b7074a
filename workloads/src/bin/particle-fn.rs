//! `particle-fn JOB [options]`: the program a burst's functions run. It reads
//! the launcher's environment (see `particle_workloads::env`) and runs one
//! function of the named job. std only and no argument parser crate, so that
//! its own start-up stays a small part of what the benchmarks measure.

use std::process::ExitCode;
use std::time::Duration;

use particle_workloads::env::FunctionEnv;
use particle_workloads::ring::{self, RingOptions};

const USAGE: &str = "usage: particle-fn ring [--offset N] [--bytes N] [--timeout-s N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("particle-fn: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let (job, rest) = args.split_first().ok_or(USAGE)?;
    let env = FunctionEnv::from_env().map_err(|e| e.to_string())?;
    match job.as_str() {
        "ring" => {
            let mut opts = RingOptions::default();
            let mut it = rest.iter();
            while let Some(flag) = it.next() {
                let value: u64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{flag} needs a number\n{USAGE}"))?;
                match flag.as_str() {
                    "--offset" => opts.offset = value as usize,
                    "--bytes" => opts.bytes = value as usize,
                    "--timeout-s" => opts.timeout = Duration::from_secs(value),
                    _ => return Err(format!("unknown option {flag}\n{USAGE}")),
                }
            }
            ring::run(&env, &opts, &mut std::io::stdout().lock()).map_err(|e| e.to_string())
        }
        other => Err(format!("unknown job {other:?}\n{USAGE}")),
    }
}

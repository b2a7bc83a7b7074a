//! `particle-fn JOB [options]`: the program a burst's functions run. It reads
//! the launcher's environment (see `particle_workloads::env`) and runs one
//! function of the named job. No argument parser crate and no codec (the
//! video job is `particle-video`: linking OpenH264 and libstdc++ made every
//! start of this binary ~0.3 ms slower), so that its own start-up stays a
//! small part of what the benchmarks measure.

use std::process::ExitCode;
use std::time::Duration;

use particle_workloads::args::{number, pairs, unknown};
use particle_workloads::env::FunctionEnv;
use particle_workloads::ring::{self, RingOptions};
use particle_workloads::shuffle::{self, ShuffleOptions};

const USAGE: &str = "usage:
  particle-fn ring    [--offset N] [--bytes N] [--timeout-s N]
  particle-fn shuffle [--bytes N] [--seed N] [--fan-out N] [--timeout-s N]
(the video pipeline is `particle-video`)";

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
    let mut stdout = std::io::stdout().lock();
    let num = |flag: &str, value: &str| number::<u64>(flag, value, USAGE);
    match job.as_str() {
        "ring" => {
            let mut opts = RingOptions::default();
            for (flag, value) in pairs(rest, USAGE)? {
                match flag {
                    "--offset" => opts.offset = num(flag, value)? as usize,
                    "--bytes" => opts.bytes = num(flag, value)? as usize,
                    "--timeout-s" => opts.timeout = Duration::from_secs(num(flag, value)?),
                    _ => return Err(unknown(flag, USAGE)),
                }
            }
            ring::run(&env, &opts, &mut stdout).map_err(|e| e.to_string())
        }
        "shuffle" => {
            let mut opts = ShuffleOptions::default();
            for (flag, value) in pairs(rest, USAGE)? {
                match flag {
                    "--bytes" => opts.bytes = num(flag, value)? as usize,
                    "--seed" => opts.seed = num(flag, value)?,
                    "--fan-out" => opts.fan_out = num(flag, value)? as usize,
                    "--timeout-s" => opts.timeout = Duration::from_secs(num(flag, value)?),
                    _ => return Err(unknown(flag, USAGE)),
                }
            }
            shuffle::run(&env, &opts, &mut stdout)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        other => Err(format!("unknown job {other:?}\n{USAGE}")),
    }
}

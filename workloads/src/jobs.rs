//! The job a function runs, by name: what both `particle-fn JOB ...` and
//! `particle fn JOB ...` dispatch to.

use std::time::Duration;

use crate::env::FunctionEnv;
use crate::ring::{self, RingOptions};

pub const USAGE: &str = "usage: particle-fn ring [--offset N] [--bytes N] [--timeout-s N]";

/// Runs function `args[0]` with the rest as its options, in the environment
/// the launcher gave it.
pub fn run(args: &[String]) -> Result<(), String> {
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

//! The job a function runs, by name: what both `particle-fn JOB ...` and
//! `particle fn JOB ...` dispatch to.

use std::time::Duration;

use crate::args::{number, pairs, unknown};
use crate::ring::{self, RingOptions};
use crate::shuffle::{self, ShuffleOptions};
use particle_wire::function_env::FunctionEnv;

pub const USAGE: &str = "usage:
  particle-fn ring    [--offset N] [--bytes N] [--timeout-s N]
  particle-fn shuffle [--bytes N] [--seed N] [--fan-out N] [--timeout-s N]
(the video pipeline is `particle-video`)";

/// Runs function `args[0]` with the rest as its options, in the environment
/// the launcher gave it.
pub fn run(args: &[String]) -> Result<(), String> {
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

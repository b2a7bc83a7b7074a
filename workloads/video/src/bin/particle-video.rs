//! `particle-video --output PATH [options]`: one function of the video
//! pipeline (see the `particle_video` library). Its own binary because it
//! links OpenH264 (C++), which `particle-fn`'s start-up should not pay for.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use particle_video::{self as video, VideoOptions};
use particle_wire::function_env::FunctionEnv;
use particle_workloads::args::{number, pairs, unknown};

const USAGE: &str = "usage: particle-video --output PATH [--width N] [--height N] [--frames N]
                      [--seed N] [--qp N] [--collector RANK] [--timeout-s N]
Every function of the job takes the same arguments; the collector writes PATH.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("particle-video: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let env = FunctionEnv::from_env().map_err(|e| e.to_string())?;
    let mut opts = VideoOptions::default();
    let mut output = None;
    for (flag, value) in pairs(args, USAGE)? {
        match flag {
            "--output" => output = Some(PathBuf::from(value)),
            "--width" => opts.width = number(flag, value, USAGE)?,
            "--height" => opts.height = number(flag, value, USAGE)?,
            "--frames" => opts.frames = number(flag, value, USAGE)?,
            "--seed" => opts.seed = number(flag, value, USAGE)?,
            "--qp" => opts.qp = number(flag, value, USAGE)?,
            "--collector" => opts.collector = number(flag, value, USAGE)?,
            "--timeout-s" => opts.timeout = Duration::from_secs(number(flag, value, USAGE)?),
            _ => return Err(unknown(flag, USAGE)),
        }
    }
    opts.output = output.ok_or_else(|| format!("--output PATH is required\n{USAGE}"))?;
    video::run(&env, &opts, &mut std::io::stdout().lock())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

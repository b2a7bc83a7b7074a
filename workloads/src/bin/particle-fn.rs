//! `particle-fn JOB [options]`: the program a burst's functions run. It reads
//! the launcher's environment (see `particle_wire::function_env`) and runs one
//! function of the named job. std only, no argument parser crate and no
//! codec (the video job is `particle-video`: linking OpenH264 and libstdc++
//! made every start ~0.3 ms slower), so that its own start-up stays a small
//! part of what the benchmarks measure.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match particle_workloads::jobs::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("particle-fn: {e}");
            ExitCode::FAILURE
        }
    }
}

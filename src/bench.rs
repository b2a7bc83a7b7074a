//! `particle bench ...`: the benchmarks are the bench crate's
//! (`particle_bench::cli`); this prints what one reports.

use anyhow::Result;

pub fn run(bench: &particle_bench::cli::Bench) -> Result<()> {
    let outcome = particle_bench::cli::run(bench)?;
    print!("{}", outcome.stdout);
    outcome.verdict
}

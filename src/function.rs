//! `particle fn`: one function of a job, as `particle-fn` runs it.

#[derive(clap::Args)]
pub struct FnArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Runs the function; a failure exits 1 with its reason on stderr.
pub fn run(args: &FnArgs) -> anyhow::Result<()> {
    if let Err(e) = particle_workloads::jobs::run(&args.args) {
        eprintln!("particle fn: {e}");
        std::process::exit(1);
    }
    Ok(())
}

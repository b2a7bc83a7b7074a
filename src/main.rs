//! `particle`: the one command operators run.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "particle",
    version,
    about = "Overlay networking for burst-parallel serverless jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks against real baselines, in the same run.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
    /// Removes what crashed Particle runs left behind (mounted namespaces,
    /// links in this namespace); never touches live runs.
    Gc,
}

#[derive(Subcommand)]
enum Bench {
    /// Endpoint creation: one `ip` per command vs `ip -batch` vs Particle, then warm-pool claims.
    Endpoints {
        /// Endpoints to create with each method.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Particle's worker threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Skip the slow one-`ip`-process-per-command baseline.
        #[arg(long)]
        skip_ip_cmd: bool,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench {
            bench:
                Bench::Endpoints {
                    count,
                    workers,
                    skip_ip_cmd,
                    json,
                },
        } => {
            let opts = particle_bench::endpoints::Options {
                count,
                workers,
                skip_ip_cmd,
            };
            let report = particle_bench::endpoints::run(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", particle_bench::endpoints::render(&report));
            }
            if report.leaked > 0 {
                anyhow::bail!("{} objects leaked", report.leaked);
            }
        }
        Command::Gc => {
            let mut socket = particle_net::NetlinkSocket::open().context("netlink socket")?;
            let report = particle_net::gc::collect(Some(&mut socket));
            println!(
                "removed {} namespaces, {} links, {} dead runs",
                report.namespaces.len(),
                report.links.len(),
                report.runs.len()
            );
            for e in &report.errors {
                eprintln!("error: {e}");
            }
            if !report.errors.is_empty() {
                anyhow::bail!("{} objects could not be removed", report.errors.len());
            }
        }
    }
    Ok(())
}

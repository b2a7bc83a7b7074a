//! `particle`: the one command operators run. This file only parses the
//! command line and hands each subcommand to the file that owns it.

mod agent;
mod bench;
mod cluster;
mod config;
mod controller;
mod demo;
mod function;
mod gc;
mod launch;
mod local;

use anyhow::Result;
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
        bench: particle_bench::cli::Bench,
    },
    /// A local cluster: N namespaced nodes, a controller and N agents.
    Cluster {
        #[command(subcommand)]
        cluster: cluster::ClusterCommand,
    },
    /// The controller: tenants, nodes, address blocks; pushes overlay state to agents.
    Controller(controller::ControllerSettings),
    /// The node agent: runs in its node's namespace, owns the node's tenant
    /// overlays and warm pools, follows the controller, serves the local API.
    Agent(Box<agent::AgentSettings>),
    /// Sends one request to a node agent's local API and prints the answer,
    /// e.g. `particle local --socket S '{"op":"claim","tenant":"a"}'`.
    Local(local::LocalArgs),
    /// Launches a burst of functions on a tenant's overlay and follows it,
    /// e.g. `particle launch --tenant a -n 100 -- particle-fn ring`.
    Launch(launch::LaunchArgs),
    /// The main job: the video pipeline on a local cluster with embedded
    /// defaults; prints a summary and writes the output and a timeline plot.
    Demo(demo::DemoArgs),
    /// Jobs: list, status, cancel, output.
    Job {
        #[command(subcommand)]
        job: launch::JobCommand,
    },
    /// Runs one function of a job, as `particle-fn` does (for launching
    /// where only the `particle` binary is installed).
    #[command(hide = true)]
    Fn(function::FnArgs),
    /// Removes what crashed Particle runs left behind (mounted namespaces,
    /// links in this namespace); never touches live runs.
    Gc,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Bench { bench } => bench::run(&bench),
        Command::Cluster { cluster } => cluster::run(cluster),
        Command::Controller(settings) => controller::run(&settings),
        Command::Agent(settings) => agent::run(&settings),
        Command::Local(args) => local::run(&args),
        Command::Launch(args) => launch::launch(args),
        Command::Demo(args) => demo::run(&args),
        Command::Job { job } => launch::job(job),
        Command::Fn(args) => function::run(&args),
        Command::Gc => gc::run(),
    }
}

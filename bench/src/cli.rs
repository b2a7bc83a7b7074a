//! `particle bench`: the subcommands' flags, and [`run`], which runs one
//! and says what to print; the `particle` binary only parses and prints.

use anyhow::{anyhow, Result};
use clap::Subcommand;
use serde::Serialize;

use crate::{cni_add, endpoints, failover, pipeline, reuse, soak, startup};

#[derive(Subcommand)]
pub enum Bench {
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
    /// Warm connections: request latency (baseline / do-nothing preload / reuse) and flow completion times, new vs warm.
    Reuse {
        /// Requests per mode in the latency experiment.
        #[arg(long, default_value_t = 500)]
        runs: usize,
        /// One-way delay of the emulated underlay, ms (a userspace delay line: no netem here).
        #[arg(long, default_value_t = 0.5)]
        delay_ms: f64,
        /// Flows per size, kind and load in the flow experiment.
        #[arg(long, default_value_t = 10)]
        flow_runs: usize,
        /// Underlay rate in Mbit/s (tbf each way); 0: unshaped.
        #[arg(long, default_value_t = 1000)]
        link_mbit: u32,
        /// Write the latency CDF plot (SVG) here.
        #[arg(long, default_value = "reuse-cdf.svg")]
        plot: std::path::PathBuf,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Per-ADD/DEL time of particle-cni vs the reference CNI bridge plugin, same run.
    Cni {
        /// ADDs (and DELs) per plugin.
        #[arg(long, default_value_t = 100)]
        adds: usize,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The plain client process `bench reuse` runs (connect, request, read, close).
    #[command(hide = true)]
    ReuseClient {
        #[arg(long)]
        dest: std::net::SocketAddr,
        #[arg(long)]
        runs: usize,
        #[arg(long, default_value_t = crate::reuse::REQUEST_ANSWER)]
        size: u64,
    },
    /// The video pipeline on Particle (warm) vs the baselines, job time and ratio.
    Pipeline(crate::pipeline::PipelineArgs),
    /// Burst startup: launch to every function reaching a peer on another
    /// node, Particle warm/cold vs hand-built overlay, CNI bridge, Docker Swarm
    /// and no network, in one run; table, JSON and a plot.
    Startup(crate::startup::StartupArgs),
    /// Churn: bursts launched and ended without pause (several tenants, mixed
    /// sizes, cancels) on a local cluster; errors, startup over time, and what
    /// every agent holds at the start and the end (must match: nothing leaks).
    Soak(crate::soak::SoakArgs),
    /// Controller failover: three controllers on a 3-member etcd, the leader
    /// SIGKILLed mid-burst (5 times); takeover time (median) and jobs lost.
    Failover(crate::failover::FailoverArgs),
}

/// What a benchmark subcommand prints (the table, or one JSON object), and
/// whether the run passed its own checks: a run that leaked fails the
/// command after its report is printed.
pub struct Outcome {
    pub stdout: String,
    pub verdict: Result<()>,
}

impl Outcome {
    fn report<R: Serialize>(report: &R, json: bool, render: fn(&R) -> String) -> Result<Self> {
        let stdout = if json {
            format!("{}\n", serde_json::to_string_pretty(report)?)
        } else {
            render(report)
        };
        Ok(Self {
            stdout,
            verdict: Ok(()),
        })
    }

    /// Fails the run with `why` unless an earlier check failed it already.
    fn failing_if(mut self, failed: bool, why: impl FnOnce() -> String) -> Self {
        if failed && self.verdict.is_ok() {
            self.verdict = Err(anyhow!(why()));
        }
        self
    }
}

/// Runs one `particle bench` subcommand.
pub fn run(bench: &Bench) -> Result<Outcome> {
    Ok(match bench {
        Bench::Endpoints {
            count,
            workers,
            skip_ip_cmd,
            json,
        } => {
            let opts = endpoints::Options {
                count: *count,
                workers: *workers,
                skip_ip_cmd: *skip_ip_cmd,
            };
            let report = endpoints::run(&opts)?;
            Outcome::report(&report, *json, endpoints::render)?
                .failing_if(report.leaked > 0, || {
                    format!("{} objects leaked", report.leaked)
                })
        }
        Bench::Reuse {
            runs,
            delay_ms,
            flow_runs,
            link_mbit,
            plot,
            json,
        } => {
            let opts = reuse::Options {
                runs: *runs,
                delay_ms: *delay_ms,
                flow_runs: *flow_runs,
                link_mbit: *link_mbit,
                plot: Some(plot.clone()),
            };
            Outcome::report(&reuse::run(&opts)?, *json, reuse::render)?
        }
        Bench::ReuseClient { dest, runs, size } => Outcome {
            stdout: format!("{}\n", reuse::client(*dest, *runs, *size)?),
            verdict: Ok(()),
        },
        Bench::Cni { adds, json } => {
            let report = cni_add::run(*adds)?;
            Outcome::report(&report, *json, cni_add::render)?.failing_if(report.leaked > 0, || {
                format!("{} links leaked", report.leaked)
            })
        }
        Bench::Pipeline(args) => {
            Outcome::report(&pipeline::run(args)?, args.json, pipeline::render)?
        }
        Bench::Soak(args) => {
            let report = soak::run(args)?;
            let leaks = report.leaks();
            Outcome::report(&report, args.json, soak::render)?
                .failing_if(!leaks.is_empty(), || format!("leaked: {leaks:?}"))
                .failing_if(report.errors > 0, || {
                    format!("{} jobs failed", report.errors)
                })
        }
        Bench::Startup(args) => Outcome::report(&startup::run(args)?, args.json, startup::render)?,
        Bench::Failover(args) => {
            let report = failover::run(args)?;
            Outcome::report(&report, args.json, failover::render)?
                .failing_if(report.jobs_lost > 0, || {
                    format!("{} jobs lost", report.jobs_lost)
                })
        }
    })
}

//! `particle bench soak`: bursts launched and ended without pause on a local
//! cluster, for a while, the way a platform runs for weeks: several tenants,
//! mixed burst sizes, two jobs in flight at a time, and every fourth job
//! cancelled while it runs. At the end the pools are left to refill and every
//! agent's kernel objects, fds and processes are compared with what it held
//! before the first burst; see [`report`] for the report.

mod report;

pub use report::*;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use particle_cluster::{tenants, LocalCluster, Options};
use particle_wire::api::{Job, JobState, LaunchJob};
use particle_wire::client::{ApiClient, Method};
use particle_workloads::ring::{parse_probe, REACHED};

use crate::agent_resources::AgentResources;
use crate::jobs::launch_job;
use crate::startup::{ring_argv, ring_tenant};

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// Nodes (namespaced hosts).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// How long to keep launching, in seconds.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    #[arg(long, default_value_t = 3)]
    pub tenants: usize,
    /// Warm endpoints per tenant per node.
    #[arg(long, default_value_t = 8)]
    pub warm: usize,
    /// The largest burst; sizes cycle up to it (some beyond the warm pools).
    #[arg(long, default_value_t = 48)]
    pub max_functions: usize,
    /// Seconds the pools get at the end to refill and the kernel to let go of
    /// what the last functions used, before the final census.
    #[arg(long, default_value_t = 120)]
    pub settle: u64,
    /// Seconds per line of the startup-over-time table [default: duration / 10, at least 5].
    #[arg(long)]
    pub window: Option<u64>,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Burst sizes, in turn (capped at `--max-functions`).
const SIZES: [usize; 8] = [2, 8, 24, 48, 4, 16, 32, 12];
/// A ring function that has not reached its peer by then has failed.
const FUNCTION_TIMEOUT_S: u64 = 60;
const ERROR_SAMPLES: usize = 10;

/// What one job of the soak came to.
enum Outcome {
    /// Ended; every function's startup (ms).
    Ran(Vec<f64>),
    Cancelled,
}

pub fn run(args: &SoakArgs) -> Result<SoakReport> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the soak builds network namespaces: run it as root"
    );
    anyhow::ensure!(
        args.nodes >= 1 && args.tenants >= 1 && args.max_functions >= 2,
        "need at least one node, one tenant and bursts of two"
    );
    let argv = ring_argv(FUNCTION_TIMEOUT_S)?;
    let cluster = LocalCluster::start(&Options::processes(
        args.nodes,
        "10.236.0.0/24",
        7741,
        args.warm,
        8,
    ))?;
    let api = cluster.api()?;
    let agents = cluster.agent_pids();
    let runtime = tokio::runtime::Runtime::new()?;
    let tenants: Vec<String> = (0..args.tenants).map(|i| format!("soak{i}")).collect();

    runtime.block_on(async {
        for (i, t) in tenants.iter().enumerate() {
            // Disjoint /16s from 10.100.0.0 on; VNIs from 4600.
            let subnet = format!("10.{}.0.0/16", 100 + i);
            let per_node = args.max_functions.div_ceil(args.nodes).max(args.warm);
            tenants::create(&api, &ring_tenant(t, 4600 + i as u32, &subnet, per_node)).await?;
            tenants::set_warm(&api, t, args.warm).await?;
        }
        for t in &tenants {
            tenants::warm_up(&api, t, args.warm).await?;
        }
        // One small burst per tenant first, so that the start is a node that
        // has carried traffic: its underlay ARP entries for the other nodes
        // exist from the first overlay packet on and stay (as they should).
        for t in &tenants {
            ring_job(&api, t, argv.clone(), 2 * args.nodes)
                .await
                .with_context(|| format!("the warm-up burst of {t}"))?;
        }
        for t in &tenants {
            tenants::warm_up(&api, t, args.warm).await?;
        }
        anyhow::Ok(())
    })?;
    let start = steady_census(&agents)?;

    let began = Instant::now();
    let mut report = SoakReport {
        nodes: args.nodes,
        tenants: args.tenants,
        duration_s: 0.0,
        jobs: 0,
        cancelled_jobs: 0,
        functions: 0,
        errors: 0,
        error_samples: Vec::new(),
        startup_over_time: Vec::new(),
        leaked: Default::default(),
        growth: Default::default(),
        agents: Vec::new(),
    };
    let mut finished: Vec<(f64, Vec<f64>)> = Vec::new();
    let mut turn = 0usize;
    while began.elapsed() < Duration::from_secs(args.duration) {
        // Two jobs at once, of two tenants; every fourth one is cancelled.
        let job = |k: usize| {
            let n = turn + k;
            let tenant = tenants[n % tenants.len()].clone();
            let size = SIZES[n % SIZES.len()].min(args.max_functions);
            let api = &api;
            let argv = argv.clone();
            async move {
                let outcome = if n % 4 == 3 {
                    cancelled_job(api, &tenant, size).await
                } else {
                    ring_job(api, &tenant, argv, size).await
                };
                (
                    size,
                    outcome.with_context(|| format!("job {n}: {size} functions of {tenant}")),
                )
            }
        };
        let (a, b) = runtime.block_on(async { tokio::join!(job(0), job(1)) });
        let results = [a, b];
        turn += 2;
        let t = began.elapsed().as_secs_f64();
        for (size, outcome) in results {
            report.jobs += 1;
            report.functions += size;
            match outcome {
                Ok(Outcome::Ran(startups)) => finished.push((t, startups)),
                Ok(Outcome::Cancelled) => report.cancelled_jobs += 1,
                Err(e) => {
                    report.errors += 1;
                    if report.error_samples.len() < ERROR_SAMPLES {
                        report.error_samples.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
    report.duration_s = began.elapsed().as_secs_f64();
    let width = args.window.unwrap_or((args.duration / 10).max(5)) as f64;
    report.startup_over_time = windows(&finished, width);

    // The pools refill behind the last jobs and their functions go; wait
    // for every agent to be back where it started (or the settle time to pass).
    let end = census(&agents, Some((&start, Duration::from_secs(args.settle))))?;
    report.agents = agents
        .iter()
        .zip(start.into_iter().zip(end))
        .map(|((node, _), (start, end))| AgentCensus {
            node: node.clone(),
            start,
            end,
        })
        .collect();
    report.tally();
    Ok(report)
}

/// Whether every agent holds as much as before, growth counters aside.
fn same_level(before: &[AgentResources], after: &[AgentResources]) -> bool {
    before.iter().zip(after).all(|(b, a)| {
        b.delta(a)
            .iter()
            .all(|(name, d)| GROWTH_COUNTERS.contains(&name.as_str()) || *d == 0)
    })
}

/// The census once two reads a pool's rest apart agree (the last burst's
/// endpoints recycled, the pools' ARP sweep run), or after a minute.
fn steady_census(agents: &[(String, i32)]) -> Result<Vec<AgentResources>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = census(agents, None)?;
    loop {
        std::thread::sleep(Duration::from_secs(6));
        let now = census(agents, None)?;
        if same_level(&last, &now) || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// Every agent's resources; with `settle`, re-read until the kernel objects,
/// fds and processes match `settle`'s census or its time is up.
fn census(
    agents: &[(String, i32)],
    settle: Option<(&[AgentResources], Duration)>,
) -> Result<Vec<AgentResources>> {
    let read = || -> Result<Vec<AgentResources>> {
        agents
            .iter()
            .map(|(node, pid)| {
                AgentResources::read(*pid).with_context(|| format!("census of agent {node}"))
            })
            .collect()
    };
    let Some((start, within)) = settle else {
        return read();
    };
    let deadline = Instant::now() + within;
    loop {
        let now = read()?;
        if same_level(start, &now) || Instant::now() > deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A ring burst run to its end: every function's startup, launch to peer reached.
async fn ring_job(
    api: &ApiClient,
    tenant: &str,
    argv: Vec<String>,
    size: usize,
) -> Result<Outcome> {
    let timeout = Duration::from_secs(FUNCTION_TIMEOUT_S);
    let (submitted, _, runs) = launch_job(api, tenant, argv, size, timeout, None).await?;
    let startups = runs
        .iter()
        .map(|r| {
            parse_probe(&r.stdout, REACHED)
                .map(|reached| reached.saturating_sub(submitted) as f64 / 1e6)
                .with_context(|| format!("rank {} never reached its peer", r.rank))
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(Outcome::Ran(startups))
}

/// A burst of long sleeps, cancelled while it runs: the cancel path's
/// kills and endpoint returns are churned too.
async fn cancelled_job(api: &ApiClient, tenant: &str, size: usize) -> Result<Outcome> {
    let request = LaunchJob::of(tenant, size, vec!["/bin/sleep".into(), "600".into()]);
    let job: Job = api.call(Method::POST, "/v1/jobs", Some(&request)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let job: Job = api
        .call::<(), _>(Method::DELETE, &format!("/v1/jobs/{}", job.id), None)
        .await?;
    anyhow::ensure!(
        job.state == JobState::Cancelled,
        "job {} is {:?} after its cancel",
        job.id,
        job.state
    );
    Ok(Outcome::Cancelled)
}

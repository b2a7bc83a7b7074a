//! `particle bench startup`: the Particle paper's experiment. The same ring
//! functions (each reaches the next rank, on another node, and exchanges a
//! message) launched over N namespaced nodes by every system in one run:
//! Particle with warm pools, Particle cold, the hand-built Linux overlay, the
//! CNI reference bridge plugin, Docker Swarm's overlay, and no network at all
//! (the floor). Time runs from the launch to the last function having
//! reached its peer; see [`report`] for the report.

mod report;

pub use report::*;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use particle_cluster::{tenants, LocalCluster, Options, DEFAULT_FREE_POOL_SIZE, DEFAULT_POOL_SIZE};
use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Run};
use particle_wire::api::CreateTenant;
use particle_wire::client::ApiClient;
use particle_workloads::local::local_envs;
use particle_workloads::ring::now_ns;

use crate::baselines::docker_swarm::{Swarm, SwarmHost};
use crate::jobs::launch_job;
use crate::peaks::{ClusterMemory, NeighbourTable, NeighbourTableWatch};
use crate::pipeline_baseline::Baseline;

#[derive(clap::Args, Debug, Clone)]
pub struct StartupArgs {
    /// Nodes (namespaced hosts).
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Functions in the largest burst (the table's numbers).
    #[arg(long, default_value_t = 1000)]
    pub functions: usize,
    /// Burst sizes for the plot [default: M/4, M/2, M].
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<usize>,
    /// Leave out these systems (e.g. `--skip docker-swarm`).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// ADDs for the per-ADD CNI comparison (`particle-cni` vs `cni-bridge`).
    #[arg(long, default_value_t = 100)]
    pub cni_adds: usize,
    /// The plot (SVG).
    #[arg(long, default_value = "startup.svg")]
    pub plot: PathBuf,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// A baseline's constructor: nodes, the underlay's subnet, the two octets
/// its overlay subnets start with.
type BaselineFn = fn(usize, &str, [u8; 2]) -> Result<Baseline>;

/// The largest burst the baselines run.
const MAX_BASELINE_FUNCTIONS: usize = 1000;
const BASELINE_LIMIT: &str = "not run above 1,000 functions: it builds every \
    function's network at launch, one by one (about an hour for 10,000 here), and hands \
    peers over in the environment, which cannot hold 10,000 of them (exec fails with E2BIG)";

/// The seconds a function may take to reach its peer (Swarm's DNS is slow).
const FUNCTION_TIMEOUT_S: u64 = 600;

/// The ring function's argv: `particle-fn` beside this binary, else this
/// binary's own `particle fn` (the same code); a function gives up after
/// `timeout_s`.
pub fn ring_argv(timeout_s: u64) -> Result<Vec<String>> {
    let exe = std::env::current_exe().context("locating the particle binary")?;
    let small = exe.with_file_name("particle-fn");
    let mut argv = if small.exists() {
        vec![small.display().to_string()]
    } else {
        vec![exe.display().to_string(), "fn".into()]
    };
    argv.extend(["ring", "--timeout-s"].map(String::from));
    argv.push(timeout_s.to_string());
    Ok(argv)
}

pub fn run(args: &StartupArgs) -> Result<StartupReport> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the startup benchmark builds network namespaces: run it as root"
    );
    anyhow::ensure!(
        args.nodes >= 1 && args.functions >= 1,
        "need at least one node and one function"
    );
    let argv = ring_argv(FUNCTION_TIMEOUT_S)?;
    let mut sweep = if args.sweep.is_empty() {
        vec![args.functions / 4, args.functions / 2, args.functions]
    } else {
        args.sweep.clone()
    };
    sweep.push(args.functions);
    sweep.retain(|m| *m > 0 && *m <= args.functions);
    sweep.sort_unstable();
    sweep.dedup();
    let wanted = |s: &str| !args.skip.iter().any(|k| k == s);
    let mut report = StartupReport::new(args.nodes, args.functions);
    let timeout = Duration::from_secs(FUNCTION_TIMEOUT_S);

    particle(args, &sweep, &argv, &mut report, &wanted)?;
    // Built anew for each burst: nodes wired, each function's network made at launch.
    let baselines: [(&str, BaselineFn, &str, [u8; 2]); 2] = [
        (
            "linux-overlay",
            Baseline::linux_overlay,
            "10.245.0.0/24",
            [10, 244],
        ),
        (
            "cni-bridge",
            Baseline::cni_bridge,
            "10.243.0.0/24",
            [10, 242],
        ),
    ];
    for &m in &sweep {
        for (system, build, underlay, subnets) in baselines {
            if wanted(system) && m > MAX_BASELINE_FUNCTIONS {
                report.skip(system, BASELINE_LIMIT);
            } else if wanted(system) {
                let mut baseline = build(args.nodes, underlay, subnets)?;
                let (submitted, runs) = baseline.launch(&argv, m, timeout)?;
                report.add_burst(system, measured(submitted, runs.iter().map(|r| &r.stdout))?);
            }
        }
        if wanted("no-network") {
            let (burst, table) = no_network(&argv, args.nodes, m, timeout)?;
            report.add_burst("no-network", burst);
            if m == args.functions {
                report.add_details("no-network", Origins::default(), table);
            }
        }
    }
    if wanted("docker-swarm") && args.functions > MAX_BASELINE_FUNCTIONS {
        report.skip("docker-swarm", BASELINE_LIMIT);
    } else if wanted("docker-swarm") {
        match docker_swarm(&argv, args.nodes, args.functions) {
            Ok(b) => report.add_burst("docker-swarm", b),
            Err(why) => report.skip("docker-swarm", why),
        }
    }
    if wanted("particle-cni") {
        match crate::cni_add::run(args.cni_adds) {
            Ok(cni) => report.add_cni(&cni),
            Err(e) => report.skip("particle-cni", format!("{e:#}")),
        }
    }
    for s in SYSTEMS {
        if !wanted(s) {
            report.skip(s, "left out with --skip");
        }
    }
    report.finish();
    std::fs::write(&args.plot, plot_svg(&report))
        .with_context(|| format!("writing {}", args.plot.display()))?;
    report.plot = Some(args.plot.display().to_string());
    Ok(report)
}

fn measured<'a>(submitted: u128, outs: impl Iterator<Item = &'a String>) -> Result<Burst> {
    let outs: Vec<String> = outs.cloned().collect();
    burst(submitted, &outs)
}

/// Particle's systems, each meeting every burst its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Particle {
    /// The tenant's pools hold the burst before the clock starts (as a
    /// platform keeps them for a job it knows is coming).
    Warm,
    /// One warm endpoint per node and no tenant-free pool: the rest are
    /// built in one batch per node during the launch.
    Cold,
    /// What `particle cluster up` runs, untuned: the default warm pool per
    /// tenant and the default tenant-free pool per node, nothing prewarmed
    /// for the job; the burst is larger than both.
    Default,
}

impl Particle {
    fn name(self) -> &'static str {
        match self {
            Self::Warm => "particle-warm",
            Self::Cold => "particle-cold",
            Self::Default => "particle-default",
        }
    }

    /// The tenant, its VNI and subnet (one per system, on one cluster).
    fn tenant(self) -> (&'static str, u32, &'static str) {
        match self {
            Self::Warm => ("warm", 4401, "10.64.0.0/12"),
            Self::Cold => ("cold", 4402, "10.80.0.0/12"),
            Self::Default => ("default", 4403, "10.96.0.0/12"),
        }
    }

    /// Sets the tenant up for a burst of `per_node` functions per node and
    /// waits until its pools are as the system has them.
    async fn prepare(self, api: &ApiClient, per_node: usize) -> Result<()> {
        let tenant = self.tenant().0;
        let ready = match self {
            Self::Warm => per_node,
            Self::Cold => 1,
            // The tenant's own default: nothing asked of it.
            Self::Default => {
                return tenants::warm_up(api, tenant, DEFAULT_POOL_SIZE)
                    .await
                    .map(drop)
            }
        };
        tenants::set_warm(api, tenant, ready).await?;
        tenants::warm_up(api, tenant, ready).await.map(drop)
    }
}

/// Particle's systems, on the clusters they run on: warm and cold on one
/// without a tenant-free pool, the default on one as `cluster up` makes it.
fn particle(
    args: &StartupArgs,
    sweep: &[usize],
    argv: &[String],
    report: &mut StartupReport,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let tuned = Options::processes(args.nodes, "10.241.0.0/24", 7700, 1, 0);
    let defaults = Options::processes(
        args.nodes,
        "10.241.1.0/24",
        7700,
        DEFAULT_POOL_SIZE,
        DEFAULT_FREE_POOL_SIZE,
    );
    for (options, systems) in [
        (tuned, &[Particle::Warm, Particle::Cold][..]),
        (defaults, &[Particle::Default][..]),
    ] {
        let systems: Vec<Particle> = systems
            .iter()
            .copied()
            .filter(|s| wanted(s.name()))
            .collect();
        if !systems.is_empty() {
            on_cluster(&options, &systems, args, sweep, argv, report)?;
        }
    }
    Ok(())
}

/// Every burst of `sweep` for each of `systems`, on one cluster started
/// with `options`.
fn on_cluster(
    options: &Options,
    systems: &[Particle],
    args: &StartupArgs,
    sweep: &[usize],
    argv: &[String],
    report: &mut StartupReport,
) -> Result<()> {
    let per_node = |m: usize| m.div_ceil(args.nodes);
    let cluster = LocalCluster::start(options)?;
    let api = cluster.api()?;
    let timeout = Duration::from_secs(FUNCTION_TIMEOUT_S);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        for s in systems {
            let (name, vni, subnet) = s.tenant();
            let mut tenant = ring_tenant(name, vni, subnet, per_node(args.functions));
            if *s == Particle::Default {
                // Nothing asked: the agents' default warm pool.
                tenant.warm_per_node = None;
            }
            tenants::create(&api, &tenant).await?;
        }
        for &m in sweep {
            for &system in systems {
                system.prepare(&api, per_node(m)).await?;
                let watch = NeighbourTableWatch::start()?;
                let launched =
                    launch_job(&api, system.tenant().0, argv.to_vec(), m, timeout, None).await;
                let table = watch.finish()?;
                let (submitted, job, runs) = launched?;
                report.add_burst(
                    system.name(),
                    measured(submitted, runs.iter().map(|r| &r.stdout))?,
                );
                if m == args.functions {
                    report.add_details(
                        system.name(),
                        Origins {
                            warm: job.warm,
                            bound: job.bound,
                            cold: job.cold,
                        },
                        table,
                    );
                }
            }
        }
        anyhow::Ok(())
    })?;
    // A peak is the processes' whole life: read before the cluster stops.
    let memory = ClusterMemory::read();
    for s in systems {
        report.add_memory(s.name(), memory);
    }
    drop(cluster);
    Ok(())
}

/// A tenant for ring bursts on `subnet`, one warm endpoint per node to
/// start with (the benchmark sets its warm target per burst), with blocks
/// large enough for `per_node` functions and its pool.
pub fn ring_tenant(name: &str, vni: u32, subnet: &str, per_node: usize) -> CreateTenant {
    CreateTenant {
        name: name.into(),
        vni,
        subnet: subnet.into(),
        block_prefix: Some(block_prefix_for(per_node + DEFAULT_POOL_SIZE)),
        warm_per_node: Some(1),
    }
}

/// The longest prefix whose blocks hold `hosts` addresses besides the
/// network, gateway and broadcast addresses; never longer than /24.
fn block_prefix_for(hosts: usize) -> u8 {
    (8..=24u8)
        .rev()
        .find(|p| (1usize << (32 - p)) >= hosts + 3)
        .unwrap_or(8)
}

/// The floor: the same functions started by Particle's launcher, one per
/// node in parallel, with no network of their own (`crate::no_network`).
fn no_network(
    argv: &[String],
    nodes: usize,
    m: usize,
    timeout: Duration,
) -> Result<(Burst, NeighbourTable)> {
    let envs = local_envs("no-network", m, 20_000, nodes);
    let watch = NeighbourTableWatch::start()?;
    let ran = crate::no_network::run(&envs, argv, nodes, "10.240.0.0/24", timeout, None);
    let table = watch.finish()?;
    let (submitted, outputs) = ran?;
    Ok((
        measured(submitted, outputs.iter().map(|o| &o.stdout))?,
        table,
    ))
}

/// Docker Swarm's overlay on namespaced hosts of its own (dockerd rewrites
/// its hosts' firewall); `Err` says why it could not run.
fn docker_swarm(argv: &[String], nodes: usize, m: usize) -> Result<Burst, String> {
    let run = Run::start().map_err(|e| e.to_string())?;
    let mut fabric = ScratchNode::new(
        run.prefix(),
        AddressBlock::parse("10.239.0.0/24").map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let hosts = fabric.hosts(nodes).map_err(|e| e.to_string())?;
    let swarm_hosts: Vec<SwarmHost> = hosts
        .iter()
        .map(|h| SwarmHost {
            netns: h.netns(),
            underlay_ip: h.address().ip(),
        })
        .collect();
    let binary = PathBuf::from(&argv[0]);
    if argv.get(1).map(String::as_str) == Some("fn") {
        return Err("docker-swarm needs particle-fn beside the particle binary (cargo build --release -p particle-workloads)".into());
    }
    let swarm = Swarm::start(&swarm_hosts, run.prefix(), &binary).map_err(|e| e.to_string())?;
    let mut in_container = vec![swarm.function_path().to_string()];
    in_container.extend(argv[1..].iter().cloned());
    let submitted = now_ns();
    let runs = swarm
        .launch(m, &in_container)
        .map_err(|e| format!("launching on Swarm: {e}"))?;
    let outs: Vec<String> = runs.iter().map(|r| r.stdout.clone()).collect();
    drop(swarm);
    burst(submitted, &outs).map_err(|e| format!("{e:#}"))
}

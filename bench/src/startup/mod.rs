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
use particle_cluster::{tenants, LocalCluster, Options};
use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Run};
use particle_wire::api::CreateTenant;
use particle_workloads::local::local_envs;
use particle_workloads::ring::now_ns;

use crate::baselines::docker_swarm::{Swarm, SwarmHost};
use crate::jobs::launch_job;
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

    if wanted("particle-warm") || wanted("particle-cold") {
        particle(args, &sweep, &argv, &mut report, &wanted)?;
    }
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
            if wanted(system) {
                let mut baseline = build(args.nodes, underlay, subnets)?;
                let (submitted, runs) = baseline.launch(&argv, m, timeout)?;
                report.add_burst(system, measured(submitted, runs.iter().map(|r| &r.stdout))?);
            }
        }
        if wanted("no-network") {
            report.add_burst("no-network", no_network(&argv, args.nodes, m, timeout)?);
        }
    }
    if wanted("docker-swarm") {
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

/// Particle warm and cold on one local cluster. Warm: the tenant's pools hold
/// the burst before the clock starts (as a platform keeps them for a job it
/// knows is coming). Cold: one warm endpoint per node and no tenant-free
/// pool, so the rest are built in one batch per node during the launch.
fn particle(
    args: &StartupArgs,
    sweep: &[usize],
    argv: &[String],
    report: &mut StartupReport,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let per_node = |m: usize| m.div_ceil(args.nodes);
    let cluster =
        LocalCluster::start(&Options::processes(args.nodes, "10.241.0.0/24", 7700, 1, 0))?;
    let api = cluster.api()?;
    let timeout = Duration::from_secs(FUNCTION_TIMEOUT_S);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        tenants::create(&api, &ring_tenant("warm", 4401, "10.64.0.0/12")).await?;
        tenants::create(&api, &ring_tenant("cold", 4402, "10.80.0.0/12")).await?;
        for &m in sweep {
            if wanted("particle-warm") {
                tenants::set_warm(&api, "warm", per_node(m)).await?;
                tenants::warm_up(&api, "warm", per_node(m)).await?;
                let (submitted, _, runs) =
                    launch_job(&api, "warm", argv.to_vec(), m, timeout, None).await?;
                report.add_burst(
                    "particle-warm",
                    measured(submitted, runs.iter().map(|r| &r.stdout))?,
                );
            }
            if wanted("particle-cold") {
                tenants::set_warm(&api, "cold", 1).await?;
                tenants::warm_up(&api, "cold", 1).await?;
                let (submitted, _, runs) =
                    launch_job(&api, "cold", argv.to_vec(), m, timeout, None).await?;
                report.add_burst(
                    "particle-cold",
                    measured(submitted, runs.iter().map(|r| &r.stdout))?,
                );
            }
        }
        anyhow::Ok(())
    })
}

/// A tenant for ring bursts on `subnet`, one warm endpoint per node to
/// start with (the benchmark sets its warm target per burst).
pub fn ring_tenant(name: &str, vni: u32, subnet: &str) -> CreateTenant {
    CreateTenant {
        name: name.into(),
        vni,
        subnet: subnet.into(),
        // Room for 1000+ functions on one node.
        block_prefix: Some(21),
        warm_per_node: Some(1),
    }
}

/// The floor: the same functions started by Particle's launcher, one per
/// node in parallel, with no network of their own (`crate::no_network`).
fn no_network(argv: &[String], nodes: usize, m: usize, timeout: Duration) -> Result<Burst> {
    let envs = local_envs("no-network", m, 20_000, nodes);
    let (submitted, outputs) =
        crate::no_network::run(&envs, argv, nodes, "10.240.0.0/24", timeout, None)?;
    measured(submitted, outputs.iter().map(|o| &o.stdout))
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

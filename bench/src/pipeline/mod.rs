//! `particle bench pipeline`: the video pipeline, the same job in the same
//! run, launched by each system; reports each one's job time (submission to
//! the last function's end) and the ratio hand-built Linux overlay / Particle.
//! Every run's output is decoded and checked before its time counts. The
//! job itself (its command line, what its outputs say) is [`job`]'s; the
//! demo runs it on Particle alone ([`on_particle`]).

mod job;

pub use job::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use particle_cluster::{tenants, LocalCluster, Options};
use particle_wire::api::Job;
use particle_workloads::local::local_envs;
use serde::Serialize;

use crate::jobs::{launch_job, ScratchDir};
use crate::pipeline_baseline::Baseline;

#[derive(clap::Args, Debug, Clone)]
pub struct PipelineArgs {
    /// Nodes (namespaced hosts) the functions are spread over.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Functions (one chunk of the video each).
    #[arg(long, default_value_t = 200)]
    pub functions: usize,
    /// Frames each function encodes (320x240).
    #[arg(long, default_value_t = 4)]
    pub frames_per_function: usize,
    /// The local cluster's controller port (relayed on 127.0.0.1).
    #[arg(long, default_value_t = 7791)]
    pub port: u16,
    /// The cluster's underlay subnet (inside its namespaces only).
    #[arg(long, default_value = "10.252.0.0/24")]
    pub underlay: String,
    /// Where the outputs go (one file per system).
    #[arg(long, default_value = "particle-bench-pipeline")]
    pub dir: PathBuf,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct SystemResult {
    /// Time to make the systems' networks ready before the job (not in job_s
    /// for Particle, whose pools are warm before the burst).
    pub prepare_s: f64,
    #[serde(flatten)]
    pub run: PipelineResult,
}

#[derive(Debug, Serialize)]
pub struct PipelineReport {
    pub functions: usize,
    pub nodes: usize,
    pub frames: usize,
    /// Particle, warm pools.
    pub particle: SystemResult,
    /// No per-function network: plain processes sharing one namespace's
    /// loopback. The floor: the job's own time.
    pub no_network: SystemResult,
    /// Bridges and VXLAN wired by hand with iproute2, each function's
    /// network built at launch (`crate::pipeline_baseline`).
    pub linux_overlay: SystemResult,
    /// The CNI reference `bridge` plugin per function, host-gw routes
    /// between nodes (`crate::pipeline_baseline`).
    pub cni_bridge: SystemResult,
    /// Hand-built Linux overlay job time / Particle job time.
    pub ratio: f64,
}

pub fn run(args: &PipelineArgs) -> Result<PipelineReport> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the pipeline benchmark builds network namespaces: run it as root"
    );
    anyhow::ensure!(
        args.nodes >= 1 && args.functions >= 1,
        "need at least one node and one function"
    );
    let program = video_program()?;
    let dir = absolute(&args.dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let spec_for = |system: &str| PipelineSpec {
        nice: Some(10),
        ..PipelineSpec::new(
            args.functions,
            args.frames_per_function,
            dir.join(format!("{system}.h264")),
        )
    };

    let no_network = run_no_network(&spec_for("no-network"), args.nodes, &program)?;
    // The hand-built overlay: bridges and VXLAN wired with iproute2.
    let linux_overlay = run_baseline(
        &spec_for("linux-overlay"),
        &program,
        "linux-overlay",
        || Baseline::linux_overlay(args.nodes, "10.250.0.0/24", [10, 249]),
    )?;
    // The CNI bridge plugin: nodes' routes set first, each function's
    // network added by the plugin.
    let cni_bridge = run_baseline(&spec_for("cni-bridge"), &program, "cni-bridge", || {
        Baseline::cni_bridge(args.nodes, "10.248.0.0/24", [10, 247])
    })?;
    let particle = run_particle(&spec_for("particle"), args, &program)?;
    Ok(PipelineReport {
        functions: args.functions,
        nodes: args.nodes,
        frames: particle.run.frames,
        ratio: linux_overlay.run.job_s / particle.run.job_s,
        particle,
        no_network,
        linux_overlay,
        cni_bridge,
    })
}

/// Particle: a local cluster, a tenant whose pools are prewarmed for the
/// burst (before the clock starts, as a platform keeps them), then the job
/// through the launch API.
fn run_particle(spec: &PipelineSpec, args: &PipelineArgs, program: &Path) -> Result<SystemResult> {
    let cluster = Options::processes(
        args.nodes,
        &args.underlay,
        args.port,
        args.functions.div_ceil(args.nodes),
        16,
    );
    let tenant = PipelineTenant {
        name: "bench",
        vni: 4343,
        subnet: "10.96.0.0/12",
    };
    let run = on_particle(&cluster, &tenant, spec, program, |_| {})?;
    Ok(SystemResult {
        prepare_s: run.prepare.as_secs_f64(),
        run: evaluate(spec, run.submitted, &run.runs).context("Particle's run")?,
    })
}

/// The tenant the pipeline runs on.
pub struct PipelineTenant<'a> {
    pub name: &'a str,
    pub vni: u32,
    pub subnet: &'a str,
}

/// One pipeline job on Particle.
pub struct ParticleRun {
    /// Creating the tenant and warming its pools for the burst (before the
    /// job's clock starts).
    pub prepare: Duration,
    /// When the job was submitted (wall ns).
    pub submitted: u128,
    pub job: Job,
    pub runs: Vec<FunctionRun>,
}

/// Starts `cluster`, creates `tenant` with pools warm for the whole burst
/// (its share of the functions on every node), tells `prepared` how long
/// that took, launches the pipeline on it through the launch API and waits
/// for it; the cluster is gone when this returns.
pub fn on_particle(
    cluster: &Options,
    tenant: &PipelineTenant,
    spec: &PipelineSpec,
    program: &Path,
    prepared: impl FnOnce(Duration),
) -> Result<ParticleRun> {
    let per_node = spec.functions.div_ceil(cluster.nodes);
    // Sandboxed functions write only where the job lets them: staged, then copied out.
    let staging = ScratchDir::staging("pipeline")?;
    let staged = PipelineSpec {
        output: staging.stage(&spec.output)?,
        ..spec.clone()
    };
    let cluster = LocalCluster::start(cluster)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let api = cluster.api()?;
        let prepare =
            tenants::prepare(&api, tenant.name, tenant.vni, tenant.subnet, per_node).await?;
        prepared(prepare);
        let argv = staged.argv(program);
        let (submitted, job, runs) = launch_job(
            &api,
            tenant.name,
            argv,
            spec.functions,
            spec.timeout,
            Some(staging.dir()),
        )
        .await?;
        std::fs::copy(&staged.output, &spec.output)
            .with_context(|| format!("writing {}", spec.output.display()))?;
        Ok(ParticleRun {
            prepare,
            submitted,
            job,
            runs,
        })
    })
}

/// The `particle-video` binary next to this one (the function's program).
pub fn video_program() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the particle binary")?;
    let program = exe.with_file_name("particle-video");
    if !program.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p particle-video`",
            program.display()
        );
    }
    Ok(program)
}

/// An absolute path (functions do not share our working directory).
pub fn absolute(path: &Path) -> Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    })
}

/// A hand-built baseline (`crate::pipeline_baseline`): its nodes wired by
/// `build` before the clock starts, each function's network built at launch.
fn run_baseline(
    spec: &PipelineSpec,
    program: &Path,
    system: &str,
    build: impl FnOnce() -> Result<Baseline>,
) -> Result<SystemResult> {
    let start = std::time::Instant::now();
    let mut baseline = build()?;
    let prepare_s = start.elapsed().as_secs_f64();
    let (submitted, runs) = baseline.launch(&spec.argv(program), spec.functions, spec.timeout)?;
    Ok(SystemResult {
        prepare_s,
        run: evaluate(spec, submitted, &runs).with_context(|| format!("the {system} run"))?,
    })
}

/// The floor: the same functions started by Particle's launcher, one per
/// node in parallel, with no network of their own (`crate::no_network`).
fn run_no_network(spec: &PipelineSpec, nodes: usize, program: &Path) -> Result<SystemResult> {
    let envs = local_envs("no-network", spec.functions, 20_000, nodes);
    // The floor's functions are sandboxed like Particle's: staged output.
    let staging = ScratchDir::staging("pipeline-floor")?;
    let staged = PipelineSpec {
        output: staging.stage(&spec.output)?,
        ..spec.clone()
    };
    let argv = staged.argv(program);
    let (submitted, outputs) = crate::no_network::run(
        &envs,
        &argv,
        nodes,
        "10.251.0.0/24",
        spec.timeout,
        Some(staging.dir()),
    )?;
    std::fs::copy(&staged.output, &spec.output)
        .with_context(|| format!("writing {}", spec.output.display()))?;
    let runs: Vec<FunctionRun> = outputs
        .into_iter()
        .map(|o| FunctionRun {
            rank: o.rank,
            node: envs[o.rank].node.clone(),
            stdout: o.stdout,
        })
        .collect();
    Ok(SystemResult {
        prepare_s: 0.0,
        run: evaluate(spec, submitted, &runs).context("the no-network run")?,
    })
}

pub fn render(r: &PipelineReport) -> String {
    let mut s =
        format!(
        "video pipeline: {} functions on {} nodes, {} frames\n{:<14} {:>9} {:>12} {:>12} {:>12}\n",
        r.functions, r.nodes, r.frames, "system", "job (s)", "start p50", "start p99", "prepare (s)"
    );
    for (name, sys) in [
        ("particle", &r.particle),
        ("linux overlay", &r.linux_overlay),
        ("cni bridge", &r.cni_bridge),
        ("no network", &r.no_network),
    ] {
        s += &format!(
            "{:<14} {:>9.3} {:>9.1} ms {:>9.1} ms {:>12.2}\n",
            name, sys.run.job_s, sys.run.startup_p50_ms, sys.run.startup_p99_ms, sys.prepare_s
        );
    }
    s += &format!("linux overlay / particle job time: {:.2}x\n", r.ratio);
    s
}

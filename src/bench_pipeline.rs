//! `particle bench pipeline`: the video pipeline, the same job in the same
//! run, launched by each system; reports each one's job time (submission to
//! the last function's end) and the ratio hand-built Linux overlay / Particle.
//! Every run's output is decoded and checked before its time counts.

use std::path::PathBuf;

use anyhow::{Context, Result};
use particle_bench::pipeline::{evaluate, FunctionRun, PipelineResult, PipelineSpec};
use particle_bench::pipeline_baseline::Baseline;
use particle_workloads::local::local_envs;
use serde::Serialize;

use crate::demo::{absolute, launch_pipeline, local_cluster, prepare_tenant, video_program};

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
    /// network built at launch (`particle_bench::pipeline_baseline`).
    pub linux_overlay: SystemResult,
    /// The CNI reference `bridge` plugin per function, host-gw routes
    /// between nodes (`particle_bench::pipeline_baseline`).
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

    // Particle's and the floor's sandboxed functions write only under their
    // private /tmp (or the image): their streams are made in a staging
    // directory there and copied to `dir` after.
    let staging =
        std::env::temp_dir().join(format!("particle-bench-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&staging)?;
    let _staging = crate::demo::RemoveDir(staging.clone());
    let sandboxed = |system: &str, run: &dyn Fn(&PipelineSpec) -> Result<SystemResult>| {
        let spec = PipelineSpec {
            output: staging.join(format!("{system}.h264")),
            ..spec_for(system)
        };
        let mut result = run(&spec)?;
        let output = dir.join(format!("{system}.h264"));
        std::fs::copy(&spec.output, &output)
            .with_context(|| format!("writing {}", output.display()))?;
        result.run.output = output;
        anyhow::Ok(result)
    };
    let no_network = sandboxed("no-network", &|s| run_no_network(s, args.nodes, &program))?;
    let linux_overlay = run_linux_overlay(&spec_for("linux-overlay"), args.nodes, &program)?;
    let cni_bridge = run_cni_bridge(&spec_for("cni-bridge"), args.nodes, &program)?;
    let particle = sandboxed("particle", &|s| run_particle(s, args, &program))?;
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
fn run_particle(
    spec: &PipelineSpec,
    args: &PipelineArgs,
    program: &std::path::Path,
) -> Result<SystemResult> {
    let per_node = args.functions.div_ceil(args.nodes);
    let cluster = local_cluster(args.nodes, args.port, &args.underlay, per_node, 16)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let api = cluster.api()?;
        let prepare = prepare_tenant(&api, "bench", 4343, "10.96.0.0/12", per_node).await?;
        let (submitted, _job, runs) = launch_pipeline(&api, "bench", spec, program).await?;
        Ok(SystemResult {
            prepare_s: prepare.as_secs_f64(),
            run: evaluate(spec, submitted, &runs).context("Particle's run")?,
        })
    })
}

/// The hand-built overlay: nodes wired before the clock starts, each
/// function's network built at launch.
fn run_linux_overlay(
    spec: &PipelineSpec,
    nodes: usize,
    program: &std::path::Path,
) -> Result<SystemResult> {
    let start = std::time::Instant::now();
    let mut overlay = Baseline::linux_overlay(nodes, "10.250.0.0/24", [10, 249])?;
    let prepare_s = start.elapsed().as_secs_f64();
    let (submitted, runs) = overlay.launch(&spec.argv(program), spec.functions, spec.timeout)?;
    Ok(SystemResult {
        prepare_s,
        run: evaluate(spec, submitted, &runs).context("the linux-overlay run")?,
    })
}

/// The CNI bridge plugin: nodes' routes set before the clock starts, each
/// function's network added by the plugin at launch.
fn run_cni_bridge(
    spec: &PipelineSpec,
    nodes: usize,
    program: &std::path::Path,
) -> Result<SystemResult> {
    let start = std::time::Instant::now();
    let mut cni = Baseline::cni_bridge(nodes, "10.248.0.0/24", [10, 247])?;
    let prepare_s = start.elapsed().as_secs_f64();
    let (submitted, runs) = cni.launch(&spec.argv(program), spec.functions, spec.timeout)?;
    Ok(SystemResult {
        prepare_s,
        run: evaluate(spec, submitted, &runs).context("the cni-bridge run")?,
    })
}

/// The floor: the same functions started by Particle's launcher, one per
/// node in parallel, with no network of their own (`particle_bench::no_network`).
fn run_no_network(
    spec: &PipelineSpec,
    nodes: usize,
    program: &std::path::Path,
) -> Result<SystemResult> {
    let envs = local_envs("no-network", spec.functions, 20_000, nodes);
    let argv = spec.argv(program);
    let dir = crate::demo::writable_output_dir(&spec.output)?;
    let (submitted, outputs) = particle_bench::no_network::run(
        &envs,
        &argv,
        nodes,
        "10.251.0.0/24",
        spec.timeout,
        Some(&dir),
    )?;
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

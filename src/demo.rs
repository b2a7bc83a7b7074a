//! `particle demo`: the video pipeline on a local cluster, end to end, with
//! embedded defaults. It starts a local cluster (the machinery of `particle
//! cluster up`, its processes children that die with us), creates a tenant,
//! prewarms its pools, launches the pipeline through the burst launch API,
//! checks the output by decoding it, prints a summary and writes the
//! timeline plot. The run on Particle is the pipeline benchmark's
//! (`particle_bench::pipeline::on_particle`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use particle_bench::pipeline::{
    absolute, evaluate, on_particle, timeline_rows, video_program, PipelineResult, PipelineSpec,
    PipelineTenant,
};
use particle_cluster::Options;
use serde::Serialize;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Nodes of the local cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Functions (one chunk of the video each).
    #[arg(long, default_value_t = 24)]
    pub functions: usize,
    /// Frames each function encodes.
    #[arg(long, default_value_t = 8)]
    pub frames_per_function: usize,
    #[arg(long, default_value_t = 320)]
    pub width: usize,
    #[arg(long, default_value_t = 240)]
    pub height: usize,
    /// The H.264 stream the pipeline writes.
    #[arg(long, default_value = "particle-demo.h264")]
    pub output: PathBuf,
    /// The timeline plot (SVG).
    #[arg(long, default_value = "particle-demo-timeline.svg")]
    pub plot: PathBuf,
    /// The local cluster's controller port (relayed on 127.0.0.1).
    #[arg(long, default_value_t = 7790)]
    pub port: u16,
    /// The cluster's underlay subnet (inside its namespaces only).
    #[arg(long, default_value = "10.253.0.0/24")]
    pub underlay: String,
    /// The demo tenant's overlay subnet.
    #[arg(long, default_value = "10.230.0.0/16")]
    pub subnet: String,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct DemoSummary {
    #[serde(flatten)]
    result: PipelineResult,
    launch_ms: f64,
    warm: usize,
    cold: usize,
    prewarm_s: f64,
    plot: PathBuf,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo starts a local cluster (network namespaces): run it as root");
    }
    anyhow::ensure!(
        args.nodes >= 1 && args.functions >= 1,
        "need at least one node and one function"
    );
    let program = video_program()?;
    let mut spec = PipelineSpec::new(
        args.functions,
        args.frames_per_function,
        absolute(&args.output)?,
    );
    // The whole burst encodes at once: keep the agents' heartbeats ahead of it.
    spec.nice = Some(10);
    spec.width = args.width;
    spec.height = args.height;
    let plot = absolute(&args.plot)?;
    let per_node = args.functions.div_ceil(args.nodes);

    eprintln!("starting a local cluster of {} nodes ...", args.nodes);
    let cluster = Options::processes(args.nodes, &args.underlay, args.port, per_node, 16);
    let tenant = PipelineTenant {
        name: "demo",
        vni: 4242,
        subnet: &args.subnet,
    };
    let run = on_particle(&cluster, &tenant, &spec, &program, |prewarm| {
        eprintln!(
            "tenant demo ({}): {per_node} warm endpoints per node in {:.1} s; launching {} functions ...",
            args.subnet,
            prewarm.as_secs_f64(),
            args.functions
        );
    })?;
    let result = evaluate(&spec, run.submitted, &run.runs)?;
    let rows = timeline_rows(run.submitted, &run.runs);
    let summary = DemoSummary {
        result,
        launch_ms: run.job.launch_ms,
        warm: run.job.warm,
        cold: run.job.cold,
        prewarm_s: run.prepare.as_secs_f64(),
        plot: plot.clone(),
    };

    let title = format!(
        "video pipeline on Particle: {} functions on {} nodes, {} frames {}x{}",
        summary.result.functions,
        summary.result.nodes,
        summary.result.frames,
        summary.result.width,
        summary.result.height
    );
    particle_bench::timeline::write_svg(&plot, &title, &rows)
        .with_context(|| format!("writing {}", plot.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", render(&summary));
    }
    Ok(())
}

fn render(s: &DemoSummary) -> String {
    let r = &s.result;
    format!(
        "video pipeline on Particle\n\
         \x20 functions   {} on {} nodes ({} warm, {} cold endpoints)\n\
         \x20 startup     p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (submission to function start)\n\
         \x20 launch      {:.1} ms (API: request to every function started)\n\
         \x20 job         {:.3} s (submission to the last function's end)\n\
         \x20 exchange    {} boundary frames, {} across nodes\n\
         \x20 output      {} ({} frames {}x{}, {} bytes, decoded and checked)\n\
         \x20 timeline    {}\n",
        r.functions,
        r.nodes,
        s.warm,
        s.cold,
        r.startup_p50_ms,
        r.startup_p90_ms,
        r.startup_p99_ms,
        r.startup_max_ms,
        s.launch_ms,
        r.job_s,
        r.exchanges,
        r.cross_node_exchanges,
        r.output.display(),
        r.frames,
        r.width,
        r.height,
        r.output_bytes,
        s.plot.display()
    )
}

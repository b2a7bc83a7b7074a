//! `particle demo`: the video pipeline on a local cluster, end to end, with
//! embedded defaults. It starts `particle cluster up` (the same machinery
//! as the command, as a child that dies with us), creates a tenant, prewarms
//! its pools, launches the pipeline through the burst launch API, checks the
//! output by decoding it, prints a summary and writes the timeline plot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_bench::pipeline::{
    evaluate, timeline_rows, FunctionRun, PipelineResult, PipelineSpec,
};
use particle_wire::api::{
    CreateTenant, FunctionCommand, Job, JobState, LaunchJob, Node, Placement, RuntimeKind, Tenant,
    WarmTarget,
};
use particle_wire::client::{ApiClient, Method};
use particle_workloads::ring::now_ns;
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

/// A local cluster for the demo and the benchmarks, in this process: warm
/// endpoints per tenant per node `pool_size`, tenant-free ones `free_pool_size`.
pub fn local_cluster(
    nodes: usize,
    port: u16,
    underlay: &str,
    pool_size: usize,
    free_pool_size: usize,
) -> Result<crate::cluster::LocalCluster> {
    crate::cluster::LocalCluster::start(
        &crate::cluster::UpOptions {
            nodes,
            underlay: underlay.to_string(),
            port,
            pool_size,
            free_pool_size,
            heartbeat_timeout: None,
        },
        false,
    )
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

/// Creates `tenant`, sets its warm target to cover the burst and waits
/// until every node has that many endpoints ready.
pub async fn prepare_tenant(
    api: &ApiClient,
    tenant: &str,
    vni: u32,
    subnet: &str,
    per_node: usize,
) -> Result<Duration> {
    let _: Tenant = api
        .call(
            Method::POST,
            "/v1/tenants",
            Some(&CreateTenant {
                name: tenant.into(),
                vni,
                subnet: subnet.into(),
                block_prefix: None,
                warm_per_node: Some(per_node),
            }),
        )
        .await
        .context("creating the tenant")?;
    let _: Tenant = api
        .call(
            Method::PUT,
            &format!("/v1/tenants/{tenant}/warm"),
            Some(&WarmTarget {
                per_node: Some(per_node),
            }),
        )
        .await
        .context("setting the warm target")?;
    warm_up(api, tenant, per_node).await
}

/// Waits until every node has `per_node` endpoints of `tenant` ready.
pub async fn warm_up(api: &ApiClient, tenant: &str, per_node: usize) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let nodes: Vec<Node> = api.call::<(), _>(Method::GET, "/v1/nodes", None).await?;
        let ready: Vec<usize> = nodes
            .iter()
            .filter(|n| n.api_port.is_some())
            .map(|n| n.pools.get(tenant).map_or(0, |p| p.ready))
            .collect();
        if !ready.is_empty() && ready.iter().all(|r| *r >= per_node) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("pools not warm after 300 s: {ready:?} of {per_node} per node");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Launches the pipeline on `tenant` and waits for it; returns when it was
/// submitted (wall ns), the job, and every function's run.
pub async fn launch_pipeline(
    api: &ApiClient,
    tenant: &str,
    spec: &PipelineSpec,
    program: &Path,
) -> Result<(u128, Job, Vec<FunctionRun>)> {
    let dir = writable_output_dir(&spec.output)?;
    launch_job_writing(
        api,
        tenant,
        spec.argv(program),
        spec.functions,
        spec.timeout,
        Some(dir.display().to_string()),
    )
    .await
}

/// The directory of `output`, made writable for functions (which run as
/// their tenant's unprivileged uid and may write only the directory a job
/// names: `LaunchJob::output_dir`).
pub fn writable_output_dir(output: &Path) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = output
        .parent()
        .context("the output has no directory")?
        .to_path_buf();
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))
        .with_context(|| format!("opening {} to functions", dir.display()))?;
    Ok(dir)
}

/// [`launch_job_writing`] without an output directory.
pub async fn launch_job(
    api: &ApiClient,
    tenant: &str,
    argv: Vec<String>,
    functions: usize,
    timeout: Duration,
) -> Result<(u128, Job, Vec<FunctionRun>)> {
    launch_job_writing(api, tenant, argv, functions, timeout, None).await
}

/// Launches `functions` copies of `argv` on `tenant` through the launch API
/// and waits for the job to end; fails unless every function exited 0.
pub async fn launch_job_writing(
    api: &ApiClient,
    tenant: &str,
    argv: Vec<String>,
    functions: usize,
    timeout: Duration,
    output_dir: Option<String>,
) -> Result<(u128, Job, Vec<FunctionRun>)> {
    let request = LaunchJob {
        tenant: tenant.into(),
        functions,
        command: FunctionCommand {
            argv,
            env: Default::default(),
        },
        placement: Placement::default(),
        runtime: RuntimeKind::Builtin,
        port: None,
        limits: Default::default(),
        image: None,
        output_dir,
    };
    let submitted = now_ns();
    let job: Job = api
        .call(Method::POST, "/v1/jobs", Some(&request))
        .await
        .context("launching the job")?;
    let deadline = Instant::now() + timeout + Duration::from_secs(30);
    let job = loop {
        let path = format!("/v1/jobs/{}?wait_s=5&output=true", job.id);
        let job: Job = api.call::<(), _>(Method::GET, &path, None).await?;
        if job.state != JobState::Running {
            break job;
        }
        if Instant::now() > deadline {
            let _: Result<Job, _> = api
                .call::<(), _>(Method::DELETE, &format!("/v1/jobs/{}", job.id), None)
                .await;
            bail!("job {} did not end in time; cancelled", job.id);
        }
    };
    if job.state != JobState::Succeeded {
        let failed: Vec<String> = job
            .functions
            .iter()
            .filter(|f| f.exit_code != Some(0))
            .take(3)
            .map(|f| {
                format!(
                    "rank {} on {}: {:?} {}\n{}",
                    f.rank,
                    f.node,
                    f.exit_code,
                    f.error.clone().unwrap_or_default(),
                    f.output.clone().unwrap_or_default()
                )
            })
            .collect();
        bail!(
            "job {} ended {:?}:\n{}",
            job.id,
            job.state,
            failed.join("\n")
        );
    }
    let runs = job
        .functions
        .iter()
        .map(|f| FunctionRun {
            rank: f.rank,
            node: f.node.clone(),
            stdout: f.output.clone().unwrap_or_default(),
        })
        .collect();
    Ok((submitted, job, runs))
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
    let output = absolute(&args.output)?;
    // Functions write only under their private /tmp or the image: the stream
    // is made in a staging directory there and moved to `output` after.
    let staging = std::env::temp_dir().join(format!("particle-demo-{}", std::process::id()));
    let _staging = RemoveDir(staging.clone());
    let file_name = output.file_name().context("the output names no file")?;
    let mut spec = PipelineSpec::new(
        args.functions,
        args.frames_per_function,
        staging.join(file_name),
    );
    // The whole burst encodes at once: keep the agents' heartbeats ahead of it.
    spec.nice = Some(10);
    spec.width = args.width;
    spec.height = args.height;
    let plot = absolute(&args.plot)?;
    let per_node = args.functions.div_ceil(args.nodes);

    eprintln!("starting a local cluster of {} nodes ...", args.nodes);
    let cluster = local_cluster(args.nodes, args.port, &args.underlay, per_node, 16)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let (summary, rows) = runtime.block_on(async {
        let api = cluster.api()?;
        let prewarm = prepare_tenant(&api, "demo", 4242, &args.subnet, per_node).await?;
        eprintln!(
            "tenant demo ({}): {per_node} warm endpoints per node in {:.1} s; launching {} functions ...",
            args.subnet,
            prewarm.as_secs_f64(),
            args.functions
        );
        let (submitted, job, runs) = launch_pipeline(&api, "demo", &spec, &program).await?;
        let mut result = evaluate(&spec, submitted, &runs)?;
        std::fs::copy(&spec.output, &output)
            .with_context(|| format!("writing {}", output.display()))?;
        result.output = output.clone();
        let rows = timeline_rows(submitted, &runs);
        anyhow::Ok((
            DemoSummary {
                result,
                launch_ms: job.launch_ms,
                warm: job.warm,
                cold: job.cold,
                prewarm_s: prewarm.as_secs_f64(),
                plot: plot.clone(),
            },
            rows,
        ))
    })?;
    drop(cluster);

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

/// Removes a directory when dropped, however the run ends.
pub struct RemoveDir(pub std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

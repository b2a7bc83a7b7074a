//! `particle launch` and `particle job ...`: the user's side of the burst
//! launch API (see `particle_controller::api`).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_wire::api::{
    FunctionCommand, FunctionLimits, FunctionState, Job, JobState, JobSummary, LaunchJob, Node,
    Placement, RuntimeKind, Tenant, WarmTarget,
};
use particle_wire::client::{ApiClient, Method};

/// How to reach the controller.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerFlags {
    /// The controller (a local cluster relays it on 127.0.0.1:7700), or several (`a:7700,b:7700`): requests go to their leader.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub controller: particle_wire::client::Controllers,
    /// File with the bearer token [default: the running local cluster's].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

impl ControllerFlags {
    pub fn client(&self) -> Result<ApiClient> {
        let path = match &self.token_file {
            Some(p) => p.clone(),
            None => local_cluster_token()?,
        };
        Ok(ApiClient::direct_to_any(
            self.controller.0.clone(),
            crate::config::read_token(&path)?,
        ))
    }
}

/// The token of the one local cluster running on this machine.
fn local_cluster_token() -> Result<PathBuf> {
    let found: Vec<PathBuf> = particle_cluster::running()
        .into_iter()
        .map(|(_, dir)| dir.join("token"))
        .filter(|p| p.exists())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no --token-file given and no local cluster running (`particle cluster up`)"),
        _ => bail!("several local clusters are running: say which with --token-file"),
    }
}

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub api: ControllerFlags,
    /// The tenant whose overlay the functions join.
    #[arg(long)]
    pub tenant: String,
    /// How many functions.
    #[arg(long, short = 'n')]
    pub functions: usize,
    /// Only on these nodes (repeat the flag).
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// At most this many functions per node.
    #[arg(long)]
    pub max_per_node: Option<usize>,
    /// Start functions through the nodes' OCI runtime (runc) instead of the built-in launcher.
    #[arg(long)]
    pub oci: bool,
    /// Extra environment, KEY=VALUE (repeat the flag).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The port every function listens on (its PARTICLE_PEERS entry).
    #[arg(long)]
    pub port: Option<u16>,
    /// Warm enough endpoints on every node first, and wait for them.
    #[arg(long)]
    pub prewarm: bool,
    /// Return once started instead of waiting for the job to end.
    #[arg(long)]
    pub detach: bool,
    /// Print every function's output when the job ends.
    #[arg(long)]
    pub output: bool,
    /// Print the job as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Each function's process limit [default: the agents' setting].
    #[arg(long)]
    pub pids: Option<u64>,
    /// Each function's memory limit, MiB, its /tmp included [default: the agents' setting].
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Each function's CPU weight, 1..=10000 [default: the agents' setting, 100].
    #[arg(long)]
    pub cpu_weight: Option<u64>,
    /// Size of each function's private /tmp, MiB [default: the agents' setting].
    #[arg(long)]
    pub tmp_mb: Option<u64>,
    /// The functions' root file system: a directory on the nodes or an unpacked OCI image [default: the agents' image].
    #[arg(long)]
    pub image: Option<String>,
    /// The program and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(clap::Subcommand, Debug)]
pub enum JobCommand {
    /// Every job the controller knows.
    List {
        #[command(flatten)]
        api: ControllerFlags,
    },
    /// A job's state and its functions.
    Status {
        #[command(flatten)]
        api: ControllerFlags,
        id: String,
        /// Include every function's output.
        #[arg(long)]
        output: bool,
    },
    /// Kills what still runs and returns the endpoints.
    Cancel {
        #[command(flatten)]
        api: ControllerFlags,
        id: String,
    },
    /// What one function printed; `--follow` streams it until the job ends.
    Output {
        #[command(flatten)]
        api: ControllerFlags,
        id: String,
        rank: usize,
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

pub fn launch(args: LaunchArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let api = args.api.client()?;
        if args.prewarm {
            prewarm(&api, &args).await?;
        }
        let request = LaunchJob {
            tenant: args.tenant.clone(),
            functions: args.functions,
            command: FunctionCommand {
                argv: args.command.clone(),
                env: args.env.iter().cloned().collect::<BTreeMap<_, _>>(),
            },
            placement: Placement {
                nodes: (!args.nodes.is_empty()).then(|| args.nodes.clone()),
                max_per_node: args.max_per_node,
            },
            runtime: if args.oci {
                RuntimeKind::Oci
            } else {
                RuntimeKind::Builtin
            },
            port: args.port,
            limits: FunctionLimits {
                pids: args.pids,
                memory_mb: args.memory_mb,
                cpu_weight: args.cpu_weight,
                tmp_mb: args.tmp_mb,
            },
            image: args.image.clone(),
            output_dir: None,
        };
        let job: Job = api
            .call(Method::POST, "/v1/jobs", Some(&request))
            .await
            .context("launching")?;
        let started = job
            .functions
            .iter()
            .filter(|f| f.state != FunctionState::Failed)
            .count();
        eprintln!(
            "job {}: {started}/{} functions started in {:.1} ms ({} warm, {} bound, {} cold endpoints)",
            job.id,
            job.functions.len(),
            job.launch_ms,
            job.warm,
            job.bound,
            job.cold
        );
        if args.detach {
            return print_job(&job, args.json);
        }
        let job = follow(&api, &job.id, args.output).await?;
        print_job(&job, args.json)?;
        // With --json every function's output is in the JSON: stdout stays one document.
        if args.output && !args.json {
            for f in &job.functions {
                println!("--- rank {} on {} ---", f.rank, f.node);
                print!("{}", f.output.as_deref().unwrap_or(""));
            }
        }
        match job.state {
            JobState::Succeeded => Ok(()),
            state => bail!("job {} ended {state:?}", job.id),
        }
    })
}

/// Sets the tenant's warm target to cover the burst and waits until every
/// node reports that many ready.
async fn prewarm(api: &ApiClient, args: &LaunchArgs) -> Result<()> {
    let nodes: Vec<Node> = api.call::<(), _>(Method::GET, "/v1/nodes", None).await?;
    let nodes: Vec<Node> = nodes
        .into_iter()
        .filter(|n| n.api_port.is_some() && (args.nodes.is_empty() || args.nodes.contains(&n.name)))
        .collect();
    anyhow::ensure!(!nodes.is_empty(), "no node can launch functions");
    let per_node = args.functions.div_ceil(nodes.len());
    let path = format!("/v1/tenants/{}/warm", args.tenant);
    let _: Tenant = api
        .call(
            Method::PUT,
            &path,
            Some(&WarmTarget {
                per_node: Some(per_node),
            }),
        )
        .await
        .context("setting the warm target")?;
    let start = Instant::now();
    loop {
        let nodes: Vec<Node> = api.call::<(), _>(Method::GET, "/v1/nodes", None).await?;
        let ready: Vec<usize> = nodes
            .iter()
            .filter(|n| args.nodes.is_empty() || args.nodes.contains(&n.name))
            .filter(|n| n.api_port.is_some())
            .map(|n| n.pools.get(&args.tenant).map_or(0, |p| p.ready))
            .collect();
        let total: usize = ready.iter().map(|r| (*r).min(per_node)).sum();
        progress(&format!(
            "prewarming: {total}/{} endpoints ready",
            per_node * ready.len()
        ));
        if ready.iter().all(|r| *r >= per_node) {
            eprintln!();
            eprintln!(
                "prewarmed {per_node} endpoints per node in {:.1} s",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("pools not warm after 300 s: {ready:?} of {per_node} per node");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn progress(line: &str) {
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[2K{line}");
    }
    let _ = err.flush();
}

/// Waits for the job to end, drawing a progress bar on a terminal.
async fn follow(api: &ApiClient, id: &str, output: bool) -> Result<Job> {
    loop {
        let path = format!("/v1/jobs/{id}?wait_s=1&output={output}");
        let job: Job = api.call::<(), _>(Method::GET, &path, None).await?;
        let total = job.functions.len().max(1);
        let done = job
            .functions
            .iter()
            .filter(|f| f.state != FunctionState::Running)
            .count();
        let failed = job
            .functions
            .iter()
            .filter(|f| f.state != FunctionState::Running && f.exit_code != Some(0))
            .count();
        let width = 40;
        let filled = done * width / total;
        progress(&format!(
            "[{}{}] {done}/{total} ended, {failed} not ok",
            "=".repeat(filled),
            " ".repeat(width - filled)
        ));
        if job.state != JobState::Running {
            if std::io::stderr().is_terminal() {
                eprintln!();
            }
            return Ok(job);
        }
    }
}

fn print_job(job: &Job, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(job)?);
        return Ok(());
    }
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for f in &job.functions {
        let key = match (f.state, f.exit_code) {
            (FunctionState::Exited, Some(c)) => format!("exit {c}"),
            (state, _) => format!("{state:?}").to_lowercase(),
        };
        *states.entry(key).or_default() += 1;
    }
    println!(
        "job {} ({}): {:?}, {} functions, launch {:.1} ms{}",
        job.id,
        job.tenant,
        job.state,
        job.functions.len(),
        job.launch_ms,
        job.duration_ms
            .map(|d| format!(", ended after {:.1} ms", d))
            .unwrap_or_default()
    );
    for (state, n) in &states {
        println!("  {n:>6} {state}");
    }
    for f in job
        .functions
        .iter()
        .filter(|f| {
            f.error.is_some() || (f.state == FunctionState::Exited && f.exit_code != Some(0))
        })
        .take(5)
    {
        println!(
            "  rank {} on {}: {}",
            f.rank,
            f.node,
            f.error
                .clone()
                .unwrap_or_else(|| format!("exit {:?}", f.exit_code)),
        );
        if let Some(reason) = &f.reason {
            println!("    {reason}");
        }
    }
    Ok(())
}

pub fn job(command: JobCommand) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match command {
            JobCommand::List { api } => {
                let jobs: Vec<JobSummary> = api
                    .client()?
                    .call::<(), _>(Method::GET, "/v1/jobs", None)
                    .await?;
                for j in jobs {
                    println!(
                        "{:<20} {:<12} {:<10?} {}/{} ended",
                        j.id, j.tenant, j.state, j.exited, j.functions
                    );
                }
                Ok(())
            }
            JobCommand::Status { api, id, output } => {
                let path = format!("/v1/jobs/{id}?output={output}");
                let job: Job = api
                    .client()?
                    .call::<(), _>(Method::GET, &path, None)
                    .await?;
                print_job(&job, output)
            }
            JobCommand::Cancel { api, id } => {
                let path = format!("/v1/jobs/{id}");
                let job: Job = api
                    .client()?
                    .call::<(), _>(Method::DELETE, &path, None)
                    .await?;
                print_job(&job, false)
            }
            JobCommand::Output {
                api,
                id,
                rank,
                follow,
            } => stream_output(&api.client()?, &id, rank, follow).await,
        }
    })
}

async fn stream_output(api: &ApiClient, id: &str, rank: usize, follow: bool) -> Result<()> {
    let mut offset = 0usize;
    let mut out = std::io::stdout();
    loop {
        let path = format!("/v1/jobs/{id}/functions/{rank}/output?offset={offset}");
        let bytes = api.send::<()>(Method::GET, &path, None).await?;
        offset += bytes.len();
        out.write_all(&bytes)?;
        out.flush()?;
        if !follow {
            return Ok(());
        }
        let job: Job = api
            .call::<(), _>(Method::GET, &format!("/v1/jobs/{id}"), None)
            .await?;
        let ended = job
            .functions
            .get(rank)
            .is_none_or(|f| f.state != FunctionState::Running);
        if ended && bytes.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

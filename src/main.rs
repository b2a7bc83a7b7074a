//! `particle`: the one command operators run.

mod bench_pipeline;
mod bench_soak;
mod bench_startup;
mod cluster;
mod config;
mod demo;
mod launch;

use anyhow::{Context, Result};
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
        bench: Bench,
    },
    /// A local cluster: N namespaced nodes, a controller and N agents.
    Cluster {
        #[command(subcommand)]
        cluster: ClusterCommand,
    },
    /// The controller: tenants, nodes, address blocks; pushes overlay state to agents.
    Controller(ControllerArgs),
    /// The node agent: runs in its node's namespace, owns the node's tenant
    /// overlays and warm pools, follows the controller, serves the local API.
    Agent(Box<AgentArgs>),
    /// Sends one request to a node agent's local API and prints the answer,
    /// e.g. `particle local --socket S '{"op":"claim","tenant":"a"}'`.
    Local {
        #[arg(long, default_value = "/run/particle/agent.sock")]
        socket: std::path::PathBuf,
        /// The request: one JSON object.
        request: String,
    },
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
    Fn {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Removes what crashed Particle runs left behind (mounted namespaces,
    /// links in this namespace); never touches live runs.
    Gc,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Starts the cluster and stays in the foreground until Ctrl-C or `down`.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// The underlay's subnet (exists only inside the cluster's namespaces).
        #[arg(long, default_value = "10.254.0.0/24")]
        underlay: String,
        /// The controller's port (on the underlay, and relayed on 127.0.0.1).
        #[arg(long, default_value_t = 7700)]
        port: u16,
        /// Warm endpoints per tenant per node.
        #[arg(long, default_value_t = 16)]
        pool_size: usize,
        /// Tenant-free endpoints per node (bound to a tenant that runs dry).
        #[arg(long, default_value_t = 16)]
        free_pool_size: usize,
        /// Seconds without a heartbeat after which the controller drops a node [default: 10].
        #[arg(long)]
        heartbeat_timeout: Option<f64>,
    },
    /// Stops every running local cluster.
    Down,
}

/// `particle controller` flags; each overrides the same key of `--config`.
#[derive(clap::Args, serde::Serialize)]
struct ControllerArgs {
    /// YAML file with any of the settings below (flags win).
    #[arg(long)]
    #[serde(skip)]
    config: Option<std::path::PathBuf>,
    /// Address to listen on (agents and users) [default: 127.0.0.1:7700].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token every /v1 request must carry.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    token_file: Option<std::path::PathBuf>,
    /// The embedded store (tenants, blocks, nodes); omitted: memory only.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    state_file: Option<std::path::PathBuf>,
    /// Seconds without a heartbeat after which a node is removed [default: 10; a node busy with a large burst may be late].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_timeout: Option<f64>,
    /// Listen inside this network namespace (e.g. a local cluster's underlay).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<std::path::PathBuf>,
}

/// `particle agent` flags; each overrides the same key of `--config`.
#[derive(clap::Args, serde::Serialize)]
struct AgentArgs {
    /// YAML file with any of the settings below (flags win).
    #[arg(long)]
    #[serde(skip)]
    config: Option<std::path::PathBuf>,
    /// This node's name at the controller.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    /// The controller's address (host:port).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    controller: Option<std::net::SocketAddr>,
    /// File holding the controller's bearer token.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    token_file: Option<std::path::PathBuf>,
    /// The underlay interface (VXLAN traffic leaves through it).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    underlay_iface: Option<String>,
    /// This node's address on the underlay (its VTEP).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    underlay_ip: Option<std::net::Ipv4Addr>,
    /// Run in this network namespace (a simulated host); default: where started.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<std::path::PathBuf>,
    /// The local API's Unix socket [default: /run/particle/agent.sock].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<std::path::PathBuf>,
    /// Warm endpoints kept per tenant [default: 32].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pool_size: Option<usize>,
    /// Tenant-free endpoints kept warm, bound to a tenant that runs dry; 0: none [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    free_pool_size: Option<usize>,
    /// Where `/metrics` listens [default: the underlay address, port 9101].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Name prefix of this agent's kernel objects [default: random].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    /// The OCI runtime jobs with `"runtime": "oci"` use [default: runc if installed].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    oci_runtime: Option<std::path::PathBuf>,
    /// Serve warm connections on this Unix socket [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warm_socket: Option<std::path::PathBuf>,
    /// Agent-to-agent warm listener port, on the underlay address [default: 7702].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warm_port: Option<u16>,
    /// Warm connections kept per destination [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warm_pool_size: Option<usize>,
    /// An external service to keep warm: ADDR:PORT or ADDR:PORT=TENANT,TENANT (repeatable).
    #[arg(long = "warm-destination")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warm_destinations: Vec<String>,
    /// Keep-warm probe period on agent-to-agent connections, ms [default: 0, none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warm_probe_ms: Option<u64>,
}

#[derive(Subcommand)]
enum Bench {
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
        #[arg(long, default_value_t = particle_bench::reuse::REQUEST_ANSWER)]
        size: u64,
    },
    /// The video pipeline on Particle (warm) vs the baselines, job time and ratio.
    Pipeline(bench_pipeline::PipelineArgs),
    /// Burst startup: launch to every function reaching a peer on another
    /// node, Particle warm/cold vs hand-built overlay, CNI bridge, Docker Swarm
    /// and no network, in one run; table, JSON and a plot.
    Startup(bench_startup::StartupArgs),
    /// Churn: bursts launched and ended without pause (several tenants, mixed
    /// sizes, cancels) on a local cluster; errors, startup over time, and what
    /// every agent holds at the start and the end (must match: nothing leaks).
    Soak(bench_soak::SoakArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench {
            bench:
                Bench::Endpoints {
                    count,
                    workers,
                    skip_ip_cmd,
                    json,
                },
        } => {
            let opts = particle_bench::endpoints::Options {
                count,
                workers,
                skip_ip_cmd,
            };
            let report = particle_bench::endpoints::run(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", particle_bench::endpoints::render(&report));
            }
            if report.leaked > 0 {
                anyhow::bail!("{} objects leaked", report.leaked);
            }
        }
        Command::Bench {
            bench:
                Bench::Reuse {
                    runs,
                    delay_ms,
                    flow_runs,
                    link_mbit,
                    plot,
                    json,
                },
        } => {
            let opts = particle_bench::reuse::Options {
                runs,
                delay_ms,
                flow_runs,
                link_mbit,
                plot: Some(plot),
            };
            let report = particle_bench::reuse::run(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", particle_bench::reuse::render(&report));
            }
        }
        Command::Bench {
            bench: Bench::ReuseClient { dest, runs, size },
        } => println!("{}", particle_bench::reuse::client(dest, runs, size)?),
        Command::Bench {
            bench: Bench::Cni { adds, json },
        } => {
            let report = particle_bench::cni_add::run(adds)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", particle_bench::cni_add::render(&report));
            }
            if report.leaked > 0 {
                anyhow::bail!("{} links leaked", report.leaked);
            }
        }
        Command::Bench {
            bench: Bench::Pipeline(args),
        } => {
            let report = bench_pipeline::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench_pipeline::render(&report));
            }
        }
        Command::Bench {
            bench: Bench::Soak(args),
        } => {
            let report = bench_soak::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", particle_bench::soak::render(&report));
            }
            let leaks = report.leaks();
            anyhow::ensure!(leaks.is_empty(), "leaked: {leaks:?}");
            anyhow::ensure!(report.errors == 0, "{} jobs failed", report.errors);
        }
        Command::Bench {
            bench: Bench::Startup(args),
        } => {
            let report = bench_startup::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", particle_bench::startup::render(&report));
            }
        }
        Command::Cluster {
            cluster:
                ClusterCommand::Up {
                    nodes,
                    underlay,
                    port,
                    pool_size,
                    free_pool_size,
                    heartbeat_timeout,
                },
        } => cluster::up(&cluster::UpOptions {
            nodes,
            underlay,
            port,
            pool_size,
            free_pool_size,
            heartbeat_timeout,
        })?,
        Command::Cluster {
            cluster: ClusterCommand::Down,
        } => {
            let n = cluster::down()?;
            if n == 0 {
                println!("no local cluster running");
            }
        }
        Command::Controller(args) => controller(args)?,
        Command::Local { socket, request } => {
            use std::io::{BufRead, Write};
            let mut stream = std::os::unix::net::UnixStream::connect(&socket)
                .with_context(|| format!("connecting to {}", socket.display()))?;
            writeln!(stream, "{}", request.trim())?;
            let mut answer = String::new();
            std::io::BufReader::new(stream).read_line(&mut answer)?;
            print!("{answer}");
            anyhow::ensure!(
                !answer.contains(r#""ok":false"#),
                "the agent refused the request"
            );
        }
        Command::Agent(args) => agent(*args)?,
        Command::Launch(args) => launch::launch(args)?,
        Command::Demo(args) => demo::run(&args)?,
        Command::Job { job } => launch::job(job)?,
        Command::Fn { args } => {
            if let Err(e) = particle_workloads::jobs::run(&args) {
                eprintln!("particle fn: {e}");
                std::process::exit(1);
            }
        }
        Command::Gc => {
            let mut socket = particle_net::NetlinkSocket::open().context("netlink socket")?;
            let report = particle_net::gc::collect(Some(&mut socket));
            println!(
                "removed {} namespaces, {} links, {} dead runs",
                report.namespaces.len(),
                report.links.len(),
                report.runs.len()
            );
            for e in &report.errors {
                eprintln!("error: {e}");
            }
            if !report.errors.is_empty() {
                anyhow::bail!("{} objects could not be removed", report.errors.len());
            }
        }
    }
    Ok(())
}

/// Moves the whole process into a network namespace. Called while the process
/// has one thread: every socket and thread made later is then in it, as on a
/// real host.
fn enter_netns(path: Option<&std::path::Path>) -> Result<()> {
    if let Some(path) = path {
        let ns = particle_net::NetNs::open(path)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {}", path.display()))?;
    }
    Ok(())
}

fn read_token(path: &std::path::Path) -> Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token from {}", path.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!token.is_empty(), "{} holds no token", path.display());
    Ok(token)
}

fn controller(args: ControllerArgs) -> Result<()> {
    let settings: config::ControllerSettings = config::resolve(args.config.as_deref(), &args)?;
    enter_netns(settings.netns.as_deref())?;
    anyhow::ensure!(
        settings.heartbeat_timeout.is_finite() && settings.heartbeat_timeout > 0.0,
        "heartbeat_timeout must be a positive number of seconds"
    );
    let config = particle_controller::ControllerConfig {
        listen: settings.listen,
        token: read_token(&settings.token_file)?,
        state_file: settings.state_file,
        heartbeat_timeout: std::time::Duration::from_secs_f64(settings.heartbeat_timeout),
        long_poll_max: particle_controller::DEFAULT_LONG_POLL_MAX,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        particle_controller::serve(config, listener).await
    })
}

fn agent(args: AgentArgs) -> Result<()> {
    use particle_net::{PoolConfig, Run, RunPrefix};
    let args: config::AgentSettings = config::resolve(args.config.as_deref(), &args)?;
    enter_netns(args.netns.as_deref())?;
    particle_net::limits::raise_open_files()?;
    let token = read_token(&args.token_file)?;
    let run = match &args.prefix {
        Some(p) => Run::with_prefix(RunPrefix::parse(p)?)?,
        None => Run::start()?,
    };
    let mut socket = particle_net::NetlinkSocket::open()?;
    let iface = particle_net::IfName::new(args.underlay_iface.clone())?;
    let underlay_index = particle_net::bridge::Bridge::lookup(&mut socket, &iface)
        .with_context(|| format!("underlay interface {iface}"))?
        .index;
    let config = particle_node_agent::daemon::AgentConfig {
        node_name: args.node.clone(),
        node: particle_node_agent::NodeConfig {
            prefix: run.prefix().clone(),
            underlay: particle_net::overlay::Underlay {
                index: underlay_index,
                address: args.underlay_ip,
            },
            pool: PoolConfig::warm(args.pool_size.max(1)),
            workers: 0,
            free_pool: (args.free_pool_size > 0).then(|| PoolConfig::warm(args.free_pool_size)),
        },
        socket_path: args.socket.clone(),
        heartbeat_every: std::time::Duration::from_secs(1),
        oci_runtime: args.oci_runtime.clone(),
        sandbox: args.sandbox.clone(),
    };
    let warm = args.warm_config()?;
    let client = particle_wire::client::ApiClient::direct(args.controller, token);
    let metrics_addr = args
        .metrics_listen
        .unwrap_or_else(|| std::net::SocketAddr::from((args.underlay_ip, 9101)));
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let metrics = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("metrics on {metrics_addr}"))?;
        let listeners = particle_node_agent::daemon::Listeners {
            metrics: Some(metrics),
        };
        let node = particle_net::NetNs::current()?;
        particle_node_agent::daemon::run_with_warm(config, node, client, listeners, warm).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

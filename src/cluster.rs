//! `particle cluster up|down`: a local cluster on one machine, in the
//! foreground (`particle_cluster` builds and runs it: every node a network
//! namespace, the controller and the agents processes of this binary). Users
//! reach the controller at 127.0.0.1 through its relay.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use particle_cluster::{LocalCluster, Options, Which};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Json,
    Etcd,
}

#[derive(Subcommand)]
pub enum ClusterCommand {
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
        #[arg(long, default_value_t = particle_cluster::DEFAULT_POOL_SIZE)]
        pool_size: usize,
        /// Tenant-free endpoints per node (bound to a tenant that runs dry).
        #[arg(long, default_value_t = particle_cluster::DEFAULT_FREE_POOL_SIZE)]
        free_pool_size: usize,
        /// Seconds without a heartbeat after which the controller drops a node [default: 10].
        #[arg(long)]
        heartbeat_timeout: Option<f64>,
        /// Controllers (more than one needs `--store etcd`: one leads, the others take over).
        #[arg(long, default_value_t = 1)]
        controllers: usize,
        /// The controllers' store: `json` (the embedded file) or `etcd` (a 3-member etcd cluster in the underlay).
        #[arg(long, value_enum, default_value_t = StoreKind::Json)]
        store: StoreKind,
    },
    /// Stops a running local cluster: the one on `--port` (7700 unless
    /// told), the one with `--prefix`, or `--all` of them.
    Down {
        /// The port the cluster was started with (`cluster up --port`).
        #[arg(long, default_value_t = 7700, conflicts_with_all = ["prefix", "all"])]
        port: u16,
        /// The cluster's run prefix (as `cluster up` printed it).
        #[arg(long, conflicts_with = "all")]
        prefix: Option<String>,
        /// Every local cluster on this machine.
        #[arg(long)]
        all: bool,
    },
}

pub fn run(command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Up {
            nodes,
            underlay,
            port,
            pool_size,
            free_pool_size,
            heartbeat_timeout,
            controllers,
            store,
        } => {
            if controllers > 1 && store != StoreKind::Etcd {
                anyhow::bail!("--controllers {controllers} needs --store etcd (the embedded store serves one controller)");
            }
            up(&Options {
                heartbeat_timeout,
                relay: true,
                ha: (store == StoreKind::Etcd).then_some(particle_cluster::Ha { controllers }),
                ..Options::processes(nodes, &underlay, port, pool_size, free_pool_size)
            })
        }
        ClusterCommand::Down { port, prefix, all } => {
            let which = match (all, prefix) {
                (true, _) => Which::All,
                (false, Some(p)) => Which::Prefix(p),
                (false, None) => Which::Port(port),
            };
            let stopped = particle_cluster::stop(&which)?;
            for prefix in &stopped {
                println!("stopped cluster {prefix}");
            }
            if stopped.is_empty() {
                println!("no local cluster running matches {which:?}");
            }
            Ok(())
        }
    }
}

/// Starts the cluster, says where everything is, and keeps it (restarting
/// processes that die) until SIGINT or SIGTERM.
fn up(opts: &Options) -> Result<()> {
    let mut cluster = LocalCluster::start(opts)?;
    println!("cluster {} up: {} nodes", cluster.prefix(), opts.nodes);
    if let Some(relay) = cluster.relay_addr() {
        let list: Vec<String> = cluster
            .controller_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect();
        println!(
            "  controller  http://{relay} (relayed to {} on the underlay{})",
            list.join(","),
            if list.len() > 1 {
                ", whichever leads"
            } else {
                ""
            }
        );
    }
    for (name, pid) in cluster.etcd_pids() {
        println!("  etcd {name}     pid {pid}");
    }
    println!("  token       {}", cluster.token_file().display());
    for i in 0..cluster.len() {
        println!(
            "  node n{i}     underlay {}, agent socket {}",
            cluster.node_address(i),
            cluster.socket(i).display()
        );
    }
    println!("  logs        {}", cluster.dir().display());
    println!("ready (Ctrl-C or `particle cluster down` to stop)");
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(wait_for_stop(&mut cluster))?;
    let prefix = cluster.prefix().clone();
    drop(cluster);
    println!("cluster {prefix} down");
    Ok(())
}

/// Returns on SIGINT/SIGTERM; restarts children that die meanwhile.
async fn wait_for_stop(cluster: &mut LocalCluster) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = check.tick() => cluster.restart_dead()?,
        }
    }
}

//! Local clusters: N nodes on one machine, each a network namespace (a
//! simulated host, DESIGN.md's "One machine, many nodes") on a bridge that
//! plays the underlay switch, with the controller on the underlay and one
//! agent per node. `particle cluster up`, `particle demo`, the benchmarks and
//! the tests all start their clusters here.
//!
//! Every cluster is made of the same pieces, in this order: a run of its own
//! (the prefix of its kernel objects), a directory for its files, the scratch
//! fabric (the underlay) and the node namespaces on it, a fresh bearer token;
//! then the controller, listening on the fabric's gateway address, and the
//! agents; then [`LocalCluster::start`] waits until every node has
//! registered. The [`Mode`] says only how the controller and agents run:
//!
//! - [`Mode::Processes`]: `particle controller` and `particle agent`
//!   processes inside the namespaces, exactly as on real hosts, started
//!   again when they die. `particle cluster up`, the demo and the
//!   benchmarks that drive the launch API use it.
//! - [`Mode::InProcess`]: the controller and the agents as tasks of this
//!   process. For the tests and benchmarks that talk to an agent directly
//!   (its local API, the CNI plugin) and have no `particle` binary to start.
//!
//! Everything hangs off the [`LocalCluster`]: namespaces are held by fd,
//! child processes die with this one (PR_SET_PDEATHSIG), tasks stop with its
//! runtime; dropping it, Ctrl-C or a crash leave nothing behind.

mod ha;
mod in_process;
mod processes;
mod relay;
mod running;
pub mod tenants;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Endpoint, NetNs, PoolConfig, Run, RunPrefix};
use particle_wire::client::ApiClient;
use serde_json::Value;

pub use ha::{Ha, ETCD_MEMBERS};
use running::ClusterDir;
pub use running::{running, stop, Which};

/// Node `i`'s name at the controller.
fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// Warm endpoints per tenant per node that `particle cluster up` keeps
/// unless told otherwise.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Tenant-free endpoints per node that `particle cluster up` keeps unless
/// told otherwise.
pub const DEFAULT_FREE_POOL_SIZE: usize = 16;

/// How a cluster's controller and agents run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Processes of this executable, which must be the `particle` binary:
    /// `particle controller` in the underlay's namespace, `particle agent`
    /// in each node's.
    Processes,
    /// Tasks of this process, on the cluster's own runtime.
    InProcess,
}

/// What cluster to start.
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    /// The underlay's subnet (it exists only inside the cluster's namespaces).
    pub underlay: String,
    /// The controller's port on the underlay (and the relay's on 127.0.0.1).
    pub port: u16,
    /// Every agent's warm pool per tenant. Agent processes take a size
    /// (`--pool-size`), so with [`Mode::Processes`] this must be
    /// `PoolConfig::warm(size)`.
    pub pool: PoolConfig,
    /// Every agent's tenant-free pool, `PoolConfig::warm(size)`; `None`: none.
    pub free_pool: Option<PoolConfig>,
    /// The controller's heartbeat timeout (seconds); `None`: the mode's
    /// default (the controller's own for processes, 3 s in process).
    pub heartbeat_timeout: Option<f64>,
    /// Also relay the controller on 127.0.0.1:`port`, for users outside the
    /// cluster's namespaces.
    pub relay: bool,
    pub mode: Mode,
    /// Several controllers on a three-member etcd cluster (processes
    /// only); `None`: one controller on the embedded store.
    pub ha: Option<Ha>,
}

impl Options {
    /// Agent processes with `pool_size` warm endpoints per tenant and
    /// `free_pool_size` tenant-free ones (0: none); no relay.
    pub fn processes(
        nodes: usize,
        underlay: &str,
        port: u16,
        pool_size: usize,
        free_pool_size: usize,
    ) -> Self {
        Self {
            nodes,
            underlay: underlay.to_string(),
            port,
            pool: PoolConfig::warm(pool_size),
            free_pool: (free_pool_size > 0).then(|| PoolConfig::warm(free_pool_size)),
            heartbeat_timeout: None,
            relay: false,
            mode: Mode::Processes,
            ha: None,
        }
    }

    /// In-process agents with warm pools per `pool` and no tenant-free pool.
    pub fn in_process(nodes: usize, underlay: &str, pool: PoolConfig) -> Self {
        Self {
            nodes,
            underlay: underlay.to_string(),
            port: 7700,
            pool,
            free_pool: None,
            heartbeat_timeout: None,
            relay: false,
            mode: Mode::InProcess,
            ha: None,
        }
    }
}

/// A running local cluster, removed when dropped.
pub struct LocalCluster {
    // Field order is drop order: the processes, then (with the runtime) the
    // tasks, stop before the namespaces they run in go, and those before
    // the files and the run.
    children: Vec<processes::ChildGuard>,
    runtime: tokio::runtime::Runtime,
    hosts: Vec<Endpoint>,
    fabric: ScratchNode,
    token: String,
    controller_addrs: Vec<SocketAddr>,
    relay_addr: Option<SocketAddr>,
    sockets: Vec<PathBuf>,
    dir: ClusterDir,
    run: Run,
}

impl LocalCluster {
    /// Builds the underlay and the nodes, starts the controller and the
    /// agents, and waits until every node has registered.
    pub fn start(opts: &Options) -> Result<Self> {
        if opts.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("a local cluster creates network namespaces: run it as root");
        }
        particle_net::limits::raise_open_files()?;
        let run = Run::start()?;
        let dir = ClusterDir::create(run.prefix(), opts.mode, opts.port)?;
        let mut fabric = ScratchNode::new(run.prefix(), AddressBlock::parse(&opts.underlay)?)
            .context("creating the underlay")?;
        let hosts = fabric.hosts(opts.nodes).context("creating the nodes")?;
        let token = dir.new_token()?;
        let controller_addr = SocketAddr::new(IpAddr::V4(fabric.block.gateway()), opts.port);
        let controller_addrs = ha::controller_addrs(opts, controller_addr);
        if opts.ha.is_some() && opts.mode != Mode::Processes {
            bail!("several controllers on etcd run as processes only");
        }
        let sockets: Vec<PathBuf> = (0..opts.nodes)
            .map(|i| dir.path().join(format!("n{i}.sock")))
            .collect();

        let (runtime, children) = match opts.mode {
            Mode::Processes => {
                let children = processes::start(
                    opts,
                    dir.path(),
                    &fabric.netns,
                    &hosts,
                    controller_addrs[0],
                    &sockets,
                )?;
                (tokio::runtime::Runtime::new()?, children)
            }
            Mode::InProcess => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                let cluster = in_process::Pieces {
                    prefix: run.prefix(),
                    fabric: &fabric.netns,
                    hosts: &hosts,
                    controller: controller_addrs[0],
                    token: &token,
                    sockets: &sockets,
                };
                in_process::start(opts, &runtime, &cluster)?;
                (runtime, Vec::new())
            }
        };
        let relay_addr = opts
            .relay
            .then(|| SocketAddr::from(([127, 0, 0, 1], opts.port)));
        let cluster = Self {
            children,
            runtime,
            hosts,
            fabric,
            token,
            controller_addrs,
            relay_addr,
            sockets,
            dir,
            run,
        };
        let api = cluster.api()?;
        let fabric_ns = Arc::new(cluster.fabric.netns.try_clone()?);
        cluster.runtime.block_on(async {
            if let Some(relay_addr) = relay_addr {
                let relay = tokio::net::TcpListener::bind(relay_addr)
                    .await
                    .with_context(|| format!("relay on {relay_addr}"))?;
                let targets = cluster.controller_addrs.clone();
                let token = cluster.token.clone();
                tokio::spawn(relay::relay_loop(relay, fabric_ns, targets, token));
            }
            tenants::wait_for_nodes(&api, opts.nodes, Duration::from_secs(30)).await
        })?;
        Ok(cluster)
    }

    /// A client of the controller, dialling inside the underlay.
    pub fn api(&self) -> Result<ApiClient> {
        let dial = self.fabric.netns.try_clone()?.tcp_dialer();
        Ok(ApiClient::to_any(
            self.controller_addrs.clone(),
            self.token.clone(),
            dial,
        ))
    }

    /// Every controller's address on the underlay (one but with [`Options::ha`]).
    pub fn controller_addrs(&self) -> &[SocketAddr] {
        &self.controller_addrs
    }

    /// Every controller process's address and pid (as running now).
    pub fn controller_pids(&self) -> Vec<(SocketAddr, i32)> {
        self.children
            .iter()
            .filter_map(processes::ChildGuard::controller)
            .collect()
    }

    /// Every etcd member's name and pid (as running now).
    pub fn etcd_pids(&self) -> Vec<(String, i32)> {
        self.children
            .iter()
            .filter_map(processes::ChildGuard::etcd_member)
            .collect()
    }

    pub fn prefix(&self) -> &RunPrefix {
        self.run.prefix()
    }

    /// Where the cluster's files (token, logs, sockets, the controller's
    /// store) are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file holding the controller's bearer token.
    pub fn token_file(&self) -> PathBuf {
        self.dir.token_file()
    }

    /// The (first) controller's address on the underlay.
    pub fn controller_addr(&self) -> SocketAddr {
        self.controller_addrs[0]
    }

    /// Where the controller is relayed on 127.0.0.1, if it is.
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay_addr
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Node `i`'s namespace.
    pub fn node(&self, i: usize) -> &NetNs {
        self.hosts[i].netns()
    }

    /// Node `i`'s address on the underlay.
    pub fn node_address(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.hosts[i].address().ip())
    }

    /// Node `i`'s agent socket (its local API).
    pub fn socket(&self, i: usize) -> &Path {
        &self.sockets[i]
    }

    /// The underlay: the namespace with the bridge the nodes hang off.
    pub fn fabric(&self) -> &ScratchNode {
        &self.fabric
    }

    /// The runtime the cluster's relay (and in process its controller and
    /// agents) run on, e.g. to serve more things next to them.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// Every agent process's node name and pid (as running now); none in
    /// process, where the agents have no process of their own.
    pub fn agent_pids(&self) -> Vec<(String, i32)> {
        self.children
            .iter()
            .filter_map(processes::ChildGuard::agent)
            .collect()
    }

    /// Starts again the processes that died (as systemd or a DaemonSet
    /// would): a restarted agent rebuilds its node from the controller, a
    /// restarted controller reloads its store.
    pub fn restart_dead(&mut self) -> Result<()> {
        for c in self.children.iter_mut() {
            c.restart_if_dead()?;
        }
        Ok(())
    }

    /// One request to node `i`'s local API.
    pub fn request(&self, i: usize, request: &Value) -> Result<Value> {
        use std::io::{BufRead, BufReader, Write};
        let stream = std::os::unix::net::UnixStream::connect(&self.sockets[i])?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = request.to_string();
        line.push('\n');
        (&stream).write_all(line.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer)?;
        Ok(serde_json::from_str(&answer)?)
    }

    /// Waits until every agent, asked through its local API, has at least
    /// `ready` endpoints of `tenant` warm. (The controller's view, which
    /// placement uses, follows a heartbeat later: [`tenants::warm_up`].)
    pub fn wait_ready(&self, tenant: &str, ready: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.len() {
            loop {
                let status = self.request(i, &serde_json::json!({"op":"status"}));
                let level = status
                    .as_ref()
                    .ok()
                    .and_then(|s| s["pools"][tenant]["ready"].as_u64());
                if level.is_some_and(|l| l >= ready) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("node {i}: tenant {tenant} has not {ready} endpoints ready: {status:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Creates a tenant at the controller (see [`tenants::create`]).
    pub fn create_tenant(
        &self,
        tenant: &particle_wire::api::CreateTenant,
    ) -> Result<particle_wire::api::Tenant> {
        let api = self.api()?;
        self.runtime.block_on(tenants::create(&api, tenant))
    }
}

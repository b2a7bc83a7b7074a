//! Namespaced nodes with running Particle agents, for benchmarks and tests
//! that need what a runtime on a real node would talk to: a scratch fabric
//! (the underlay), a controller served in-process inside it, and one agent
//! per node namespace with its local API on a Unix socket. Everything runs on
//! a tokio runtime of its own, so synchronous callers can use it; dropping it
//! stops the agents and the controller and the kernel removes the namespaces.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_controller::ControllerConfig;
use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Endpoint, NetNs, PoolConfig, Run};
use particle_node_agent::daemon::{self, AgentConfig, Listeners};
use particle_node_agent::NodeConfig;
use particle_wire::api::{CreateTenant, Tenant};
use particle_wire::client::{ApiClient, Dial};
use serde_json::Value;

const TOKEN: &str = "agent-nodes";

/// A tenant to create at the controller.
#[derive(Debug, Clone)]
pub struct TenantSpec {
    pub name: String,
    pub vni: u32,
    pub subnet: String,
    /// Per-node block size (the controller's default is /24).
    pub block_prefix: Option<u8>,
}

pub struct AgentNodes {
    // Field order is drop order: agents and controller stop (with the
    // runtime) before the namespaces they run in go.
    runtime: tokio::runtime::Runtime,
    sockets: Vec<PathBuf>,
    hosts: Vec<Endpoint>,
    fabric: ScratchNode,
}

fn dial_from(ns: &NetNs) -> Result<Dial> {
    Ok(ns.try_clone()?.tcp_dialer())
}

impl AgentNodes {
    /// `nodes` agents on a fabric whose underlay is `underlay` (a /24 of the
    /// caller's), each with warm pools per `pool`, and `tenants` created.
    pub fn start(
        run: &Run,
        underlay: &str,
        nodes: usize,
        pool: PoolConfig,
        tenants: &[TenantSpec],
    ) -> Result<Self> {
        let block = AddressBlock::parse(underlay).context("underlay block")?;
        let mut fabric = ScratchNode::new(run.prefix(), block).context("scratch fabric")?;
        let hosts = fabric.hosts(nodes).context("node namespaces")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;

        // The controller listens on the fabric bridge's address, inside the fabric.
        let addr = SocketAddr::new(IpAddr::V4(fabric.block.gateway()), 7700);
        let listener = fabric
            .netns
            .run_in(|| std::net::TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let config = ControllerConfig {
            listen: addr,
            token: TOKEN.into(),
            state_file: None,
            heartbeat_timeout: Duration::from_secs(3),
            long_poll_max: Duration::from_secs(5),
        };
        {
            let _entered = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener)?;
            runtime.spawn(particle_controller::serve(config, listener));
        }
        let user = ApiClient::new(addr, TOKEN.into(), dial_from(&fabric.netns)?);
        for t in tenants {
            let body = CreateTenant {
                name: t.name.clone(),
                vni: t.vni,
                subnet: t.subnet.clone(),
                block_prefix: t.block_prefix,
                warm_per_node: None,
            };
            let _: Tenant = runtime
                .block_on(user.call(hyper::Method::POST, "/v1/tenants", Some(&body)))
                .with_context(|| format!("creating tenant {}", t.name))?;
        }

        let mut sockets = Vec::with_capacity(nodes);
        for (i, host) in hosts.iter().enumerate() {
            let socket = PathBuf::from(format!("/run/particle/{}-n{i}.sock", run.prefix()));
            let config = AgentConfig {
                node_name: format!("n{i}"),
                node: NodeConfig {
                    prefix: run.prefix().clone(),
                    underlay: ScratchNode::underlay_of(host),
                    pool,
                    workers: 1,
                    free_pool: None,
                },
                socket_path: socket.clone(),
                heartbeat_every: Duration::from_millis(500),
                oci_runtime: None,
                sandbox: Default::default(),
            };
            let client = ApiClient::new(addr, TOKEN.into(), dial_from(host.netns())?);
            let netns = host.netns().try_clone()?;
            runtime.spawn(async move {
                if let Err(e) =
                    daemon::run(config, netns, client, Listeners { metrics: None }).await
                {
                    tracing::error!("agent n{i}: {e}");
                }
            });
            sockets.push(socket);
        }
        Ok(Self {
            runtime,
            sockets,
            hosts,
            fabric,
        })
    }

    /// Node `i`'s agent socket.
    pub fn socket(&self, i: usize) -> &Path {
        &self.sockets[i]
    }

    /// Node `i`'s namespace.
    pub fn node(&self, i: usize) -> &NetNs {
        self.hosts[i].netns()
    }

    pub fn fabric(&self) -> &ScratchNode {
        &self.fabric
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
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

    /// Waits until every agent has `tenant`'s pool with at least `ready`
    /// endpoints warm.
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

    /// The runtime the agents run on, e.g. to serve more things next to them.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }
}

//! [`Mode::InProcess`](crate::Mode::InProcess): the controller served in the
//! underlay's namespace and one agent per node namespace, as tasks on the
//! cluster's runtime; they stop with it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use particle_controller::ControllerConfig;
use particle_net::scratch::ScratchNode;
use particle_net::{Endpoint, NetNs, RunPrefix};
use particle_node_agent::daemon::{self, AgentConfig, Listeners};
use particle_node_agent::NodeConfig;
use particle_wire::client::ApiClient;

use crate::{node_name, Options};

/// What the cluster has built for its controller and agents to run in.
pub(crate) struct Pieces<'a> {
    pub prefix: &'a RunPrefix,
    pub fabric: &'a NetNs,
    pub hosts: &'a [Endpoint],
    pub controller: SocketAddr,
    pub token: &'a str,
    pub sockets: &'a [PathBuf],
}

/// Agents heartbeat this often, and the controller drops a node silent for
/// [`HEARTBEAT_TIMEOUT`] (unless the options say otherwise): quick, for tests.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
const LONG_POLL_MAX: Duration = Duration::from_secs(5);

pub(crate) fn start(opts: &Options, runtime: &tokio::runtime::Runtime, c: &Pieces) -> Result<()> {
    let listener = c
        .fabric
        .run_in(|| std::net::TcpListener::bind(c.controller))??;
    listener.set_nonblocking(true)?;
    let config = ControllerConfig {
        listen: c.controller,
        token: c.token.into(),
        store: None,
        cluster_id: "particle".into(),
        advertise: None,
        heartbeat_timeout: opts
            .heartbeat_timeout
            .map_or(HEARTBEAT_TIMEOUT, Duration::from_secs_f64),
        long_poll_max: LONG_POLL_MAX,
        quotas: Default::default(),
    };
    {
        let _entered = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        runtime.spawn(particle_controller::serve(config, listener));
    }
    for (i, (host, socket)) in c.hosts.iter().zip(c.sockets).enumerate() {
        let config = AgentConfig {
            node_name: node_name(i),
            node: NodeConfig {
                prefix: c.prefix.clone(),
                underlay: ScratchNode::underlay_of(host),
                pool: opts.pool,
                workers: 1,
                free_pool: opts.free_pool,
            },
            socket_path: socket.clone(),
            heartbeat_every: HEARTBEAT_EVERY,
            oci_runtime: None,
            sandbox: Default::default(),
        };
        let dial = host.netns().try_clone()?.tcp_dialer();
        let client = ApiClient::new(c.controller, c.token.into(), dial);
        let netns = host.netns().try_clone()?;
        runtime.spawn(async move {
            if let Err(e) = daemon::run(config, netns, client, Listeners { metrics: None }).await {
                tracing::error!("agent n{i}: {e}");
            }
        });
    }
    Ok(())
}

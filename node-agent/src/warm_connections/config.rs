//! What the warm-connection service is told: destinations, sizes, timeouts.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Finds the tenant of the function whose network namespace has this inode
/// (`None`: not a claimed endpoint of this node).
pub type TenantOf = Arc<dyn Fn(u64) -> Option<String> + Send + Sync>;

/// Every tenant may use a destination listing this.
pub const ANY_TENANT: &str = "*";

/// An external service the agent keeps connections to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmDestination {
    pub addr: SocketAddr,
    /// Tenants allowed to use it ([`ANY_TENANT`] for all).
    pub tenants: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct WarmConfig {
    /// The Unix socket functions ask on.
    pub socket_path: PathBuf,
    /// Where this agent accepts other agents' warm connections (in the node's
    /// namespace); also its identity towards them. `None`: no channels.
    pub listen: Option<SocketAddr>,
    pub destinations: Vec<WarmDestination>,
    /// Other agents' `listen` addresses to keep connections to from the start
    /// (others are added when a channel first asks for them).
    pub peers: Vec<SocketAddr>,
    /// Connections kept per destination, idle or lent: lent ones count, so a
    /// connection given back does not find a fresh one made in its place.
    pub pool_size: usize,
    /// Most idle connections kept per destination (returned ones beyond the
    /// target are kept up to this many, then closed).
    pub max_idle: usize,
    /// Idle connections beyond `pool_size` are closed after this long.
    pub idle_timeout: Duration,
    /// A lent connection not given back within this long no longer counts
    /// towards `pool_size` (its function kept or lost it).
    pub lent_timeout: Duration,
    /// Keep-warm probes on agent-to-agent connections: every this often...
    pub probe_every: Option<Duration>,
    /// ... this many bytes.
    pub probe_bytes: usize,
    /// Turn `net.ipv4.tcp_slow_start_after_idle` off in the node's namespace
    /// (only where the agent owns it), so an idle connection keeps its window.
    pub slow_start_after_idle_off: bool,
    pub connect_timeout: Duration,
    /// How long the receiving end of a channel waits for the other end.
    pub channel_timeout: Duration,
    /// How often the maintainer looks at the pools.
    pub tick: Duration,
    /// What every agent-to-agent connection opens with (the cluster's token):
    /// a function that re-dials another agent's warm port cannot pose as an
    /// agent and bind itself into another tenant's channel.
    pub peer_token: String,
}

impl WarmConfig {
    pub fn new(socket_path: PathBuf) -> Self {
        Self {
            socket_path,
            listen: None,
            destinations: Vec::new(),
            peers: Vec::new(),
            pool_size: 4,
            max_idle: 8,
            idle_timeout: Duration::from_secs(60),
            lent_timeout: Duration::from_secs(60),
            probe_every: None,
            probe_bytes: 64 * 1024,
            slow_start_after_idle_off: false,
            connect_timeout: Duration::from_secs(2),
            channel_timeout: Duration::from_secs(10),
            tick: Duration::from_millis(100),
            peer_token: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WarmPoolError {
    #[error("warm socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("agent-to-agent listener on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("node namespace: {0}")]
    NetNs(#[from] particle_net::NetNsError),
    #[error("setting tcp_slow_start_after_idle: {0}")]
    Sysctl(io::Error),
    #[error("starting a thread: {0}")]
    Thread(io::Error),
    #[error("bad warm config: {0}")]
    Config(String),
    #[error("pinning lent connections to their destinations: {0}")]
    Pinning(io::Error),
}

//! `particle agent`: its settings (flags, or keys of `--config`) and the
//! node agent, run in its node's network namespace.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{self, required};

/// `particle agent`'s settings, declared once: each field is a flag
/// (`--pool-size`) and the key of the `--config` YAML file with `_`
/// (`pool_size`). A flag wins over the file, the file over the default
/// (applied by the methods below).
#[derive(clap::Args, Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// YAML file with any of the settings below (flags win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's name at the controller.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The controller's address (host:port), or several (`a:7700,b:7700`): the agent follows their leader.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<particle_wire::client::Controllers>,
    /// File holding the controller's bearer token.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The underlay interface (VXLAN traffic leaves through it).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub underlay_iface: Option<String>,
    /// This node's address on the underlay (its VTEP).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<Ipv4Addr>,
    /// Run in this network namespace (a simulated host); default: where started.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The local API's Unix socket [default: /run/particle/agent.sock].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Warm endpoints kept per tenant [default: 32].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
    /// Tenant-free endpoints kept warm, bound to a tenant that runs dry; 0: none [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_pool_size: Option<usize>,
    /// Where `/metrics` listens [default: the underlay address, port 9101].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Name prefix of this agent's kernel objects [default: random].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The OCI runtime jobs with `"runtime": "oci"` use [default: runc if installed].
    // The one default serde applies, when the key is absent: a file's
    // explicit `oci_runtime: ~` turns the OCI runtime off.
    #[arg(long)]
    #[serde(
        default = "default_oci_runtime",
        skip_serializing_if = "Option::is_none"
    )]
    pub oci_runtime: Option<PathBuf>,
    /// Serve warm connections on this Unix socket [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_socket: Option<PathBuf>,
    /// Agent-to-agent warm listener port, on the underlay address [default: 7702].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_port: Option<u16>,
    /// Warm connections kept per destination [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_pool_size: Option<usize>,
    /// An external service to keep warm: ADDR:PORT or ADDR:PORT=TENANT,TENANT (repeatable).
    #[arg(long = "warm-destination")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm_destinations: Vec<String>,
    /// Keep-warm probe period on agent-to-agent connections, ms [default: 0, none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_probe_ms: Option<u64>,
    /// Functions' images, default limits and tenants' quotas (settings file
    /// only: no flag, so the flags never override the file's).
    #[arg(skip)]
    #[serde(default, skip_serializing)]
    pub sandbox: particle_node_agent::sandbox::SandboxConfig,
}

fn default_oci_runtime() -> Option<PathBuf> {
    ["/usr/sbin/runc", "/usr/bin/runc"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl config::Settings for AgentSettings {
    fn file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn check(&self) -> Result<()> {
        self.node()?;
        self.controller()?;
        self.token_file()?;
        self.underlay_iface()?;
        self.underlay_ip()?;
        Ok(())
    }
}

impl AgentSettings {
    pub fn node(&self) -> Result<&str> {
        required(&self.node, "node").map(String::as_str)
    }

    pub fn controller(&self) -> Result<Vec<SocketAddr>> {
        required(&self.controller, "controller").map(|c| c.0.clone())
    }

    pub fn token_file(&self) -> Result<&Path> {
        required(&self.token_file, "token_file").map(PathBuf::as_path)
    }

    pub fn underlay_iface(&self) -> Result<&str> {
        required(&self.underlay_iface, "underlay_iface").map(String::as_str)
    }

    pub fn underlay_ip(&self) -> Result<Ipv4Addr> {
        required(&self.underlay_ip, "underlay_ip").copied()
    }

    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/particle/agent.sock"))
    }

    pub fn pool_size(&self) -> usize {
        self.pool_size.unwrap_or(32)
    }

    pub fn free_pool_size(&self) -> usize {
        self.free_pool_size.unwrap_or(16)
    }

    /// Port of the agent-to-agent warm listener, on the underlay address.
    pub fn warm_port(&self) -> u16 {
        self.warm_port.unwrap_or(7702)
    }

    /// Connections kept per destination, idle or lent.
    pub fn warm_pool_size(&self) -> usize {
        self.warm_pool_size.unwrap_or(4)
    }

    /// Keep-warm probe period on agent-to-agent connections, ms (0: none).
    pub fn warm_probe_ms(&self) -> u64 {
        self.warm_probe_ms.unwrap_or(0)
    }

    /// The warm-connection service's config, if `warm_socket` turns it on.
    pub fn warm_config(&self) -> Result<Option<particle_node_agent::warm_connections::WarmConfig>> {
        let Some(socket) = &self.warm_socket else {
            return Ok(None);
        };
        let mut c = particle_node_agent::warm_connections::WarmConfig::new(socket.clone());
        c.listen = Some(SocketAddr::from((self.underlay_ip()?, self.warm_port())));
        c.pool_size = self.warm_pool_size().max(1);
        // Saturating: a huge warm_pool_size must not overflow (a panic in debug builds).
        c.max_idle = c.pool_size.saturating_mul(2);
        c.destinations = self
            .warm_destinations
            .iter()
            .map(|d| warm_destination(d))
            .collect::<Result<_>>()?;
        let probe_ms = self.warm_probe_ms();
        c.probe_every = (probe_ms > 0).then(|| std::time::Duration::from_millis(probe_ms));
        // The agent owns its node's namespace: an idle warm connection keeps its window.
        c.slow_start_after_idle_off = true;
        Ok(Some(c))
    }
}

/// `ADDR` or `ADDR=TENANT,TENANT`.
pub fn warm_destination(s: &str) -> Result<particle_node_agent::warm_connections::WarmDestination> {
    let (addr, tenants) = match s.split_once('=') {
        Some((a, t)) => (a, t.split(',').map(|t| t.trim().to_string()).collect()),
        None => (
            s,
            vec![particle_node_agent::warm_connections::ANY_TENANT.to_string()],
        ),
    };
    let addr = addr
        .trim()
        .parse()
        .with_context(|| format!("warm destination {s:?}: expected ADDR:PORT[=TENANT,...]"))?;
    if tenants.iter().any(String::is_empty) {
        anyhow::bail!("warm destination {s:?}: empty tenant name");
    }
    Ok(particle_node_agent::warm_connections::WarmDestination { addr, tenants })
}

/// Runs the agent until it fails.
pub fn run(flags: &AgentSettings) -> Result<()> {
    use particle_net::{PoolConfig, Run, RunPrefix};
    let args = config::resolve(flags)?;
    config::enter_netns(args.netns.as_deref())?;
    let token = config::read_token(args.token_file()?)?;
    let run = match &args.prefix {
        Some(p) => Run::with_prefix(RunPrefix::parse(p)?)?,
        None => Run::start()?,
    };
    let mut socket = particle_net::NetlinkSocket::open()?;
    let iface = particle_net::IfName::new(args.underlay_iface()?.to_string())?;
    let underlay_index = particle_net::bridge::Bridge::lookup(&mut socket, &iface)
        .with_context(|| format!("underlay interface {iface}"))?
        .index;
    let underlay_ip = args.underlay_ip()?;
    let free_pool_size = args.free_pool_size();
    let config = particle_node_agent::daemon::AgentConfig {
        node_name: args.node()?.to_string(),
        node: particle_node_agent::NodeConfig {
            prefix: run.prefix().clone(),
            underlay: particle_net::overlay::Underlay {
                index: underlay_index,
                address: underlay_ip,
            },
            pool: PoolConfig::warm(args.pool_size().max(1)),
            workers: 0,
            free_pool: (free_pool_size > 0).then(|| PoolConfig::warm(free_pool_size)),
        },
        socket_path: args.socket(),
        heartbeat_every: std::time::Duration::from_secs(1),
        oci_runtime: args.oci_runtime.clone(),
        sandbox: args.sandbox.clone(),
    };
    let warm = args.warm_config()?;
    let client = particle_wire::client::ApiClient::direct_to_any(args.controller()?, token);
    let metrics_addr = args
        .metrics_listen
        .unwrap_or_else(|| SocketAddr::from((underlay_ip, 9101)));
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

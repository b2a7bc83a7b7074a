//! Settings of the long-running commands: a YAML file (`--config`) whose keys
//! are the flags' names with `_`, and flags that override it key by key.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSettings {
    #[serde(default = "default_controller_listen")]
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Seconds.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout: f64,
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    pub node: String,
    pub controller: SocketAddr,
    pub token_file: PathBuf,
    pub underlay_iface: String,
    pub underlay_ip: Ipv4Addr,
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default = "default_agent_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default = "default_free_pool_size")]
    pub free_pool_size: usize,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub prefix: Option<String>,
    /// The OCI runtime jobs may ask for; default: runc if installed.
    #[serde(default = "default_oci_runtime")]
    pub oci_runtime: Option<PathBuf>,
    /// Serve warm connections on this Unix socket (off when unset).
    #[serde(default)]
    pub warm_socket: Option<PathBuf>,
    /// Port of the agent-to-agent warm listener, on the underlay address.
    #[serde(default = "default_warm_port")]
    pub warm_port: u16,
    /// Connections kept per destination, idle or lent.
    #[serde(default = "default_warm_pool_size")]
    pub warm_pool_size: usize,
    /// External services to keep warm: `ADDR` (every tenant) or `ADDR=TENANT,TENANT`.
    #[serde(default)]
    pub warm_destinations: Vec<String>,
    /// Keep-warm probe period on agent-to-agent connections, ms (0: none).
    #[serde(default)]
    pub warm_probe_ms: u64,
}

impl AgentSettings {
    /// The warm-connection service's config, if `warm_socket` turns it on.
    pub fn warm_config(&self) -> Result<Option<particle_node_agent::warm_pool::WarmConfig>> {
        let Some(socket) = &self.warm_socket else {
            return Ok(None);
        };
        let mut c = particle_node_agent::warm_pool::WarmConfig::new(socket.clone());
        c.listen = Some(SocketAddr::from((self.underlay_ip, self.warm_port)));
        c.pool_size = self.warm_pool_size.max(1);
        c.max_idle = c.pool_size * 2;
        c.destinations = self
            .warm_destinations
            .iter()
            .map(|d| warm_destination(d))
            .collect::<Result<_>>()?;
        c.probe_every =
            (self.warm_probe_ms > 0).then(|| std::time::Duration::from_millis(self.warm_probe_ms));
        // The agent owns its node's namespace: an idle warm connection keeps its window.
        c.slow_start_after_idle_off = true;
        Ok(Some(c))
    }
}

/// `ADDR` or `ADDR=TENANT,TENANT`.
pub fn warm_destination(s: &str) -> Result<particle_node_agent::warm_pool::WarmDestination> {
    let (addr, tenants) = match s.split_once('=') {
        Some((a, t)) => (a, t.split(',').map(|t| t.trim().to_string()).collect()),
        None => (
            s,
            vec![particle_node_agent::warm_pool::ANY_TENANT.to_string()],
        ),
    };
    let addr = addr
        .trim()
        .parse()
        .with_context(|| format!("warm destination {s:?}: expected ADDR:PORT[=TENANT,...]"))?;
    if tenants.iter().any(String::is_empty) {
        anyhow::bail!("warm destination {s:?}: empty tenant name");
    }
    Ok(particle_node_agent::warm_pool::WarmDestination { addr, tenants })
}

fn default_warm_port() -> u16 {
    7702
}

fn default_warm_pool_size() -> usize {
    4
}

fn default_controller_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7700))
}

fn default_heartbeat_timeout() -> f64 {
    10.0
}

fn default_agent_socket() -> PathBuf {
    PathBuf::from("/run/particle/agent.sock")
}

fn default_oci_runtime() -> Option<PathBuf> {
    ["/usr/sbin/runc", "/usr/bin/runc"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn default_pool_size() -> usize {
    32
}

fn default_free_pool_size() -> usize {
    16
}

/// The file's settings with the flags' on top, checked as a whole.
pub fn resolve<T: DeserializeOwned>(file: Option<&Path>, flags: &impl Serialize) -> Result<T> {
    let text = match file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => String::new(),
    };
    merge(&text, flags).with_context(|| match file {
        Some(path) => format!("settings from {} and flags", path.display()),
        None => "settings from flags".to_string(),
    })
}

fn merge<T: DeserializeOwned>(yaml: &str, flags: &impl Serialize) -> Result<T> {
    let mut settings = if yaml.trim().is_empty() {
        serde_json::Map::new()
    } else {
        match serde_norway::from_str::<serde_json::Value>(yaml)? {
            serde_json::Value::Object(map) => map,
            other => anyhow::bail!("expected a mapping of settings, found {other}"),
        }
    };
    if let serde_json::Value::Object(flags) = serde_json::to_value(flags)? {
        settings.extend(flags);
    }
    Ok(serde_json::from_value(serde_json::Value::Object(settings))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        pool_size: Option<usize>,
    }

    const AGENT: &str = "node: n1\ncontroller: 10.0.0.1:7700\ntoken_file: /t\nunderlay_iface: eth0\nunderlay_ip: 10.0.0.2\npool_size: 8\n";

    #[test]
    fn file_settings_with_flags_on_top() {
        let s: AgentSettings = merge(AGENT, &Flags { pool_size: None }).unwrap();
        assert_eq!(s.pool_size, 8);
        assert_eq!(s.socket, default_agent_socket());
        let s: AgentSettings = merge(
            AGENT,
            &Flags {
                pool_size: Some(64),
            },
        )
        .unwrap();
        assert_eq!(s.pool_size, 64);
        let c: ControllerSettings = merge("token_file: /t\n", &Flags { pool_size: None }).unwrap();
        assert_eq!(c.listen, default_controller_listen());
        assert_eq!(c.heartbeat_timeout, 10.0);
    }

    #[test]
    fn warm_settings() {
        let s: AgentSettings = merge(AGENT, &Flags { pool_size: None }).unwrap();
        assert!(s.warm_config().unwrap().is_none());
        let yaml = format!(
            "{AGENT}warm_socket: /run/w.sock\nwarm_destinations: [\"10.0.0.9:80=a,b\", \"10.0.0.8:5432\"]\n"
        );
        let s: AgentSettings = merge(&yaml, &Flags { pool_size: None }).unwrap();
        let w = s.warm_config().unwrap().unwrap();
        assert_eq!(w.listen, Some("10.0.0.2:7702".parse().unwrap()));
        assert_eq!(w.destinations[0].tenants, ["a", "b"]);
        assert_eq!(w.destinations[1].tenants, ["*"]);
        for bad in ["nowhere", "10.0.0.9:80=", "10.0.0.9:80=a,"] {
            assert!(warm_destination(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_settings_are_refused_clearly() {
        let none = Flags { pool_size: None };
        let e = merge::<AgentSettings>("node: n1\n", &none).unwrap_err();
        assert!(format!("{e:#}").contains("missing field"), "{e:#}");
        let e = merge::<ControllerSettings>("token_file: /t\nlisten_on: x\n", &none).unwrap_err();
        assert!(
            format!("{e:#}").contains("unknown field `listen_on`"),
            "{e:#}"
        );
        let e =
            merge::<ControllerSettings>("token_file: /t\nlisten: nowhere\n", &none).unwrap_err();
        assert!(format!("{e:#}").contains("invalid socket address"), "{e:#}");
        let e = merge::<ControllerSettings>("- a\n- b\n", &none).unwrap_err();
        assert!(format!("{e:#}").contains("expected a mapping"), "{e:#}");
        assert!(merge::<ControllerSettings>("key: [unclosed\n", &none).is_err());
    }
}

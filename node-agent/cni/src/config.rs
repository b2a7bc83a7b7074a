//! The plugin's own keys of the network configuration, validated with the
//! spec's error codes: a key the plugin does not understand is code 2
//! (unsupported field), a missing or malformed required one code 7.

use std::path::PathBuf;

use rscni_plugin::error::Error;
use rscni_plugin::types::NetConf;

/// Keys of ours, besides the spec's own (`cniVersion`, `name`, `type`,
/// `dns`, `args`, `prevResult`, `runtimeConfig`, `capabilities`, ...).
pub const AGENT_SOCKET: &str = "agentSocket";
pub const TENANT: &str = "tenant";
/// Seconds to wait for the agent's answer (default 10).
pub const TIMEOUT: &str = "timeoutSeconds";
/// `"plug"` (default: a pair made on the tenant's warm bridge straight into
/// the container's namespace) or `"move"` (a warm endpoint's own interface
/// moved in; the kernel's namespace move costs an RCU barrier).
pub const ATTACH_MODE: &str = "attachMode";

const DEFAULT_TIMEOUT_SECONDS: u64 = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    pub network: String,
    pub tenant: String,
    pub agent_socket: PathBuf,
    pub timeout: std::time::Duration,
    /// `plug` or `move`, as the agent's local API spells it.
    pub attach_mode: String,
}

impl PluginConfig {
    pub fn from_netconf(conf: &NetConf) -> Result<Self, Error> {
        if let Some(key) = conf
            .custom
            .keys()
            .find(|k| ![AGENT_SOCKET, TENANT, TIMEOUT, ATTACH_MODE].contains(&k.as_str()))
        {
            return Err(Error::UnsupportedNetworkConfiguration(format!(
                "unknown key {key:?}; particle-cni understands {AGENT_SOCKET:?}, {TENANT:?}, {TIMEOUT:?} and {ATTACH_MODE:?}"
            )));
        }
        if conf.ipam.is_some() {
            return Err(Error::UnsupportedNetworkConfiguration(
                "\"ipam\": addresses come from the agent's warm endpoints; remove the ipam section"
                    .into(),
            ));
        }
        if conf.ip_masq == Some(true) {
            return Err(Error::UnsupportedNetworkConfiguration(
                "\"ipMasq\": the tenant overlay is private; masquerading is not supported".into(),
            ));
        }
        let string = |key: &str| -> Result<String, Error> {
            match conf.custom.get(key) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(other) => Err(Error::InvalidNetworkConfig(format!(
                    "{key:?} must be a non-empty string, not {other}"
                ))),
                None => Err(Error::InvalidNetworkConfig(format!("{key:?} is required"))),
            }
        };
        let agent_socket = PathBuf::from(string(AGENT_SOCKET)?);
        if !agent_socket.is_absolute() {
            return Err(Error::InvalidNetworkConfig(format!(
                "{AGENT_SOCKET:?} must be an absolute path, not {}",
                agent_socket.display()
            )));
        }
        let timeout = match conf.custom.get(TIMEOUT) {
            None => DEFAULT_TIMEOUT_SECONDS,
            Some(v) => v.as_u64().filter(|s| *s > 0).ok_or_else(|| {
                Error::InvalidNetworkConfig(format!(
                    "{TIMEOUT:?} must be a positive whole number, not {v}"
                ))
            })?,
        };
        let attach_mode = match conf.custom.get(ATTACH_MODE) {
            None => "plug".to_string(),
            Some(serde_json::Value::String(m)) if m == "plug" || m == "move" => m.clone(),
            Some(other) => {
                return Err(Error::InvalidNetworkConfig(format!(
                    "{ATTACH_MODE:?} must be \"plug\" or \"move\", not {other}"
                )))
            }
        };
        Ok(Self {
            attach_mode,
            network: conf.name.clone(),
            tenant: string(TENANT)?,
            agent_socket,
            timeout: std::time::Duration::from_secs(timeout),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: &str) -> NetConf {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_good_config() {
        let c = PluginConfig::from_netconf(&conf(
            r#"{"cniVersion":"1.0.0","name":"n","type":"particle-cni","tenant":"a","agentSocket":"/run/p.sock"}"#,
        ))
        .unwrap();
        assert_eq!(c.tenant, "a");
        assert_eq!(c.network, "n");
        assert_eq!(c.agent_socket, PathBuf::from("/run/p.sock"));
        assert_eq!(c.timeout.as_secs(), 10);
        assert_eq!(c.attach_mode, "plug");
    }

    #[test]
    fn bad_configs_get_the_spec_codes() {
        let base = r#""cniVersion":"1.0.0","name":"n","type":"particle-cni""#;
        for (extra, code, needle) in [
            (r#","agentSocket":"/s""#, 7, "\"tenant\" is required"),
            (r#","tenant":"a""#, 7, "\"agentSocket\" is required"),
            (r#","tenant":"a","agentSocket":"rel.sock""#, 7, "absolute"),
            (r#","tenant":5,"agentSocket":"/s""#, 7, "non-empty string"),
            (
                r#","tenant":"a","agentSocket":"/s","timeoutSeconds":0"#,
                7,
                "positive",
            ),
            (
                r#","tenant":"a","agentSocket":"/s","attachMode":"teleport""#,
                7,
                "\"plug\" or \"move\"",
            ),
            (
                r#","tenant":"a","agentSocket":"/s","bridge":"x""#,
                2,
                "\"bridge\"",
            ),
            (
                r#","tenant":"a","agentSocket":"/s","ipam":{"type":"host-local"}"#,
                2,
                "ipam",
            ),
        ] {
            let err = PluginConfig::from_netconf(&conf(&format!("{{{base}{extra}}}"))).unwrap_err();
            assert_eq!(u32::from(&err), code, "{extra}: {err:?}");
            assert!(err.details().contains(needle), "{extra}: {}", err.details());
        }
    }
}

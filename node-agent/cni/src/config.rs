//! The plugin's own keys of the network configuration, validated with the
//! spec's error codes: a key the plugin does not understand is code 2
//! (unsupported field), a missing or malformed required one code 7.

use std::path::PathBuf;

use particle_wire::local::AttachMode;
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
    /// How the agent lends the interface (`plug` or `move`).
    pub attach_mode: AttachMode,
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
            None => AttachMode::Plug,
            Some(serde_json::Value::String(m)) if m == "plug" => AttachMode::Plug,
            Some(serde_json::Value::String(m)) if m == "move" => AttachMode::Move,
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
        assert_eq!(c.attach_mode, AttachMode::Plug);
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

/// Bounded fuzzing (property tests, run by `cargo test`) of the network
/// configuration the runtime hands the plugin on stdin.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use serde_json::{json, Map, Value};

    fn config(cases: u32) -> Config {
        Config {
            cases,
            // A bug found here becomes a plain test; no files in the tree.
            failure_persistence: None,
            ..Config::default()
        }
    }

    fn text() -> BoxedStrategy<String> {
        prop_oneof![
            3 => "[a-z0-9/._-]{0,12}",
            1 => prop::collection::vec(any::<char>(), 0..10).prop_map(String::from_iter),
        ]
        .boxed()
    }

    fn json_value() -> BoxedStrategy<Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            text().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(text(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
    }

    /// A network configuration: the spec's keys right, ours and others
    /// each maybe missing, of the right type or of any.
    fn netconf() -> BoxedStrategy<Value> {
        let ours = |good: BoxedStrategy<Value>| {
            prop_oneof![
                1 => Just(None),
                5 => good.prop_map(Some),
                1 => json_value().prop_map(Some),
            ]
            .boxed()
        };
        let tenant =
            ours(prop_oneof![2 => Just(json!("a")), 1 => text().prop_map(Value::from)].boxed());
        let socket = ours(
            prop_oneof![
                2 => Just(json!("/run/particle/agent.sock")),
                1 => text().prop_map(Value::from),
                2 => text().prop_map(|t| Value::from(format!("/{t}"))),
            ]
            .boxed(),
        );
        let timeout = ours(
            prop_oneof![
                4 => (0u64..100).prop_map(Value::from),
                1 => Just(json!(u64::MAX)),
                1 => Just(json!(-1)),
                1 => Just(json!(2.5)),
                1 => Just(json!("10")),
            ]
            .boxed(),
        );
        let mode = ours(
            prop::sample::select(vec!["plug", "move", "Plug", "teleport", ""])
                .prop_map(Value::from)
                .boxed(),
        );
        // Each of the unsupported ones now and then, so the rest is reached.
        let spec = (
            prop::option::weighted(0.2, Just(json!({"type": "host-local"}))),
            prop::option::of(prop::bool::weighted(0.2)),
        );
        let extra = prop::option::weighted(
            0.2,
            (
                prop::sample::select(vec!["bridge", "mtu", "tenant ", "AgentSocket", "x"]),
                json_value(),
            ),
        );
        (tenant, socket, timeout, mode, spec, extra)
            .prop_map(|(tenant, socket, timeout, mode, (ipam, masq), extra)| {
                let mut m = Map::new();
                m.insert("cniVersion".into(), json!("1.0.0"));
                m.insert("name".into(), json!("particle"));
                m.insert("type".into(), json!("particle-cni"));
                for (k, v) in [
                    (TENANT, tenant),
                    (AGENT_SOCKET, socket),
                    (TIMEOUT, timeout),
                    (ATTACH_MODE, mode),
                    ("ipam", ipam),
                    ("ipMasq", masq.map(Value::from)),
                ] {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                }
                if let Some((k, v)) = extra {
                    m.insert(k.into(), v);
                }
                Value::Object(m)
            })
            .boxed()
    }

    /// What the plugin should make of `conf`, worked out independently: the
    /// spec's code 2 for what it does not support, 7 for a missing or
    /// malformed key of ours (2 first), or the settings.
    fn expected(conf: &Value) -> Result<(String, String, u64, String), u32> {
        let m = conf.as_object().unwrap();
        let ours = [TENANT, AGENT_SOCKET, TIMEOUT, ATTACH_MODE];
        let spec = ["cniVersion", "name", "type", "ipam", "ipMasq"];
        if m.keys()
            .any(|k| !ours.contains(&k.as_str()) && !spec.contains(&k.as_str()))
            || m.contains_key("ipam")
            || m.get("ipMasq") == Some(&json!(true))
        {
            return Err(2);
        }
        let string = |k: &str| match m.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(7u32),
        };
        let tenant = string(TENANT)?;
        let socket =
            string(AGENT_SOCKET).and_then(|s| if s.starts_with('/') { Ok(s) } else { Err(7) })?;
        let timeout = match m.get(TIMEOUT) {
            None => 10,
            Some(v) => v.as_u64().filter(|t| *t > 0).ok_or(7u32)?,
        };
        let mode = match m.get(ATTACH_MODE) {
            None => "plug".to_string(),
            Some(Value::String(s)) if s == "plug" || s == "move" => s.clone(),
            Some(_) => return Err(7),
        };
        Ok((tenant, socket, timeout, mode))
    }

    /// Near-valid configurations get exactly the outcome the rules call
    /// for, and an accepted timeout can be set on a socket.
    #[test]
    fn configs_get_the_outcome_the_rules_call_for() {
        TestRunner::new(config(3000))
            .run(&netconf(), |conf| {
                // Decoding is the plugin library's (code 6): only ours is judged here.
                let Ok(netconf) = serde_json::from_value::<NetConf>(conf.clone()) else {
                    return Ok(());
                };
                match (PluginConfig::from_netconf(&netconf), expected(&conf)) {
                    (Ok(c), Ok((tenant, socket, timeout, mode))) => {
                        prop_assert_eq!(&c.tenant, &tenant);
                        prop_assert_eq!(c.agent_socket, PathBuf::from(socket));
                        prop_assert_eq!(c.timeout.as_secs(), timeout);
                        prop_assert_eq!(
                            serde_json::to_value(c.attach_mode).ok(),
                            Some(Value::from(mode))
                        );
                        prop_assert_eq!(c.network.as_str(), "particle");
                        let (s, _) = std::os::unix::net::UnixStream::pair().unwrap();
                        prop_assert!(s.set_read_timeout(Some(c.timeout)).is_ok());
                    }
                    (Err(e), Err(code)) => {
                        prop_assert_eq!(u32::from(&e), code, "{}: {}", conf, e.details());
                        prop_assert!(!e.details().is_empty());
                    }
                    (got, want) => prop_assert!(false, "{conf}: got {got:?}, want {want:?}"),
                }
                Ok(())
            })
            .unwrap();
    }

    /// Anything the runtime may send: never a panic; a refusal carries the
    /// spec's code 2 or 7 and says why.
    #[test]
    fn any_json_is_accepted_or_refused_with_a_spec_code() {
        let docs = prop_oneof![
            json_value().prop_map(|v| v.to_string().into_bytes()),
            (json_value(), netconf()).prop_map(|(v, mut conf)| {
                // Any value under one of the spec's own keys too.
                conf["dns"] = v;
                conf.to_string().into_bytes()
            }),
            prop::collection::vec(any::<u8>(), 0..128),
        ];
        TestRunner::new(config(3000))
            .run(&docs, |bytes| {
                if let Ok(netconf) = serde_json::from_slice::<NetConf>(&bytes) {
                    if let Err(e) = PluginConfig::from_netconf(&netconf) {
                        prop_assert!(matches!(u32::from(&e), 2 | 7), "{e:?}");
                        prop_assert!(!e.details().is_empty());
                    }
                }
                Ok(())
            })
            .unwrap();
    }
}

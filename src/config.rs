//! What the long-running commands (`particle controller`, `particle agent`)
//! share: their settings come from flags and from a YAML file (`--config`)
//! whose keys are the flags' names with `_`, flags overriding it key by key
//! ([`resolve`]); each command declares its settings once, as one struct that
//! is both its clap flags and its serde keys ([`crate::controller::ControllerSettings`],
//! [`crate::agent::AgentSettings`]), and applies its defaults in that
//! struct's methods.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A command's settings: flags (clap) and file keys (serde) in one struct.
/// Its `Serialize` leaves out the flags that were not given.
pub trait Settings: Serialize + DeserializeOwned {
    /// The `--config` file, if given.
    fn file(&self) -> Option<&Path>;
    /// Refuses settings that lack a required key.
    fn check(&self) -> Result<()>;
}

/// The settings of `flags`' `--config` file with the flags on top, checked
/// as a whole.
pub fn resolve<T: Settings>(flags: &T) -> Result<T> {
    let file = flags.file();
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

fn merge<T: Settings>(yaml: &str, flags: &T) -> Result<T> {
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
    let settings: T = serde_json::from_value(serde_json::Value::Object(settings))?;
    settings.check()?;
    Ok(settings)
}

/// A required setting's value, or the error that names it.
pub fn required<'a, T>(value: &'a Option<T>, key: &str) -> Result<&'a T> {
    value
        .as_ref()
        .ok_or_else(|| anyhow!("missing field `{key}`"))
}

/// Positive seconds that fit a `Duration`: checked here, where the value is
/// read, because `Duration::from_secs_f64` panics on NaN, negatives and
/// anything too large (1e300 passed a finite-and-positive check).
pub fn positive_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let seconds = f64::deserialize(d)?;
    if seconds > 0.0 && std::time::Duration::try_from_secs_f64(seconds).is_ok() {
        Ok(Some(seconds))
    } else {
        Err(serde::de::Error::custom(format!(
            "expected a positive number of seconds that fits a duration, found {seconds}"
        )))
    }
}

/// Moves the whole process into a network namespace. Called while the process
/// has one thread: every socket and thread made later is then in it, as on a
/// real host.
pub fn enter_netns(path: Option<&Path>) -> Result<()> {
    if let Some(path) = path {
        let ns = particle_net::NetNs::open(path)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {}", path.display()))?;
    }
    Ok(())
}

/// The bearer token in `path` (trimmed; an empty file is an error).
pub fn read_token(path: &Path) -> Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token from {}", path.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!token.is_empty(), "{} holds no token", path.display());
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{warm_destination, AgentSettings};
    use crate::controller::ControllerSettings;
    use std::path::PathBuf;

    /// Flags that set `pool_size` (or nothing).
    fn flags(pool_size: Option<usize>) -> AgentSettings {
        AgentSettings {
            pool_size,
            ..Default::default()
        }
    }

    const AGENT: &str = "node: n1\ncontroller: 10.0.0.1:7700\ntoken_file: /t\nunderlay_iface: eth0\nunderlay_ip: 10.0.0.2\npool_size: 8\n";

    #[test]
    fn file_settings_with_flags_on_top() {
        let s = merge(AGENT, &flags(None)).unwrap();
        assert_eq!(s.pool_size(), 8);
        assert_eq!(s.socket(), PathBuf::from("/run/particle/agent.sock"));
        let s = merge(AGENT, &flags(Some(64))).unwrap();
        assert_eq!(s.pool_size(), 64);
        let c = merge("token_file: /t\n", &ControllerSettings::default()).unwrap();
        assert_eq!(c.listen(), "127.0.0.1:7700".parse().unwrap());
        assert_eq!(c.heartbeat_timeout(), 10.0);
    }

    /// Defaults apply to what neither the file nor the flags set; a flag
    /// given alone (no file) is enough for what it sets.
    #[test]
    fn defaults_fill_only_what_is_unset() {
        let s = merge(AGENT, &flags(None)).unwrap();
        assert_eq!(
            (s.free_pool_size(), s.warm_port(), s.warm_pool_size()),
            (16, 7702, 4)
        );
        assert_eq!(s.warm_probe_ms(), 0);
        let all_flags = AgentSettings {
            node: Some("n9".into()),
            controller: Some("10.0.0.1:7700".parse().unwrap()),
            token_file: Some("/t".into()),
            underlay_iface: Some("eth0".into()),
            underlay_ip: Some("10.0.0.2".parse().unwrap()),
            ..flags(Some(3))
        };
        let s = merge("", &all_flags).unwrap();
        assert_eq!((s.node().unwrap(), s.pool_size()), ("n9", 3));
        let s = merge(AGENT, &all_flags).unwrap();
        assert_eq!((s.node().unwrap(), s.pool_size()), ("n9", 3));
    }

    #[test]
    fn warm_settings() {
        let s = merge(AGENT, &flags(None)).unwrap();
        assert!(s.warm_config().unwrap().is_none());
        let yaml = format!(
            "{AGENT}warm_socket: /run/w.sock\nwarm_destinations: [\"10.0.0.9:80=a,b\", \"10.0.0.8:5432\"]\n"
        );
        let s = merge(&yaml, &flags(None)).unwrap();
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
        let none = ControllerSettings::default();
        let e = merge("node: n1\n", &flags(None)).unwrap_err();
        assert!(format!("{e:#}").contains("missing field"), "{e:#}");
        let e = merge("token_file: /t\nlisten_on: x\n", &none).unwrap_err();
        assert!(
            format!("{e:#}").contains("unknown field `listen_on`"),
            "{e:#}"
        );
        let e = merge("token_file: /t\nlisten: nowhere\n", &none).unwrap_err();
        assert!(format!("{e:#}").contains("invalid socket address"), "{e:#}");
        let e = merge("- a\n- b\n", &none).unwrap_err();
        assert!(format!("{e:#}").contains("expected a mapping"), "{e:#}");
        assert!(merge("key: [unclosed\n", &none).is_err());
    }
}

/// Bounded fuzzing (property tests, run by `cargo test`) of what an operator
/// writes: the YAML file, the flags on top and `--warm-destination`.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::agent::{warm_destination, AgentSettings};
    use crate::controller::ControllerSettings;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    fn config(cases: u32) -> Config {
        Config {
            cases,
            // A bug found here becomes a plain test; no files in the tree.
            failure_persistence: None,
            ..Config::default()
        }
    }

    /// A YAML scalar or small structure of any kind, as text.
    fn yaml_value() -> BoxedStrategy<String> {
        prop_oneof![
            6 => prop::sample::select(vec![
                // addresses, paths, names
                "10.0.0.1:7700", "\"[::1]:80\"", "nowhere", "10.0.0.2", "/t", "rel/path", "n1",
                "eth0", "''", "~", "null", "yes",
                // numbers: edges, non-finite, not numbers
                "0", "8", "-1", "10.5", "1e300", "-1e300", ".inf", "-.inf", ".nan", "1e-300",
                "18446744073709551615", "18446744073709551616", "9223372036854775807",
                "0x10", "1_000", "0.0",
                // lists and maps
                "[]", "[\"10.0.0.9:80=a,b\", \"10.0.0.8:5432\"]", "[\"nowhere\"]", "[1, 2]",
                "{a: 1}", "[[[[[[[[]]]]]]]]",
                // YAML's own features
                "&a [*a]", "*undefined", "!!binary aGVsbG8=", "!custom x", "|\n  block\n",
                "\"unterminated", "{", "- x",
            ])
            .prop_map(String::from),
            1 => any::<f64>().prop_map(|x| x.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => ".{0,12}",
        ]
        .boxed()
    }

    const CONTROLLER_KEYS: &[&str] = &[
        "listen",
        "token_file",
        "state_file",
        "store",
        "cluster_id",
        "advertise",
        "heartbeat_timeout",
        "netns",
    ];
    const AGENT_KEYS: &[&str] = &[
        "node",
        "controller",
        "token_file",
        "underlay_iface",
        "underlay_ip",
        "netns",
        "socket",
        "pool_size",
        "free_pool_size",
        "metrics_listen",
        "prefix",
        "oci_runtime",
        "warm_socket",
        "warm_port",
        "warm_pool_size",
        "warm_destinations",
        "warm_probe_ms",
        "sandbox",
    ];

    /// Mostly the settings' own keys, sometimes others.
    fn key(known: &'static [&'static str]) -> BoxedStrategy<String> {
        prop_oneof![
            8 => prop::sample::select(known).prop_map(String::from),
            1 => "[a-z_]{1,10}",
            1 => prop::sample::select(vec!["<<", "? [a]", "1", "''"]).prop_map(String::from),
        ]
        .boxed()
    }

    /// YAML text: near-valid settings files, and anything at all.
    fn yaml(known: &'static [&'static str]) -> BoxedStrategy<String> {
        let mapping = prop::collection::vec((key(known), yaml_value()), 0..6).prop_map(|kvs| {
            kvs.iter()
                .map(|(k, v)| format!("{k}: {v}\n"))
                .collect::<String>()
        });
        prop_oneof![
            6 => mapping,
            1 => ".{0,80}",
            1 => prop::collection::vec(any::<u8>(), 0..80)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            // Nesting around and past the parser's recursion limit (128):
            // an error, not a stack overflow.
            1 => (100usize..300).prop_map(|n| format!("a: {}{}", "[".repeat(n), "]".repeat(n))),
        ]
        .boxed()
    }

    /// A scratch file for `resolve` to read, removed when dropped.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("particle-config-fuzz-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir.join("settings.yaml"))
        }

        fn write(&self, text: &str) -> &Path {
            std::fs::write(&self.0, text).unwrap();
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Any file and flags: an error or settings the controller can use as
    /// they are (a heartbeat timeout that makes a `Duration`), flags winning.
    #[test]
    fn controller_settings_are_usable_or_refused() {
        let scratch = Scratch::new("controller");
        let flags = prop::option::of(prop_oneof![
            any::<f64>(),
            prop::sample::select(vec![1e300, -1.0, 0.0, f64::NAN, 0.5]),
        ])
        .prop_map(|heartbeat_timeout| ControllerSettings {
            heartbeat_timeout,
            ..Default::default()
        });
        // Often with the one required key, so the others are reached.
        let text = prop_oneof![
            1 => yaml(CONTROLLER_KEYS),
            2 => yaml(CONTROLLER_KEYS).prop_map(|extra| format!("token_file: /t\n{extra}")),
        ];
        TestRunner::new(config(1500))
            .run(&(text, flags), |(text, flags)| {
                let flags = ControllerSettings {
                    config: Some(scratch.write(&text).to_path_buf()),
                    ..flags
                };
                if let Ok(s) = resolve(&flags) {
                    let t = s.heartbeat_timeout();
                    prop_assert!(t > 0.0 && Duration::try_from_secs_f64(t).is_ok(), "{t}");
                    if let Some(f) = flags.heartbeat_timeout {
                        prop_assert_eq!(t, f);
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    /// Any file and flags: an error or settings whose warm config builds
    /// without a panic, one destination per entry, flags winning.
    #[test]
    fn agent_settings_are_usable_or_refused() {
        let scratch = Scratch::new("agent");
        let size = || {
            prop::option::of(prop_oneof![
                0usize..64,
                prop::sample::select(vec![usize::MAX, usize::MAX / 2 + 1])
            ])
        };
        let flags = (size(), size()).prop_map(|(pool_size, warm_pool_size)| AgentSettings {
            pool_size,
            warm_pool_size,
            ..Default::default()
        });
        // Often a complete agent file, so the fields after the required ones are reached.
        let text = prop_oneof![
            1 => yaml(AGENT_KEYS),
            2 => yaml(AGENT_KEYS).prop_map(|extra| format!(
                "node: n1\ncontroller: 10.0.0.1:7700\ntoken_file: /t\nunderlay_iface: eth0\n\
                 underlay_ip: 10.0.0.2\nwarm_socket: /run/w.sock\n{extra}"
            )),
        ];
        TestRunner::new(config(1500))
            .run(&(text, flags), |(text, flags)| {
                let flags = AgentSettings {
                    config: Some(scratch.write(&text).to_path_buf()),
                    ..flags
                };
                let Ok(s) = resolve(&flags) else {
                    return Ok(());
                };
                if let Some(n) = flags.pool_size {
                    prop_assert_eq!(s.pool_size(), n);
                }
                if let Some(n) = flags.warm_pool_size {
                    prop_assert_eq!(s.warm_pool_size(), n);
                }
                let parsed: Vec<Result<_>> = s
                    .warm_destinations
                    .iter()
                    .map(|d| warm_destination(d))
                    .collect();
                match s.warm_config() {
                    Ok(Some(w)) => {
                        prop_assert_eq!(w.destinations.len(), s.warm_destinations.len());
                        prop_assert!(w.max_idle >= w.pool_size && w.pool_size >= 1);
                    }
                    Ok(None) => prop_assert!(s.warm_socket.is_none()),
                    // Refused only for a destination that does not parse.
                    Err(e) => prop_assert!(parsed.iter().any(Result::is_err), "{e:#}"),
                }
                Ok(())
            })
            .unwrap();
    }

    /// Settings written out as YAML read back as the same settings.
    #[test]
    fn a_valid_agent_file_reads_back() {
        let scratch = Scratch::new("valid");
        let settings = (
            "[a-z][a-z0-9-]{0,12}",
            socket_addr(),
            any::<Ipv4Addr>(),
            0usize..100_000,
            prop::option::of(any::<u16>()),
            prop::collection::vec(destination(), 0..3),
        );
        TestRunner::new(config(500))
            .run(&settings, |(node, controller, ip, pool, port, dests)| {
                let mut yaml = serde_json::json!({
                    "node": node, "controller": controller.to_string(), "token_file": "/t",
                    "underlay_iface": "eth0", "underlay_ip": ip.to_string(), "pool_size": pool,
                    "warm_socket": "/run/w.sock",
                    "warm_destinations": dests.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
                });
                if let Some(port) = port {
                    yaml["warm_port"] = port.into();
                }
                let text = serde_norway::to_string(&yaml).unwrap();
                let flags = AgentSettings {
                    config: Some(scratch.write(&text).to_path_buf()),
                    ..Default::default()
                };
                let s = resolve(&flags).unwrap();
                prop_assert_eq!(
                    (
                        s.node().unwrap(),
                        s.controller().unwrap()[0],
                        s.underlay_ip().unwrap(),
                        s.pool_size()
                    ),
                    (node.as_str(), controller, ip, pool)
                );
                prop_assert_eq!(s.warm_port(), port.unwrap_or(7702));
                let w = s.warm_config().unwrap().unwrap();
                prop_assert_eq!(w.listen, Some(SocketAddr::from((ip, s.warm_port()))));
                let got: Vec<_> = w
                    .destinations
                    .iter()
                    .map(|d| (d.addr, d.tenants.clone()))
                    .collect();
                let want: Vec<_> = dests.into_iter().map(|d| (d.1, d.2)).collect();
                prop_assert_eq!(got, want);
                Ok(())
            })
            .unwrap();
    }

    /// Any address as text can name it (no IPv6 flow info or scope).
    fn socket_addr() -> BoxedStrategy<SocketAddr> {
        (any::<std::net::IpAddr>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(ip, port))
            .boxed()
    }

    /// A valid `--warm-destination`: its text (spaces around the parts
    /// allowed), the address and the tenants it names (`*` for none).
    fn destination() -> BoxedStrategy<(String, SocketAddr, Vec<String>)> {
        let pad = || prop::sample::select(vec!["", " ", "  "]);
        (
            socket_addr(),
            prop::option::of(prop::collection::vec(
                (pad(), "[a-z*][a-z0-9_-]{0,8}", pad()),
                1..4,
            )),
            pad(),
        )
            .prop_map(|(addr, tenants, p)| match tenants {
                None => (
                    format!("{p}{addr}{p}"),
                    addr,
                    vec![particle_node_agent::warm_connections::ANY_TENANT.to_string()],
                ),
                Some(ts) => {
                    let text: Vec<String> =
                        ts.iter().map(|(a, t, b)| format!("{a}{t}{b}")).collect();
                    let names = ts.into_iter().map(|(_, t, _)| t).collect();
                    (format!("{p}{addr}{p}={}", text.join(",")), addr, names)
                }
            })
            .boxed()
    }

    /// Any `--warm-destination` text: an error or a destination with an
    /// address and named, trimmed tenants; a valid one reads back exactly.
    #[test]
    fn warm_destinations_parse_exactly_or_are_refused() {
        let text = prop_oneof![
            ".{0,40}",
            "[0-9.:=, a-z\\[\\]]{0,30}",
            destination().prop_map(|d| d.0),
        ];
        TestRunner::new(config(3000))
            .run(&text, |s| {
                if let Ok(d) = warm_destination(&s) {
                    prop_assert!(!d.tenants.is_empty());
                    for t in &d.tenants {
                        prop_assert!(!t.is_empty() && t.trim() == t, "{s:?}: tenant {t:?}");
                    }
                }
                Ok(())
            })
            .unwrap();
        TestRunner::new(config(2000))
            .run(&destination(), |(text, addr, tenants)| {
                let d = warm_destination(&text).unwrap();
                prop_assert_eq!((d.addr, d.tenants), (addr, tenants));
                Ok(())
            })
            .unwrap();
    }

    /// Found by the properties above: each passed a check and panicked later.
    #[test]
    fn huge_numbers_are_refused_or_saturate() {
        let none = ControllerSettings::default();
        // (.inf and .nan are refused earlier: JSON has no such numbers.)
        for bad in ["1e300", "-1", "0", ".inf", ".nan"] {
            let e = merge(
                &format!("token_file: /t\nheartbeat_timeout: {bad}\n"),
                &none,
            )
            .unwrap_err();
            assert!(
                format!("{e:#}").contains("positive number of seconds") || bad.starts_with('.'),
                "{bad}: {e:#}"
            );
        }
        let agent = "node: n1\ncontroller: 10.0.0.1:7700\ntoken_file: /t\n\
                     underlay_iface: eth0\nunderlay_ip: 10.0.0.2\nwarm_socket: /w\n";
        let flags = AgentSettings {
            warm_pool_size: Some(usize::MAX),
            ..Default::default()
        };
        let s = merge(agent, &flags).unwrap();
        assert_eq!(s.warm_config().unwrap().unwrap().max_idle, usize::MAX);
    }
}

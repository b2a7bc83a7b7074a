//! The agent's local API: a Unix socket on the node (mode 0600: only root on
//! the node may call it; functions never can) speaking one JSON object per
//! line. The server is `particle_node_agent::api::local`.
//!
//! `{"op":"claim","tenant":"a"}` → `{"ok":true,"endpoint":{...}}`: a warm
//! endpoint whose namespace is at `netns` (a path into the agent's fds, valid
//! while the endpoint is claimed). `{"op":"release","id":7}` returns it;
//! `{"op":"status"}` reports the pools. Every error is `{"ok":false,"error":"..."}`.
//!
//! For container runtimes (the CNI plugin):
//! `{"op":"attach","network":"n","tenant":"a","container_id":"c","ifname":"eth0","netns":"/run/netns/x"}`
//! → `{"ok":true,"attachment":{...}}`: an interface of the tenant's overlay in
//! that namespace (`plug`: a new veth pair on the tenant's bridge; `move`: a
//! warm endpoint's interface moved there), addressed and routed; `{"op":"detach","container_id":"c","ifname":"eth0"}`
//! → `{"ok":true,"found":bool}` (unknown ones succeed); `{"op":"check",...}` →
//! the attachment if it is intact; `{"op":"gc","network":"n","valid":[{"container_id":"c","ifname":"eth0"}]}`
//! → `{"ok":true,"detached":[...]}`, every other attachment of that network detached.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::PoolLevel;

/// Longest request line accepted; anything longer is hostile or broken.
pub const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum LocalRequest {
    Claim {
        tenant: String,
    },
    Release {
        id: u64,
    },
    // An empty struct variant, not a unit one: serde's deny_unknown_fields
    // ignores unit variants of a tagged enum (`{"op":"status","x":1}` passed).
    Status {},
    Attach {
        network: String,
        tenant: String,
        container_id: String,
        ifname: String,
        netns: String,
        /// `plug` (default) or `move`; see [`AttachMode`].
        #[serde(default)]
        mode: AttachMode,
    },
    Detach {
        container_id: String,
        ifname: String,
    },
    Check {
        container_id: String,
        ifname: String,
    },
    Gc {
        network: String,
        valid: Vec<AttachmentKey>,
    },
}

impl LocalRequest {
    /// Whether answering it touches the kernel (and so must not run on the
    /// async executor).
    pub fn blocks(&self) -> bool {
        matches!(
            self,
            Self::Attach { .. } | Self::Detach { .. } | Self::Check { .. } | Self::Gc { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedEndpoint {
    pub id: u64,
    pub tenant: String,
    pub address: String,
    pub gateway: String,
    pub netns: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LocalResponse {
    Claimed {
        ok: bool,
        endpoint: ClaimedEndpoint,
    },
    Status {
        ok: bool,
        pools: BTreeMap<String, PoolLevel>,
    },
    Attached {
        ok: bool,
        attachment: Attachment,
    },
    Detached {
        ok: bool,
        found: bool,
    },
    Collected {
        ok: bool,
        detached: Vec<AttachmentKey>,
    },
    // Before `Done`: an untagged enum takes the first variant that fits, and
    // `{"ok":false,"error":..}` fits `Done` too (unknown fields are ignored).
    Error {
        ok: bool,
        error: String,
    },
    Done {
        ok: bool,
    },
}

impl LocalResponse {
    pub fn error(message: impl Into<String>) -> Self {
        Self::Error {
            ok: false,
            error: message.into(),
        }
    }
}

/// How an interface is lent to a runtime: `plug` (default) makes a veth
/// pair on the tenant's bridge with its peer in the runtime's namespace;
/// `move` moves a warm endpoint's interface there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    #[default]
    Plug,
    Move,
}

/// What the runtime is told of an attachment (the CNI result's substance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// The CNI network it was made for (GC is per network).
    pub network: String,
    pub tenant: String,
    /// The runtime's namespace path the interface went into.
    pub netns: String,
    /// Address with prefix length, e.g. `10.1.0.5/24`.
    pub address: String,
    pub gateway: String,
    pub mac: String,
    pub mode: AttachMode,
}

/// An attachment the runtime says should exist (CNI GC's valid list).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

/// Parses one request line; a clear error for anything malformed.
pub fn parse_request(line: &str) -> Result<LocalRequest, String> {
    serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(
            parse_request(r#"{"op":"claim","tenant":"a"}"#),
            Ok(LocalRequest::Claim { tenant: "a".into() })
        );
        assert_eq!(
            parse_request(r#"{"op":"release","id":7}"#),
            Ok(LocalRequest::Release { id: 7 })
        );
        assert_eq!(
            parse_request(r#"{"op":"status"}"#),
            Ok(LocalRequest::Status {})
        );
        for bad in [
            "",
            "{",
            r#"{"op":"destroy"}"#,
            r#"{"op":"claim"}"#,
            r#"{"op":"claim","tenant":"a","x":1}"#,
            r#"{"op":"status","tenant":"a"}"#,
            r#"{"op":"release","id":-1}"#,
        ] {
            let err = parse_request(bad).unwrap_err();
            assert!(err.starts_with("malformed request"), "{bad}: {err}");
        }
    }

    #[test]
    fn runtime_requests_parse_strictly() {
        assert_eq!(
            parse_request(
                r#"{"op":"attach","network":"n","tenant":"a","container_id":"c","ifname":"eth0","netns":"/run/netns/x"}"#
            ),
            Ok(LocalRequest::Attach {
                network: "n".into(),
                tenant: "a".into(),
                container_id: "c".into(),
                ifname: "eth0".into(),
                netns: "/run/netns/x".into(),
                mode: AttachMode::Plug,
            })
        );
        assert_eq!(
            parse_request(
                r#"{"op":"gc","network":"n","valid":[{"container_id":"c","ifname":"eth0"}]}"#
            ),
            Ok(LocalRequest::Gc {
                network: "n".into(),
                valid: vec![AttachmentKey {
                    container_id: "c".into(),
                    ifname: "eth0".into()
                }],
            })
        );
        for bad in [
            r#"{"op":"attach","tenant":"a","container_id":"c","ifname":"eth0"}"#,
            r#"{"op":"detach","container_id":"c"}"#,
            r#"{"op":"gc","network":"n"}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }
}

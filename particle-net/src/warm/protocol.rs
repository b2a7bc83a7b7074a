//! The warm-connection protocol on the agent's Unix socket: one JSON object per
//! line each way, a connection's fd attached to the line that mentions it.
//!
//! | request | reply |
//! | --- | --- |
//! | `{"op":"destinations"}` | `{"ok":true,"destinations":["10.0.0.9:80"]}`: the pooled destinations the caller's tenant may use |
//! | `{"op":"get","dest":"10.0.0.9:80"}` | `{"ok":true,"local_port":40312,"uses":3}` + the connected socket |
//! | `{"op":"put"}` + the socket | `{"ok":true,"pooled":true}`, or `"pooled":false` with a `reason` (the agent closed it) |
//! | `{"op":"channel","peer":"10.9.0.3:7702","key":"job7/0-1"}` | `{"ok":true}` + one end of an agent-to-agent connection |
//! | `{"op":"stats"}` | `{"ok":true,"stats":{...}}` |
//!
//! Errors are `{"ok":false,"error":"..."}`. The caller's tenant is never in a
//! request: the agent finds it from the peer's credentials.

use serde::{Deserialize, Serialize};

/// Longest line either side accepts; anything longer is broken or hostile.
pub const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum WarmRequest {
    // Empty struct variants, not unit ones: serde's deny_unknown_fields
    // ignores unit variants of a tagged enum.
    Destinations {},
    Get { dest: String },
    Put {},
    Channel { peer: String, key: String },
    Stats {},
}

/// Every reply: `ok`, and the fields of the request's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destinations: Option<Vec<String>>,
    /// `get`: the connection's local port (the same port means the same connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_port: Option<u16>,
    /// `get`: how many times the connection was handed out before this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u64>,
    /// `put`: whether the agent kept the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled: Option<bool>,
    /// `put`: why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<WarmStats>,
}

impl WarmResponse {
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            ..Self::default()
        }
    }
}

/// The agent's warm-connection counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmStats {
    /// Idle connections ready now, all destinations.
    pub idle: u64,
    /// Connections handed out and not yet back.
    pub lent: u64,
    /// Connections the agent established.
    pub connects: u64,
    /// Failed attempts to establish one.
    pub connect_errors: u64,
    /// `get`s answered with a connection.
    pub handed_out: u64,
    /// ... of which with a connection that had been used before.
    pub reused: u64,
    /// `get`s refused (not allowed, unknown destination, pool empty).
    pub refused: u64,
    /// Returned connections pooled again / closed as not clean.
    pub returned_clean: u64,
    pub returned_dirty: u64,
    /// Idle connections closed: dead (peer closed, error) or expired.
    pub dead: u64,
    pub expired: u64,
    /// Keep-warm probes sent on agent-to-agent connections.
    pub probes: u64,
    /// Function-to-function channels opened (either end).
    pub channels: u64,
}

/// The agent-to-agent wire before a connection is handed to a function:
/// frames of `[kind u8][len u32 BE][payload]`, exact-length reads only, so
/// nothing after a [`FRAME_BIND`] is ever consumed by the agent.
pub const FRAME_PROBE: u8 = 1;
/// The answer to a probe (empty payload).
pub const FRAME_PROBE_ACK: u8 = 2;
/// Binds the connection to a channel; payload is a [`ChannelBind`] in JSON.
/// What follows on the connection belongs to the two functions.
pub const FRAME_BIND: u8 = 3;
/// Header length of a frame.
pub const FRAME_HEADER: usize = 5;
/// Largest frame payload accepted.
pub const FRAME_MAX: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelBind {
    /// The tenant of the function at the initiating end, as its agent found it.
    pub tenant: String,
    pub key: String,
}

pub fn frame_header(kind: u8, len: usize) -> [u8; FRAME_HEADER] {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    [kind, len[0], len[1], len[2], len[3]]
}

pub fn parse_frame_header(h: [u8; FRAME_HEADER]) -> (u8, usize) {
    (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let get: WarmRequest =
            serde_json::from_str(r#"{"op":"get","dest":"10.0.0.9:80"}"#).unwrap();
        assert_eq!(
            get,
            WarmRequest::Get {
                dest: "10.0.0.9:80".into()
            }
        );
        for bad in [r#"{"op":"get"}"#, r#"{"op":"put","tenant":"a"}"#, "{"] {
            assert!(serde_json::from_str::<WarmRequest>(bad).is_err(), "{bad}");
        }
        let r = WarmResponse {
            local_port: Some(4000),
            ..WarmResponse::ok()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ok":true,"local_port":4000}"#
        );
        let h = frame_header(FRAME_BIND, 70000);
        assert_eq!(parse_frame_header(h), (FRAME_BIND, 70000));
    }
}

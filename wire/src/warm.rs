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
/// The first frame of every agent-to-agent connection: the cluster's token
/// (payload), proving the dialer is an agent. Anything else first is closed.
pub const FRAME_HELLO: u8 = 4;
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

/// Bounded fuzzing (property tests, run by `cargo test`) of what a function
/// or another agent can send: request lines, frame headers, bind payloads,
/// and the line framing they arrive in.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use serde_json::Value;

    fn config(cases: u32) -> Config {
        Config {
            cases,
            // A bug found here becomes a plain test; no files in the tree.
            failure_persistence: None,
            ..Config::default()
        }
    }

    /// Any characters, control characters, quotes and newlines included.
    fn text() -> BoxedStrategy<String> {
        prop_oneof![
            3 => "[a-z0-9.:/_-]{0,12}",
            1 => prop::collection::vec(any::<char>(), 0..10).prop_map(String::from_iter),
        ]
        .boxed()
    }

    fn request() -> BoxedStrategy<WarmRequest> {
        prop_oneof![
            Just(WarmRequest::Destinations {}),
            text().prop_map(|dest| WarmRequest::Get { dest }),
            Just(WarmRequest::Put {}),
            (text(), text()).prop_map(|(peer, key)| WarmRequest::Channel { peer, key }),
            Just(WarmRequest::Stats {}),
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

    /// An object with `keys` (and `op`, `tenant`, an unknown one), each maybe
    /// missing or of any type.
    fn near(ops: Vec<&'static str>, keys: Vec<&'static str>) -> BoxedStrategy<Value> {
        let value = prop_oneof![2 => text().prop_map(Value::from), 1 => json_value()];
        let mut keys = keys;
        keys.extend(["op", "tenant", "extra"]);
        (
            prop::sample::select(ops),
            prop::collection::btree_map(prop::sample::select(keys), value, 0..5),
            any::<bool>(),
        )
            .prop_map(|(op, fields, with_op)| {
                let mut m: serde_json::Map<String, Value> = fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                if with_op {
                    m.entry("op").or_insert_with(|| Value::from(op));
                }
                Value::Object(m)
            })
            .boxed()
    }

    /// `T` accepts an object only if it represents it exactly: every field
    /// given is known and comes back unchanged when serialised. (serde also
    /// takes a struct as an array of its fields in order; that form must
    /// mean the same once written back as an object.)
    fn accepts_only_what_it_keeps<T>(v: &Value) -> Result<(), TestCaseError>
    where
        T: serde::de::DeserializeOwned + Serialize + std::fmt::Debug,
    {
        let Ok(parsed) = serde_json::from_str::<T>(&v.to_string()) else {
            return Ok(());
        };
        let back = serde_json::to_value(&parsed).unwrap();
        let Value::Object(back) = &back else {
            return Err(TestCaseError::fail(format!("{parsed:?} is not an object")));
        };
        let Value::Object(given) = v else {
            let again = serde_json::to_value(
                serde_json::from_value::<T>(Value::Object(back.clone())).unwrap(),
            );
            prop_assert_eq!(
                again.as_ref().ok(),
                Some(&Value::Object(back.clone())),
                "{}",
                v
            );
            return Ok(());
        };
        for (k, given) in given {
            prop_assert_eq!(Some(given), back.get(k), "{} in {}", k, v);
        }
        Ok(())
    }

    /// A request line from a function: never a panic; accepted only if
    /// every field is one the request has, kept unchanged.
    #[test]
    fn request_lines_parse_exactly_or_are_refused() {
        let lines = prop_oneof![
            near(
                vec!["destinations", "get", "put", "channel", "stats", "bind", ""],
                vec!["dest", "peer", "key"]
            ),
            json_value(),
        ];
        TestRunner::new(config(3000))
            .run(&lines, |v| accepts_only_what_it_keeps::<WarmRequest>(&v))
            .unwrap();
        let text = prop_oneof![
            ".{0,64}",
            prop::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ];
        TestRunner::new(config(2000))
            .run(&text, |line| {
                let _ = serde_json::from_str::<WarmRequest>(&line);
                Ok(())
            })
            .unwrap();
    }

    /// Requests, replies and bind payloads serialise to one line (or one
    /// frame) that parses back to the same value.
    #[test]
    fn messages_round_trip() {
        TestRunner::new(config(2000))
            .run(&request(), |req| {
                let line = serde_json::to_string(&req).unwrap();
                prop_assert!(!line.contains('\n'), "{line:?}");
                prop_assert_eq!(serde_json::from_str::<WarmRequest>(&line).unwrap(), req);
                Ok(())
            })
            .unwrap();
        let stats = prop::collection::vec(any::<u64>(), 13).prop_map(|n| WarmStats {
            idle: n[0],
            lent: n[1],
            connects: n[2],
            connect_errors: n[3],
            handed_out: n[4],
            reused: n[5],
            refused: n[6],
            returned_clean: n[7],
            returned_dirty: n[8],
            dead: n[9],
            expired: n[10],
            probes: n[11],
            channels: n[12],
        });
        let response = (
            any::<bool>(),
            prop::option::of(text()),
            prop::option::of(prop::collection::vec(text(), 0..3)),
            prop::option::of(any::<u16>()),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<bool>()),
            prop::option::of(text()),
            prop::option::of(stats),
        )
            .prop_map(
                |(ok, error, destinations, local_port, uses, pooled, reason, stats)| WarmResponse {
                    ok,
                    error,
                    destinations,
                    local_port,
                    uses,
                    pooled,
                    reason,
                    stats,
                },
            );
        TestRunner::new(config(1000))
            .run(&response, |r| {
                let line = serde_json::to_string(&r).unwrap();
                prop_assert!(!line.contains('\n'), "{line:?}");
                prop_assert_eq!(serde_json::from_str::<WarmResponse>(&line).unwrap(), r);
                Ok(())
            })
            .unwrap();
        let bind = (text(), text()).prop_map(|(tenant, key)| ChannelBind { tenant, key });
        TestRunner::new(config(1000))
            .run(&bind, |b| {
                let payload = serde_json::to_vec(&b).unwrap();
                prop_assert!(payload.len() <= FRAME_MAX);
                let mut frame = frame_header(FRAME_BIND, payload.len()).to_vec();
                frame.extend_from_slice(&payload);
                let (kind, len) = parse_frame_header(frame[..FRAME_HEADER].try_into().unwrap());
                prop_assert_eq!((kind, len), (FRAME_BIND, payload.len()));
                let got: ChannelBind =
                    serde_json::from_slice(&frame[FRAME_HEADER..FRAME_HEADER + len]).unwrap();
                prop_assert_eq!(got, b);
                Ok(())
            })
            .unwrap();
    }

    /// A bind payload comes from another agent over TCP: any bytes, never a
    /// panic; accepted only with exactly its two fields.
    #[test]
    fn bind_payloads_parse_exactly_or_are_refused() {
        let payloads = prop_oneof![near(vec![""], vec!["key"]), json_value()];
        TestRunner::new(config(2000))
            .run(&payloads, |v| accepts_only_what_it_keeps::<ChannelBind>(&v))
            .unwrap();
        TestRunner::new(config(2000))
            .run(&prop::collection::vec(any::<u8>(), 0..128), |bytes| {
                let _ = serde_json::from_slice::<ChannelBind>(&bytes);
                Ok(())
            })
            .unwrap();
    }

    /// Frame headers: a bijection between (kind, length ≤ u32::MAX) and the
    /// five bytes, and a length that does not fit is never read as one a
    /// receiver accepts.
    #[test]
    fn frame_headers_round_trip() {
        TestRunner::new(config(5000))
            .run(&(any::<u8>(), any::<u32>()), |(kind, len)| {
                let len = len as usize;
                prop_assert_eq!(parse_frame_header(frame_header(kind, len)), (kind, len));
                Ok(())
            })
            .unwrap();
        TestRunner::new(config(5000))
            .run(&any::<[u8; FRAME_HEADER]>(), |h| {
                let (kind, len) = parse_frame_header(h);
                prop_assert_eq!(frame_header(kind, len), h);
                Ok(())
            })
            .unwrap();
        TestRunner::new(config(1000))
            .run(
                &(any::<u8>(), u32::MAX as usize..=usize::MAX),
                |(kind, len)| {
                    let (k, parsed) = parse_frame_header(frame_header(kind, len));
                    prop_assert_eq!(k, kind);
                    prop_assert!(parsed > FRAME_MAX, "{len} read back as {parsed}");
                    Ok(())
                },
            )
            .unwrap();
    }
}

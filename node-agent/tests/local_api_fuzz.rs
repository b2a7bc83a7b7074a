//! Bounded fuzzing (property tests, run by `cargo test`) of the agent's
//! local API: the request parser (`particle_wire::local`) and the
//! connection loop of the server (`particle_node_agent::api::local`) over a
//! real socket.

use std::path::Path;
use std::sync::Arc;

use particle_node_agent::api::local::{bind, serve, LocalApi};
use particle_wire::local::{
    parse_request, AttachMode, AttachmentKey, LocalRequest, LocalResponse, MAX_LINE,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

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
        3 => "[a-z0-9/_-]{0,10}",
        1 => prop::collection::vec(any::<char>(), 0..10).prop_map(String::from_iter),
    ]
    .boxed()
}

fn key() -> BoxedStrategy<AttachmentKey> {
    (text(), text())
        .prop_map(|(container_id, ifname)| AttachmentKey {
            container_id,
            ifname,
        })
        .boxed()
}

fn request() -> BoxedStrategy<LocalRequest> {
    prop_oneof![
        text().prop_map(|tenant| LocalRequest::Claim { tenant }),
        any::<u64>().prop_map(|id| LocalRequest::Release { id }),
        Just(LocalRequest::Status {}),
        (text(), text(), text(), text(), text(), any::<bool>()).prop_map(
            |(network, tenant, container_id, ifname, netns, plug)| LocalRequest::Attach {
                network,
                tenant,
                container_id,
                ifname,
                netns,
                mode: if plug {
                    AttachMode::Plug
                } else {
                    AttachMode::Move
                },
            }
        ),
        (text(), text()).prop_map(|(container_id, ifname)| LocalRequest::Detach {
            container_id,
            ifname
        }),
        (text(), text()).prop_map(|(container_id, ifname)| LocalRequest::Check {
            container_id,
            ifname
        }),
        (text(), prop::collection::vec(key(), 0..3))
            .prop_map(|(network, valid)| LocalRequest::Gc { network, valid }),
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

/// A request object with an `op` and fields of the right names, each
/// maybe missing or of any type.
fn near_request() -> BoxedStrategy<Value> {
    let op = prop::sample::select(vec![
        "claim", "release", "status", "attach", "detach", "check", "gc", "destroy", "",
    ]);
    let field = prop::sample::select(vec![
        "tenant",
        "id",
        "network",
        "container_id",
        "ifname",
        "netns",
        "mode",
        "valid",
        "op",
        "extra",
    ]);
    let value = prop_oneof![
        2 => text().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => prop::sample::select(vec!["plug", "move", "teleport"]).prop_map(Value::from),
        1 => prop::collection::vec(key(), 0..2).prop_map(|v| serde_json::json!(v)),
        1 => json_value(),
    ];
    (op, prop::collection::btree_map(field, value, 0..6))
        .prop_map(|(op, fields)| {
            let mut m: serde_json::Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            m.entry("op").or_insert_with(|| Value::from(op));
            Value::Object(m)
        })
        .boxed()
}

/// Arbitrary text never panics the parser: a request or a "malformed
/// request" error.
#[test]
fn any_text_parses_or_is_refused() {
    let text = prop_oneof![
        ".{0,64}",
        prop::collection::vec(any::<char>(), 0..64).prop_map(String::from_iter),
        json_value().prop_map(|v| v.to_string()),
    ];
    TestRunner::new(config(2000))
        .run(&text, |line| {
            if let Err(e) = parse_request(&line) {
                prop_assert!(e.starts_with("malformed request"), "{line:?}: {e}");
            }
            Ok(())
        })
        .unwrap();
}

/// What the parser accepts it represents exactly: every field given is
/// known and comes back unchanged when the request is serialised.
#[test]
fn accepted_requests_keep_every_field() {
    let values = prop_oneof![near_request(), json_value()];
    TestRunner::new(config(3000))
        .run(&values, |v| {
            let Ok(req) = parse_request(&v.to_string()) else {
                return Ok(());
            };
            let back = serde_json::to_value(&req).unwrap();
            let (Value::Object(given), Value::Object(back)) = (&v, &back) else {
                return Err(TestCaseError::fail(format!("{v} parsed as {req:?}")));
            };
            for (k, given) in given {
                // Entries of `valid` may carry keys that are ignored.
                if k == "valid" {
                    prop_assert_eq!(
                        given.as_array().map(Vec::len),
                        back[k].as_array().map(Vec::len)
                    );
                } else {
                    prop_assert_eq!(Some(given), back.get(k), "{} in {}", k, v);
                }
            }
            Ok(())
        })
        .unwrap();
}

/// Serialising a request gives one line that parses back to it.
#[test]
fn requests_round_trip_on_one_line() {
    TestRunner::new(config(2000))
        .run(&request(), |req| {
            let line = serde_json::to_string(&req).unwrap();
            prop_assert!(!line.contains('\n'), "{line:?}");
            prop_assert_eq!(parse_request(&line), Ok(req));
            Ok(())
        })
        .unwrap();
}

/// One line a client may send.
#[derive(Debug, Clone)]
enum Sent {
    Request(LocalRequest),
    Text(String),
    Bytes(Vec<u8>),
    /// A line of this many bytes before its newline, maybe too long.
    Long(usize),
}

impl Sent {
    fn bytes(&self) -> Vec<u8> {
        let mut b = match self {
            Self::Request(r) => serde_json::to_vec(r).unwrap(),
            Self::Text(t) => t.clone().into_bytes(),
            Self::Bytes(b) => b
                .iter()
                .map(|&b| if b == b'\n' { b' ' } else { b })
                .collect(),
            Self::Long(n) => {
                // A valid request padded with spaces: only its length is wrong.
                let mut b = br#"{"op":"status"}"#.to_vec();
                b.resize((*n).max(b.len()), b' ');
                b
            }
        };
        b.push(b'\n');
        b
    }
}

fn sent() -> BoxedStrategy<Sent> {
    prop_oneof![
        4 => request().prop_map(Sent::Request),
        2 => near_request().prop_map(|v| Sent::Text(v.to_string())),
        1 => ".{0,40}".prop_map(Sent::Text),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Sent::Bytes),
        1 => prop_oneof![MAX_LINE - 3..MAX_LINE + 3, 0..3 * MAX_LINE].prop_map(Sent::Long),
    ]
    .boxed()
}

/// The replies the connection loop owes for `lines`, from a fresh model:
/// one per line, in order (a line that is not UTF-8 gets an error), up
/// to the first line that is too long (an error, then closed). True if
/// it closes before the last line.
fn expected_replies(lines: &[Vec<u8>]) -> (Vec<Value>, bool) {
    let model = LocalApi::default();
    let mut out = Vec::new();
    for line in lines {
        // The loop reads at most MAX_LINE + 1 bytes of a line.
        let read = &line[..line.len().min(MAX_LINE + 1)];
        if read.len() > MAX_LINE {
            out.push(
                serde_json::to_value(LocalResponse::error(format!(
                    "request longer than {MAX_LINE} bytes"
                )))
                .unwrap(),
            );
            return (out, true);
        }
        let text = match std::str::from_utf8(read) {
            Ok(text) => text,
            Err(e) => {
                let reply = LocalResponse::error(format!("the request is not UTF-8: {e}"));
                out.push(serde_json::to_value(reply).unwrap());
                continue;
            }
        };
        let reply = match parse_request(text.trim()) {
            Ok(req) => model.handle(req),
            Err(e) => LocalResponse::error(e),
        };
        out.push(serde_json::to_value(reply).unwrap());
    }
    (out, false)
}

/// What the agent answers to `input`, and whether the connection was reset.
async fn exchange(path: &Path, input: Vec<u8>) -> (Vec<u8>, bool) {
    let stream = UnixStream::connect(path).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    // Written while replies are read: a long input must not deadlock on
    // full socket buffers.
    let writer = tokio::spawn(async move {
        // The agent may close early (a line too long).
        let _ = write.write_all(&input).await;
        let _ = write.shutdown().await;
    });
    let mut replies = Vec::new();
    // A Unix stream closed with input unread resets the other end after
    // the data sent before: what was read is what the agent answered.
    let reset = match read.read_to_end(&mut replies).await {
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(e) => panic!("reading replies: {e}"),
    };
    writer.await.unwrap();
    (replies, reset)
}

/// End to end over the real socket: arbitrary lines (invalid UTF-8, too
/// long, many) get exactly the replies owed, never a panic, and a new
/// connection's `status` still works afterwards.
#[test]
fn the_socket_answers_every_line_or_closes() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("particle-local-api-fuzz-{}", std::process::id()));
    let path = dir.join("agent.sock");
    // Bound inside the runtime (a tokio listener needs its reactor).
    let listener = rt.block_on(async { bind(&path).unwrap() });
    let server = rt.spawn(serve(listener, Arc::new(LocalApi::default())));
    let lines = prop::collection::vec(sent(), 0..24);
    let result = TestRunner::new(config(300)).run(&lines, |lines| {
        let lines: Vec<Vec<u8>> = lines.iter().map(Sent::bytes).collect();
        let (expected, closes_early) = expected_replies(&lines);
        rt.block_on(async {
            let (replies, reset) = exchange(&path, lines.concat()).await;
            prop_assert!(!reset || closes_early, "reset though every line was read");
            prop_assert!(replies.is_empty() || replies.ends_with(b"\n"));
            let replies: Vec<Value> = replies
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).unwrap())
                .collect();
            prop_assert_eq!(replies, expected);
            let (status, _) = exchange(&path, b"{\"op\":\"status\"}\n".to_vec()).await;
            prop_assert_eq!(
                serde_json::from_slice::<Value>(&status).unwrap(),
                serde_json::json!({"ok": true, "pools": {}})
            );
            Ok(())
        })
    });
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap();
}

//! Bounded fuzzing of the controller's HTTP API: property tests over a real
//! server on loopback, a fixed number of cases each so they run in CI.
//!
//! Every case checks the answer (2xx, or 4xx with an `ApiError` body; never
//! 5xx, never a dropped connection), that a refused request changed nothing
//! (tenants, nodes, jobs, overlay version, the stored state file) and that
//! the server still answers `/healthz`.
//!
//! Traffic stays on loopback: every node the tests register has a 127/8
//! underlay address and, if it can launch, an API port nothing listens on,
//! so the jobs the controller launches fail at once with "connection
//! refused".

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use particle_wire::api::{
    ApiError, CreateTenant, FunctionExits, Heartbeat, Job, JobState, JobSummary, LaunchJob, Node,
    NodeOverlay, PoolLevel, RegisterNode, Tenant, WarmTarget,
};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

/// Runs `cases` cases of `test`; a failure is shrunk to a minimal input and
/// reported with it. No regression files are written into the tree: a bug
/// found here gets a plain test below instead.
fn fuzz<S>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    if let Err(e) = TestRunner::new(config).run(&strategy, test) {
        panic!("{e}");
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The controller under test: tenant `red` (VNI 100, 10.1.0.0/16) and two
/// nodes that can launch (`n1`, `n2`, agents on closed loopback ports).
struct Fuzzed {
    server: Server,
    state_file: PathBuf,
    /// API ports nothing listens on, for nodes registered by the tests.
    closed_ports: Vec<u16>,
}

impl Drop for Fuzzed {
    fn drop(&mut self) {
        if let Some(dir) = self.state_file.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A port free on every local address right now: an agent "listening"
/// there refuses at once.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn fuzzed(tag: &str) -> Fuzzed {
    let state_file = temp_state_file(&format!("fuzz-{tag}"));
    let server = start(Opts {
        state_file: Some(state_file.clone()),
        // Short, so a `since` that hits the current version costs little.
        long_poll_max: Duration::from_millis(50),
        ..Opts::default()
    })
    .await;
    let closed_ports: Vec<u16> = (0..3).map(|_| closed_port()).collect();
    create_tenant(server.addr, "red", 100, "10.1.0.0/16").await;
    for (node, ip, port) in [
        ("n1", "127.0.0.2", closed_ports[0]),
        ("n2", "127.0.0.3", closed_ports[1]),
    ] {
        let r = call(
            server.addr,
            "POST",
            "/v1/agents/register",
            &json!({"node": node, "underlay_ip": ip, "api_port": port}).to_string(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    Fuzzed {
        server,
        state_file,
        closed_ports,
    }
}

/// Everything a request may change, as the API shows it.
#[derive(Debug, Clone, PartialEq)]
struct World {
    tenants: Vec<Tenant>,
    nodes: Vec<NodeView>,
    jobs: Vec<JobSummary>,
    version: u64,
    /// `particle_controller_pool_ready` series in `/metrics`.
    pool_series: usize,
    stored: Option<Vec<u8>>,
}

/// A node without `last_seen_ms`, which moves by itself.
#[derive(Debug, Clone, PartialEq)]
struct NodeView {
    name: String,
    underlay_ip: Ipv4Addr,
    api_port: Option<u16>,
    pools: BTreeMap<String, PoolLevel>,
}

impl World {
    fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

async fn world(f: &Fuzzed) -> World {
    let addr = f.server.addr;
    let nodes: Vec<Node> = call(addr, "GET", "/v1/nodes", "").await.json();
    let jobs: Vec<JobSummary> = call(addr, "GET", "/v1/jobs", "").await.json();
    let metrics = raw(addr, "GET", "/metrics", Some(TOKEN), "").await;
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    let version = metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("particle_controller_overlay_version "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pool_series = metrics
        .body
        .lines()
        .filter(|l| l.starts_with("particle_controller_pool_ready{"))
        .count();
    let world = World {
        tenants: tenants(addr).await,
        nodes: nodes
            .into_iter()
            .map(|n| NodeView {
                name: n.name,
                underlay_ip: n.underlay_ip,
                api_port: n.api_port,
                pools: n.pools,
            })
            .collect(),
        jobs,
        version,
        pool_series,
        stored: std::fs::read(&f.state_file).ok(),
    };
    // Not a property of the controller: the guard that keeps the launches
    // these tests make on this machine.
    for n in &world.nodes {
        assert!(
            n.api_port.is_none() || n.underlay_ip.is_loopback(),
            "node {} at {} could be dialled off loopback",
            n.name,
            n.underlay_ip
        );
    }
    world
}

/// 2xx, or 4xx with an `ApiError` body.
fn check_answer(r: &Resp, what: &dyn fmt::Debug) -> Result<(), TestCaseError> {
    prop_assert!(
        (200..300).contains(&r.status) || (400..500).contains(&r.status),
        "{what:?}: status {} body {}",
        r.status,
        r.body
    );
    if r.status >= 400 {
        let e = serde_json::from_str::<ApiError>(&r.body);
        prop_assert!(
            matches!(&e, Ok(e) if !e.error.is_empty()),
            "{what:?}: {} with body {:?}, not an ApiError",
            r.status,
            r.body
        );
    }
    Ok(())
}

async fn healthy(addr: SocketAddr) -> Result<(), TestCaseError> {
    let r = raw(addr, "GET", "/healthz", None, "").await;
    prop_assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    Ok(())
}

// ---------------------------------------------------------------- strategies

/// Any JSON value, a few levels deep.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN and infinities become null
        ".{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A field that is always there.
fn field(key: &'static str, value: BoxedStrategy<Value>) -> BoxedStrategy<Option<(String, Value)>> {
    value.prop_map(move |v| Some((key.to_string(), v))).boxed()
}

/// A field that may be left out.
fn maybe(key: &'static str, value: BoxedStrategy<Value>) -> BoxedStrategy<Option<(String, Value)>> {
    prop::option::of(value)
        .prop_map(move |v| v.map(|v| (key.to_string(), v)))
        .boxed()
}

fn object(fields: Vec<BoxedStrategy<Option<(String, Value)>>>) -> BoxedStrategy<Value> {
    fields
        .prop_map(|kvs| Value::Object(kvs.into_iter().flatten().collect::<Map<_, _>>()))
        .boxed()
}

/// Half the time the object as generated; otherwise with one field
/// dropped, given a value of any type, or an unknown field added.
fn mutated(valid: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    (
        valid,
        0..6usize,
        any::<Index>(),
        json_value(),
        "[a-z_]{1,12}",
    )
        .prop_map(|(v, how, i, other, key)| {
            let Value::Object(mut m) = v else { return v };
            let keys: Vec<String> = m.keys().cloned().collect();
            match how {
                1 if !keys.is_empty() => {
                    m.remove(&keys[i.index(keys.len())]);
                }
                2 if !keys.is_empty() => {
                    m.insert(keys[i.index(keys.len())].clone(), other);
                }
                3 => {
                    m.insert(key, other);
                }
                _ => {}
            }
            Value::Object(m)
        })
        .boxed()
}

/// A request body built around `valid`: near-valid objects, cut-off JSON,
/// any JSON, any bytes.
fn body(valid: BoxedStrategy<Value>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        6 => mutated(valid.clone()).prop_map(|v| v.to_string().into_bytes()),
        1 => (valid, any::<Index>()).prop_map(|(v, i)| {
            let text = v.to_string().into_bytes();
            text[..i.index(text.len())].to_vec()
        }),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ]
    .boxed()
}

fn name() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-z][a-z0-9-]{0,10}",
        1 => "[a-z][a-z0-9-]{30,33}",
        1 => ".{0,12}",
    ]
    .boxed()
}

/// Edges of a `usize`/`u64`, where arithmetic on it overflows.
fn huge() -> BoxedStrategy<Value> {
    prop_oneof![
        2 => select(vec![u64::MAX, u64::MAX / 2 + 1, 1 << 32, 1 << 53]).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
    ]
    .boxed()
}

/// A `usize`/`u64` field: small, huge, or not quite a count.
fn count() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => (0u64..=8).prop_map(Value::from),
        2 => huge(),
        1 => (i64::MIN..0).prop_map(Value::from),
        1 => Just(json!(1.5)),
        1 => Just(json!("3")),
    ]
    .boxed()
}

fn cidr() -> BoxedStrategy<String> {
    (any::<[u8; 4]>(), 0u8..=32, any::<bool>())
        .prop_map(|(ip, prefix, keep_host_bits)| {
            let mut ip = u32::from_be_bytes(ip);
            if !keep_host_bits {
                ip &= u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            }
            format!("{}/{prefix}", Ipv4Addr::from(ip))
        })
        .boxed()
}

fn create_tenant_body() -> BoxedStrategy<Value> {
    object(vec![
        field("name", name().prop_map(Value::from).boxed()),
        field(
            "vni",
            prop_oneof![
                3 => (95u32..=105).prop_map(Value::from),
                1 => any::<u32>().prop_map(Value::from),
                1 => count(),
            ]
            .boxed(),
        ),
        field(
            "subnet",
            prop_oneof![4 => cidr(), 1 => ".{0,20}"]
                .prop_map(Value::from)
                .boxed(),
        ),
        maybe(
            "block_prefix",
            prop_oneof![4 => (0u64..=33).prop_map(Value::from), 1 => count()].boxed(),
        ),
        maybe("warm_per_node", count()),
    ])
}

/// An underlay address: on loopback (never 127.0.0.1, where the
/// controller is), sometimes one already taken, or not an address.
fn underlay_ip() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => (1u8..=255, any::<u8>(), 1u8..=254).prop_map(|(a, b, c)| format!("127.{a}.{b}.{c}")),
        1 => select(vec!["127.0.0.2", "127.0.0.3"]).prop_map(String::from),
        1 => select(vec!["not-an-ip", "::1", "127.0.0", "127.0.0.256", "", " 127.0.0.9"])
            .prop_map(String::from),
    ]
    .prop_map(Value::from)
    .boxed()
}

fn register_body(closed_ports: Vec<u16>) -> BoxedStrategy<Value> {
    object(vec![
        field(
            "node",
            prop_oneof![4 => name(), 1 => select(vec!["n1".to_string(), "n2".to_string()])]
                .prop_map(Value::from)
                .boxed(),
        ),
        field("underlay_ip", underlay_ip()),
        maybe(
            "api_port",
            prop_oneof![
                3 => select(closed_ports).prop_map(Value::from),
                1 => Just(Value::Null),
                1 => prop_oneof![Just(json!(65536)), Just(json!(-1)), Just(json!("80"))],
            ]
            .boxed(),
        ),
    ])
}

fn heartbeat_body() -> BoxedStrategy<Value> {
    let level = object(vec![
        field("ready", count()),
        field("claims_total", count()),
        field("build_errors", count()),
    ]);
    object(vec![maybe(
        "pools",
        prop::collection::btree_map(
            prop_oneof![3 => name(), 1 => Just("red".to_string())],
            level,
            0..4,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect()))
        .boxed(),
    )])
}

fn exits_body() -> BoxedStrategy<Value> {
    let exit = object(vec![
        field("job", ".{0,10}".prop_map(Value::from).boxed()),
        field("rank", count()),
        field(
            "exit_code",
            prop_oneof![
                Just(Value::Null),
                any::<i32>().prop_map(Value::from),
                count()
            ]
            .boxed(),
        ),
        field(
            "error",
            prop::option::of(".{0,10}").prop_map(|e| json!(e)).boxed(),
        ),
        field("output", ".{0,20}".prop_map(Value::from).boxed()),
    ]);
    object(vec![field(
        "exits",
        prop::collection::vec(exit, 0..3)
            .prop_map(Value::Array)
            .boxed(),
    )])
}

fn launch_body() -> BoxedStrategy<Value> {
    let command = object(vec![
        field(
            "argv",
            // Mostly a program to run; sometimes none.
            prop_oneof![
                6 => prop::collection::vec(
                    prop_oneof![3 => Just("true".to_string()), 1 => ".{0,6}"],
                    1..3,
                ),
                1 => Just(Vec::new()),
            ]
            .prop_map(|v| json!(v))
            .boxed(),
        ),
        maybe(
            "env",
            prop::collection::btree_map(".{0,4}", ".{0,4}", 0..3)
                .prop_map(|m| json!(m))
                .boxed(),
        ),
    ]);
    let placement = object(vec![
        maybe(
            "nodes",
            prop_oneof![
                3 => prop::sample::subsequence(vec!["n1", "n2"], 0..=2),
                1 => prop::collection::vec(select(vec!["n1", "n2", "n9"]), 0..3),
            ]
            .prop_map(|v| json!(v))
            .boxed(),
        ),
        maybe(
            "max_per_node",
            prop_oneof![
                3 => (0u64..=4).prop_map(Value::from),
                3 => huge(),
                1 => count(),
            ]
            .boxed(),
        ),
    ]);
    object(vec![
        field(
            "tenant",
            prop_oneof![3 => Just("red".to_string()), 1 => name()]
                .prop_map(Value::from)
                .boxed(),
        ),
        field(
            "functions",
            prop_oneof![
                4 => (1u64..=4).prop_map(Value::from),
                1 => select(vec![0u64, 100_001, u64::MAX]).prop_map(Value::from),
                1 => count(),
            ]
            .boxed(),
        ),
        field("command", command),
        maybe("placement", placement),
        maybe(
            "runtime",
            select(vec!["builtin", "oci", "builtin", "docker"])
                .prop_map(Value::from)
                .boxed(),
        ),
        maybe(
            "port",
            prop_oneof![3 => any::<u16>().prop_map(Value::from), 1 => count()].boxed(),
        ),
    ])
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Route {
    CreateTenant,
    SetWarm,
    LaunchJob,
    Register,
    Heartbeat,
    Exits,
}

#[derive(Clone)]
struct BodyRequest {
    route: Route,
    method: &'static str,
    path: String,
    body: Vec<u8>,
}

impl fmt::Debug for BodyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {:?}",
            self.method,
            self.path,
            String::from_utf8_lossy(&self.body)
        )
    }
}

fn body_request(closed_ports: Vec<u16>) -> BoxedStrategy<BodyRequest> {
    let to = |route, method, path: &str| {
        let path = path.to_string();
        move |body| BodyRequest {
            route,
            method,
            path: path.clone(),
            body,
        }
    };
    let node = || select(vec!["n1", "n2", "ghost"]);
    let warm = object(vec![field(
        "per_node",
        prop_oneof![Just(Value::Null), count()].boxed(),
    )]);
    let heartbeat = prop_oneof![4 => body(heartbeat_body()), 1 => Just(Vec::new())];
    prop_oneof![
        1 => body(create_tenant_body()).prop_map(to(Route::CreateTenant, "POST", "/v1/tenants")),
        1 => (select(vec!["red", "nope"]), body(warm)).prop_map(move |(t, b)| {
            to(Route::SetWarm, "PUT", &format!("/v1/tenants/{t}/warm"))(b)
        }),
        2 => body(launch_body()).prop_map(to(Route::LaunchJob, "POST", "/v1/jobs")),
        1 => body(register_body(closed_ports))
            .prop_map(to(Route::Register, "POST", "/v1/agents/register")),
        1 => (node(), heartbeat).prop_map(move |(n, b)| {
            to(Route::Heartbeat, "POST", &format!("/v1/agents/{n}/heartbeat"))(b)
        }),
        1 => (node(), body(exits_body())).prop_map(move |(n, b)| {
            to(Route::Exits, "POST", &format!("/v1/agents/{n}/exits"))(b)
        }),
    ]
    .prop_map(keep_on_loopback)
    .boxed()
}

/// The tests' own guard (not a property): a registration whose underlay
/// address parses and is not loopback is moved to loopback before it is
/// sent, so the controller never dials another host. (serde also takes a
/// struct as an array of its fields: `underlay_ip` is the second.)
fn keep_on_loopback(mut r: BodyRequest) -> BodyRequest {
    let Ok(mut body) = serde_json::from_slice::<Value>(&r.body) else {
        return r;
    };
    let ip = match &mut body {
        Value::Object(m) => m.get_mut("underlay_ip"),
        Value::Array(a) => a.get_mut(1),
        _ => None,
    };
    if let Some(ip) = ip {
        let off = serde_json::from_value::<Ipv4Addr>(ip.clone()).is_ok_and(|ip| !ip.is_loopback());
        if off {
            *ip = json!("127.0.0.9");
            r.body = body.to_string().into_bytes();
        }
    }
    r
}

// -------------------------------------------------------------------- tests

/// (a) + (b): malformed and near-valid bodies on every route with a body.
#[test]
fn bodies_get_2xx_or_4xx_and_refusals_change_nothing() {
    let rt = runtime();
    let f = rt.block_on(fuzzed("bodies"));
    fuzz(400, body_request(f.closed_ports.clone()), |req| {
        rt.block_on(check_body_request(&f, &req))
    });
}

/// Well-formed jobs with hostile values (huge counts, empty or unknown
/// placements, no program): the arithmetic and checks behind the parser.
#[test]
fn well_formed_jobs_with_hostile_values() {
    let rt = runtime();
    let f = rt.block_on(fuzzed("jobs"));
    let jobs = launch_body().prop_map(|v| BodyRequest {
        route: Route::LaunchJob,
        method: "POST",
        path: "/v1/jobs".into(),
        body: v.to_string().into_bytes(),
    });
    fuzz(300, jobs, |req| rt.block_on(check_body_request(&f, &req)));
}

/// One request: 2xx or 4xx with an `ApiError`; refused, nothing changed;
/// accepted, exactly what was asked changed; the server still healthy.
async fn check_body_request(f: &Fuzzed, req: &BodyRequest) -> Result<(), TestCaseError> {
    let addr = f.server.addr;
    let before = world(f).await;
    let r = raw_bytes(addr, req.method, &req.path, Some(TOKEN), &req.body).await;
    check_answer(&r, req)?;
    let after = world(f).await;
    if r.status >= 400 {
        prop_assert_eq!(
            &after,
            &before,
            "{:?} was refused ({}) but changed the state",
            req,
            r.body
        );
    } else {
        accepted_did_what_it_says(req, &r, &before, &after)?;
    }
    healthy(addr).await
}

/// A 2xx answer is the documented type and the change is the one asked for,
/// and no other.
fn accepted_did_what_it_says(
    req: &BodyRequest,
    r: &Resp,
    before: &World,
    after: &World,
) -> Result<(), TestCaseError> {
    let parsed = |ok: bool| -> Result<(), TestCaseError> {
        prop_assert!(
            ok,
            "{:?} accepted ({}) but is not a valid request",
            req,
            r.status
        );
        Ok(())
    };
    match req.route {
        Route::CreateTenant => {
            let asked = serde_json::from_slice::<CreateTenant>(&req.body);
            parsed(asked.is_ok())?;
            let asked = asked.unwrap();
            prop_assert_eq!(r.status, 201);
            let t: Tenant = r.json();
            prop_assert_eq!((&t.name, t.vni), (&asked.name, asked.vni));
            prop_assert_eq!(t.block_prefix, asked.block_prefix.unwrap_or(24));
            prop_assert_eq!(t.warm_per_node, asked.warm_per_node);
            let node_names: Vec<&String> = after.nodes.iter().map(|n| &n.name).collect();
            prop_assert_eq!(t.blocks.keys().collect::<Vec<_>>(), node_names);
            let mut expected = before.tenants.clone();
            expected.push(t);
            expected.sort_by(|a, b| a.name.cmp(&b.name));
            prop_assert_eq!(&after.tenants, &expected);
            prop_assert_eq!(&after.nodes, &before.nodes);
            prop_assert_eq!(after.version, before.version + 1);
        }
        Route::SetWarm => {
            let asked = serde_json::from_slice::<WarmTarget>(&req.body);
            parsed(asked.is_ok())?;
            prop_assert_eq!(r.status, 200);
            let t: Tenant = r.json();
            prop_assert_eq!(t.warm_per_node, asked.unwrap().per_node);
            let mut expected = before.tenants.clone();
            for e in &mut expected {
                if e.name == t.name {
                    *e = t.clone();
                }
            }
            prop_assert_eq!(&after.tenants, &expected);
            prop_assert_eq!(&after.nodes, &before.nodes);
        }
        Route::Register => {
            let asked = serde_json::from_slice::<RegisterNode>(&req.body);
            parsed(asked.is_ok())?;
            let asked = asked.unwrap();
            prop_assert_eq!(r.status, 200);
            let o: NodeOverlay = r.json();
            prop_assert_eq!(&o.node, &asked.node);
            prop_assert_eq!(o.version, after.version);
            let node = after.node(&asked.node).map(|n| (n.underlay_ip, n.api_port));
            prop_assert_eq!(node, Some((asked.underlay_ip, asked.api_port)));
            // Every tenant has a block on every node.
            for t in &after.tenants {
                prop_assert!(
                    t.blocks.contains_key(&asked.node),
                    "{} has no block on {}",
                    t.name,
                    asked.node
                );
            }
            prop_assert_eq!(o.tenants.len(), after.tenants.len());
        }
        Route::Heartbeat => {
            let asked = if req.body.is_empty() {
                Ok(Heartbeat::default())
            } else {
                serde_json::from_slice::<Heartbeat>(&req.body)
            };
            parsed(asked.is_ok())?;
            prop_assert_eq!(r.status, 204);
            let node = req.path.split('/').nth(3).unwrap_or_default();
            let pools = after.node(node).map(|n| n.pools.clone());
            prop_assert_eq!(pools.as_ref(), Some(&asked.unwrap().pools));
            // One metrics series per reported pool, whatever the names hold.
            let series: usize = after.nodes.iter().map(|n| n.pools.len()).sum();
            prop_assert_eq!(after.pool_series, series);
            prop_assert_eq!(&after.tenants, &before.tenants);
            prop_assert_eq!(after.version, before.version);
        }
        Route::Exits => {
            parsed(serde_json::from_slice::<FunctionExits>(&req.body).is_ok())?;
            prop_assert_eq!(r.status, 204);
            prop_assert_eq!(&after.tenants, &before.tenants);
            prop_assert_eq!(&after.nodes, &before.nodes);
        }
        Route::LaunchJob => {
            let asked = serde_json::from_slice::<LaunchJob>(&req.body);
            parsed(asked.is_ok())?;
            prop_assert_eq!(r.status, 201);
            let job: Job = r.json();
            prop_assert_eq!(job.functions.len(), asked.unwrap().functions);
            prop_assert!(
                after.jobs.iter().any(|j| j.id == job.id),
                "job {} not listed",
                job.id
            );
            prop_assert_eq!(&after.tenants, &before.tenants);
            prop_assert_eq!(&after.nodes, &before.nodes);
        }
    }
    Ok(())
}

/// Percent-encodes everything but the unreserved characters.
fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
struct PathRequest {
    method: &'static str,
    segments: Vec<String>,
    query: String,
    token: bool,
}

impl PathRequest {
    fn target(&self) -> String {
        format!("/{}{}", self.segments.join("/"), self.query)
    }
}

fn path_request() -> BoxedStrategy<PathRequest> {
    let segment = || {
        prop_oneof![
            6 => select(vec![
                "v1", "tenants", "red", "warm", "nodes", "jobs", "functions", "0", "output",
                "agents", "n1", "register", "heartbeat", "overlay", "exits", "healthz",
                "metrics", "",
            ])
            .prop_map(String::from),
            1 => ".{0,12}".prop_map(|s| encode(s.as_bytes())),
            1 => prop::collection::vec(any::<u8>(), 0..8).prop_map(|b| encode(&b)),
            1 => select(vec![
                "%", "%zz", "%FF", "%C3%28", "..", ".", "%2F", "%00", "18446744073709551616",
            ])
            .prop_map(String::from),
        ]
    };
    // The API's own routes with arbitrary segments in their parameters
    // ("*"), so queries reach the handlers that read them.
    let routes = (
        select(vec![
            "v1/tenants/*",
            "v1/tenants/*/warm",
            "v1/jobs/*",
            "v1/jobs/*/functions/*/output",
            "v1/agents/*/overlay",
            "v1/agents/*/heartbeat",
            "v1/agents/*/exits",
            "v1/agents/register",
            "v1/tenants",
            "v1/nodes",
            "v1/jobs",
        ]),
        prop::collection::vec(prop_oneof![segment(), Just("n1".to_string())], 2),
    )
        .prop_map(|(route, holes)| {
            let mut holes = holes.into_iter();
            route
                .split('/')
                .map(|s| match s {
                    "*" => holes.next().unwrap_or_default(),
                    s => s.to_string(),
                })
                .collect::<Vec<_>>()
        });
    let segments = prop_oneof![routes, prop::collection::vec(segment(), 1..6)];
    let key = prop_oneof![
        4 => select(vec!["since", "wait_s", "offset", "output"]).prop_map(String::from),
        1 => "[a-z_]{1,6}",
    ];
    let value = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..4).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        // Display writes huge values in full (1e300 as 301 digits).
        any::<f64>().prop_map(|x| x.to_string()),
        select(vec![
            "1e300", "-1", "NaN", "inf", "-0", "0.01", "true", "", "1e-320", "0x10",
        ])
        .prop_map(String::from),
        ".{0,8}".prop_map(|s| encode(s.as_bytes())),
    ];
    let query = prop::collection::vec((key, value), 0..3).prop_map(|kvs| {
        if kvs.is_empty() {
            String::new()
        } else {
            let pairs: Vec<String> = kvs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("?{}", pairs.join("&"))
        }
    });
    (
        select(vec!["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
        segments,
        query,
        prop::bool::weighted(0.9),
    )
        .prop_map(|(method, segments, query, token)| PathRequest {
            method,
            segments,
            query,
            token,
        })
        .boxed()
}

/// (c): arbitrary paths and query strings, with any method.
#[test]
fn paths_and_queries_never_get_5xx() {
    let rt = runtime();
    let f = rt.block_on(fuzzed("paths"));
    fuzz(400, path_request(), |req| {
        rt.block_on(async {
            let addr = f.server.addr;
            let before = world(&f).await;
            let auth = req.token.then_some(TOKEN);
            let r = raw(addr, req.method, &req.target(), auth, "").await;
            prop_assert!(
                (200..300).contains(&r.status) || (400..500).contains(&r.status),
                "{:?} ({}): status {} body {}",
                req,
                req.target(),
                r.status,
                r.body
            );
            // HEAD answers carry no body.
            if req.method != "HEAD" {
                check_answer(&r, &req)?;
            }
            if !["v1", "healthz", "metrics"].contains(&req.segments[0].as_str()) {
                prop_assert_eq!(r.status, 404, "{:?}: {}", req, r.body);
            }
            if r.status >= 400 {
                prop_assert_eq!(
                    &world(&f).await,
                    &before,
                    "{:?} was refused but changed the state",
                    req
                );
            }
            healthy(addr).await
        })
    });
}

#[derive(Debug, Clone)]
enum QueryRoute {
    /// `GET /v1/agents/{node}/overlay` (`since`).
    Overlay { node: &'static str },
    /// `GET /v1/jobs/{id}` (`wait_s`, `output`), of a job that exists or not.
    Job { exists: bool },
    /// `GET /v1/jobs/nope/functions/{rank}/output` (`offset`).
    Output { rank: String },
}

#[derive(Debug, Clone)]
struct QueryRequest {
    route: QueryRoute,
    key: &'static str,
    /// Before percent-encoding.
    value: String,
}

fn query_request() -> BoxedStrategy<QueryRequest> {
    let rank = prop_oneof![
        3 => (0u64..4).prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => ".{0,6}",
    ];
    let route = prop_oneof![
        select(vec!["n1", "ghost"]).prop_map(|node| QueryRoute::Overlay { node }),
        any::<bool>().prop_map(|exists| QueryRoute::Job { exists }),
        rank.prop_map(|rank| QueryRoute::Output { rank }),
    ];
    let value = prop_oneof![
        2 => (0u64..4).prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        // Display writes huge values in full (1e300 as 301 digits).
        1 => any::<f64>().prop_map(|x| x.to_string()),
        1 => any::<f64>().prop_map(|x| format!("{x:e}")),
        2 => select(vec![
            "1e300", "1e20", "-1", "NaN", "inf", "infinity", "-0", "0.01", "true", "false", "",
            "1e-320", "0x10", "+5", " 5", "18446744073709551616",
        ])
        .prop_map(String::from),
        1 => ".{0,8}",
    ];
    (
        route,
        select(vec!["since", "wait_s", "output", "offset"]),
        value,
    )
        .prop_map(|(route, key, value)| QueryRequest { route, key, value })
        .boxed()
}

/// (c), the handlers that read a query: the status is the one the value
/// calls for (as Rust parses it: `u64`, `f64`, `bool`), never a 5xx.
#[test]
fn query_values_get_the_status_they_call_for() {
    let rt = runtime();
    let f = rt.block_on(fuzzed("queries"));
    // A job to ask about: it fails at once (its agents refuse connections).
    let job: Job = rt.block_on(async {
        let body = json!({"tenant": "red", "functions": 2, "command": {"argv": ["true"]}});
        let r = call(f.server.addr, "POST", "/v1/jobs", &body.to_string()).await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()
    });
    // An ended job: `wait_s` on it answers at once instead of waiting.
    assert_ne!(job.state, JobState::Running, "{job:?}");
    fuzz(400, query_request(), |q| {
        rt.block_on(async {
            let query = format!("?{}={}", q.key, encode(q.value.as_bytes()));
            let v = q.value.as_str();
            let (path, expected) = match &q.route {
                QueryRoute::Overlay { node } => {
                    let found = if *node == "n1" { 200 } else { 404 };
                    let ok = q.key != "since" || v.parse::<u64>().is_ok();
                    (
                        format!("/v1/agents/{node}/overlay"),
                        if ok { found } else { 400 },
                    )
                }
                QueryRoute::Job { exists } => {
                    let id = if *exists { job.id.as_str() } else { "nope" };
                    let ok = match q.key {
                        "wait_s" => v.parse::<f64>().is_ok_and(|s| s.is_finite() && s >= 0.0),
                        "output" => v.parse::<bool>().is_ok(),
                        _ => false, // unknown keys are refused
                    };
                    let found = if *exists { 200 } else { 404 };
                    (format!("/v1/jobs/{id}"), if ok { found } else { 400 })
                }
                QueryRoute::Output { rank } => {
                    let ok = rank.parse::<usize>().is_ok()
                        && q.key == "offset"
                        && v.parse::<u64>().is_ok();
                    let path =
                        format!("/v1/jobs/nope/functions/{}/output", encode(rank.as_bytes()));
                    (path, if ok { 404 } else { 400 })
                }
            };
            let r = call(f.server.addr, "GET", &format!("{path}{query}"), "").await;
            check_answer(&r, &q)?;
            prop_assert_eq!(r.status, expected, "{:?}: {}", q, r.body);
            if r.status == 200 {
                match q.route {
                    QueryRoute::Overlay { .. } => drop(r.json::<NodeOverlay>()),
                    _ => prop_assert_eq!(r.json::<Job>().id, job.id.clone()),
                }
            }
            healthy(f.server.addr).await
        })
    });
}

#[derive(Debug, Clone)]
struct TenantRequest {
    name: String,
    vni: u32,
    subnet: String,
    block_prefix: Option<u8>,
}

fn tenant_request() -> BoxedStrategy<TenantRequest> {
    (
        name(),
        prop_oneof![
            3 => 95u32..=115,
            2 => 1u32..=0xFF_FFFF,
            1 => select(vec![0, 0x100_0000, u32::MAX]),
        ],
        // Mostly mid-sized subnets: /0../4 overlap everything after the first.
        prop_oneof![
            4 => (any::<[u8; 4]>(), 8u8..=28, any::<bool>()),
            1 => (any::<[u8; 4]>(), 0u8..=32, any::<bool>()),
        ],
        prop::option::of(0u8..=32),
    )
        .prop_map(|(name, vni, (ip, prefix, keep_host_bits), block_prefix)| {
            let mut ip = u32::from_be_bytes(ip);
            if !keep_host_bits {
                ip &= mask(prefix);
            }
            TenantRequest {
                name,
                vni,
                subnet: format!("{}/{prefix}", Ipv4Addr::from(ip)),
                block_prefix,
            }
        })
        .boxed()
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn parse_cidr(s: &str) -> (u32, u8) {
    let (ip, prefix) = s.split_once('/').unwrap();
    (
        u32::from(ip.parse::<Ipv4Addr>().unwrap()),
        prefix.parse().unwrap(),
    )
}

/// What the API promises for a tenant creation, worked out independently:
/// 400 for a request that is wrong in itself, 409 for one that clashes with
/// the tenants and nodes there are, else 201.
fn expected_status(t: &TenantRequest, tenants: &[Tenant], nodes: &[NodeView]) -> u16 {
    let name_ok = (1..=32).contains(&t.name.len())
        && t.name.starts_with(|c: char| c.is_ascii_lowercase())
        && t.name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let (ip, prefix) = parse_cidr(&t.subnet);
    let block = t.block_prefix.unwrap_or(24);
    let block_ok = block >= prefix && block <= 30 && block - prefix <= 24;
    if !name_ok || t.vni == 0 || t.vni > 0xFF_FFFF || ip & !mask(prefix) != 0 || !block_ok {
        return 400;
    }
    // Loopback, link-local, multicast, "this network", reserved: never a tenant's.
    let special = [
        (0u32, 8u8),
        (127 << 24, 8),
        (0xA9FE_0000, 16),
        (0xE000_0000, 4),
        (0xF000_0000, 4),
    ];
    let touches = |(sip, sp): (u32, u8)| {
        let m = mask(prefix.min(sp));
        ip & m == sip & m
    };
    let holds_underlay = nodes
        .iter()
        .any(|n| u32::from(n.underlay_ip) & mask(prefix) == ip);
    if special.into_iter().any(touches) || holds_underlay {
        return 400;
    }
    if tenants.len() >= particle_controller::state::Quotas::default().max_tenants {
        return 403;
    }
    let overlaps = tenants.iter().any(|o| {
        let (oip, op) = parse_cidr(&o.subnet);
        let m = mask(prefix.min(op));
        ip & m == oip & m
    });
    let blocks = 1u64 << (block - prefix);
    if tenants.iter().any(|o| o.name == t.name || o.vni == t.vni)
        || overlaps
        || blocks < nodes.len() as u64
    {
        return 409;
    }
    201
}

/// Valid-looking tenant creations: the status the rules predict, and either
/// 201 with exactly that tenant added, or a refusal that changed nothing.
#[test]
fn tenant_creation_matches_the_rules() {
    let rt = runtime();
    let f = rt.block_on(fuzzed("tenants"));
    fuzz(400, tenant_request(), |t| {
        rt.block_on(async {
            let before = world(&f).await;
            let mut body = json!({"name": t.name, "vni": t.vni, "subnet": t.subnet});
            if let Some(b) = t.block_prefix {
                body["block_prefix"] = json!(b);
            }
            let r = call(f.server.addr, "POST", "/v1/tenants", &body.to_string()).await;
            check_answer(&r, &t)?;
            let expected = expected_status(&t, &before.tenants, &before.nodes);
            prop_assert_eq!(r.status, expected, "{:?}: {}", t, r.body);
            let after = world(&f).await;
            if r.status != 201 {
                prop_assert_eq!(&after, &before);
                return Ok(());
            }
            let created: Tenant = r.json();
            let block = t.block_prefix.unwrap_or(24);
            prop_assert_eq!(
                (
                    &created.name,
                    created.vni,
                    &created.subnet,
                    created.block_prefix,
                    created.warm_per_node
                ),
                (&t.name, t.vni, &t.subnet, block, None)
            );
            // One block per node, inside the subnet, of the asked size, all different.
            let (net, prefix) = parse_cidr(&t.subnet);
            let names: Vec<&String> = after.nodes.iter().map(|n| &n.name).collect();
            prop_assert_eq!(created.blocks.keys().collect::<Vec<_>>(), names);
            let mut seen = Vec::new();
            for b in created.blocks.values() {
                let (ip, p) = parse_cidr(b);
                prop_assert_eq!(p, block);
                prop_assert_eq!(ip & mask(prefix), net);
                prop_assert!(!seen.contains(&ip), "block {} given twice", b);
                seen.push(ip);
            }
            let mut expected = before.tenants.clone();
            expected.push(created);
            expected.sort_by(|a, b| a.name.cmp(&b.name));
            prop_assert_eq!(&after.tenants, &expected);
            prop_assert_eq!(after.version, before.version + 1);
            prop_assert!(
                after.stored != before.stored,
                "the new tenant was not stored"
            );
            Ok(())
        })
    });
}

/// Arbitrary bytes straight on the socket (garbage, broken request lines
/// and headers, pipelined requests): the answer, if any, is not a 5xx, and
/// the server goes on serving.
#[test]
fn raw_bytes_on_the_socket() {
    let rt = runtime();
    let f = rt.block_on(fuzzed("socket"));
    let request_line = (
        select(vec!["GET", "POST", "PUT", "DELETE", "BREW", ""]),
        select(vec![
            "/v1/tenants",
            "/healthz",
            "/v1/jobs",
            "*",
            "",
            "/v1/agents/n1/heartbeat",
        ]),
        select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9", ""]),
        prop::collection::vec("[ -~]{0,30}", 0..4),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(m, p, v, headers, tail)| {
            let mut out = format!("{m} {p} {v}\r\n").into_bytes();
            for h in headers {
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&tail);
            out
        });
    let bytes = prop_oneof![prop::collection::vec(any::<u8>(), 0..512), request_line,];
    fuzz(300, bytes, |bytes| {
        rt.block_on(async {
            let addr = f.server.addr;
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // The server may answer and close before reading everything.
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
            let mut answer = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
            prop_assert!(read.is_ok(), "no answer or close within 5 s");
            if !answer.is_empty() {
                let head = String::from_utf8_lossy(&answer[..answer.len().min(12)]).into_owned();
                let status: Option<u16> = head
                    .strip_prefix("HTTP/1.")
                    .and_then(|rest| rest.get(2..5))
                    .and_then(|s| s.parse().ok());
                prop_assert!(
                    matches!(status, Some(s) if (200..500).contains(&s)),
                    "answer starts {:?}",
                    head
                );
            }
            healthy(addr).await
        })
    });
}

// ------------------------------------------- regressions: bugs found above

/// `max_per_node * nodes` overflowed (a panic in debug builds, a wrapped
/// product in release) for a huge `max_per_node` and two or more nodes.
#[test]
fn a_huge_max_per_node_is_not_an_overflow() {
    let rt = runtime();
    let f = rt.block_on(fuzzed("max-per-node"));
    rt.block_on(async {
        let body = json!({"tenant": "red", "functions": 1, "command": {"argv": ["true"]},
                          "placement": {"max_per_node": u64::MAX}});
        let r = call(f.server.addr, "POST", "/v1/jobs", &body.to_string()).await;
        assert_eq!(r.status, 201, "{}", r.body);
    });
}

/// An empty `placement.nodes` was a 503 ("no live node"), which no retry can
/// cure: it is the request's fault.
#[test]
fn an_empty_placement_is_a_bad_request() {
    let rt = runtime();
    let f = rt.block_on(fuzzed("empty-placement"));
    rt.block_on(async {
        let body = json!({"tenant": "red", "functions": 1, "command": {"argv": ["true"]},
                          "placement": {"nodes": []}});
        let r = call(f.server.addr, "POST", "/v1/jobs", &body.to_string()).await;
        r.expect_error(400);
    });
}

/// `Duration::from_secs_f64` panicked on a finite `wait_s` too large for a
/// `Duration` (1e300) before the wait was capped.
#[test]
fn a_huge_wait_is_capped_not_a_panic() {
    let rt = runtime();
    let f = rt.block_on(fuzzed("huge-wait"));
    rt.block_on(async {
        let r = call(f.server.addr, "GET", "/v1/jobs/nope?wait_s=1e300", "").await;
        r.expect_error(404);
    });
}

/// A body over axum's 2 MiB limit was refused with a plain-text 413, not
/// the `ApiError` every other refusal carries.
#[test]
fn an_oversized_body_gets_an_api_error() {
    let rt = runtime();
    let f = rt.block_on(fuzzed("oversized"));
    rt.block_on(async {
        let before = world(&f).await;
        let body = vec![b' '; (2 << 20) + 1];
        for path in ["/v1/tenants", "/v1/jobs", "/v1/agents/n1/heartbeat"] {
            let r = raw_bytes(f.server.addr, "POST", path, Some(TOKEN), &body).await;
            r.expect_error(413);
        }
        assert_eq!(world(&f).await, before);
    });
}

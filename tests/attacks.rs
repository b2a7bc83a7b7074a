//! Hostile callers against a real cluster (`particle cluster up`, two
//! tenants): from inside a tenant's function, from root on the node naming
//! namespaces it does not own, and floods of connections against the agent's
//! socket and the controller. Each attack here got through before the
//! hardening of issue 18 (the verdict before is in each test's comment).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::Cluster;
use serde_json::Value;

/// The hostile tool, built beside `particle` by `cargo test --workspace`.
fn hostile() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_particle")).with_file_name("particle-hostile");
    assert!(
        path.exists(),
        "{} is missing: build it (cargo build -p particle-node-agent --bins)",
        path.display()
    );
    path
}

/// Each `attack NAME VERDICT` line of a function's output.
fn verdicts(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("attack "))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Before: the agent read `/proc/PID/ns/net` of a pid that had exited, took
/// the caller for the node and served it (from a function: status, and
/// claims of another tenant's endpoints). After: a function does not see the
/// socket at all (its sandbox has no node files), and the race itself is
/// refused even where the socket is reachable, so the check fails closed.
#[test]
fn a_function_cannot_use_its_agents_local_api() {
    let cluster = Cluster::up(1, 17_781, "10.218.0.0/24", &["--pool-size", "2"]);
    cluster.create_tenant("a", 351, "10.45.0.0/16", 2);
    cluster.create_tenant("b", 352, "10.46.0.0/16", 2);
    let socket = &cluster.sockets[0];
    let script =
        format!("[ -e {socket} ] && echo 'attack socket visible' || echo 'attack socket absent'");
    let out = cluster
        .command(&["launch"])
        .args(["--tenant", "a", "-n", "1", "--json", "--output", "--"])
        .args(["/bin/sh", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    // --json with --output: one JSON document, outputs inside.
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    let output = job["functions"][0]["output"].as_str().unwrap_or_default();
    assert_eq!(
        verdicts(output),
        [("socket".into(), "absent".into())],
        "{output}"
    );
    // The race, where the socket is reachable: connected by a child that
    // exits, then used by its parent. The agent is stopped meanwhile so that
    // it looks only after the child is gone: the losing side of the race,
    // every time (a root caller still alive on the node is the node).
    let agent = cluster.agent_pid(0).expect("the agent runs");
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &agent.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {agent}");
    };
    signal("-STOP");
    let race = std::process::Command::new(hostile())
        .args(["local-child", socket])
        .stdout(std::process::Stdio::piped())
        .spawn();
    // The child connects and exits at once; its parent then waits for the answer.
    std::thread::sleep(Duration::from_millis(500));
    signal("-CONT");
    let out = race.unwrap().wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = verdicts(&text);
    let answer: Value = serde_json::from_str(&v[0].1).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(answer["ok"], false, "served: {text}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not identified"),
        "{text}"
    );
    // Tenant b's pool is whole: nothing was claimed on its behalf.
    let status = common::particle()
        .args(["local", "--socket", socket, r#"{"op":"status"}"#])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["pools"]["b"]["claims_total"], 0, "{status}");
}

/// Before: an `attach` naming `/proc/<agent pid>/fd/N` lent a tenant's
/// interface into a namespace the agent held: another tenant's router or a
/// pooled endpoint. After: a namespace the agent manages is never a
/// runtime's, whoever asks.
#[test]
fn a_runtime_cannot_name_the_agents_own_namespaces() {
    let cluster = Cluster::up(1, 17_782, "10.218.1.0/24", &["--pool-size", "2"]);
    cluster.create_tenant("a", 353, "10.47.0.0/16", 2);
    cluster.create_tenant("b", 354, "10.48.0.0/16", 2);
    let agent = cluster.agent_pid(0).expect("the agent runs");
    common::eventually_within(60, "tenant b's pool is warm", || {
        let out = common::particle()
            .args([
                "local",
                "--socket",
                &cluster.sockets[0],
                r#"{"op":"status"}"#,
            ])
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout)
            .is_ok_and(|s| s["pools"]["b"]["ready"].as_u64() >= Some(2))
    });
    // Every network namespace the agent holds by fd: routers, endpoints.
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{agent}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("net:["))
        })
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(held.len() >= 4, "{held:?}");
    for path in held {
        let request = format!(
            r#"{{"op":"attach","network":"n","tenant":"a","container_id":"evil","ifname":"eth9","netns":"{path}"}}"#
        );
        let out = common::particle()
            .args(["local", "--socket", &cluster.sockets[0], &request])
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&out.stdout);
        assert!(answer.contains("not the caller's"), "{path}: {answer}");
    }
}

/// Before: ~20,000 idle connections to the agent's socket took its
/// descriptors and it exited, losing every function. After: one caller gets
/// a few, the rest are closed at once, idle ones time out, and the agent
/// answers others all along.
#[test]
fn a_connection_flood_does_not_take_the_agent_down() {
    let _ = particle_net::limits::raise_open_files();
    let cluster = Cluster::up(1, 17_783, "10.218.2.0/24", &["--pool-size", "2"]);
    let socket = cluster.sockets[0].clone();
    let agent = cluster.agent_pid(0).expect("the agent runs");
    let (fds_before, rss_before) = (open_fds(agent), rss_kib(agent));
    let flood: Vec<UnixStream> = (0..5000)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    // Another caller is served meanwhile, and the agent holds few of them.
    let out = common::particle()
        .args(["local", "--socket", &socket, r#"{"op":"status"}"#])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(
        open_fds(agent) < fds_before + 200,
        "{} fds with the flood (was {fds_before})",
        open_fds(agent)
    );
    drop(flood);
    assert_eq!(cluster.agent_pid(0), Some(agent), "the agent restarted");
    common::eventually_within(60, "the agent gives its descriptors back", || {
        open_fds(agent) <= fds_before + 20
    });
    let rss_after = rss_kib(agent);
    assert!(
        rss_after < rss_before + 64 * 1024,
        "agent RSS {rss_before} → {rss_after} KiB"
    );
}

/// Before: 10,000 slowloris connections through the relay: the relay
/// stopped listening for good and the controller held them all (no header
/// timeout), its memory 12 → 238 MB. After: the controller cuts them off
/// after its header timeout, agents (other addresses) keep heartbeating, the
/// relay keeps listening, and memory comes back.
#[test]
fn a_slowloris_flood_does_not_take_the_controller_down() {
    let _ = particle_net::limits::raise_open_files();
    let cluster = Cluster::up(2, 17_784, "10.218.3.0/24", &[]);
    let controller = cluster.controller_pid().expect("the controller runs");
    let rss_before = rss_kib(controller);
    let mut flood = Vec::new();
    for _ in 0..3000 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", cluster.port)) {
            let _ = s.write_all(b"GET /v1/nodes HTTP/1.1\r\nHost: x\r\n");
            flood.push(s);
        }
    }
    // Held longer than the header timeout (10 s) and the heartbeat timeout.
    let held_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < held_until {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cluster.controller_pid(), Some(controller), "it restarted");
    drop(flood);
    common::eventually_within(30, "the API answers through the relay again", || {
        cluster.api("GET", "/v1/nodes", "").0 == 200
    });
    // Both nodes stayed (their heartbeats came from their own addresses).
    let nodes = cluster.api_json("GET", "/v1/nodes", "", 200);
    assert_eq!(nodes.as_array().map(Vec::len), Some(2), "{nodes}");
    let rss_after = rss_kib(controller);
    assert!(
        rss_after < rss_before + 64 * 1024,
        "controller RSS {rss_before} → {rss_after} KiB"
    );
}

/// Before: 1,000 tenant creations were accepted in 12 s, each building ~12
/// endpoints per node even with `warm_per_node` 0, and memory kept rising
/// after they were deleted. After: a tenant costs its router until used,
/// and deleting tenants gives back every descriptor (namespace) they held.
#[test]
fn tenant_churn_gives_back_what_it_took() {
    let cluster = Cluster::up(1, 17_785, "10.218.4.0/24", &["--pool-size", "2"]);
    let agent = cluster.agent_pid(0).expect("the agent runs");
    let status = || -> Value {
        let out = common::particle()
            .args([
                "local",
                "--socket",
                &cluster.sockets[0],
                r#"{"op":"status"}"#,
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let fds_before = open_fds(agent);
    for round in 0..2 {
        for i in 0..12 {
            let body = format!(
                r#"{{"name":"c{i}","vni":{},"subnet":"10.{}.0.0/16","warm_per_node":{}}}"#,
                600 + i,
                100 + i,
                if i % 2 == 0 { 0 } else { 2 }
            );
            cluster.api_json("POST", "/v1/tenants", &body, 201);
        }
        // Generous: the other attack tests' clusters load the machine too.
        common::eventually_within(120, "every tenant's network is up", || {
            status()["pools"].as_object().map(|p| p.len()) == Some(12)
        });
        // The tenants that asked for none built none.
        let pools = status();
        for i in (0..12).step_by(2) {
            assert_eq!(
                pools["pools"][format!("c{i}")]["ready"],
                0,
                "round {round}: {pools}"
            );
        }
        for i in 0..12 {
            let (code, body) = cluster.api("DELETE", &format!("/v1/tenants/c{i}"), "");
            assert_eq!(code, 204, "{body}");
        }
        common::eventually_within(120, "every tenant's network is gone", || {
            status()["pools"].as_object().is_some_and(|p| p.is_empty())
        });
    }
    common::eventually_within(60, "the agent holds what it held before", || {
        open_fds(agent) <= fds_before + 10
    });
    assert_eq!(cluster.agent_pid(0), Some(agent));
}

//! `particle cluster up/down` with real processes: the controller and two
//! agents come up in their namespaces, a tenant created through the relay
//! gets a block on every node, endpoints claimed from two agents reach each
//! other over the overlay, and `down` leaves nothing behind.

mod common;

use common::{eventually, http, links_of, particle, Cluster};

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const PORT: u16 = 17_731;
const FREE_POOL: usize = 4;

/// Claims through an agent's socket, waiting while the agent (re)starts.
fn claim(socket: &str, tenant: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = UnixStream::connect(socket).ok().and_then(|mut s| {
            writeln!(s, r#"{{"op":"claim","tenant":"{tenant}"}}"#).ok()?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).ok()?;
            serde_json::from_str::<serde_json::Value>(&line).ok()
        });
        if let Some(v) = &answer {
            if v["ok"] == true {
                return v["endpoint"].clone();
            }
        }
        assert!(Instant::now() < deadline, "{answer:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pings(from: &serde_json::Value, to: &serde_json::Value) -> bool {
    let target = to["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let ns = particle_net::NetNs::open(from["netns"].as_str().unwrap()).unwrap();
    (0..3).any(|_| {
        ns.command("ping")
            .args(["-c", "1", "-W", "1", &target])
            .output()
            .unwrap()
            .status
            .success()
    })
}

#[test]
fn cluster_up_serves_an_overlay_and_down_leaves_nothing() {
    let free_pool = FREE_POOL.to_string();
    let cluster = Cluster::up(
        2,
        PORT,
        "10.252.0.0/24",
        &["--pool-size", "4", "--free-pool-size", &free_pool],
    );
    let token = cluster.token.clone();
    let sockets = cluster.sockets.clone();
    assert_eq!(sockets.len(), 2, "{sockets:?}");

    let created = http(
        PORT,
        "POST",
        "/v1/tenants",
        &token,
        r#"{"name":"t","vni":77,"subnet":"10.77.0.0/16"}"#,
    )
    .unwrap();
    assert!(created.starts_with("HTTP/1.1 201"), "{created}");
    assert!(
        created.contains(r#""n0":"10.77.0.0/24""#) && created.contains(r#""n1":"10.77.1.0/24""#),
        "{created}"
    );
    let refused = http(PORT, "GET", "/v1/tenants", "wrong", "").unwrap();
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");

    let e0 = claim(&sockets[0], "t");
    let e1 = claim(&sockets[1], "t");
    assert!(pings(&e0, &e1));

    // An agent killed outright is started again; it rebuilds its node from the
    // controller, and the node holds what it held before, no more.
    let agent = cluster.agent_pid(0).expect("agent n0 runs");
    // lo, eth0 and the host ends of the tenant-free pool: nothing else lives
    // in a node's own namespace.
    let full = 2 + FREE_POOL;
    eventually("n0 holds lo, eth0 and its tenant-free pool", || {
        links_of(agent) == full
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), nix::sys::signal::SIGKILL).unwrap();
    let mut restarted = None;
    eventually("agent n0 restarted", || {
        restarted = cluster.agent_pid(0).filter(|p| *p != agent);
        restarted.is_some()
    });
    let e0 = claim(&sockets[0], "t");
    assert!(pings(&e0, &e1), "the restarted node reaches across");
    let restarted = restarted.unwrap();
    eventually("n0 holds what it held before, no more", || {
        links_of(restarted) == full
    });

    // The controller killed outright comes back with its state.
    let controller = cluster.controller_pid().expect("controller runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(controller),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    eventually("controller restarted with its tenants", || {
        cluster.controller_pid().is_some_and(|p| p != controller)
            && http(PORT, "GET", "/v1/tenants/t", &token, "")
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    });

    let down = particle()
        .args(["cluster", "down", "--port", &PORT.to_string()])
        .output()
        .unwrap();
    assert!(down.status.success(), "{down:?}");
    let logs = cluster.logs.clone();
    let status = cluster.wait();
    assert!(status.success(), "cluster up exited with {status}");
    assert!(!std::path::Path::new(&sockets[0]).exists());
    assert!(!std::path::Path::new(&logs).exists());
}

/// `cluster down` stops the cluster it names (by port, the default 7700
/// otherwise), not every cluster on the machine.
#[test]
fn cluster_down_stops_only_its_own_cluster() {
    let mine = Cluster::up(1, 17_733, "10.214.0.0/24", &["--pool-size", "1"]);
    let other = Cluster::up(1, 17_734, "10.214.1.0/24", &["--pool-size", "1"]);
    let down = particle()
        .args(["cluster", "down", "--port", "17733"])
        .output()
        .unwrap();
    assert!(down.status.success(), "{down:?}");
    let status = mine.wait();
    assert!(status.success(), "cluster up exited with {status}");
    // The other one still answers.
    let (code, body) = other.api("GET", "/v1/nodes", "");
    assert_eq!(code, 200, "{body}");
    let none = particle()
        .args(["cluster", "down", "--port", "17733"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&none.stdout).contains("no local cluster running"));
}

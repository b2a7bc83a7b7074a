//! `particle cluster up/down` with real processes: the controller and two
//! agents come up in their namespaces, a tenant created through the relay
//! gets a block on every node, endpoints claimed from two agents reach each
//! other over the overlay, and `down` leaves nothing behind.

mod common;

use common::{eventually, http, links_of, particle, pid_of};

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

const PORT: u16 = 17_731;
const FREE_POOL: usize = 4;

/// Stops the cluster if the test fails before `cluster down` does.
struct UpGuard(Option<std::process::Child>);

impl UpGuard {
    fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("cluster up runs until wait()")
    }

    fn wait(mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("cluster up runs until wait()");
        child.wait().unwrap()
    }
}

impl Drop for UpGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

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
    common::require_root();
    let mut up = UpGuard(Some(
        particle()
            .args(["cluster", "up", "--nodes", "2", "--port", &PORT.to_string()])
            .args(["--underlay", "10.252.0.0/24", "--pool-size", "4"])
            .args(["--free-pool-size", &FREE_POOL.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let mut lines = BufReader::new(up.child().stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let ready = line.starts_with("ready");
        out.push(line);
        if ready {
            break;
        }
    }
    let field = |key: &str| -> String {
        out.iter()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {out:?}"))
            .trim()
            .to_string()
    };
    let token = std::fs::read_to_string(field("token")).unwrap();
    let sockets: Vec<String> = out
        .iter()
        .filter_map(|l| l.split("agent socket ").nth(1).map(str::to_string))
        .collect();
    assert_eq!(sockets.len(), 2, "{out:?}");

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
    let agent = pid_of(&sockets[0], "agent").expect("agent n0 runs");
    // lo, eth0 and the host ends of the tenant-free pool: nothing else lives
    // in a node's own namespace.
    let full = 2 + FREE_POOL;
    eventually("n0 holds lo, eth0 and its tenant-free pool", || {
        links_of(agent) == full
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), nix::sys::signal::SIGKILL).unwrap();
    let mut restarted = None;
    eventually("agent n0 restarted", || {
        restarted = pid_of(&sockets[0], "agent").filter(|p| *p != agent);
        restarted.is_some()
    });
    let e0 = claim(&sockets[0], "t");
    assert!(pings(&e0, &e1), "the restarted node reaches across");
    let restarted = restarted.unwrap();
    eventually("n0 holds what it held before, no more", || {
        links_of(restarted) == full
    });

    // The controller killed outright comes back with its state.
    let logs = field("logs");
    let controller = pid_of(&logs, "controller").expect("controller runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(controller),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    eventually("controller restarted with its tenants", || {
        pid_of(&logs, "controller").is_some_and(|p| p != controller)
            && http(PORT, "GET", "/v1/tenants/t", &token, "")
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    });

    let down = particle().args(["cluster", "down"]).output().unwrap();
    assert!(down.status.success(), "{down:?}");
    let status = up.wait();
    assert!(status.success(), "cluster up exited with {status}");
    assert!(!std::path::Path::new(&sockets[0]).exists());
    assert!(!std::path::Path::new(&field("logs")).exists());
}

//! `particle cluster up/down` with real processes: the controller and two
//! agents come up in their namespaces, a tenant created through the relay
//! gets a block on every node, endpoints claimed from two agents reach each
//! other over the overlay, and `down` leaves nothing behind.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PORT: u16 = 17_731;

fn particle() -> Command {
    Command::new(env!("CARGO_BIN_EXE_particle"))
}

fn http(method: &str, path: &str, token: &str, body: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn claim(socket: &str, tenant: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut s = UnixStream::connect(socket).unwrap();
        writeln!(s, r#"{{"op":"claim","tenant":"{tenant}"}}"#).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["ok"] == true {
            return v["endpoint"].clone();
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cluster_up_serves_an_overlay_and_down_leaves_nothing() {
    common::require_root();
    let mut up = particle()
        .args(["cluster", "up", "--nodes", "2", "--port", &PORT.to_string()])
        .args(["--underlay", "10.252.0.0/24", "--pool-size", "4"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
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
        "POST",
        "/v1/tenants",
        &token,
        r#"{"name":"t","vni":77,"subnet":"10.77.0.0/16"}"#,
    );
    assert!(created.starts_with("HTTP/1.1 201"), "{created}");
    assert!(
        created.contains(r#""n0":"10.77.0.0/24""#) && created.contains(r#""n1":"10.77.1.0/24""#),
        "{created}"
    );
    let refused = http("GET", "/v1/tenants", "wrong", "");
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");

    let e0 = claim(&sockets[0], "t");
    let e1 = claim(&sockets[1], "t");
    let target = e1["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let ns = particle_net::NetNs::open(e0["netns"].as_str().unwrap()).unwrap();
    let ping = ns
        .command("ping")
        .args(["-c", "1", "-W", "2", &target])
        .output()
        .unwrap();
    assert!(ping.status.success(), "{ping:?}");
    drop(ns);

    let down = particle().args(["cluster", "down"]).output().unwrap();
    assert!(down.status.success(), "{down:?}");
    let status = up.wait().unwrap();
    assert!(status.success(), "cluster up exited with {status}");
    assert!(!std::path::Path::new(&sockets[0]).exists());
    assert!(!std::path::Path::new(&field("logs")).exists());
}

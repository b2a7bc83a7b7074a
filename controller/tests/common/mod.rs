//! A real controller on loopback and a minimal HTTP/1.1 client, shared by
//! the controller's test crates.

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use particle_controller::{serve, ControllerConfig};
use particle_wire::api::{ApiError, NodeOverlay, Tenant};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const TOKEN: &str = "s3cret";

pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Opts {
    pub state_file: Option<PathBuf>,
    pub heartbeat_timeout: Duration,
    pub long_poll_max: Duration,
    pub quotas: particle_controller::state::Quotas,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            state_file: None,
            heartbeat_timeout: Duration::from_secs(60),
            long_poll_max: Duration::from_secs(2),
            quotas: Default::default(),
        }
    }
}

pub async fn start(opts: Opts) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ControllerConfig {
        listen: addr,
        token: TOKEN.into(),
        store: opts
            .state_file
            .map(particle_controller::store::StoreSpec::Json),
        cluster_id: "particle".into(),
        advertise: None,
        heartbeat_timeout: opts.heartbeat_timeout,
        long_poll_max: opts.long_poll_max,
        quotas: opts.quotas,
    };
    let task = tokio::spawn(serve(config, listener));
    Server { addr, task }
}

pub struct Resp {
    pub status: u16,
    pub body: String,
}

impl Resp {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: status {} body {:?}", self.status, self.body))
    }

    /// Asserts an error status with an `{"error": ...}` body.
    pub fn expect_error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "body: {}", self.body);
        let e: ApiError = self.json();
        assert!(!e.error.is_empty());
        e.error
    }
}

pub async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> Resp {
    raw_bytes(addr, method, path, auth, body.as_bytes()).await
}

/// One request on its own connection; panics unless the answer is a
/// well-formed HTTP response with a UTF-8 body.
pub async fn raw_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &[u8],
) -> Resp {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(token) = auth {
        req.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut req = req.into_bytes();
    req.extend_from_slice(body);
    stream.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no HTTP response, got {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp { status, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        s = &rest[size + 2..];
    }
}

pub async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> Resp {
    raw(addr, method, path, Some(TOKEN), body).await
}

pub async fn create_tenant(addr: SocketAddr, name: &str, vni: u32, subnet: &str) -> Tenant {
    let r = call(
        addr,
        "POST",
        "/v1/tenants",
        &json!({"name": name, "vni": vni, "subnet": subnet}).to_string(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

pub async fn register(addr: SocketAddr, node: &str, ip: &str) -> NodeOverlay {
    let r = call(
        addr,
        "POST",
        "/v1/agents/register",
        &json!({"node": node, "underlay_ip": ip}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

pub async fn heartbeat(addr: SocketAddr, node: &str) -> Resp {
    call(
        addr,
        "POST",
        &format!("/v1/agents/{node}/heartbeat"),
        r#"{"pools": {"red": {"ready": 5, "claimed": 2, "build_errors": 0}}}"#,
    )
    .await
}

pub async fn overlay(addr: SocketAddr, node: &str, since: u64) -> Resp {
    call(
        addr,
        "GET",
        &format!("/v1/agents/{node}/overlay?since={since}"),
        "",
    )
    .await
}

pub async fn version(addr: SocketAddr) -> u64 {
    let text = raw(addr, "GET", "/metrics", Some(TOKEN), "").await.body;
    text.lines()
        .find_map(|l| l.strip_prefix("particle_controller_overlay_version "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

pub async fn tenants(addr: SocketAddr) -> Vec<Tenant> {
    let r = call(addr, "GET", "/v1/tenants", "").await;
    assert_eq!(r.status, 200);
    r.json()
}

pub fn temp_state_file(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "particle-controller-api-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("state.json")
}

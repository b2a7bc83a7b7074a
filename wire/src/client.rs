//! A JSON-over-HTTP/1.1 client of Particle's APIs: agents call the controller
//! with it, the controller calls agents, the `particle` command calls the
//! controller. The caller dials the TCP connection, so a local cluster can
//! dial from a node's namespace while real hosts just connect.
//!
//! A client may know several controllers (`--controller a:7700,b:7700`):
//! only the leader serves, the others answer 503 naming it in
//! [`LEADER_HEADER`], and the client moves to whichever one that names (or,
//! when a controller cannot be reached or knows no leader, the next one)
//! until [`FAILOVER_WAIT`] has passed. A request is sent again only when
//! the one it went to did not act on it (refused connection, follower's 503).

use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::api::{ApiError, Heartbeat, NodeOverlay, RegisterNode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use hyper::Method;

/// Opens a TCP connection to the server (`particle_net::NetNs::tcp_dialer`
/// dials from inside a namespace).
pub type Dial = Arc<dyn Fn(SocketAddr) -> io::Result<std::net::TcpStream> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("{status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("the answer is not the expected JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the connection task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The header a follower's 503 names the leader in (`host:port`).
pub const LEADER_HEADER: &str = "particle-leader";

/// How long a client of several controllers keeps looking for the leader
/// (a takeover takes the lease's TTL plus a poll; see docs/ha.md).
pub const FAILOVER_WAIT: Duration = Duration::from_secs(20);

/// A comma-separated list of controllers (`host:port,host:port`), as flags
/// and settings files take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controllers(pub Vec<SocketAddr>);

impl FromStr for Controllers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addrs = s
            .split(',')
            .map(|a| {
                a.trim()
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("{a:?}: {e} (want host:port[,host:port...])"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if addrs.is_empty() {
            return Err("no controller address".into());
        }
        Ok(Self(addrs))
    }
}

impl std::fmt::Display for Controllers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.0.iter().map(SocketAddr::to_string).collect();
        f.write_str(&list.join(","))
    }
}

impl serde::Serialize for Controllers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Controllers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone)]
pub struct ApiClient {
    addrs: Arc<Vec<SocketAddr>>,
    /// Index in `addrs` of the one believed to lead.
    current: Arc<AtomicUsize>,
    token: String,
    dial: Dial,
}

/// One attempt's outcome, when it did not succeed.
enum Failed {
    /// Not acted on: another controller may be asked (the leader it names).
    Elsewhere(ClientError, Option<SocketAddr>),
    /// Final.
    Final(ClientError),
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("addrs", &self.addrs)
            .finish()
    }
}

impl ApiClient {
    pub fn new(addr: SocketAddr, token: String, dial: Dial) -> Self {
        Self::to_any(vec![addr], token, dial)
    }

    /// A client of several controllers, which follows their leader. An
    /// empty token sends no `Authorization` header (etcd's gateway).
    pub fn to_any(addrs: Vec<SocketAddr>, token: String, dial: Dial) -> Self {
        Self {
            addrs: Arc::new(addrs),
            current: Arc::new(AtomicUsize::new(0)),
            token,
            dial,
        }
    }

    /// [`Self::to_any`], connecting from the calling process's namespace.
    pub fn direct_to_any(addrs: Vec<SocketAddr>, token: String) -> Self {
        Self::to_any(addrs, token, Arc::new(std::net::TcpStream::connect))
    }

    /// The controller requests go to now.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[self.current.load(Ordering::Relaxed) % self.addrs.len()]
    }

    /// The bearer token it sends.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A client that connects from the calling process's own namespace.
    pub fn direct(addr: SocketAddr, token: String) -> Self {
        Self::new(addr, token, Arc::new(std::net::TcpStream::connect))
    }

    pub async fn register(&self, body: &RegisterNode) -> Result<NodeOverlay, ClientError> {
        self.call(Method::POST, "/v1/agents/register", Some(body))
            .await
    }

    /// `Ok(false)`: the controller does not know the node (register again).
    pub async fn heartbeat(&self, node: &str, body: &Heartbeat) -> Result<bool, ClientError> {
        let path = format!("/v1/agents/{node}/heartbeat");
        match self.send(Method::POST, &path, Some(body)).await {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits (long poll) for an overlay state newer than `since`.
    pub async fn overlay(&self, node: &str, since: u64) -> Result<NodeOverlay, ClientError> {
        let path = format!("/v1/agents/{node}/overlay?since={since}");
        self.call::<(), _>(Method::GET, &path, None).await
    }

    /// Any API call: `body` as JSON, the answer parsed as `R`.
    pub async fn call<T: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
    ) -> Result<R, ClientError> {
        let bytes = self.send(method, path, body).await?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Any API call; the raw body of a successful answer. With several
    /// controllers, follows the leader (see the module's documentation).
    pub async fn send<T: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
    ) -> Result<Bytes, ClientError> {
        let payload = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
        let mut tried_in_a_row = 0;
        loop {
            let index = self.current.load(Ordering::Relaxed) % self.addrs.len();
            let addr = self.addrs[index];
            let (e, leader) = match self.send_to(addr, &method, path, payload.clone()).await {
                Ok(bytes) => return Ok(bytes),
                Err(Failed::Final(e)) => return Err(e),
                Err(Failed::Elsewhere(e, leader)) => (e, leader),
            };
            if self.addrs.len() == 1 || tokio::time::Instant::now() >= deadline {
                return Err(e);
            }
            let next = leader
                .and_then(|l| self.addrs.iter().position(|a| *a == l))
                .filter(|i| *i != index)
                .unwrap_or((index + 1) % self.addrs.len());
            self.current.store(next, Ordering::Relaxed);
            tried_in_a_row += 1;
            if tried_in_a_row >= self.addrs.len() {
                // Nobody leads right now (a takeover): wait a little.
                tried_in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn send_to(
        &self,
        addr: SocketAddr,
        method: &Method,
        path: &str,
        payload: Bytes,
    ) -> Result<Bytes, Failed> {
        let elsewhere = |e: ClientError| Failed::Elsewhere(e, None);
        let dial = self.dial.clone();
        let stream = tokio::task::spawn_blocking(move || {
            let s = dial(addr)?;
            s.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(s)
        })
        .await
        .map_err(|e| Failed::Final(e.into()))?
        .map_err(|source| elsewhere(ClientError::Connect { addr, source }))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| elsewhere(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("API connection: {e}");
            }
        });
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", addr.to_string())
            .header("content-type", "application/json");
        if !self.token.is_empty() {
            request = request.header("authorization", format!("Bearer {}", self.token));
        }
        let request = request
            .body(Full::new(payload))
            .map_err(|e| Failed::Final(e.into()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Failed::Final(e.into()))?;
        let status = response.status();
        let leader = response
            .headers()
            .get(LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<SocketAddr>().ok());
        let not_leader = status == StatusCode::SERVICE_UNAVAILABLE
            && response.headers().contains_key(LEADER_HEADER);
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failed::Final(e.into()))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        let e = ClientError::Status { status, message };
        if not_leader {
            Err(Failed::Elsewhere(e, leader))
        } else {
            Err(Failed::Final(e))
        }
    }
}

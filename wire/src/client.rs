//! A JSON-over-HTTP/1.1 client of Particle's APIs: agents call the controller
//! with it, the controller calls agents, the `particle` command calls the
//! controller. The caller dials the TCP connection, so a local cluster can
//! dial from a node's namespace while real hosts just connect.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

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

#[derive(Clone)]
pub struct ApiClient {
    addr: SocketAddr,
    token: String,
    dial: Dial,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ApiClient {
    pub fn new(addr: SocketAddr, token: String, dial: Dial) -> Self {
        Self { addr, token, dial }
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

    /// Any API call; the raw body of a successful answer.
    pub async fn send<T: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
    ) -> Result<Bytes, ClientError> {
        let addr = self.addr;
        let dial = self.dial.clone();
        let stream = tokio::task::spawn_blocking(move || {
            let s = dial(addr)?;
            s.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(s)
        })
        .await?
        .map_err(|source| ClientError::Connect { addr, source })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("API connection: {e}");
            }
        });
        let payload = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(payload))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if status.is_success() {
            Ok(bytes)
        } else {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            Err(ClientError::Status { status, message })
        }
    }
}

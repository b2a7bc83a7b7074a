//! Serving an HTTP API to callers that may be hostile: the one server loop
//! behind the controller's API and each agent's. Compared with a plain
//! `axum::serve` it bounds what a flood can take: connections at once, in
//! all and per client address (over a cap a connection is closed at accept,
//! so one flooding address cannot starve the others), the time a client may
//! take to send its request headers (also the idle time between requests, so
//! slowloris and idle floods give their descriptors and memory back), and an
//! accept that fails (out of descriptors) is retried, never fatal. A body
//! declared larger than the limit is read and thrown away before the 413 is
//! sent, so the client reads the answer instead of a connection reset.

use std::future::Future;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::caps::ConnectionCaps;
use crate::http_error::HttpError;

/// What one server lets its callers take.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections one client address may hold at once.
    pub max_per_address: usize,
    /// Longest a client may take to send a request's headers, counted from
    /// when the server starts waiting for them (idle keep-alive included).
    pub header_timeout: Duration,
    /// Largest request body; a larger declared one gets a 413.
    pub max_body: usize,
    /// Most bytes read and discarded from an oversized body before the 413.
    pub max_drain: u64,
    /// Longest spent discarding it.
    pub drain_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_per_address: 256,
            header_timeout: Duration::from_secs(10),
            max_body: 2 << 20,
            max_drain: 256 << 20,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let app = app.layer(middleware::from_fn(move |req, next| {
        refuse_oversized(req, next, limits)
    }));
    let caps = ConnectionCaps::new(limits.max_connections, limits.max_per_address);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => return Ok(()),
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("HTTP accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = caps.enter(peer.ip()) else {
            tracing::debug!("HTTP: connection from {peer} over the caps, closed");
            continue; // dropped: closed at once
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("HTTP connection: {e}");
            }
        });
    }
}

/// Answers a body declared over the limit with 413 after discarding it (up
/// to the drain bounds): closing with it unread would reset the connection
/// under the client's feet and lose the answer.
async fn refuse_oversized(req: Request, next: Next, limits: ServeLimits) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limits.max_body as u64 => {}
        _ => return next.run(req).await,
    }
    let mut body = req.into_body();
    let mut drained = 0u64;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                drained += data.len() as u64;
                if drained > limits.max_drain {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(limits.drain_timeout, drain).await;
    let mut response = HttpError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {} bytes", limits.max_body),
    )
    .into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

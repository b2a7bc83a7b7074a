//! The calls a launch makes to its agents, each sent to every agent at once:
//! reserve endpoints, start the functions, release what a failed or
//! cancelled job holds.

use std::net::SocketAddr;

use axum::http::StatusCode;
use futures_util::future::join_all;

use super::{
    ApiClient, ClientError, HttpError, LaunchJob, Method, ReserveFunctions, Reserved,
    StartFunctions, Started,
};
use crate::Controller;

fn client(c: &Controller, addr: SocketAddr) -> ApiClient {
    ApiClient::direct(addr, c.token().to_string())
}

/// An agent's refusal, passed on with the node's name; unreachable agents
/// and server errors are 502.
fn agent_error(node: &str, e: ClientError) -> HttpError {
    match e.status() {
        Some(s) if s.is_client_error() => HttpError::new(s, format!("node {node}: {e}")),
        _ => HttpError::new(StatusCode::BAD_GATEWAY, format!("node {node}: {e}")),
    }
}

/// Asks each agent to reserve endpoints for its `ranks` (one list per
/// agent, in the same order); one answer per agent.
pub(super) async fn reserve_all(
    c: &Controller,
    id: &str,
    req: &LaunchJob,
    program: &str,
    agents: &[(String, SocketAddr)],
    ranks: &[Vec<usize>],
) -> Vec<Result<Reserved, HttpError>> {
    let reserves = agents.iter().zip(ranks).map(|((node, addr), ranks)| {
        let body = ReserveFunctions {
            tenant: req.tenant.clone(),
            ranks: ranks.clone(),
            program: program.to_string(),
            runtime: req.runtime,
            limits: req.limits,
            image: req.image.clone(),
            output_dir: req.output_dir.clone(),
        };
        let path = format!("/v1/jobs/{id}/reserve");
        let api = client(c, *addr);
        async move {
            let r: Result<Reserved, _> = api.call(Method::POST, &path, Some(&body)).await;
            r.map_err(|e| agent_error(node, e))
        }
    });
    join_all(reserves).await
}

/// Asks each agent to start the functions it reserved, every one knowing
/// every peer; each agent's answer with its node.
pub(super) async fn start_all(
    c: &Controller,
    id: &str,
    req: &LaunchJob,
    peers: &[String],
    agents: &[(String, SocketAddr)],
) -> Vec<(String, Result<Started, ClientError>)> {
    let starts = agents.iter().map(|(node, addr)| {
        let body = StartFunctions {
            command: req.command.clone(),
            runtime: req.runtime,
            size: req.functions,
            peers: peers.to_vec(),
        };
        let path = format!("/v1/jobs/{id}/start");
        let api = client(c, *addr);
        async move {
            let r: Result<Started, _> = api.call(Method::POST, &path, Some(&body)).await;
            (node.clone(), r)
        }
    });
    join_all(starts).await
}

/// Tells every agent to drop what it holds for job `id`.
pub(super) async fn release_all(c: &Controller, id: &str, agents: &[(String, SocketAddr)]) {
    let calls = agents.iter().map(|(node, addr)| {
        let api = client(c, *addr);
        let path = format!("/v1/jobs/{id}");
        async move {
            if let Err(e) = api.send::<()>(Method::DELETE, &path, None).await {
                tracing::warn!("releasing job {id} on {node}: {e}");
            }
        }
    });
    join_all(calls).await;
}

//! The agent's HTTP API for the controller (same bearer token as the
//! controller's): reserve endpoints for a job's ranks, start them, cancel,
//! and read a function's output. Served next to `/metrics`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use particle_wire::api::{Reserved, Started};
use particle_wire::{require_bearer, HttpError};
use serde::Deserialize;

use crate::jobs::NodeJobs;

#[derive(Clone)]
struct ApiState {
    jobs: Arc<NodeJobs>,
    token: Arc<str>,
}

pub fn router(jobs: Arc<NodeJobs>, token: &str) -> Router {
    let state = ApiState {
        jobs,
        token: token.into(),
    };
    Router::new()
        .route("/v1/jobs/{id}/reserve", post(reserve))
        .route("/v1/jobs/{id}/start", post(start))
        .route("/v1/jobs/{id}", delete(cancel))
        .route("/v1/jobs/{id}/functions/{rank}/output", get(output))
        .route_layer(middleware::from_fn_with_state(
            state.token.clone(),
            require_bearer,
        ))
        .with_state(state)
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, HttpError> {
    serde_json::from_slice(body)
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

async fn reserve(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Reserved>, HttpError> {
    let req = parse(&body)?;
    // Cold endpoints are built on this call: keep it off the runtime's workers.
    let jobs = s.jobs.clone();
    tokio::task::spawn_blocking(move || jobs.reserve(&id, req))
        .await
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map(Json)
}

async fn start(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Started>, HttpError> {
    let req = parse(&body)?;
    // fork/exec per function: blocking, but it needs the runtime's context.
    let jobs = s.jobs.clone();
    tokio::task::spawn_blocking(move || jobs.start(&id, req))
        .await
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map(Json)
}

async fn cancel(State(s): State<ApiState>, Path(id): Path<String>) -> StatusCode {
    s.jobs.cancel(&id);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct OutputQuery {
    #[serde(default)]
    offset: usize,
}

async fn output(
    State(s): State<ApiState>,
    Path((id, rank)): Path<(String, usize)>,
    Query(q): Query<OutputQuery>,
) -> Result<Vec<u8>, HttpError> {
    s.jobs.output(&id, rank, q.offset)
}

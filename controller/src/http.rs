//! The axum router implementing the API documented in [`crate::api`].
//!
//! Every error, including malformed JSON, bad paths and unknown routes, is
//! answered with an [`ApiError`] body. Request bodies are decoded here rather
//! than with axum's `Json` extractor so the status is always 400 (axum would
//! answer 415/422 with a plain-text body) and a missing Content-Type is fine.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::api::{ApiError, CreateTenant, Heartbeat, Node, NodeOverlay, RegisterNode, Tenant};
use crate::state::{ErrorKind, StateError};
use crate::{Controller, UpdateError};

/// An error answered as `{"error": "..."}` with the given status.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiError {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<StateError> for HttpError {
    fn from(e: StateError) -> Self {
        let status = match e.kind() {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
        };
        Self::new(status, e.to_string())
    }
}

impl From<UpdateError> for HttpError {
    fn from(e: UpdateError) -> Self {
        match e {
            UpdateError::Rejected(e) => e.into(),
            UpdateError::Persist(e) => {
                tracing::error!("{e}");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("state not persisted: {e}"),
                )
            }
        }
    }
}

impl From<PathRejection> for HttpError {
    fn from(e: PathRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.body_text())
    }
}

impl From<QueryRejection> for HttpError {
    fn from(e: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.body_text())
    }
}

fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, HttpError> {
    serde_json::from_slice(body)
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// The whole API. `/v1` routes need the bearer token; `/metrics` and
/// `/healthz` do not.
pub fn router(controller: Controller) -> Router {
    let v1 = Router::new()
        .route("/v1/tenants", post(create_tenant).get(list_tenants))
        .route("/v1/tenants/{name}", get(get_tenant).delete(delete_tenant))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/agents/register", post(register))
        .route("/v1/agents/{node}/heartbeat", post(heartbeat))
        .route("/v1/agents/{node}/overlay", get(overlay))
        // route_layer: unknown /v1 paths still get a plain 404.
        .route_layer(middleware::from_fn_with_state(
            controller.clone(),
            require_token,
        ));
    Router::new()
        .merge(v1)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { HttpError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            HttpError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(middleware::from_fn_with_state(
            controller.clone(),
            count_requests,
        ))
        .with_state(controller)
}

async fn count_requests(State(c): State<Controller>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    c.metrics().count_request(response.status().as_u16());
    response
}

async fn require_token(
    State(c): State<Controller>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), c.token().as_bytes()) => {
            next.run(req).await
        }
        Some(_) => HttpError::new(StatusCode::UNAUTHORIZED, "wrong bearer token").into_response(),
        None => HttpError::new(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token>",
        )
        .into_response(),
    }
}

/// Compares without an early exit so response time does not leak how much
/// of the token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn create_tenant(
    State(c): State<Controller>,
    body: Bytes,
) -> Result<(StatusCode, Json<Tenant>), HttpError> {
    let req: CreateTenant = parse_json(&body)?;
    let tenant = c.update(|s| s.create_tenant(&req))?;
    tracing::info!(tenant = %tenant.name, vni = tenant.vni, subnet = %tenant.subnet, "tenant created");
    Ok((StatusCode::CREATED, Json(tenant)))
}

async fn list_tenants(State(c): State<Controller>) -> Json<Vec<Tenant>> {
    Json(c.lock().tenants())
}

async fn get_tenant(
    State(c): State<Controller>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Tenant>, HttpError> {
    let Path(name) = name?;
    Ok(Json(c.lock().tenant(&name)?))
}

async fn delete_tenant(
    State(c): State<Controller>,
    name: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, HttpError> {
    let Path(name) = name?;
    c.update(|s| s.delete_tenant(&name))?;
    tracing::info!(tenant = %name, "tenant deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_nodes(State(c): State<Controller>) -> Json<Vec<Node>> {
    Json(c.lock().nodes(Instant::now()))
}

async fn register(
    State(c): State<Controller>,
    body: Bytes,
) -> Result<Json<NodeOverlay>, HttpError> {
    let req: RegisterNode = parse_json(&body)?;
    let overlay = c.update(|s| s.register_node(&req.node, req.underlay_ip, Instant::now()))?;
    tracing::info!(node = %req.node, underlay_ip = %req.underlay_ip, version = overlay.version, "node registered");
    Ok(Json(overlay))
}

async fn heartbeat(
    State(c): State<Controller>,
    node: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    let Path(node) = node?;
    // An empty body is a heartbeat with no pools.
    let hb: Heartbeat = if body.is_empty() {
        Heartbeat::default()
    } else {
        parse_json(&body)?
    };
    // Liveness only: no version bump, so no store write and no clone needed.
    c.lock().heartbeat(&node, hb, Instant::now())?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct OverlayQuery {
    since: Option<u64>,
}

/// Long poll: answers at once unless `since` is the current version, in
/// which case it waits for the next change or `long_poll_max`.
async fn overlay(
    State(c): State<Controller>,
    node: Result<Path<String>, PathRejection>,
    query: Result<Query<OverlayQuery>, QueryRejection>,
) -> Result<Json<NodeOverlay>, HttpError> {
    let Path(node) = node?;
    let Query(query) = query?;
    // Subscribe before reading the version so no change can slip between.
    let mut rx = c.subscribe();
    let current = {
        let state = c.lock();
        if !state.has_node(&node) {
            return Err(StateError::UnknownNode(node).into());
        }
        state.version()
    };
    // A `since` ahead of us means the controller lost its state: answer at
    // once so the agent resynchronises instead of waiting.
    if query.since == Some(current) {
        // Timing out is fine: the answer is then the unchanged state.
        let _ = tokio::time::timeout(c.long_poll_max(), rx.wait_for(|v| *v > current)).await;
    }
    Ok(Json(c.lock().overlay_for(&node)?))
}

async fn metrics(State(c): State<Controller>) -> Response {
    let rendered = {
        let state = c.lock();
        c.metrics().render(&state)
    };
    match rendered {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

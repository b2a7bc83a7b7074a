//! The axum router implementing the API documented in [`particle_wire::api`].
//!
//! Every error, including malformed JSON, bad paths and unknown routes, is
//! answered with an [`ApiError`] body. Request bodies are decoded here rather
//! than with axum's `Json` extractor so the status is always 400 (axum would
//! answer 415/422 with a plain-text body) and a missing Content-Type is fine.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::state::{ErrorKind, StateError};
use crate::{Controller, Role, UpdateError};
use particle_wire::api::{
    CreateTenant, FunctionExits, Heartbeat, Job, JobSummary, LaunchJob, Node, NodeOverlay,
    RegisterNode, Tenant, WarmTarget,
};
use particle_wire::client::{ApiClient, Method, LEADER_HEADER};
use particle_wire::{require_bearer, HttpError};

impl From<StateError> for HttpError {
    fn from(e: StateError) -> Self {
        let status = match e.kind() {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Quota => StatusCode::FORBIDDEN,
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
                let status = if e.is_unavailable() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                Self::new(status, format!("state not persisted, nothing changed: {e}"))
            }
        }
    }
}

/// A request body, or why it could not be read (over the 2 MiB limit: 413),
/// taken as a `Result` so that too is answered with an [`ApiError`].
type RequestBody = Result<Bytes, BytesRejection>;

fn parse_json<T: DeserializeOwned>(body: &RequestBody) -> Result<T, HttpError> {
    let body = body
        .as_ref()
        .map_err(|e| HttpError::new(e.status(), e.body_text()))?;
    serde_json::from_slice(body)
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// The whole API. `/v1` routes and `/metrics` (tenant names, pool levels
/// per node) need the bearer token; only `/healthz` does not.
pub fn router(controller: Controller) -> Router {
    let token: std::sync::Arc<str> = controller.token().into();
    let v1 = Router::new()
        .route("/v1/tenants", post(create_tenant).get(list_tenants))
        .route("/v1/tenants/{name}", get(get_tenant).delete(delete_tenant))
        .route("/v1/tenants/{name}/warm", put(set_warm))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/jobs", post(launch_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route(
            "/v1/jobs/{id}/functions/{rank}/output",
            get(function_output),
        )
        .route("/v1/agents/{node}/exits", post(exits))
        .route("/v1/agents/register", post(register))
        .route("/v1/agents/{node}/heartbeat", post(heartbeat))
        .route("/v1/agents/{node}/overlay", get(overlay))
        .route("/metrics", get(metrics))
        // route_layer: unknown /v1 paths still get a plain 404.
        .route_layer(middleware::from_fn_with_state(token, require_bearer));
    Router::new()
        .merge(v1)
        .layer(middleware::from_fn_with_state(
            controller.clone(),
            leader_only,
        ))
        .route("/healthz", get(|| async { "ok" }))
        .route("/leader", get(leader))
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

/// A follower serves nothing but `/healthz` and `/leader`: a 503 naming
/// the leader ([`LEADER_HEADER`], empty while nobody leads), which clients
/// of several controllers follow. A 503 rather than a redirect: the client
/// must dial the leader itself (perhaps from another namespace), and a
/// request it sent was not acted on, so it may send it again.
async fn leader_only(State(c): State<Controller>, req: Request, next: Next) -> Response {
    match c.role() {
        Role::Leader => next.run(req).await,
        Role::Follower { leader } => {
            let message = match &leader {
                Some(l) => format!("this controller follows; the leader is {l}"),
                None => "no controller leads right now (etcd unreachable, or a takeover under way): try again".to_string(),
            };
            let mut response =
                HttpError::new(StatusCode::SERVICE_UNAVAILABLE, message).into_response();
            if let Ok(value) = header::HeaderValue::from_str(leader.as_deref().unwrap_or("")) {
                response.headers_mut().insert(LEADER_HEADER, value);
            }
            response
        }
    }
}

/// `GET /leader` (no token: it names only addresses): who leads, and
/// whether this controller does.
async fn leader(State(c): State<Controller>) -> Json<serde_json::Value> {
    let me = c.advertise().to_string();
    let leader = match c.role() {
        Role::Leader => Some(me.clone()),
        Role::Follower { leader } => leader,
    };
    Json(serde_json::json!({ "leader": leader, "self": me, "is_leader": c.is_leader() }))
}

async fn count_requests(State(c): State<Controller>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    c.metrics().count_request(response.status().as_u16());
    response
}

async fn create_tenant(
    State(c): State<Controller>,
    body: RequestBody,
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
    body: RequestBody,
) -> Result<Json<NodeOverlay>, HttpError> {
    let req: RegisterNode = parse_json(&body)?;
    let overlay = c.update(|s| {
        s.register_node(&req.node, req.underlay_ip, Instant::now())?;
        s.set_api_port(&req.node, req.api_port)?;
        // After both: a changed port is a new version too.
        s.overlay_for(&req.node)
    })?;
    if let Some(instance) = &req.instance {
        c.jobs().agent_registered(&req.node, instance);
    }
    tracing::info!(node = %req.node, underlay_ip = %req.underlay_ip, version = overlay.version, "node registered");
    Ok(Json(overlay))
}

async fn heartbeat(
    State(c): State<Controller>,
    node: Result<Path<String>, PathRejection>,
    body: RequestBody,
) -> Result<StatusCode, HttpError> {
    let Path(node) = node?;
    // An empty body is a heartbeat with no pools.
    let hb: Heartbeat = if body.as_ref().is_ok_and(Bytes::is_empty) {
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

async fn set_warm(
    State(c): State<Controller>,
    name: Result<Path<String>, PathRejection>,
    body: RequestBody,
) -> Result<Json<Tenant>, HttpError> {
    let Path(name) = name?;
    let req: WarmTarget = parse_json(&body)?;
    Ok(Json(c.update(|s| s.set_warm(&name, req.per_node))?))
}

async fn launch_job(
    State(c): State<Controller>,
    body: RequestBody,
) -> Result<(StatusCode, Json<Job>), HttpError> {
    let req: LaunchJob = parse_json(&body)?;
    let job = crate::jobs::launch(&c, req).await?;
    Ok((StatusCode::CREATED, Json(job)))
}

async fn list_jobs(State(c): State<Controller>) -> Json<Vec<JobSummary>> {
    Json(c.jobs().list())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobQuery {
    /// Wait up to this many seconds for the job to end.
    #[serde(default)]
    wait_s: Option<f64>,
    /// Include every function's captured output.
    #[serde(default)]
    output: bool,
}

/// The longest a job status request may wait.
const MAX_JOB_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

async fn get_job(
    State(c): State<Controller>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<JobQuery>, QueryRejection>,
) -> Result<Json<Job>, HttpError> {
    let Path(id) = id?;
    let Query(query) = query?;
    let unknown = || HttpError::new(StatusCode::NOT_FOUND, format!("unknown job {id:?}"));
    let mut job = match query.wait_s {
        Some(s) if s.is_finite() && s > 0.0 => {
            // Capped before converting: from_secs_f64 panics on values too big for a Duration.
            let wait = std::time::Duration::from_secs_f64(s.min(MAX_JOB_WAIT.as_secs_f64()));
            c.jobs().wait(&id, wait).await
        }
        Some(s) if !(s.is_finite() && s >= 0.0) => {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "wait_s must be a non-negative number",
            ))
        }
        _ => c.jobs().get(&id),
    }
    .ok_or_else(unknown)?;
    if !query.output {
        for f in &mut job.functions {
            f.output = None;
        }
    }
    Ok(Json(job))
}

async fn cancel_job(
    State(c): State<Controller>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Job>, HttpError> {
    let Path(id) = id?;
    Ok(Json(crate::jobs::cancel(&c, &id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputQuery {
    #[serde(default)]
    offset: u64,
}

/// Live output, from the agent running the function.
async fn function_output(
    State(c): State<Controller>,
    path: Result<Path<(String, usize)>, PathRejection>,
    query: Result<Query<OutputQuery>, QueryRejection>,
) -> Result<String, HttpError> {
    let Path((id, rank)) = path?;
    let Query(query) = query?;
    let agent = c.jobs().agent_of(&id, rank).ok_or_else(|| {
        HttpError::new(
            StatusCode::NOT_FOUND,
            format!("job {id:?} has no function {rank}"),
        )
    })?;
    let api = ApiClient::direct(agent, c.token().to_string());
    let path = format!(
        "/v1/jobs/{id}/functions/{rank}/output?offset={}",
        query.offset
    );
    let bytes = api
        .send::<()>(Method::GET, &path, None)
        .await
        .map_err(|e| {
            HttpError::new(e.status().unwrap_or(StatusCode::BAD_GATEWAY), e.to_string())
        })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

async fn exits(
    State(c): State<Controller>,
    node: Result<Path<String>, PathRejection>,
    body: RequestBody,
) -> Result<StatusCode, HttpError> {
    let Path(node) = node?;
    let report: FunctionExits = parse_json(&body)?;
    // A report is as good a sign of life as a heartbeat.
    c.lock().touch(&node, Instant::now());
    // Not stored: a 503, and the agent reports again.
    c.jobs().record_exits(&node, report.exits)?;
    Ok(StatusCode::NO_CONTENT)
}

//! The error every HTTP surface of Particle answers with (the controller's
//! API and each agent's controller-facing API): a status and an
//! [`ApiError`] body, `{"error": "..."}`. Domain errors convert into it where
//! they are defined.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::ApiError;

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

/// The bearer-token check every `/v1` route of the controller and the agents makes.
pub fn check_bearer(headers: &HeaderMap, token: &str) -> Result<(), HttpError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if crate::same_secret(t.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(HttpError::new(
            StatusCode::UNAUTHORIZED,
            "wrong bearer token",
        )),
        None => Err(HttpError::new(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token>",
        )),
    }
}

/// Middleware (`axum::middleware::from_fn_with_state(token, require_bearer)`)
/// letting through only requests that carry the bearer token.
pub async fn require_bearer(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    match check_bearer(req.headers(), &token) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

//! What every side of Particle speaks, so that the controller, the node
//! agents, the CNI plugin, the `particle` command and the functions are
//! peers that share a language rather than layers that import each other:
//!
//! - [`api`]: the controller's HTTP/JSON API and the agents' controller-facing one.
//! - [`local`]: the agent's local Unix-socket API (runtimes, the CNI plugin, operators).
//! - [`warm`]: the warm-connection protocol between functions and their agent,
//!   and the agent-to-agent frames.
//! - [`caps`]: bounds on the connections every server holds.
//! - [`function_env`]: the launcher → function contract (`PARTICLE_*` variables).
//! - [`client`], [`http_error`] and [`http_server`] (feature `http`): the
//!   JSON-over-HTTP client, the error every HTTP surface answers with, and
//!   the bounded server loop behind every HTTP API.

pub mod api;
pub mod caps;
pub mod function_env;
pub mod local;
pub mod warm;

#[cfg(feature = "http")]
pub mod client;
#[cfg(feature = "http")]
pub mod http_error;
#[cfg(feature = "http")]
pub mod http_server;

/// Compares two secrets without an early exit, so the time taken does not
/// tell how much of a guess matched.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(feature = "http")]
pub use http_error::{check_bearer, require_bearer, HttpError};

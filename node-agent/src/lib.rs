//! The per-node agent: owns the node's tenant overlays and endpoint pools,
//! applies the overlay state the controller sends ([`node_state`]),
//! heartbeats and follows the controller ([`daemon`]), hands out endpoints
//! ([`claims`], the one claim path, with the [`free_pool`] and the
//! [`attachments`] lent to runtimes), launches functions ([`jobs`],
//! [`launcher`], in the [`sandbox`]), keeps warm TCP connections for them ([`warm_connections`]),
//! and serves its API surfaces ([`api`]), telling callers apart by what the
//! kernel says of them ([`peer`]).

pub mod api;
pub mod attachments;
pub mod claims;
pub mod daemon;
pub mod free_pool;
pub mod jobs;
pub mod launcher;
pub mod node_state;
pub mod peer;
pub mod sandbox;
pub mod warm_connections;

pub use node_state::{AgentError, NodeConfig, NodeState};

//! The per-node agent: owns the node's tenant overlays and warm endpoint
//! pools, applies the overlay state the controller sends ([`node_state`]),
//! heartbeats and follows the controller ([`daemon`], [`controller_client`]),
//! and serves the local Unix-socket API ([`local_api`]) and `/metrics`.

pub mod agent_api;
pub mod controller_client;
pub mod daemon;
pub mod free_pool;
pub mod jobs;
pub mod launcher;
pub mod local_api;
pub mod metrics;
pub mod node_state;

pub use node_state::{AgentError, NodeConfig, NodeState};

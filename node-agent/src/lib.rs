//! The per-node agent: owns the node's tenant overlays and warm endpoint
//! pools and applies the overlay state the controller sends. The daemon around
//! it (controller client, local Unix-socket API, metrics) is not built yet.

pub mod controller_client;
pub mod daemon;
pub mod local_api;
pub mod node_state;

pub use node_state::{AgentError, NodeConfig, NodeState};

//! The agent's API surfaces, one file each:
//!
//! - [`local`]: the Unix socket on the node (runtimes, the CNI plugin, operators).
//! - [`controller`]: the HTTP routes the controller calls to launch functions.
//! - [`metrics`]: `/metrics` (Prometheus), served beside [`controller`].

pub mod controller;
pub mod local;
pub mod metrics;

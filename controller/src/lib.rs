//! The control plane: nodes, tenants, per-node address blocks, and the overlay state pushed to agents.

pub mod api;

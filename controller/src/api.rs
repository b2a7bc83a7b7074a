//! The wire types of the controller's HTTP/JSON API, shared by the
//! controller, the node agents and the `particle` command.
//!
//! User-facing (all need `Authorization: Bearer <token>`):
//! - `POST /v1/tenants` with [`CreateTenant`] → 201 [`Tenant`]
//! - `GET /v1/tenants` → 200 `[Tenant]`; `GET /v1/tenants/{name}` → 200 [`Tenant`]
//! - `DELETE /v1/tenants/{name}` → 204
//! - `GET /v1/nodes` → 200 `[Node]`
//!
//! Agent-facing (same token):
//! - `POST /v1/agents/register` with [`RegisterNode`] → 200 [`NodeOverlay`]
//! - `POST /v1/agents/{node}/heartbeat` with [`Heartbeat`] → 204 (404 if the
//!   controller no longer knows the node: register again)
//! - `GET /v1/agents/{node}/overlay?since=V` → 200 [`NodeOverlay`] as soon as
//!   the overlay version exceeds `V` (long poll, at most 25 s, then the current
//!   state)
//!
//! Unauthenticated: `GET /metrics` (Prometheus text), `GET /healthz`.
//! Every error is a 4xx/5xx with an [`ApiError`] body.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1-32 characters of [a-z0-9-], starting with a letter.
    pub name: String,
    /// VXLAN network identifier, 1..=16777215, unique among tenants.
    pub vni: u32,
    /// IPv4 CIDR with no host bits, not overlapping any other tenant's.
    pub subnet: String,
    /// Per-node block size; default 24. Must be within the subnet and at most 30.
    #[serde(default)]
    pub block_prefix: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    pub vni: u32,
    pub subnet: String,
    pub block_prefix: u8,
    /// Node name → that node's block of this tenant's subnet.
    pub blocks: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterNode {
    /// 1-32 characters of [a-z0-9-], starting with a letter.
    pub node: String,
    /// The node's VTEP address on the underlay.
    pub underlay_ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PoolLevel {
    pub ready: usize,
    pub claimed: u64,
    pub build_errors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Tenant name → its pool on the node.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolLevel>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    /// Milliseconds since the last heartbeat (or registration).
    pub last_seen_ms: u64,
    pub pools: BTreeMap<String, PoolLevel>,
}

/// Everything one node needs to program its overlay: O(nodes x tenants).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeOverlay {
    /// Increases with every change to tenants or nodes.
    pub version: u64,
    pub node: String,
    pub tenants: Vec<TenantOverlay>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantOverlay {
    pub name: String,
    pub vni: u32,
    pub subnet: String,
    /// This node's block.
    pub local_block: String,
    /// Every other live node's block of this tenant.
    pub remotes: Vec<RemoteNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemoteNode {
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub block: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

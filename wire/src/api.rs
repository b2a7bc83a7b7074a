//! The wire types of the controller's HTTP/JSON API, shared by the
//! controller, the node agents and the `particle` command.
//!
//! User-facing (all need `Authorization: Bearer <token>`):
//! - `POST /v1/tenants` with [`CreateTenant`] → 201 [`Tenant`]
//! - `GET /v1/tenants` → 200 `[Tenant]`; `GET /v1/tenants/{name}` → 200 [`Tenant`]
//! - `DELETE /v1/tenants/{name}` → 204
//! - `GET /v1/nodes` → 200 `[Node]`
//! - `PUT /v1/tenants/{name}/warm` with [`WarmTarget`] → 200 [`Tenant`]: the
//!   tenant's standing warm pool per node (prewarm before a burst)
//! - `POST /v1/jobs` with [`LaunchJob`] → 201 [`Job`]: a burst; returns once
//!   every function was started (or failed to), with each one's node and
//!   address
//! - `GET /v1/jobs` → 200 `[JobSummary]`; `GET /v1/jobs/{id}` → 200 [`Job`]
//!   (`?wait_s=S` waits up to S seconds for the job to end; `?output=true`
//!   adds every function's captured output)
//! - `GET /v1/jobs/{id}/functions/{rank}/output?offset=N` → 200 text: what
//!   the function printed so far from byte N (live, from its agent)
//! - `DELETE /v1/jobs/{id}` → 200 [`Job`]: cancels (kills what runs,
//!   returns the endpoints)
//!
//! Agent-facing (same token):
//! - `POST /v1/agents/register` with [`RegisterNode`] → 200 [`NodeOverlay`]
//! - `POST /v1/agents/{node}/heartbeat` with [`Heartbeat`] → 204 (404 if the
//!   controller no longer knows the node: register again)
//! - `GET /v1/agents/{node}/overlay?since=V` → 200 [`NodeOverlay`] as soon as
//!   the overlay version exceeds `V` (long poll, at most 25 s, then the current
//!   state)
//!
//! - `POST /v1/agents/{node}/exits` with [`FunctionExits`] → 204
//!
//! The controller calls each agent (same token) on the agent's API port
//! ([`RegisterNode::api_port`]): `POST /v1/jobs/{id}/reserve` with
//! [`ReserveFunctions`] → [`Reserved`], `POST /v1/jobs/{id}/start` with
//! [`StartFunctions`] → [`Started`], `DELETE /v1/jobs/{id}`, and
//! `GET /v1/jobs/{id}/functions/{rank}/output?offset=N`.
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
    /// Warm endpoints kept per node; default: the agents' own setting.
    #[serde(default)]
    pub warm_per_node: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmTarget {
    /// Warm endpoints per node; `null` goes back to the agents' default.
    pub per_node: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    pub vni: u32,
    pub subnet: String,
    pub block_prefix: u8,
    #[serde(default)]
    pub warm_per_node: Option<usize>,
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
    /// Where the agent's API listens (on `underlay_ip`); `None`: the agent
    /// cannot launch functions.
    #[serde(default)]
    pub api_port: Option<u16>,
    /// Differs on every agent start: a node registering with a new instance
    /// lost the functions the old one ran.
    #[serde(default)]
    pub instance: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PoolLevel {
    /// Warm endpoints ready now (a level).
    pub ready: usize,
    /// Endpoints claimed since the pool started (a counter, not a level).
    #[serde(alias = "claimed")]
    pub claims_total: u64,
    /// Builds that failed since the pool started (a counter).
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
    /// The agent's API port (launching functions); `None`: cannot launch.
    #[serde(default)]
    pub api_port: Option<u16>,
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
    /// Warm endpoints to keep; `None`: the agent's default.
    #[serde(default)]
    pub warm_per_node: Option<usize>,
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

/// What a function runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCommand {
    /// Program and arguments; the program is looked up in PATH inside the
    /// function's root file system ([`LaunchJob::image`]).
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// How the agents start functions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// The agent's own namespaces (fastest).
    #[default]
    Builtin,
    /// The node's OCI runtime (runc).
    Oci,
}

/// Where functions go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Only these nodes (default: every live node that can launch).
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    /// At most this many functions per node.
    #[serde(default)]
    pub max_per_node: Option<usize>,
}

/// `POST /v1/jobs`: a burst of `functions` copies of `command` on `tenant`'s
/// overlay, spread round-robin over the nodes (rank r on the r-th node, so
/// neighbouring ranks are on different nodes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchJob {
    pub tenant: String,
    pub functions: usize,
    pub command: FunctionCommand,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// The port every function's entry in `PARTICLE_PEERS` names (default 7000).
    #[serde(default)]
    pub port: Option<u16>,
    /// Per-function limits; what is unset comes from the agents' settings.
    #[serde(default, skip_serializing_if = "FunctionLimits::is_unset")]
    pub limits: FunctionLimits,
    /// The functions' root file system: a directory on the nodes, or an
    /// unpacked OCI image (a directory holding `rootfs/`); default: the
    /// tenant's image in the agents' settings, else the agents' own minimal
    /// image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A directory of the nodes the functions may write, at the same path
    /// (their only way to leave files on a node, e.g. the pipeline's
    /// stream). Under `/tmp` (made inside their private `/tmp`), or where
    /// the image has a directory for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<String>,
}

impl LaunchJob {
    /// `functions` copies of `argv` on `tenant`; everything else the defaults.
    pub fn of(tenant: &str, functions: usize, argv: Vec<String>) -> Self {
        Self {
            tenant: tenant.into(),
            functions,
            command: FunctionCommand {
                argv,
                env: Default::default(),
            },
            placement: Default::default(),
            runtime: Default::default(),
            port: None,
            limits: Default::default(),
            image: None,
            output_dir: None,
        }
    }
}

/// What one function may use; `None`: the agent's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionLimits {
    /// Processes and threads, its PID 1 included.
    #[serde(default)]
    pub pids: Option<u64>,
    /// Memory (its private `/tmp` included), MiB; over it, the function is killed.
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// CPU weight relative to other functions, 1..=10000 (100: an even share).
    #[serde(default)]
    pub cpu_weight: Option<u64>,
    /// Size of its private `/tmp`, MiB.
    #[serde(default)]
    pub tmp_mb: Option<u64>,
}

impl FunctionLimits {
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    /// Every function exited 0.
    Succeeded,
    /// Every function ended and at least one did not exit 0.
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FunctionState {
    Running,
    Exited,
    /// Never ran: no endpoint, or the start failed.
    Failed,
    /// Its node went away before it reported an exit.
    Lost,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionStatus {
    pub rank: usize,
    pub node: String,
    pub address: Option<Ipv4Addr>,
    pub state: FunctionState,
    pub exit_code: Option<i32>,
    /// Its endpoint was built for it (the warm pool had run dry).
    pub cold: bool,
    /// Its endpoint came from the node's tenant-free pool, bound to the tenant.
    #[serde(default)]
    pub bound: bool,
    pub error: Option<String>,
    /// The end of what it printed (only with `?output=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Why it ended the way it did, when its node knows more than the exit
    /// code (killed at its memory limit, refused forks at its process limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub tenant: String,
    pub state: JobState,
    pub functions: Vec<FunctionStatus>,
    /// Endpoints taken from the tenant's warm pools / bound from tenant-free
    /// pools / built during the launch.
    pub warm: usize,
    #[serde(default)]
    pub bound: usize,
    pub cold: usize,
    /// From the request to every function started, milliseconds.
    pub launch_ms: f64,
    /// From the request to the last exit, once the job has ended.
    pub duration_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: String,
    pub tenant: String,
    pub state: JobState,
    pub functions: usize,
    pub exited: usize,
}

/// Controller → agent: claim endpoints for these ranks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveFunctions {
    pub tenant: String,
    pub ranks: Vec<usize>,
    /// Checked before anything is claimed.
    pub program: String,
    pub runtime: RuntimeKind,
    /// [`LaunchJob::limits`], checked before anything is claimed and kept
    /// for the start.
    #[serde(default, skip_serializing_if = "FunctionLimits::is_unset")]
    pub limits: FunctionLimits,
    /// [`LaunchJob::image`], where `program` is looked up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// [`LaunchJob::output_dir`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedEndpoint {
    pub rank: usize,
    /// `None` with `error` set when no endpoint could be had.
    pub address: Option<Ipv4Addr>,
    pub cold: bool,
    /// Bound from the tenant-free pool (neither warm nor cold).
    #[serde(default)]
    pub bound: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserved {
    pub endpoints: Vec<ReservedEndpoint>,
    /// The agent instance that holds them ([`RegisterNode::instance`]).
    #[serde(default)]
    pub instance: Option<String>,
}

/// Controller → agent: start the reserved functions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartFunctions {
    pub command: FunctionCommand,
    pub runtime: RuntimeKind,
    pub size: usize,
    /// Every function's `host:port`, by rank (`PARTICLE_PEERS`).
    pub peers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartFailure {
    pub rank: usize,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub started: Vec<usize>,
    pub failed: Vec<StartFailure>,
}

/// Agent → controller: functions that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionExits {
    pub exits: Vec<FunctionExit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionExit {
    pub job: String,
    pub rank: usize,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// The end of its output (bounded by the agent).
    pub output: String,
    /// [`FunctionStatus::reason`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

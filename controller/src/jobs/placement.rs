//! Where a job's functions run: the nodes it may use, and its ranks spread
//! round-robin over them.

use std::net::SocketAddr;

use axum::http::StatusCode;

use super::{bad, HttpError, LaunchJob};
use crate::Controller;
use particle_net::bridge::MAX_PORTS;

/// The nodes (name, agent) that `req` launches on: every live node that can
/// launch, or the ones its placement names, checked against the tenant and
/// the placement's limit per node.
pub(super) fn choose_nodes(
    c: &Controller,
    req: &LaunchJob,
) -> Result<Vec<(String, SocketAddr)>, HttpError> {
    let (mut agents, block_prefix) = {
        let state = c.lock();
        let tenant = state.tenant(&req.tenant)?;
        (state.launchers(), tenant.block_prefix)
    };
    if let Some(wanted) = &req.placement.nodes {
        // The client's mistake, not a lack of nodes: 400, not the 503 below.
        if wanted.is_empty() {
            return Err(bad("placement.nodes is empty: name at least one node"));
        }
        if let Some(unknown) = wanted.iter().find(|n| !agents.iter().any(|(a, _)| a == *n)) {
            return Err(bad(format!(
                "placement names node {unknown:?}, which is not a live node that can launch"
            )));
        }
        agents.retain(|(name, _)| wanted.contains(name));
    }
    if agents.is_empty() {
        return Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no live node can launch functions",
        ));
    }
    if let Some(max) = req.placement.max_per_node {
        // Saturating: a max_per_node near usize::MAX means "no limit", not an overflow.
        if max == 0 || req.functions > max.saturating_mul(agents.len()) {
            return Err(bad(format!(
                "{} functions do not fit {} nodes at {max} per node",
                req.functions,
                agents.len()
            )));
        }
    }
    // A node's block holds the gateway and its endpoints, and its router's
    // bridge at most MAX_PORTS of them: a job that needs more there is
    // refused now, before anything is claimed, never half-run.
    let per_node = req.functions.div_ceil(agents.len());
    let room = block_room(block_prefix);
    let refuse = |why: String| {
        Err(HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "{} functions on {} nodes need {per_node} endpoints on a node; {why}",
                req.functions,
                agents.len(),
            ),
        ))
    };
    if per_node > room {
        return refuse(format!(
            "tenant {:?}'s /{block_prefix} blocks hold {room} addresses: use more nodes or a tenant with larger blocks (block_prefix)",
            req.tenant
        ));
    }
    if per_node > MAX_PORTS {
        return refuse(format!(
            "a tenant's router on a node is one Linux bridge, which takes at most {MAX_PORTS} ports: use more nodes"
        ));
    }
    Ok(agents)
}

/// Endpoint addresses a block of this prefix holds (not the network, the
/// gateway or the broadcast address).
fn block_room(prefix: u8) -> usize {
    let size = 1u64 << (32 - u32::from(prefix.min(32)));
    usize::try_from(size.saturating_sub(3)).unwrap_or(usize::MAX)
}

/// The node (its index among `nodes` of them) that runs `rank`.
/// Round-robin: neighbouring ranks land on different nodes.
pub(super) fn node_of(rank: usize, nodes: usize) -> usize {
    rank % nodes
}

/// The ranks of a job of `functions` on each of `nodes` nodes.
pub(super) fn ranks_by_node(functions: usize, nodes: usize) -> Vec<Vec<usize>> {
    let mut ranks: Vec<Vec<usize>> = vec![Vec::new(); nodes];
    for rank in 0..functions {
        ranks[node_of(rank, nodes)].push(rank);
    }
    ranks
}

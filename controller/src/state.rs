//! The controller's model: tenants, nodes and per-node address blocks.
//!
//! Pure and synchronous (no I/O, the clock is passed in) so every rule can be
//! unit-tested; the HTTP layer wraps it in a lock and persists it.
//!
//! Invariant: every registered node holds exactly one block in every tenant,
//! so `overlay_for` never has to invent one.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use particle_net::ipam::{parse_network, DisjointNetworks, IpamError, TenantSubnet};
use particle_net::overlay::MAX_VNI;
use serde::{Deserialize, Serialize};

use particle_wire::api::{
    CreateTenant, Heartbeat, Node, NodeOverlay, PoolLevel, RemoteNode, Tenant, TenantOverlay,
};

/// Block size used when a tenant does not ask for one.
pub const DEFAULT_BLOCK_PREFIX: u8 = 24;

/// What one controller lets its users create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Tenants at once.
    pub max_tenants: usize,
    /// Warm endpoints per tenant per node a tenant may ask for.
    pub max_warm_per_node: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            max_tenants: 256,
            // Every warm endpoint is a port of the tenant's bridge on the node.
            max_warm_per_node: particle_net::bridge::MAX_PORTS,
        }
    }
}

/// How an error should be reported to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (400).
    Invalid,
    /// It names a tenant or node that does not exist (404).
    NotFound,
    /// It is well-formed but clashes with the current state (409).
    Conflict,
    /// It is over a quota (403): refused, nothing changed.
    Quota,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error(
        "invalid {what} name {name:?}: need 1-32 characters of [a-z0-9-] starting with a letter"
    )]
    InvalidName { what: &'static str, name: String },
    #[error("VNI {0} is outside 1..={MAX_VNI}")]
    InvalidVni(u32),
    #[error("invalid subnet: {0}")]
    InvalidSubnet(IpamError),
    #[error("invalid block_prefix: {0}")]
    InvalidBlockPrefix(IpamError),
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    #[error("VNI {vni} is already used by tenant {tenant:?}")]
    VniInUse { vni: u32, tenant: String },
    #[error("subnet conflict: {0}")]
    SubnetOverlap(IpamError),
    #[error("underlay ip {ip} is already registered by node {node:?}")]
    UnderlayIpTaken { ip: Ipv4Addr, node: String },
    #[error("tenant {tenant:?}: {source}")]
    NoFreeBlock { tenant: String, source: IpamError },
    #[error("stored state is inconsistent: {0}")]
    Corrupt(String),
    #[error("subnet {subnet} overlaps the {what} range {range}")]
    ReservedSubnet {
        subnet: Ipv4Network,
        what: &'static str,
        range: Ipv4Network,
    },
    #[error("subnet {subnet} holds node {node:?}'s underlay address {ip}")]
    UnderlaySubnet {
        subnet: Ipv4Network,
        node: String,
        ip: Ipv4Addr,
    },
    #[error("node {node:?}'s underlay address {ip} is inside tenant {tenant:?}'s subnet")]
    UnderlayInTenant {
        node: String,
        ip: Ipv4Addr,
        tenant: String,
    },
    #[error("at most {max} tenants: delete one first")]
    TooManyTenants { max: usize },
    #[error("warm_per_node {asked} is over the limit of {max}")]
    WarmTooLarge { asked: usize, max: usize },
}

impl StateError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidName { .. }
            | Self::InvalidVni(_)
            | Self::InvalidSubnet(_)
            | Self::InvalidBlockPrefix(_)
            | Self::ReservedSubnet { .. }
            | Self::UnderlaySubnet { .. }
            | Self::Corrupt(_) => ErrorKind::Invalid,
            Self::TooManyTenants { .. } | Self::WarmTooLarge { .. } => ErrorKind::Quota,
            Self::UnknownTenant(_) | Self::UnknownNode(_) => ErrorKind::NotFound,
            Self::TenantExists(_)
            | Self::VniInUse { .. }
            | Self::SubnetOverlap(_)
            | Self::UnderlayIpTaken { .. }
            | Self::UnderlayInTenant { .. }
            | Self::NoFreeBlock { .. } => ErrorKind::Conflict,
        }
    }
}

/// `^[a-z][a-z0-9-]{0,31}$`, without pulling in a regex engine.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=32).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

#[derive(Debug, Clone)]
struct TenantEntry {
    vni: u32,
    subnet: Ipv4Network,
    block_prefix: u8,
    ipam: TenantSubnet,
    /// Node name → its block.
    blocks: BTreeMap<String, Ipv4Network>,
    warm_per_node: Option<usize>,
}

#[derive(Debug, Clone)]
struct NodeEntry {
    underlay_ip: Ipv4Addr,
    api_port: Option<u16>,
    last_seen: Instant,
    pools: BTreeMap<String, PoolLevel>,
}

/// What the embedded store keeps: enough to rebuild the model after a
/// restart. Liveness (last_seen) and pool levels are deliberately not stored;
/// they are re-learnt from heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Kept so agents' `since` values stay meaningful across a restart.
    pub version: u64,
    pub tenants: Vec<Tenant>,
    pub nodes: Vec<StoredNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredNode {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    #[serde(default)]
    pub api_port: Option<u16>,
}

#[derive(Debug, Clone, Default)]
pub struct ControllerState {
    version: u64,
    tenants: BTreeMap<String, TenantEntry>,
    /// All tenants' subnets, for the overlap check.
    subnets: DisjointNetworks,
    nodes: BTreeMap<String, NodeEntry>,
    quotas: Quotas,
}

impl ControllerState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The same rules with other quotas.
    pub fn with_quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    fn check_warm(&self, per_node: Option<usize>) -> Result<(), StateError> {
        match per_node {
            Some(asked) if asked > self.quotas.max_warm_per_node => Err(StateError::WarmTooLarge {
                asked,
                max: self.quotas.max_warm_per_node,
            }),
            _ => Ok(()),
        }
    }

    /// A tenant subnet must stay clear of the kernel's special ranges and of
    /// every node's underlay address (a tenant route there would take the
    /// node's own traffic).
    fn check_subnet(&self, subnet: Ipv4Network) -> Result<(), StateError> {
        if let Some((what, range)) = particle_net::ipam::reserved_overlap(subnet) {
            return Err(StateError::ReservedSubnet {
                subnet,
                what,
                range,
            });
        }
        match self
            .nodes
            .iter()
            .find(|(_, n)| subnet.contains(n.underlay_ip))
        {
            Some((node, n)) => Err(StateError::UnderlaySubnet {
                subnet,
                node: node.clone(),
                ip: n.underlay_ip,
            }),
            None => Ok(()),
        }
    }

    /// Increases on every change to tenants or nodes (not on heartbeats:
    /// liveness alone does not change anyone's overlay).
    pub fn version(&self) -> u64 {
        self.version
    }

    fn bump(&mut self) {
        self.version += 1;
    }

    pub fn create_tenant(&mut self, req: &CreateTenant) -> Result<Tenant, StateError> {
        if !valid_name(&req.name) {
            return Err(StateError::InvalidName {
                what: "tenant",
                name: req.name.clone(),
            });
        }
        if req.vni == 0 || req.vni > MAX_VNI {
            return Err(StateError::InvalidVni(req.vni));
        }
        let subnet = parse_network(&req.subnet).map_err(StateError::InvalidSubnet)?;
        self.check_subnet(subnet)?;
        self.check_warm(req.warm_per_node)?;
        let block_prefix = req.block_prefix.unwrap_or(DEFAULT_BLOCK_PREFIX);
        let mut ipam =
            TenantSubnet::new(subnet, block_prefix).map_err(StateError::InvalidBlockPrefix)?;
        if self.tenants.len() >= self.quotas.max_tenants && !self.tenants.contains_key(&req.name) {
            return Err(StateError::TooManyTenants {
                max: self.quotas.max_tenants,
            });
        }
        if self.tenants.contains_key(&req.name) {
            return Err(StateError::TenantExists(req.name.clone()));
        }
        if let Some((tenant, _)) = self.tenants.iter().find(|(_, t)| t.vni == req.vni) {
            return Err(StateError::VniInUse {
                vni: req.vni,
                tenant: tenant.clone(),
            });
        }
        // Check overlap on a copy so a later failure leaves the set untouched.
        let mut subnets = self.subnets.clone();
        subnets.insert(subnet).map_err(StateError::SubnetOverlap)?;
        let mut blocks = BTreeMap::new();
        for node in self.nodes.keys() {
            let block = ipam
                .allocate_block()
                .map_err(|source| StateError::NoFreeBlock {
                    tenant: req.name.clone(),
                    source,
                })?;
            blocks.insert(node.clone(), block.network());
        }
        self.subnets = subnets;
        self.tenants.insert(
            req.name.clone(),
            TenantEntry {
                vni: req.vni,
                subnet,
                block_prefix,
                ipam,
                blocks,
                warm_per_node: req.warm_per_node,
            },
        );
        self.bump();
        self.tenant(&req.name)
    }

    /// Sets how many warm endpoints every node keeps for the tenant.
    pub fn set_warm(&mut self, name: &str, per_node: Option<usize>) -> Result<Tenant, StateError> {
        self.check_warm(per_node)?;
        let entry = self
            .tenants
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownTenant(name.to_string()))?;
        if entry.warm_per_node != per_node {
            entry.warm_per_node = per_node;
            self.bump();
        }
        self.tenant(name)
    }

    /// Records where a node's agent API listens (learnt at registration).
    pub fn set_api_port(&mut self, name: &str, port: Option<u16>) -> Result<(), StateError> {
        let entry = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownNode(name.to_string()))?;
        if entry.api_port != port {
            entry.api_port = port;
            // A new version is what gets the store written (a restarted
            // controller must call the agent where it listens now).
            self.bump();
        }
        Ok(())
    }

    /// Nodes whose agents can launch functions: (name, API address), by name.
    pub fn launchers(&self) -> Vec<(String, std::net::SocketAddr)> {
        self.nodes
            .iter()
            .filter_map(|(name, e)| {
                Some((
                    name.clone(),
                    std::net::SocketAddr::from((e.underlay_ip, e.api_port?)),
                ))
            })
            .collect()
    }

    pub fn delete_tenant(&mut self, name: &str) -> Result<(), StateError> {
        let entry = self
            .tenants
            .remove(name)
            .ok_or_else(|| StateError::UnknownTenant(name.to_string()))?;
        self.subnets.remove(entry.subnet);
        self.bump();
        Ok(())
    }

    pub fn tenant(&self, name: &str) -> Result<Tenant, StateError> {
        self.tenants
            .get(name)
            .map(|t| tenant_view(name, t))
            .ok_or_else(|| StateError::UnknownTenant(name.to_string()))
    }

    pub fn tenants(&self) -> Vec<Tenant> {
        self.tenants
            .iter()
            .map(|(name, t)| tenant_view(name, t))
            .collect()
    }

    /// Registers a node, or refreshes one that registers again (an agent
    /// restart): the same name keeps its blocks, the underlay ip may move.
    pub fn register_node(
        &mut self,
        name: &str,
        underlay_ip: Ipv4Addr,
        now: Instant,
    ) -> Result<NodeOverlay, StateError> {
        if !valid_name(name) {
            return Err(StateError::InvalidName {
                what: "node",
                name: name.to_string(),
            });
        }
        if let Some((other, _)) = self
            .nodes
            .iter()
            .find(|(n, e)| n.as_str() != name && e.underlay_ip == underlay_ip)
        {
            return Err(StateError::UnderlayIpTaken {
                ip: underlay_ip,
                node: other.clone(),
            });
        }
        if let Some((tenant, _)) = self
            .tenants
            .iter()
            .find(|(_, t)| t.subnet.contains(underlay_ip))
        {
            return Err(StateError::UnderlayInTenant {
                node: name.to_string(),
                ip: underlay_ip,
                tenant: tenant.clone(),
            });
        }
        if let Some(entry) = self.nodes.get_mut(name) {
            entry.last_seen = now;
            if entry.underlay_ip != underlay_ip {
                entry.underlay_ip = underlay_ip;
                self.bump();
            }
            return self.overlay_for(name);
        }
        // A new node: it needs a block in every tenant, all or nothing.
        let mut allocated: Vec<(String, Ipv4Network)> = Vec::new();
        let mut failure = None;
        for (tenant, entry) in self.tenants.iter_mut() {
            match entry.ipam.allocate_block() {
                Ok(block) => allocated.push((tenant.clone(), block.network())),
                Err(source) => {
                    failure = Some(StateError::NoFreeBlock {
                        tenant: tenant.clone(),
                        source,
                    });
                    break;
                }
            }
        }
        if let Some(err) = failure {
            for (tenant, block) in allocated {
                if let Some(entry) = self.tenants.get_mut(&tenant) {
                    // Cannot fail: the block was allocated from this subnet just above.
                    let _ = entry.ipam.release_block(block);
                }
            }
            return Err(err);
        }
        for (tenant, block) in allocated {
            if let Some(entry) = self.tenants.get_mut(&tenant) {
                entry.blocks.insert(name.to_string(), block);
            }
        }
        self.nodes.insert(
            name.to_string(),
            NodeEntry {
                underlay_ip,
                api_port: None,
                last_seen: now,
                pools: BTreeMap::new(),
            },
        );
        self.bump();
        self.overlay_for(name)
    }

    /// Records liveness and pool levels. Does not bump the version.
    pub fn heartbeat(
        &mut self,
        name: &str,
        heartbeat: Heartbeat,
        now: Instant,
    ) -> Result<(), StateError> {
        let entry = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownNode(name.to_string()))?;
        entry.last_seen = now;
        entry.pools = heartbeat.pools;
        Ok(())
    }

    /// Marks a node as seen now without a heartbeat (it just answered us).
    pub fn touch(&mut self, name: &str, now: Instant) {
        if let Some(entry) = self.nodes.get_mut(name) {
            entry.last_seen = now;
        }
    }

    /// Removes nodes not seen within `timeout` and frees their blocks.
    /// Returns the removed names.
    pub fn expire_nodes(&mut self, now: Instant, timeout: Duration) -> Vec<String> {
        let expired = self.expired(now, timeout);
        for name in &expired {
            self.remove_node(name);
        }
        if !expired.is_empty() {
            self.bump();
        }
        expired
    }

    /// The nodes `expire_nodes` would remove, without removing them.
    pub fn expired(&self, now: Instant, timeout: Duration) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_seen) > timeout)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
        for entry in self.tenants.values_mut() {
            if let Some(block) = entry.blocks.remove(name) {
                // Cannot fail: every recorded block came from this subnet.
                let _ = entry.ipam.release_block(block);
            }
        }
    }

    pub fn nodes(&self, now: Instant) -> Vec<Node> {
        self.nodes
            .iter()
            .map(|(name, e)| Node {
                name: name.clone(),
                underlay_ip: e.underlay_ip,
                api_port: e.api_port,
                last_seen_ms: u64::try_from(now.saturating_duration_since(e.last_seen).as_millis())
                    .unwrap_or(u64::MAX),
                pools: e.pools.clone(),
            })
            .collect()
    }

    pub fn has_node(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// (node, tenant, ready) for every pool reported in the last heartbeats.
    pub fn pool_levels(&self) -> Vec<(String, String, usize)> {
        self.nodes
            .iter()
            .flat_map(|(node, e)| {
                e.pools
                    .iter()
                    .map(move |(tenant, p)| (node.clone(), tenant.clone(), p.ready))
            })
            .collect()
    }

    /// Everything `node` needs: per tenant its own block and every other
    /// node's block and underlay ip, sorted by tenant then node name.
    pub fn overlay_for(&self, node: &str) -> Result<NodeOverlay, StateError> {
        if !self.nodes.contains_key(node) {
            return Err(StateError::UnknownNode(node.to_string()));
        }
        let tenants = self
            .tenants
            .iter()
            .filter_map(|(name, t)| {
                let local = t.blocks.get(node)?;
                let mut remotes: Vec<RemoteNode> = t
                    .blocks
                    .iter()
                    .filter(|(other, _)| other.as_str() != node)
                    .filter_map(|(other, block)| {
                        let entry = self.nodes.get(other)?;
                        Some(RemoteNode {
                            node: other.clone(),
                            underlay_ip: entry.underlay_ip,
                            block: block.to_string(),
                        })
                    })
                    .collect();
                remotes.sort();
                Some(TenantOverlay {
                    name: name.clone(),
                    vni: t.vni,
                    subnet: t.subnet.to_string(),
                    local_block: local.to_string(),
                    warm_per_node: t.warm_per_node,
                    remotes,
                })
            })
            .collect();
        Ok(NodeOverlay {
            version: self.version,
            node: node.to_string(),
            tenants,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: self.version,
            tenants: self.tenants(),
            nodes: self
                .nodes
                .iter()
                .map(|(name, e)| StoredNode {
                    name: name.clone(),
                    underlay_ip: e.underlay_ip,
                    api_port: e.api_port,
                })
                .collect(),
        }
    }

    /// Rebuilds the model from a snapshot. Restored nodes count as seen at
    /// `now`: a grace period in which their agents must heartbeat again.
    pub fn restore(snapshot: Snapshot, now: Instant) -> Result<Self, StateError> {
        let corrupt = |msg: String| StateError::Corrupt(msg);
        let mut state = Self {
            version: snapshot.version,
            ..Self::default()
        };
        for node in snapshot.nodes {
            if !valid_name(&node.name) {
                return Err(corrupt(format!("bad node name {:?}", node.name)));
            }
            if state
                .nodes
                .insert(
                    node.name.clone(),
                    NodeEntry {
                        underlay_ip: node.underlay_ip,
                        api_port: node.api_port,
                        last_seen: now,
                        pools: BTreeMap::new(),
                    },
                )
                .is_some()
            {
                return Err(corrupt(format!("node {:?} listed twice", node.name)));
            }
        }
        for t in snapshot.tenants {
            let subnet = parse_network(&t.subnet)
                .map_err(|e| corrupt(format!("tenant {:?}: {e}", t.name)))?;
            let mut ipam = TenantSubnet::new(subnet, t.block_prefix)
                .map_err(|e| corrupt(format!("tenant {:?}: {e}", t.name)))?;
            state
                .subnets
                .insert(subnet)
                .map_err(|e| corrupt(format!("tenant {:?}: {e}", t.name)))?;
            let mut blocks = BTreeMap::new();
            for (node, block) in &t.blocks {
                if !state.nodes.contains_key(node) {
                    return Err(corrupt(format!(
                        "tenant {:?} has a block for unknown node {node:?}",
                        t.name
                    )));
                }
                let block = parse_network(block)
                    .and_then(|b| ipam.claim_block(b))
                    .map_err(|e| corrupt(format!("tenant {:?}: {e}", t.name)))?;
                blocks.insert(node.clone(), block.network());
            }
            // Keep the invariant even if the file lacks a block for a node.
            for node in state.nodes.keys() {
                if !blocks.contains_key(node) {
                    let block = ipam
                        .allocate_block()
                        .map_err(|e| corrupt(format!("tenant {:?}: {e}", t.name)))?;
                    blocks.insert(node.clone(), block.network());
                }
            }
            state.tenants.insert(
                t.name.clone(),
                TenantEntry {
                    vni: t.vni,
                    subnet,
                    block_prefix: t.block_prefix,
                    ipam,
                    blocks,
                    warm_per_node: t.warm_per_node,
                },
            );
        }
        Ok(state)
    }
}

fn tenant_view(name: &str, t: &TenantEntry) -> Tenant {
    Tenant {
        name: name.to_string(),
        vni: t.vni,
        subnet: t.subnet.to_string(),
        block_prefix: t.block_prefix,
        warm_per_node: t.warm_per_node,
        blocks: t
            .blocks
            .iter()
            .map(|(n, b)| (n.clone(), b.to_string()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, vni: u32, subnet: &str) -> CreateTenant {
        CreateTenant {
            warm_per_node: None,
            name: name.into(),
            vni,
            subnet: subnet.into(),
            block_prefix: None,
        }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 0, last)
    }

    #[test]
    fn names_follow_the_pattern() {
        assert!(valid_name("a"));
        assert!(valid_name("tenant-1"));
        assert!(valid_name(&"a".repeat(32)));
        assert!(!valid_name(&"a".repeat(33)));
        assert!(!valid_name(""));
        assert!(!valid_name("1abc"));
        assert!(!valid_name("-abc"));
        assert!(!valid_name("Abc"));
        assert!(!valid_name("a_b"));
        assert!(!valid_name("a.b"));
    }

    #[test]
    fn tenant_validation_errors_have_the_right_kind_and_change_nothing() {
        let mut s = ControllerState::new();
        s.create_tenant(&req("red", 10, "10.1.0.0/16")).unwrap();
        let v = s.version();
        let cases = [
            (req("Bad", 11, "10.2.0.0/16"), ErrorKind::Invalid),
            (req("blue", 0, "10.2.0.0/16"), ErrorKind::Invalid),
            (req("blue", MAX_VNI + 1, "10.2.0.0/16"), ErrorKind::Invalid),
            (req("blue", 11, "banana"), ErrorKind::Invalid),
            (req("blue", 11, "10.2.0.1/16"), ErrorKind::Invalid),
            (req("red", 11, "10.2.0.0/16"), ErrorKind::Conflict),
            (req("blue", 10, "10.2.0.0/16"), ErrorKind::Conflict),
            (req("blue", 11, "10.1.128.0/17"), ErrorKind::Conflict),
            (req("blue", 11, "10.0.0.0/8"), ErrorKind::Conflict),
        ];
        for (r, kind) in cases {
            let e = s.create_tenant(&r).unwrap_err();
            assert_eq!(e.kind(), kind, "{r:?}: {e}");
        }
        let mut small_block = req("blue", 11, "10.2.0.0/16");
        small_block.block_prefix = Some(31);
        assert_eq!(
            s.create_tenant(&small_block).unwrap_err().kind(),
            ErrorKind::Invalid
        );
        small_block.block_prefix = Some(8);
        assert_eq!(
            s.create_tenant(&small_block).unwrap_err().kind(),
            ErrorKind::Invalid
        );
        assert_eq!(s.version(), v);
        assert_eq!(s.tenant_count(), 1);
        // The failed attempts did not leave the subnet set dirty.
        s.create_tenant(&req("blue", 11, "10.2.0.0/16")).unwrap();
        assert_eq!(s.tenant("blue").unwrap().block_prefix, 24);
        assert_eq!(s.version(), v + 1);
    }

    #[test]
    fn blocks_follow_nodes_and_tenants_both_ways() {
        let now = Instant::now();
        let mut s = ControllerState::new();
        s.register_node("n1", ip(1), now).unwrap();
        let t = s.create_tenant(&req("red", 10, "10.1.0.0/16")).unwrap();
        assert_eq!(t.blocks["n1"], "10.1.0.0/24");
        let o = s.register_node("n2", ip(2), now).unwrap();
        assert_eq!(o.tenants[0].local_block, "10.1.1.0/24");
        assert_eq!(
            o.tenants[0].remotes,
            vec![RemoteNode {
                node: "n1".into(),
                underlay_ip: ip(1),
                block: "10.1.0.0/24".into()
            }]
        );
        let o1 = s.overlay_for("n1").unwrap();
        assert_eq!(o1.tenants[0].remotes.len(), 1);
        assert_eq!(o1.tenants[0].remotes[0].node, "n2");
        assert!(s.overlay_for("n3").is_err());
    }

    #[test]
    fn reregistering_is_idempotent_and_underlay_ips_are_unique() {
        let now = Instant::now();
        let mut s = ControllerState::new();
        s.create_tenant(&req("red", 10, "10.1.0.0/16")).unwrap();
        s.register_node("n1", ip(1), now).unwrap();
        let v = s.version();
        let o = s.register_node("n1", ip(1), now).unwrap();
        assert_eq!(s.version(), v, "same registration changes nothing");
        assert_eq!(o.tenants[0].local_block, "10.1.0.0/24");
        s.register_node("n1", ip(9), now).unwrap();
        assert_eq!(s.version(), v + 1);
        assert_eq!(s.tenant("red").unwrap().blocks["n1"], "10.1.0.0/24");
        let e = s.register_node("n2", ip(9), now).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        let e = s.register_node("N2", ip(3), now).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert_eq!(s.version(), v + 1);
    }

    #[test]
    fn a_full_subnet_refuses_new_nodes_and_rolls_back_other_tenants() {
        let now = Instant::now();
        let mut s = ControllerState::new();
        s.create_tenant(&req("big", 10, "10.1.0.0/16")).unwrap();
        let mut small = req("small", 11, "10.2.0.0/23");
        small.block_prefix = Some(24);
        s.create_tenant(&small).unwrap();
        s.register_node("n1", ip(1), now).unwrap();
        s.register_node("n2", ip(2), now).unwrap();
        let v = s.version();
        let e = s.register_node("n3", ip(3), now).unwrap_err();
        assert!(matches!(e, StateError::NoFreeBlock { .. }), "{e}");
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(s.version(), v);
        assert_eq!(s.tenant("big").unwrap().blocks.len(), 2);
        // The block "big" handed out for n3 was released again.
        s.delete_tenant("small").unwrap();
        s.register_node("n3", ip(3), now).unwrap();
        assert_eq!(s.tenant("big").unwrap().blocks["n3"], "10.1.2.0/24");
        // And a tenant too small for the nodes there are is refused.
        let mut tiny = req("tiny", 12, "10.3.0.0/24");
        tiny.block_prefix = Some(25);
        let e = s.create_tenant(&tiny).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(s.tenant("tiny").is_err());
    }

    #[test]
    fn silent_nodes_expire_and_free_their_blocks() {
        let t0 = Instant::now();
        let mut s = ControllerState::new();
        s.create_tenant(&req("red", 10, "10.1.0.0/16")).unwrap();
        s.register_node("n1", ip(1), t0).unwrap();
        s.register_node("n2", ip(2), t0).unwrap();
        let timeout = Duration::from_secs(1);
        let t1 = t0 + Duration::from_millis(800);
        s.heartbeat("n2", Heartbeat::default(), t1).unwrap();
        let v = s.version();
        assert!(s.expire_nodes(t1, timeout).is_empty());
        assert_eq!(s.version(), v);
        let t2 = t0 + Duration::from_millis(1500);
        assert_eq!(s.expire_nodes(t2, timeout), vec!["n1".to_string()]);
        assert_eq!(s.version(), v + 1);
        assert!(s.overlay_for("n2").unwrap().tenants[0].remotes.is_empty());
        assert_eq!(
            s.heartbeat("n1", Heartbeat::default(), t2)
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
        // n1's block is free again for the next node.
        s.register_node("n3", ip(3), t2).unwrap();
        assert_eq!(s.tenant("red").unwrap().blocks["n3"], "10.1.0.0/24");
    }

    #[test]
    fn heartbeats_record_pools_without_bumping_the_version() {
        let now = Instant::now();
        let mut s = ControllerState::new();
        s.register_node("n1", ip(1), now).unwrap();
        let v = s.version();
        let mut hb = Heartbeat::default();
        hb.pools.insert(
            "red".into(),
            PoolLevel {
                ready: 7,
                claims_total: 1,
                build_errors: 0,
            },
        );
        s.heartbeat("n1", hb, now).unwrap();
        assert_eq!(s.version(), v);
        assert_eq!(s.pool_levels(), vec![("n1".into(), "red".into(), 7)]);
        assert_eq!(s.nodes(now)[0].pools["red"].ready, 7);
    }

    #[test]
    fn snapshot_round_trips() {
        let now = Instant::now();
        let mut s = ControllerState::new();
        s.create_tenant(&req("red", 10, "10.1.0.0/16")).unwrap();
        s.register_node("n1", ip(1), now).unwrap();
        s.register_node("n2", ip(2), now).unwrap();
        s.create_tenant(&req("blue", 11, "10.2.0.0/16")).unwrap();
        let snap = s.snapshot();
        let later = now + Duration::from_secs(60);
        let mut r = ControllerState::restore(snap.clone(), later).unwrap();
        assert_eq!(r.snapshot(), snap);
        assert_eq!(r.version(), s.version());
        assert_eq!(r.overlay_for("n1").unwrap(), s.overlay_for("n1").unwrap());
        // Restored blocks are claimed: a new node gets a fresh one.
        r.register_node("n3", ip(3), later).unwrap();
        assert_eq!(r.tenant("red").unwrap().blocks["n3"], "10.1.2.0/24");
        // Overlap is still enforced after a restore.
        assert!(r.create_tenant(&req("x", 12, "10.1.0.0/24")).is_err());

        let mut bad = snap.clone();
        bad.tenants[0]
            .blocks
            .insert("ghost".into(), "10.2.9.0/24".into());
        assert!(ControllerState::restore(bad, later).is_err());
    }
}

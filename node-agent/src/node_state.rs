//! What one node holds: per tenant, its overlay ([`TenantNetwork`]) and its
//! warm pool, kept in line with the controller's [`NodeOverlay`].
//!
//! Everything is held by fd: if the agent dies, the kernel removes its tenant
//! namespaces (with their bridges and VXLAN devices) and every pooled
//! endpoint, so a restarted agent starts clean and rebuilds from the
//! controller's state, with nothing left over to adopt or collect.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use ipnetwork::Ipv4Network;
use particle_net::endpoint::FactoryConfig;
use particle_net::ipam::parse_network;
use particle_net::overlay::{
    OverlayCounts, OverlayError, RemoteBlock, TenantBinder, TenantNetwork, Underlay,
};
use particle_net::{
    AddressBlock, EndpointFactory, EndpointPool, IpamError, NetNs, NetlinkError, NetlinkSocket,
    PoolConfig, PoolError, PooledEndpoint, RunPrefix,
};
use particle_wire::api::{NodeOverlay, PoolLevel, TenantOverlay};

use crate::claims::{pool_level, take_one, TenantClaim};
use crate::free_pool::FreePool;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("tenant {0:?} has no network on this node")]
    UnknownTenant(String),
    #[error("tenant {tenant}: {source}")]
    Overlay {
        tenant: String,
        #[source]
        source: OverlayError,
    },
    #[error("tenant {tenant}: bad address in the overlay state: {source}")]
    Address {
        tenant: String,
        #[source]
        source: IpamError,
    },
    #[error("tenant {tenant}: {source}")]
    Pool {
        tenant: String,
        #[source]
        source: PoolError,
    },
    #[error("tenant {tenant}: {reason}")]
    Claim { tenant: String, reason: String },
    #[error("the tenant-free pool: {0}")]
    FreePool(String),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// The overlay entries per tenant as last read from the kernel (after each
/// apply and each heartbeat), for `/metrics`; read without waiting for the
/// node's state.
#[derive(Default)]
pub struct OverlayView(std::sync::RwLock<BTreeMap<String, OverlayCounts>>);

impl OverlayView {
    pub fn set(&self, counts: BTreeMap<String, OverlayCounts>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = counts;
    }

    pub fn counts(&self) -> BTreeMap<String, OverlayCounts> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// How this node builds its overlays and pools.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub prefix: RunPrefix,
    pub underlay: Underlay,
    /// Every tenant's pool on this node.
    pub pool: PoolConfig,
    /// Endpoint-building threads per tenant (0: one per core).
    pub workers: usize,
    /// The tenant-free pool, bound to a tenant whose own pool runs dry;
    /// `None`: no such pool.
    pub free_pool: Option<PoolConfig>,
}

/// One tenant on this node.
struct TenantSlot {
    vni: u32,
    block: Ipv4Network,
    // Declared before `network` so the pool (and its endpoints) go first.
    // Shared with the claim path, which must not wait for `apply`.
    pool: Arc<EndpointPool>,
    binder: Arc<Mutex<TenantBinder>>,
    network: TenantNetwork,
}

/// The node's tenants, in line with the last overlay state applied.
pub struct NodeState {
    config: NodeConfig,
    node: NetlinkSocket,
    free: Option<Arc<FreePool>>,
    tenants: BTreeMap<String, TenantSlot>,
    version: u64,
}

impl NodeState {
    /// `node` is the node's namespace (where the underlay is).
    pub fn new(config: NodeConfig, node: &NetNs) -> Result<Self, AgentError> {
        let socket = NetlinkSocket::open_in(node)?;
        let free = match config.free_pool {
            Some(pool) => {
                let factory = EndpointFactory::new(FactoryConfig {
                    home: node.try_clone().map_err(NetlinkError::from)?,
                    bridge_index: None,
                    lock_ports: true,
                    prefix: config.prefix.clone(),
                    workers: config.workers,
                })
                .map_err(|e| AgentError::FreePool(e.to_string()))?;
                Some(Arc::new(FreePool::start(
                    factory,
                    NetlinkSocket::open_in(node)?,
                    pool,
                )))
            }
            None => None,
        };
        Ok(Self {
            config,
            node: socket,
            free,
            tenants: BTreeMap::new(),
            version: 0,
        })
    }

    /// The version of the last overlay state applied.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Tenants that have a network on this node.
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.tenants.keys().map(String::as_str)
    }

    /// Brings the node in line with `overlay`: removes tenants that are gone,
    /// rebuilds those whose VNI or block changed, builds new ones (network and
    /// pool), and sets every tenant's remote entries. A tenant that fails is
    /// reported and does not stop the others.
    pub fn apply(&mut self, overlay: &NodeOverlay) -> Vec<AgentError> {
        let mut errors = Vec::new();
        let wanted: BTreeMap<&str, &TenantOverlay> = overlay
            .tenants
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        self.tenants.retain(|name, slot| {
            wanted.get(name.as_str()).is_some_and(|t| {
                t.vni == slot.vni && parse_network(&t.local_block).ok() == Some(slot.block)
            })
        });
        for (name, tenant) in wanted {
            if let Err(e) = self.apply_tenant(name, tenant) {
                tracing::warn!("{e}");
                errors.push(e);
            }
        }
        self.version = overlay.version;
        errors
    }

    fn apply_tenant(&mut self, name: &str, tenant: &TenantOverlay) -> Result<(), AgentError> {
        let address_err = |source| AgentError::Address {
            tenant: name.to_string(),
            source,
        };
        let overlay_err = |source| AgentError::Overlay {
            tenant: name.to_string(),
            source,
        };
        let remotes = tenant
            .remotes
            .iter()
            .map(|r| {
                Ok(RemoteBlock {
                    underlay: r.underlay_ip,
                    block: parse_network(&r.block)?,
                })
            })
            .collect::<Result<Vec<_>, IpamError>>()
            .map_err(address_err)?;
        // 0 is honoured: a tenant that asks for no warm endpoints costs its
        // router only, until a claim binds or builds one.
        let target = tenant
            .warm_per_node
            .unwrap_or(self.config.pool.high_watermark);
        if !self.tenants.contains_key(name) {
            let slot = self.build_tenant(name, tenant, target)?;
            self.tenants.insert(name.to_string(), slot);
        }
        let slot = self
            .tenants
            .get_mut(name)
            .ok_or_else(|| AgentError::UnknownTenant(name.to_string()))?;
        if slot.pool.config().high_watermark != target {
            slot.pool
                .set_target(target)
                .map_err(|source| AgentError::Pool {
                    tenant: name.to_string(),
                    source,
                })?;
            tracing::info!(tenant = name, target, "warm target set");
        }
        slot.network.apply_remotes(&remotes).map_err(overlay_err)
    }

    fn build_tenant(
        &mut self,
        name: &str,
        tenant: &TenantOverlay,
        target: usize,
    ) -> Result<TenantSlot, AgentError> {
        let block = parse_network(&tenant.local_block).map_err(|source| AgentError::Address {
            tenant: name.to_string(),
            source,
        })?;
        let overlay_err = |source| AgentError::Overlay {
            tenant: name.to_string(),
            source,
        };
        let network = TenantNetwork::create(
            &mut self.node,
            &self.config.prefix,
            self.config.underlay,
            tenant.vni,
            block,
        )
        .map_err(overlay_err)?;
        let factory = network
            .factory(&self.config.prefix, self.config.workers)
            .map_err(overlay_err)?;
        let addresses = AddressBlock::new(block).map_err(|source| AgentError::Address {
            tenant: name.to_string(),
            source,
        })?;
        // Started at its target: a pool started at the default and cut down
        // after would build endpoints nobody asked for.
        let config = match tenant.warm_per_node {
            None => self.config.pool,
            Some(_) => PoolConfig {
                batch_size: self.config.pool.batch_size,
                ..PoolConfig::warm(target)
            },
        };
        let pool =
            EndpointPool::start(factory, addresses, config).map_err(|source| AgentError::Pool {
                tenant: name.to_string(),
                source,
            })?;
        let binder = network.binder().map_err(overlay_err)?;
        tracing::info!(tenant = name, vni = tenant.vni, %block, "tenant network up");
        Ok(TenantSlot {
            vni: tenant.vni,
            block,
            pool: Arc::new(pool),
            binder: Arc::new(Mutex::new(binder)),
            network,
        })
    }

    /// Claims an endpoint of `tenant`: a warm one (no netlink, microseconds),
    /// else a tenant-free one bound to it.
    pub fn claim(&self, tenant: &str) -> Result<PooledEndpoint, AgentError> {
        let claim = self
            .claims()
            .remove(tenant)
            .ok_or_else(|| AgentError::UnknownTenant(tenant.to_string()))?;
        take_one(&claim, self.free.as_deref()).map_err(|e| AgentError::Claim {
            tenant: tenant.to_string(),
            reason: e,
        })
    }

    /// The tenant-free pool, if the node has one.
    pub fn free_pool(&self) -> Option<Arc<FreePool>> {
        self.free.clone()
    }

    /// The tenant's pool, e.g. to wait for it to warm up.
    pub fn pool(&self, tenant: &str) -> Option<&EndpointPool> {
        self.tenants.get(tenant).map(|s| s.pool.as_ref())
    }

    /// Every tenant's pool and binder, for a claim path that does not go
    /// through `self` (and so never waits for `apply`).
    pub fn claims(&self) -> BTreeMap<String, TenantClaim> {
        self.tenants
            .iter()
            .map(|(name, slot)| {
                let claim = TenantClaim {
                    pool: slot.pool.clone(),
                    binder: slot.binder.clone(),
                };
                (name.clone(), claim)
            })
            .collect()
    }

    /// The overlay entries each tenant's router holds, read from the kernel.
    pub fn overlay_counts(&mut self) -> BTreeMap<String, OverlayCounts> {
        self.tenants
            .iter_mut()
            .filter_map(|(name, slot)| match slot.network.state_counts() {
                Ok(c) => Some((name.clone(), c)),
                Err(e) => {
                    tracing::warn!("reading tenant {name}'s overlay entries: {e}");
                    None
                }
            })
            .collect()
    }

    /// The tenant's overlay on this node.
    pub fn network_mut(&mut self, tenant: &str) -> Option<&mut TenantNetwork> {
        self.tenants.get_mut(tenant).map(|s| &mut s.network)
    }

    /// Pool levels per tenant, as heartbeats report them.
    pub fn pool_levels(&self) -> BTreeMap<String, PoolLevel> {
        self.tenants
            .iter()
            .map(|(name, slot)| (name.clone(), pool_level(&slot.pool.stats())))
            .collect()
    }

    /// The node's VTEP address.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.config.underlay.address
    }
}

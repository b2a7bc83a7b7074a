//! The claim path: how a node hands out endpoints. Every claim, whether a
//! burst's reserve, an operator's `claim` on the local socket or a runtime's
//! `attach`, goes through [`take`]: warm endpoints of the tenant's own pool
//! first (no netlink, microseconds); then, for a single claim, a tenant-free
//! one bound to the tenant; for a burst, the rest built right now in one
//! batch. Bursts do not bind: binds go one at a time (four netlink round
//! trips each, behind the tenant-free refiller), and a burst of 200 `true`
//! on three default nodes took 3.9–4.6 s that way against 0.47–0.73 s built
//! in one batch (as measured when this was reported).
//!
//! [`Claims`] is the claim path's view of the node: a snapshot of every
//! tenant's pool (replaced after each overlay change, so a claim never waits
//! for an overlay apply), the tenant-free pool, and which claimed endpoint's
//! namespace belongs to which tenant (how the agent tells a caller's tenant).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use particle_net::overlay::TenantBinder;
use particle_net::{EndpointPool, PoolStats, PooledEndpoint};
use particle_wire::api::PoolLevel;
use particle_wire::local::ClaimedEndpoint;

use crate::free_pool::FreePool;

/// A tenant as the claim path sees it: its warm pool and how to bind to it.
#[derive(Clone)]
pub struct TenantClaim {
    pub pool: Arc<EndpointPool>,
    pub binder: Arc<Mutex<TenantBinder>>,
}

/// Where a claimed endpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The tenant's own warm pool.
    Warm,
    /// The tenant-free pool, bound to the tenant on the way out.
    Bound,
    /// Built for this claim.
    Cold,
}

/// What a claim does when the tenant's warm pool runs dry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenDry {
    /// Build the rest now, in one batch (a burst: it must start, and a
    /// batch is faster than binding one by one).
    Build,
    /// Bind a tenant-free endpoint, or answer that there is none (single
    /// claims: never a build on the spot).
    Bind,
}

/// An endpoint claimed and where it came from, or why there is none.
pub type Claimed = Result<(PooledEndpoint, Origin), String>;

/// The one claim decision: up to `n` endpoints of `tenant`, warm first, then
/// as `when_dry` says. With [`WhenDry::Bind`] the result may be shorter than
/// `n`, ending with the reason.
pub fn take(
    tenant: &TenantClaim,
    free: Option<&FreePool>,
    n: usize,
    when_dry: WhenDry,
) -> Vec<Claimed> {
    let mut out = Vec::with_capacity(n);
    let mut dry = None;
    while out.len() < n {
        match tenant.pool.claim() {
            Ok(ep) => out.push(Ok((ep, Origin::Warm))),
            Err(e) => {
                dry = Some(e.to_string());
                break;
            }
        }
    }
    if let (Some(free), WhenDry::Bind) = (free, when_dry) {
        while out.len() < n {
            match free.claim_for(&tenant.pool, &tenant.binder) {
                Ok(ep) => out.push(Ok((ep, Origin::Bound))),
                Err(e) => {
                    dry = Some(e.to_string());
                    break;
                }
            }
        }
    }
    let missing = n - out.len();
    if missing == 0 {
        return out;
    }
    match when_dry {
        WhenDry::Build => out.extend(
            tenant
                .pool
                .claim_cold(missing)
                .into_iter()
                .map(|r| r.map(|ep| (ep, Origin::Cold)).map_err(|e| e.to_string())),
        ),
        WhenDry::Bind => out.push(Err(dry.unwrap_or_else(|| "no endpoint".into()))),
    }
    out
}

/// One endpoint from the pools, never built on the spot.
pub fn take_one(tenant: &TenantClaim, free: Option<&FreePool>) -> Result<PooledEndpoint, String> {
    match take(tenant, free, 1, WhenDry::Bind).pop() {
        Some(claimed) => claimed.map(|(ep, _)| ep),
        None => Err("no endpoint".into()),
    }
}

/// What the controller is told of a pool.
pub fn pool_level(s: &PoolStats) -> PoolLevel {
    PoolLevel {
        ready: s.ready,
        claims_total: s.claimed,
        build_errors: s.build_errors,
    }
}

/// The claim path's view of the node (see the module docs).
#[derive(Default)]
pub struct Claims {
    pools: RwLock<BTreeMap<String, TenantClaim>>,
    free: Option<Arc<FreePool>>,
    /// Endpoints lent through the local socket's `claim`, by id.
    lent: Mutex<HashMap<u64, PooledEndpoint>>,
    /// Claimed endpoints' namespaces (nsfs inode) -> (endpoint id, tenant).
    claimed_netns: Mutex<HashMap<u64, (u64, String)>>,
}

impl Claims {
    pub fn new(free: Option<Arc<FreePool>>) -> Self {
        Self {
            free,
            ..Self::default()
        }
    }

    /// The tenant-free pool, if the node has one.
    pub fn free_pool(&self) -> Option<&FreePool> {
        self.free.as_deref()
    }

    /// The tenant-free pool's level and how many it bound, if there is one.
    pub fn free_stats(&self) -> Option<(usize, u64)> {
        self.free.as_ref().map(|f| (f.level(), f.bound()))
    }

    pub fn set_pools(&self, pools: BTreeMap<String, TenantClaim>) {
        *self.pools.write().unwrap_or_else(PoisonError::into_inner) = pools;
    }

    /// The tenant's pool and binder, or why it has none here.
    pub fn tenant(&self, tenant: &str) -> Result<TenantClaim, String> {
        self.pools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tenant)
            .cloned()
            .ok_or_else(|| format!("tenant {tenant:?} has no network on this node"))
    }

    /// Every pool's counters.
    pub fn pool_stats(&self) -> BTreeMap<String, PoolStats> {
        self.pools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, claim)| (name.clone(), claim.pool.stats()))
            .collect()
    }

    /// Every pool's level, as status answers and heartbeats report it.
    pub fn pool_levels(&self) -> BTreeMap<String, PoolLevel> {
        self.pool_stats()
            .into_iter()
            .map(|(name, s)| (name, pool_level(&s)))
            .collect()
    }

    /// Waits up to `within` for `tenant`'s network to exist on this node: a
    /// tenant created a moment ago reaches the agent by the next overlay
    /// update, and a launch may come right behind it.
    pub fn wait_for_tenant(&self, tenant: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let known = self.tenant(tenant).is_ok();
            if known || Instant::now() >= deadline {
                return known;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Claims `n` endpoints of `tenant` for a burst (see [`take`]): every
    /// rank gets one, built cold if the pools run dry.
    pub fn claim_burst(&self, tenant: &str, n: usize) -> Result<Vec<Claimed>, String> {
        let claim = self.tenant(tenant)?;
        Ok(take(&claim, self.free_pool(), n, WhenDry::Build))
    }

    /// Lends one endpoint of `tenant` to a caller of the local socket; it
    /// stays claimed until [`Self::give_back`].
    pub fn lend(&self, tenant: &str) -> Result<ClaimedEndpoint, String> {
        let ep = take_one(&self.tenant(tenant)?, self.free_pool())?;
        self.remember_netns(&ep, tenant);
        let endpoint = ClaimedEndpoint {
            id: ep.id(),
            tenant: tenant.to_string(),
            address: ep.address().to_string(),
            gateway: ep.gateway().to_string(),
            netns: format!("/proc/{}/fd/{}", std::process::id(), ep.netns().as_raw_fd()),
        };
        self.lent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ep.id(), ep);
        Ok(endpoint)
    }

    /// Returns an endpoint lent with [`Self::lend`]; dropping it hands it to
    /// the pool's recycler, off this path.
    pub fn give_back(&self, id: u64) -> Result<(), String> {
        let ep = self
            .lent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        match ep {
            Some(ep) => {
                self.forget_netns(&ep);
                Ok(())
            }
            None => Err(format!("no claimed endpoint {id}")),
        }
    }

    /// Records a claimed endpoint's namespace as its tenant's, for the
    /// warm-connection service's tenant check.
    pub fn remember_netns(&self, ep: &PooledEndpoint, tenant: &str) {
        if let Ok(inode) = ep.netns().inode() {
            self.claimed_netns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(inode, (ep.id(), tenant.to_string()));
        }
    }

    /// Forgets a namespace recorded with [`Self::remember_netns`] (its endpoint is going back).
    pub fn forget_netns(&self, ep: &PooledEndpoint) {
        let id = ep.id();
        self.claimed_netns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (claimed, _)| *claimed != id);
    }

    /// Endpoints `tenant` holds claimed (by jobs or lent), for its quota.
    pub fn held_by(&self, tenant: &str) -> usize {
        self.claimed_netns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|(_, t)| t == tenant)
            .count()
    }

    /// The tenant of the claimed endpoint whose namespace has this inode.
    pub fn tenant_of_netns(&self, inode: u64) -> Option<String> {
        self.claimed_netns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&inode)
            .map(|(_, tenant)| tenant.clone())
    }
}

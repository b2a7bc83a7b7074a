//! The control plane: nodes, tenants, per-node address blocks, and the overlay state pushed to agents.
//!
//! - [`state`]: the pure model and its rules.
//! - [`store`]: where state and jobs are kept: the embedded JSON store, or etcd.
//! - [`leader`]: with etcd, which of several controllers serves.
//! - [`http`]: the axum router implementing [`api`].
//! - [`serve`]: runs the router plus the node-expiry loop.

pub mod http;
pub mod jobs;
pub mod leader;
pub mod metrics;
pub mod state;
pub mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::state::{ControllerState, StateError};
use crate::store::etcd::{EtcdClient, EtcdStore};
use crate::store::{Backend, JsonStore, StoreError, StoreSpec};

pub use crate::http::router;

/// How often silent nodes are looked for. A node that stops heartbeating is
/// removed (and disappears from the other nodes' overlays) at most
/// `heartbeat_timeout + EXPIRY_INTERVAL` (timeout + 0.5 s) after its last
/// heartbeat.
pub const EXPIRY_INTERVAL: Duration = Duration::from_millis(500);

/// How long a node with a call of ours in flight counts as alive without
/// heartbeats: an agent building hundreds of cold endpoints on a loaded
/// machine may miss a few, but one that never answers is dropped after this.
pub const MAX_CALL_GRACE: Duration = Duration::from_secs(120);

/// The longest an overlay long poll waits by default.
pub const DEFAULT_LONG_POLL_MAX: Duration = Duration::from_secs(25);

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Informational (logged): [`serve`] takes an already-bound listener so
    /// the caller can bind it in any network namespace.
    pub listen: SocketAddr,
    /// The bearer token every `/v1` request must carry.
    pub token: String,
    /// Where state and jobs are kept; `None` keeps them in memory only.
    pub store: Option<StoreSpec>,
    /// With etcd: this cluster's id (a controller refuses an etcd holding
    /// another cluster's state under its prefix).
    pub cluster_id: String,
    /// With etcd: the address other controllers name to clients when this
    /// one leads [default: `listen`].
    pub advertise: Option<SocketAddr>,
    /// A node not heard from for this long is removed.
    pub heartbeat_timeout: Duration,
    /// Upper bound of an overlay long poll (25 s in production; short in tests).
    pub long_poll_max: Duration,
    /// What users may create (tenants, warm targets).
    pub quotas: state::Quotas,
}

/// How long a controller waits at start for etcd to answer.
pub const ETCD_START_WAIT: Duration = Duration::from_secs(30);

/// Whether this controller serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Leader,
    /// Another one leads (its address, if known): requests get a 503 naming it.
    Follower {
        leader: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("restoring state: {0}")]
    Restore(#[from] StateError),
}

/// Why a state change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Rejected(#[from] StateError),
    /// The change was rolled back because it could not be stored.
    #[error("state not persisted: {0}")]
    Persist(#[from] StoreError),
}

/// A cheap, cloneable handle to one controller's state.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

struct Inner {
    // A std mutex: critical sections are short and never await. The store
    // is written while it is held so files are written in version order.
    state: Mutex<ControllerState>,
    store: Option<Arc<dyn Backend>>,
    /// The same store when it is etcd (the leader loop fences it).
    etcd: Option<Arc<EtcdStore>>,
    role: watch::Sender<Role>,
    /// What clients are told to reach this controller at.
    advertise: SocketAddr,
    quotas: state::Quotas,
    version_tx: watch::Sender<u64>,
    token: String,
    heartbeat_timeout: Duration,
    long_poll_max: Duration,
    metrics: Metrics,
    jobs: jobs::Jobs,
    /// Node → when each call of ours to its agent that is still in flight began.
    calls: Mutex<BTreeMap<String, Vec<Instant>>>,
}

/// A call to some agents in flight; while it lasts (up to [`MAX_CALL_GRACE`])
/// their nodes are not expired for missing heartbeats.
pub struct InFlight {
    controller: Controller,
    nodes: Vec<String>,
    began: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut calls = self.controller.calls();
        for node in &self.nodes {
            if let Some(v) = calls.get_mut(node) {
                if let Some(i) = v.iter().position(|b| *b == self.began) {
                    v.swap_remove(i);
                }
                if v.is_empty() {
                    calls.remove(node);
                }
            }
        }
    }
}

impl Controller {
    /// Builds the controller, loading the store if there is one. With etcd
    /// it starts as a follower (until [`leader::run`] wins) and waits up to
    /// [`ETCD_START_WAIT`] for etcd to answer; it fails at once if etcd
    /// holds another cluster's state.
    pub fn new(config: &ControllerConfig) -> Result<Self, ControllerError> {
        let (store, etcd): (Option<Arc<dyn Backend>>, _) = match &config.store {
            None => (None, None),
            Some(StoreSpec::Json(path)) => (Some(Arc::new(JsonStore::open(path)?)), None),
            Some(StoreSpec::Etcd { endpoints, prefix }) => {
                let client = Arc::new(EtcdClient::new(endpoints.clone(), prefix));
                let etcd = Arc::new(EtcdStore::connect(
                    client,
                    &config.cluster_id,
                    ETCD_START_WAIT,
                )?);
                (Some(etcd.clone() as Arc<dyn Backend>), Some(etcd))
            }
        };
        let role = match etcd {
            Some(_) => Role::Follower { leader: None },
            None => Role::Leader,
        };
        let controller = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(ControllerState::new().with_quotas(config.quotas)),
                jobs: jobs::Jobs::new(store.clone()),
                store,
                etcd,
                role: watch::channel(role).0,
                advertise: config.advertise.unwrap_or(config.listen),
                quotas: config.quotas,
                version_tx: watch::channel(0).0,
                token: config.token.clone(),
                heartbeat_timeout: config.heartbeat_timeout,
                long_poll_max: config.long_poll_max,
                metrics: Metrics::new(),
                calls: Mutex::new(BTreeMap::new()),
            }),
        };
        if let Some(StoreSpec::Json(path)) = &config.store {
            let mut legacy = path.as_os_str().to_owned();
            legacy.push(".jobs");
            controller
                .inner
                .jobs
                .import_legacy(std::path::Path::new(&legacy))?;
        }
        if controller.inner.etcd.is_none() {
            controller.reload()?;
        }
        Ok(controller)
    }

    /// Replaces the model and the jobs with what the store holds.
    fn reload(&self) -> Result<(), ControllerError> {
        let snapshot = match &self.inner.store {
            Some(store) => store.load_state()?,
            None => None,
        };
        let state = match snapshot {
            Some(snapshot) => {
                let state = ControllerState::restore(snapshot, Instant::now())?;
                tracing::info!(
                    tenants = state.tenant_count(),
                    nodes = state.node_count(),
                    version = state.version(),
                    "restored state"
                );
                state
            }
            None => ControllerState::new(),
        }
        .with_quotas(self.inner.quotas);
        self.inner.jobs.reload()?;
        let version = state.version();
        *self.lock() = state;
        self.inner.version_tx.send_replace(version);
        Ok(())
    }

    /// Takes over (after winning the election as `leader_rev`): fences every
    /// write on it, loads state and jobs, then serves.
    pub fn become_leader(&self, leader_rev: i64) -> Result<(), ControllerError> {
        if let Some(etcd) = &self.inner.etcd {
            etcd.set_fence(Some(leader_rev));
        }
        self.reload()?;
        self.inner.role.send_replace(Role::Leader);
        tracing::info!(advertise = %self.inner.advertise, "leading");
        Ok(())
    }

    /// Stops serving: `leader` leads (if known).
    pub fn follow(&self, leader: Option<String>) {
        if let Some(etcd) = &self.inner.etcd {
            etcd.set_fence(None);
        }
        let role = Role::Follower { leader };
        if *self.inner.role.borrow() != role {
            tracing::info!(?role, "following");
            self.inner.role.send_replace(role);
        }
    }

    pub fn role(&self) -> Role {
        self.inner.role.borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        *self.inner.role.borrow() == Role::Leader
    }

    /// The address clients are told to use for this controller.
    pub fn advertise(&self) -> SocketAddr {
        self.inner.advertise
    }

    pub fn etcd(&self) -> Option<&Arc<EtcdStore>> {
        self.inner.etcd.as_ref()
    }

    /// Locks the model. A panic while holding the lock cannot leave it half
    /// changed (changes are applied to a copy first), so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, ControllerState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies a change: on a version bump it is persisted and announced to
    /// long polls; if it is rejected or cannot be stored, nothing changes.
    pub fn update<T>(
        &self,
        op: impl FnOnce(&mut ControllerState) -> Result<T, StateError>,
    ) -> Result<T, UpdateError> {
        let mut guard = self.lock();
        // Work on a copy so both a rejection and a failed write leave no trace.
        let mut next = guard.clone();
        let out = op(&mut next)?;
        if next.version() != guard.version() {
            if let Some(store) = &self.inner.store {
                store.save_state(&next.snapshot())?;
            }
            let version = next.version();
            *guard = next;
            self.inner.version_tx.send_replace(version);
        } else {
            // No version change, but e.g. last_seen may have moved.
            *guard = next;
        }
        Ok(out)
    }

    fn calls(&self) -> MutexGuard<'_, BTreeMap<String, Vec<Instant>>> {
        self.inner
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a call to `nodes`' agents until the returned guard drops.
    pub fn in_flight(&self, nodes: impl IntoIterator<Item = String>) -> InFlight {
        let began = Instant::now();
        let nodes: Vec<String> = nodes.into_iter().collect();
        let mut calls = self.calls();
        for node in &nodes {
            calls.entry(node.clone()).or_default().push(began);
        }
        InFlight {
            controller: self.clone(),
            nodes,
            began,
        }
    }

    /// Removes nodes silent for longer than the heartbeat timeout.
    pub fn expire_nodes(&self) -> Result<Vec<String>, UpdateError> {
        let now = Instant::now();
        let timeout = self.inner.heartbeat_timeout;
        let busy: Vec<String> = self
            .calls()
            .iter()
            .filter(|(_, began)| {
                began
                    .iter()
                    .any(|b| now.saturating_duration_since(*b) < MAX_CALL_GRACE)
            })
            .map(|(node, _)| node.clone())
            .collect();
        if !busy.is_empty() {
            let mut state = self.lock();
            for node in &busy {
                state.touch(node, now);
            }
        }
        // Cheap check first: cloning the model on every tick is wasteful.
        if self.lock().expired(now, timeout).is_empty() {
            return Ok(Vec::new());
        }
        self.update(|s| Ok(s.expire_nodes(now, timeout)))
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.version_tx.subscribe()
    }

    pub fn token(&self) -> &str {
        &self.inner.token
    }

    pub fn long_poll_max(&self) -> Duration {
        self.inner.long_poll_max
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn jobs(&self) -> &jobs::Jobs {
        &self.inner.jobs
    }

    async fn expiry_loop(self) {
        let mut tick = tokio::time::interval(EXPIRY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.is_leader() {
                continue; // the leader's business
            }
            match self.expire_nodes() {
                Ok(removed) if !removed.is_empty() => {
                    tracing::info!(?removed, "expired silent nodes");
                    self.jobs().nodes_lost(&removed);
                }
                Ok(_) => {}
                // Rolled back; retried on the next tick.
                Err(e) => tracing::error!("expiring nodes: {e}"),
            }
        }
    }
}

/// Serves the API on `listener` until the returned future is dropped or the
/// server fails. Also runs the expiry loop: every [`EXPIRY_INTERVAL`] nodes
/// silent for longer than `heartbeat_timeout` are removed, so removal happens
/// within `heartbeat_timeout + 0.5 s` of a node's last heartbeat.
pub async fn serve(
    config: ControllerConfig,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    serve_with_shutdown(config, listener, std::future::pending()).await
}

/// [`serve`], stopping gracefully when `shutdown` completes.
pub async fn serve_with_shutdown(
    config: ControllerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Err(e) = particle_net::limits::raise_open_files() {
        tracing::warn!("raising the open-file limit: {e}");
    }
    let controller = Controller::new(&config)?;
    let local = listener.local_addr()?;
    tracing::info!(listen = %config.listen, %local, store = ?config.store, "controller serving");
    // With etcd, the election runs beside the server and stops with it.
    let _election = match controller.etcd() {
        Some(etcd) => Some(leader::spawn(controller.clone(), etcd.client().clone())?),
        None => None,
    };
    let app = router(controller.clone());
    // Both in one future: dropping `serve` also stops the expiry loop, so
    // an aborted controller never writes the store again.
    let limits = particle_wire::http_server::ServeLimits::default();
    tokio::select! {
        res = particle_wire::http_server::serve(listener, app, limits, shutdown) => {
            res?;
        }
        () = controller.expiry_loop() => {}
    }
    Ok(())
}

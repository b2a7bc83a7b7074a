//! The warm endpoint pool.
//!
//! `claim()` pops a ready endpoint: a short critical section, no netlink, no
//! I/O. Two background threads do everything else:
//!
//! - the *refiller* owns the [`EndpointFactory`]; woken when the level drops
//!   below the low watermark, it builds batches until the high watermark;
//! - the *recycler* takes returned endpoints: a clean one (nothing but `lo` and
//!   `eth0`, only its own address) goes back to the pool, anything else is
//!   destroyed by closing its namespace, which lets the kernel tear the
//!   namespace and its veth pair down in one go (deleting links one by one
//!   costs ~16 ms each here).

mod ready_queue;

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ready_queue::lock;
pub use ready_queue::ReadyQueue;

use crate::endpoint::{
    forget_neighbours_in, BuildPriority, Endpoint, EndpointFactory, EndpointSpec,
};
use crate::ipam::AddressBlock;

/// How long the refiller rests before it sweeps the ARP state nobody uses
/// ([`Shared::sweep_neighbours`]); again after as long, while it rests.
/// Cheap: one dump of the bridge, and one per endpoint recycled meanwhile.
const NEIGHBOUR_SWEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// The refiller stops building at this many ready endpoints.
    pub high_watermark: usize,
    /// A claim that leaves fewer ready endpoints than this wakes the refiller.
    pub low_watermark: usize,
    /// Endpoints built per batch.
    pub batch_size: usize,
}

impl PoolConfig {
    /// A pool that keeps `target` endpoints warm and refills when a quarter is gone.
    pub fn warm(target: usize) -> Self {
        Self {
            high_watermark: target,
            low_watermark: target - target / 4,
            batch_size: 64,
        }
    }

    pub fn validate(&self) -> Result<(), PoolError> {
        // A high watermark of 0 is a pool that keeps none warm: it costs
        // nothing until used, and its claims are bound or built cold.
        let problem = if self.low_watermark > self.high_watermark {
            Some(format!(
                "low watermark {} is above high watermark {}",
                self.low_watermark, self.high_watermark
            ))
        } else if self.batch_size == 0 {
            Some("batch size must be at least 1".to_string())
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(PoolError::Config(p)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("no warm endpoint ready ({building} being built); the burst is larger than the pool")]
    Empty { building: usize },
    #[error("invalid pool configuration: {0}")]
    Config(String),
    #[error("building an endpoint: {0}")]
    Build(String),
    #[error("timed out after {waited:?} with {ready} of {wanted} endpoints ready (last error: {last_error})")]
    NotReady {
        waited: Duration,
        ready: usize,
        wanted: usize,
        last_error: String,
    },
}

/// Counters since the pool started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub ready: usize,
    /// Whether the refiller is building right now.
    pub refilling: bool,
    pub building: usize,
    pub claimed: u64,
    pub empty_claims: u64,
    pub created: u64,
    pub recycled: u64,
    pub destroyed: u64,
    pub build_errors: u64,
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    refilling: AtomicBool,
    building: AtomicUsize,
    claimed: AtomicU64,
    empty_claims: AtomicU64,
    created: AtomicU64,
    recycled: AtomicU64,
    destroyed: AtomicU64,
    build_errors: AtomicU64,
}

#[derive(Default)]
struct Wakeup {
    refill: bool,
    shutdown: bool,
}

struct Shared {
    config: Mutex<PoolConfig>,
    /// Shared with the refiller; cold builds for a burst use it directly.
    factory: Arc<EndpointFactory>,
    ready: ReadyQueue<Endpoint>,
    block: Mutex<AddressBlock>,
    wakeup: Mutex<Wakeup>,
    wakeup_signal: Condvar,
    returns: Mutex<Option<Sender<Returned>>>,
    counters: Counters,
    last_error: Mutex<Option<String>>,
    /// Endpoints recycled since the last neighbour sweep (their ids).
    unswept: Mutex<std::collections::HashSet<u64>>,
}

struct Returned {
    endpoint: Endpoint,
    reuse: bool,
}

/// A warm pool of endpoints built by one factory from one address block.
pub struct EndpointPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("config", &*lock(&self.shared.config))
            .field("stats", &self.stats())
            .finish()
    }
}

impl EndpointPool {
    /// Starts the pool and its first refill.
    pub fn start(
        factory: EndpointFactory,
        block: AddressBlock,
        config: PoolConfig,
    ) -> Result<Self, PoolError> {
        config.validate()?;
        let (returns_tx, returns_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            factory: Arc::new(factory),
            ready: ReadyQueue::new(config.low_watermark, config.high_watermark),
            block: Mutex::new(block),
            wakeup: Mutex::new(Wakeup {
                refill: true,
                shutdown: false,
            }),
            wakeup_signal: Condvar::new(),
            returns: Mutex::new(Some(returns_tx)),
            counters: Counters::default(),
            last_error: Mutex::new(None),
            unswept: Mutex::new(Default::default()),
        });
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(|e| PoolError::Config(format!("cannot start {name}: {e}")))
        };
        let refiller = {
            let shared = shared.clone();
            spawn("pool-refiller", Box::new(move || refiller(&shared)))?
        };
        let recycler = {
            let shared = shared.clone();
            spawn(
                "pool-recycler",
                Box::new(move || recycler(&shared, returns_rx)),
            )?
        };
        Ok(Self {
            shared,
            threads: vec![refiller, recycler],
        })
    }

    /// Takes a ready endpoint. Never waits for the kernel; an empty pool is an
    /// error the caller handles (e.g. by building the rest cold).
    pub fn claim(&self) -> Result<PooledEndpoint, PoolError> {
        let (endpoint, below_low) = self.shared.ready.take();
        if below_low {
            self.shared.request_refill();
        }
        let c = &self.shared.counters;
        match endpoint {
            Some(endpoint) => {
                c.claimed.fetch_add(1, Ordering::Relaxed);
                Ok(PooledEndpoint {
                    endpoint: Some(endpoint),
                    pool: self.shared.clone(),
                })
            }
            None => {
                c.empty_claims.fetch_add(1, Ordering::Relaxed);
                Err(PoolError::Empty {
                    building: c.building.load(Ordering::Relaxed),
                })
            }
        }
    }

    /// An address of this pool's block, for an endpoint built elsewhere (a
    /// tenant-free endpoint about to be bound); `None` if the block is full.
    /// Hand it back with [`Self::release_spec`] if the endpoint is not adopted.
    pub fn allocate_spec(&self) -> Option<EndpointSpec> {
        EndpointSpec::allocate(&mut lock(&self.shared.block), 1).pop()
    }

    pub fn release_spec(&self, spec: EndpointSpec) {
        if let Err(e) = lock(&self.shared.block).release(spec.address.ip()) {
            tracing::warn!("releasing an unused address: {e}");
        }
    }

    /// Takes an endpoint bound to an address from [`Self::allocate_spec`] into
    /// the pool's care as a claimed endpoint: releasing it goes through the
    /// recycler like any other, so it may stay as a warm endpoint of this pool.
    pub fn adopt(&self, endpoint: Endpoint) -> PooledEndpoint {
        self.shared.counters.claimed.fetch_add(1, Ordering::Relaxed);
        PooledEndpoint {
            endpoint: Some(endpoint),
            pool: self.shared.clone(),
        }
    }

    /// Ready endpoints right now.
    pub fn level(&self) -> usize {
        self.shared.ready.len()
    }

    pub fn config(&self) -> PoolConfig {
        *lock(&self.shared.config)
    }

    /// Changes how many endpoints are kept warm (a tenant's standing warm
    /// target, or a prewarm before a burst). Raising it starts a refill;
    /// lowering it destroys the surplus off the caller's path.
    pub fn set_target(&self, target: usize) -> Result<(), PoolError> {
        let config = PoolConfig {
            batch_size: self.config().batch_size,
            ..PoolConfig::warm(target)
        };
        config.validate()?;
        *lock(&self.shared.config) = config;
        self.shared
            .ready
            .set_watermarks(config.low_watermark, config.high_watermark);
        for surplus in self.shared.ready.take_surplus() {
            self.shared.give_back(surplus, false);
        }
        self.shared.request_refill();
        Ok(())
    }

    /// Builds `n` endpoints right now, in one batch, and hands them out
    /// claimed: the cold path for a burst larger than the warm pool. Each
    /// result stands alone; a failed endpoint leaves nothing behind.
    pub fn claim_cold(&self, n: usize) -> Vec<Result<PooledEndpoint, PoolError>> {
        let specs = EndpointSpec::allocate(&mut lock(&self.shared.block), n);
        let mut out = Vec::with_capacity(n);
        for (spec, result) in specs.iter().zip(self.shared.factory.create_batch(&specs)) {
            match result {
                Ok(ep) => {
                    self.shared.counters.created.fetch_add(1, Ordering::Relaxed);
                    out.push(Ok(self.adopt(ep)));
                }
                Err(e) => {
                    let _ = lock(&self.shared.block).release(spec.address.ip());
                    self.shared.record_error(e.to_string());
                    out.push(Err(PoolError::Build(e.to_string())));
                }
            }
        }
        let block = lock(&self.shared.block).network();
        out.extend((specs.len()..n).map(|_| {
            Err(PoolError::Build(format!(
                "address block {block} is exhausted"
            )))
        }));
        out
    }

    /// Blocks until at least `wanted` endpoints are ready (warming before a
    /// burst), or fails after `timeout` saying how far it got.
    pub fn wait_ready(&self, wanted: usize, timeout: Duration) -> Result<(), PoolError> {
        let start = Instant::now();
        self.shared
            .ready
            .wait_len(wanted, timeout)
            .map_err(|ready| PoolError::NotReady {
                waited: start.elapsed(),
                ready,
                wanted,
                last_error: lock(&self.shared.last_error)
                    .clone()
                    .unwrap_or_else(|| "none".into()),
            })
    }

    pub fn stats(&self) -> PoolStats {
        let c = &self.shared.counters;
        PoolStats {
            ready: self.level(),
            refilling: c.refilling.load(Ordering::SeqCst),
            building: c.building.load(Ordering::Relaxed),
            claimed: c.claimed.load(Ordering::Relaxed),
            empty_claims: c.empty_claims.load(Ordering::Relaxed),
            created: c.created.load(Ordering::Relaxed),
            recycled: c.recycled.load(Ordering::Relaxed),
            destroyed: c.destroyed.load(Ordering::Relaxed),
            build_errors: c.build_errors.load(Ordering::Relaxed),
            last_error: lock(&self.shared.last_error).clone(),
        }
    }

    /// Addresses of the block in use (pooled, claimed or being built).
    pub fn addresses_in_use(&self) -> usize {
        lock(&self.shared.block).in_use()
    }
}

impl Drop for EndpointPool {
    fn drop(&mut self) {
        {
            let mut w = lock(&self.shared.wakeup);
            w.shutdown = true;
        }
        self.shared.wakeup_signal.notify_all();
        // Closing the channel ends the recycler once it has drained what was returned.
        lock(&self.shared.returns).take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ep in self.shared.ready.drain() {
            self.shared.destroy(ep);
        }
    }
}

impl Shared {
    fn request_refill(&self) {
        let mut w = lock(&self.wakeup);
        if !w.refill {
            w.refill = true;
            self.wakeup_signal.notify_one();
        }
    }

    fn destroy(&self, endpoint: Endpoint) {
        let address = endpoint.address().ip();
        drop(endpoint);
        self.forget_neighbour(address);
        if let Err(e) = lock(&self.block).release(address) {
            tracing::warn!("releasing a destroyed endpoint's address: {e}");
        }
        self.counters.destroyed.fetch_add(1, Ordering::Relaxed);
    }

    /// The address goes back to the block: nothing may keep pointing at
    /// the MAC it had (the router's permanent entry included).
    fn forget_neighbour(&self, address: std::net::Ipv4Addr) {
        if let Err(e) = self.factory.forget_neighbour(address) {
            tracing::debug!("forgetting the ARP entry of {address}: {e}");
        }
    }

    /// Forgets the ARP state nobody uses: the bridge's entries for
    /// addresses no claimed endpoint holds (released, destroyed or pooled
    /// ones), and what endpoints recycled since the last sweep learnt again
    /// after the recycler flushed them. Both come from packets still in
    /// flight when an endpoint was released; the kernel would keep them
    /// while its table is small. One dump on the bridge each time, one per
    /// recycled endpoint once. Racing a claim is harmless: the endpoint
    /// ARPs once more.
    fn sweep_neighbours(&self) {
        let unswept = std::mem::take(&mut *lock(&self.unswept));
        let pooled = self.ready.map_each(|e| {
            let netns = unswept.contains(&e.id()).then(|| e.netns().try_clone());
            (e.address().ip(), netns)
        });
        let idle: std::collections::HashSet<_> = pooled.iter().map(|(ip, _)| *ip).collect();
        let in_use = |ip| !idle.contains(&ip) && lock(&self.block).is_allocated(ip);
        match self.factory.forget_unused_neighbours(in_use) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(n, "forgot the bridge's ARP entries of unused addresses"),
            Err(e) => tracing::debug!("sweeping the bridge's ARP entries: {e}"),
        }
        for (ip, netns) in pooled {
            let Some(netns) = netns else { continue };
            let swept = netns
                .map_err(Into::into)
                .and_then(|ns| forget_neighbours_in(&ns));
            if let Err(e) = swept {
                tracing::debug!("sweeping the ARP entries of pooled endpoint {ip}: {e}");
            }
        }
    }

    fn record_error(&self, error: String) {
        self.counters.build_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("endpoint build failed: {error}");
        *lock(&self.last_error) = Some(error);
    }

    fn give_back(&self, endpoint: Endpoint, reuse: bool) {
        let sender = lock(&self.returns).clone();
        let returned = Returned { endpoint, reuse };
        // After the pool shut down there is no recycler: destroy right here.
        let unsent = match sender {
            Some(s) => s.send(returned).err().map(|mpsc::SendError(r)| r),
            None => Some(returned),
        };
        if let Some(r) = unsent {
            self.destroy(r.endpoint);
        }
    }
}

fn refiller(shared: &Shared) {
    background_thread();
    let factory = &shared.factory;
    loop {
        let rested = {
            let mut w = lock(&shared.wakeup);
            loop {
                if w.shutdown {
                    return;
                }
                if w.refill {
                    w.refill = false;
                    break false;
                }
                let (guard, waited) = shared
                    .wakeup_signal
                    .wait_timeout(w, NEIGHBOUR_SWEEP_EVERY)
                    .unwrap_or_else(PoisonError::into_inner);
                w = guard;
                if waited.timed_out() && !w.refill && !w.shutdown {
                    break true;
                }
            }
        };
        if rested {
            shared.sweep_neighbours();
            continue;
        }
        shared.counters.refilling.store(true, Ordering::SeqCst);
        loop {
            if lock(&shared.wakeup).shutdown {
                break;
            }
            let batch = lock(&shared.config).batch_size;
            let room = shared.ready.reserve(batch);
            if room == 0 {
                break;
            }
            let specs = EndpointSpec::allocate(&mut lock(&shared.block), room);
            if specs.is_empty() {
                shared.ready.fill(Vec::new(), room);
                let block = lock(&shared.block).network();
                shared.record_error(format!("address block {block} is exhausted"));
                break;
            }
            shared
                .counters
                .building
                .store(specs.len(), Ordering::Relaxed);
            let mut built = Vec::with_capacity(specs.len());
            let results = factory.create_batch_at(&specs, BuildPriority::Background);
            for (spec, result) in specs.iter().zip(results) {
                match result {
                    Ok(ep) => built.push(ep),
                    Err(e) => {
                        let _ = lock(&shared.block).release(spec.address.ip());
                        shared.record_error(e.to_string());
                    }
                }
            }
            shared.counters.building.store(0, Ordering::Relaxed);
            let made = built.len();
            shared
                .counters
                .created
                .fetch_add(made as u64, Ordering::Relaxed);
            // `built` never exceeds `room`, so nothing comes back.
            for surplus in shared.ready.fill(built, room) {
                shared.destroy(surplus);
            }
            if made == 0 {
                // Every build failed: wait for the next claim rather than spin.
                break;
            }
        }
        shared.counters.refilling.store(false, Ordering::SeqCst);
    }
}

/// Pool maintenance yields to whatever else runs on the node (see
/// [`crate::limits::BACKGROUND_NICE`]).
fn background_thread() {
    if let Err(e) = crate::limits::set_current_thread_nice(crate::limits::BACKGROUND_NICE) {
        tracing::debug!("pool thread priority: {e}");
    }
}

fn recycler(shared: &Shared, returns: Receiver<Returned>) {
    background_thread();
    for Returned { endpoint, reuse } in returns {
        let room = if reuse { shared.ready.reserve(1) } else { 0 };
        let reusable = room == 1
            && endpoint.is_clean().unwrap_or(false)
            && endpoint.forget_neighbours().is_ok();
        if reusable {
            // The router's ARP entry for it stays: it is permanent and names
            // this endpoint's own MAC (crate::guard), which comes back with it.
            lock(&shared.unswept).insert(endpoint.id());
            shared.ready.fill(vec![endpoint], 1);
            // Counted after the fill, so that whoever sees the count sees the endpoint.
            shared.counters.recycled.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.ready.fill(Vec::new(), room);
            shared.destroy(endpoint);
        }
    }
}

/// A claimed endpoint. Dropping it returns it to the pool's recycler, which
/// reuses it if it is clean and destroys it otherwise, off the caller's path.
#[derive(Debug)]
pub struct PooledEndpoint {
    endpoint: Option<Endpoint>,
    pool: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolShared")
    }
}

impl PooledEndpoint {
    /// Returns the endpoint for destruction instead of reuse (e.g. after a
    /// function crashed in it).
    pub fn discard(mut self) {
        if let Some(ep) = self.endpoint.take() {
            self.pool.give_back(ep, false);
        }
    }
}

impl Deref for PooledEndpoint {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        self.endpoint
            .as_ref()
            .expect("endpoint is present until drop or discard")
    }
}

impl Drop for PooledEndpoint {
    fn drop(&mut self) {
        if let Some(ep) = self.endpoint.take() {
            self.pool.give_back(ep, true);
        }
    }
}

//! The tenant-free pool: endpoints built with no tenant and no address, bound
//! to whichever tenant runs dry first. A burst of a tenant larger than its
//! warm pool then costs a bind (four netlink round trips) per extra endpoint
//! instead of a build, and a node needs no warm pool for tenants it rarely sees.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use particle_net::overlay::TenantBinder;
use particle_net::pool::ReadyQueue;
use particle_net::{
    EndpointFactory, EndpointPool, NetlinkSocket, PoolConfig, PooledEndpoint, UnboundEndpoint,
};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("the tenant-free pool is empty too")]
    Empty,
    #[error("the tenant's address block is full")]
    NoAddress,
    #[error("binding a tenant-free endpoint: {0}")]
    Bind(String),
}

struct Shared {
    ready: ReadyQueue<UnboundEndpoint>,
    stop: AtomicBool,
    bound: AtomicU64,
    build_errors: AtomicU64,
}

pub struct FreePool {
    shared: Arc<Shared>,
    /// A socket in the node's namespace, where unbound host ends wait.
    home: Mutex<NetlinkSocket>,
    wake: Sender<()>,
    refiller: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FreePool {
    /// `factory` builds in the node's namespace with no bridge; `home` is a
    /// socket there.
    pub fn start(factory: EndpointFactory, home: NetlinkSocket, config: PoolConfig) -> Self {
        let shared = Arc::new(Shared {
            ready: ReadyQueue::new(config.low_watermark, config.high_watermark),
            stop: AtomicBool::new(false),
            bound: AtomicU64::new(0),
            build_errors: AtomicU64::new(0),
        });
        let (wake, woken) = mpsc::channel::<()>();
        let refiller = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("free-pool-refiller".into())
                .spawn(move || loop {
                    loop {
                        let room = shared.ready.reserve(config.batch_size);
                        if room == 0 || shared.stop.load(Ordering::Relaxed) {
                            shared.ready.fill(Vec::new(), room);
                            break;
                        }
                        let mut built = Vec::with_capacity(room);
                        for r in factory.create_unbound(room) {
                            match r {
                                Ok(ep) => built.push(ep),
                                Err(e) => {
                                    shared.build_errors.fetch_add(1, Ordering::Relaxed);
                                    tracing::warn!("tenant-free endpoint: {e}");
                                }
                            }
                        }
                        let made = built.len();
                        shared.ready.fill(built, room);
                        if made == 0 {
                            break;
                        }
                    }
                    match woken.recv_timeout(Duration::from_secs(5)) {
                        Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    if shared.stop.load(Ordering::Relaxed) {
                        return;
                    }
                })
                .map_err(|e| tracing::error!("cannot start the tenant-free refiller: {e}"))
                .ok()
        };
        Self {
            shared,
            home: Mutex::new(home),
            wake,
            refiller,
        }
    }

    /// Ready tenant-free endpoints.
    pub fn level(&self) -> usize {
        self.shared.ready.len()
    }

    /// Endpoints bound to a tenant so far.
    pub fn bound(&self) -> u64 {
        self.shared.bound.load(Ordering::Relaxed)
    }

    /// Waits until `wanted` endpoints are ready.
    pub fn wait_ready(&self, wanted: usize, timeout: Duration) -> Result<(), usize> {
        self.shared.ready.wait_len(wanted, timeout)
    }

    /// Takes a tenant-free endpoint and binds it to the tenant of `pool`
    /// with `binder`; the result is a claimed endpoint of that pool.
    pub fn claim_for(
        &self,
        pool: &EndpointPool,
        binder: &Mutex<TenantBinder>,
    ) -> Result<PooledEndpoint, BindError> {
        let (endpoint, below_low) = self.shared.ready.take();
        if below_low {
            let _ = self.wake.send(());
        }
        let endpoint = endpoint.ok_or(BindError::Empty)?;
        let spec = pool.allocate_spec().ok_or(BindError::NoAddress)?;
        let bound = {
            let mut home = lock(&self.home);
            lock(binder).bind(&mut home, endpoint, spec)
        };
        match bound {
            Ok(ep) => {
                self.shared.bound.fetch_add(1, Ordering::Relaxed);
                Ok(pool.adopt(ep))
            }
            Err(e) => {
                pool.release_spec(spec);
                Err(BindError::Bind(e.to_string()))
            }
        }
    }
}

impl Drop for FreePool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.send(());
        if let Some(t) = self.refiller.take() {
            let _ = t.join();
        }
    }
}

//! The agent's warm connections: per destination, established TCP connections
//! kept ready and handed to functions as file descriptors over a Unix socket
//! (protocol in `particle_wire::warm`).
//!
//! Destinations are external services named in the config (each with the
//! tenants allowed to use it) and other nodes' agents (for function-to-function
//! channels, [`peers`]). A maintainer thread in the node's
//! namespace keeps `pool_size` idle connections per destination, closes dead
//! ones and those idle over `idle_timeout` beyond the target, and probes
//! agent-to-agent connections so their congestion window stays open. A
//! connection given back is pooled again only if it is clean
//! ([`health::check_clean`]) and is one this agent lent.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use particle_net::NetNs;
use particle_wire::caps::ConnectionCaps;
use particle_wire::warm::WarmStats;

mod config;
mod handoff;
pub mod health;
mod maintainer;
pub mod peers;
pub mod pinning;

use health::check_clean;
use pinning::Pinning;

/// Warm-socket connections served at once, in all and per caller namespace.
const MAX_CLIENTS: usize = 1024;
const MAX_CLIENTS_PER_CALLER: usize = 16;
/// A warm-socket connection idle this long is closed.
const CLIENT_IDLE: Duration = Duration::from_secs(60);

pub use config::{TenantOf, WarmConfig, WarmDestination, WarmPoolError, ANY_TENANT};

/// Idle, established, ready to hand out.
pub(crate) struct Idle {
    pub(crate) stream: TcpStream,
    uses: u64,
    since: Instant,
    probed: Instant,
}

impl Idle {
    pub(crate) fn fresh(stream: TcpStream) -> Self {
        let now = Instant::now();
        Self {
            stream,
            uses: 0,
            since: now,
            probed: now,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DestKind {
    External {
        tenants: Vec<String>,
    },
    /// Another agent: for channels only.
    Peer,
}

pub(crate) struct DestPool {
    pub(crate) kind: DestKind,
    /// LIFO: the most recently used (warmest) connection goes out first.
    pub(crate) idle: Vec<Idle>,
}

struct Lent {
    dest: SocketAddr,
    uses: u64,
    since: Instant,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) connects: AtomicU64,
    pub(crate) connect_errors: AtomicU64,
    pub(crate) handed_out: AtomicU64,
    pub(crate) reused: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) returned_clean: AtomicU64,
    pub(crate) returned_dirty: AtomicU64,
    pub(crate) dead: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) probes: AtomicU64,
    pub(crate) channels: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct Shared {
    pub(crate) config: WarmConfig,
    tenant_of: TenantOf,
    pub(crate) pools: Mutex<HashMap<SocketAddr, DestPool>>,
    /// Signalled when a connection joins a pool.
    pub(crate) ready: Condvar,
    lent: Mutex<HashMap<u64, Lent>>,
    pub(crate) channels: peers::Parked,
    /// Asks the maintainer to look now (a connection went out).
    wake: (Mutex<bool>, Condvar),
    pub(crate) stop: AtomicBool,
    pub(crate) counters: Counters,
    /// Streams to shut down on stop, so blocked threads return.
    pub(crate) open: Mutex<HashMap<u64, OwnedFd>>,
    next_open: AtomicU64,
    /// The firewall rules keeping lent sockets on their destinations.
    pinning: Pinning,
}

impl Shared {
    pub(crate) fn track(&self, fd: impl AsFd) -> Option<u64> {
        let dup = fd.as_fd().try_clone_to_owned().ok()?;
        let id = self.next_open.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(id, dup);
        Some(id)
    }

    pub(crate) fn untrack(&self, id: Option<u64>) {
        if let Some(id) = id {
            lock(&self.open).remove(&id);
        }
    }

    fn wake_maintainer(&self) {
        *lock(&self.wake.0) = true;
        self.wake.1.notify_one();
    }

    pub fn stats(&self) -> WarmStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WarmStats {
            idle: lock(&self.pools)
                .values()
                .map(|p| p.idle.len() as u64)
                .sum(),
            lent: lock(&self.lent).len() as u64,
            connects: get(&c.connects),
            connect_errors: get(&c.connect_errors),
            handed_out: get(&c.handed_out),
            reused: get(&c.reused),
            refused: get(&c.refused),
            returned_clean: get(&c.returned_clean),
            returned_dirty: get(&c.returned_dirty),
            dead: get(&c.dead),
            expired: get(&c.expired),
            probes: get(&c.probes),
            channels: get(&c.channels),
        }
    }

    /// Takes a clean idle connection to `dest` (closing dead ones on the way).
    pub(crate) fn take_idle(pool: &mut DestPool, counters: &Counters) -> Option<Idle> {
        while let Some(c) = pool.idle.pop() {
            match check_clean(c.stream.as_fd()) {
                Ok(()) => return Some(c),
                Err(e) => {
                    tracing::debug!("closing a dead warm connection: {e}");
                    bump(&counters.dead);
                }
            }
        }
        None
    }
}

/// The running warm-connection service; stopping it (drop) closes every
/// connection it holds and removes its socket.
pub struct WarmService {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    unix: UnixListener,
    peer_listener: Option<std::net::TcpListener>,
}

impl WarmService {
    /// Starts serving: the Unix socket, the maintainer (in `node`), and the
    /// agent-to-agent listener if `config.listen` is set.
    pub fn start(
        config: WarmConfig,
        node: &NetNs,
        tenant_of: TenantOf,
    ) -> Result<Self, WarmPoolError> {
        if config.pool_size == 0 || config.max_idle < config.pool_size {
            return Err(WarmPoolError::Config(format!(
                "pool_size {} must be at least 1 and at most max_idle {}",
                config.pool_size, config.max_idle
            )));
        }
        if config.slow_start_after_idle_off {
            node.run_in(|| std::fs::write("/proc/sys/net/ipv4/tcp_slow_start_after_idle", "0"))?
                .map_err(WarmPoolError::Sysctl)?;
        }
        let peer_listener = match config.listen {
            Some(addr) => Some(
                node.run_in(|| std::net::TcpListener::bind(addr))?
                    .map_err(|source| WarmPoolError::Listen { addr, source })?,
            ),
            None => None,
        };
        // Before any socket exists: none may be lent unpinned.
        let allowed: Vec<SocketAddr> = (config.destinations.iter().map(|d| d.addr))
            .chain(config.peers.iter().copied())
            .collect();
        let pinning = Pinning::install(node, pinning::chain_for(&config.socket_path), &allowed)
            .map_err(WarmPoolError::Pinning)?;
        let unix = bind_unix(&config.socket_path).map_err(|source| WarmPoolError::Socket {
            path: config.socket_path.clone(),
            source,
        })?;
        let mut pools = HashMap::new();
        for d in &config.destinations {
            pools.insert(
                d.addr,
                DestPool {
                    kind: DestKind::External {
                        tenants: d.tenants.clone(),
                    },
                    idle: Vec::new(),
                },
            );
        }
        for p in &config.peers {
            pools.entry(*p).or_insert_with(|| DestPool {
                kind: DestKind::Peer,
                idle: Vec::new(),
            });
        }
        let shared = Arc::new(Shared {
            config,
            tenant_of,
            pools: Mutex::new(pools),
            ready: Condvar::new(),
            lent: Mutex::new(HashMap::new()),
            channels: peers::Parked::default(),
            wake: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            open: Mutex::new(HashMap::new()),
            next_open: AtomicU64::new(0),
            pinning,
        });
        let mut service = Self {
            shared: shared.clone(),
            threads: Vec::new(),
            unix,
            peer_listener,
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(WarmPoolError::Thread)
        };
        // Connections the maintainer opens belong to the node's namespace.
        let node = node.try_clone()?;
        let s = shared.clone();
        service.threads.push(spawn(
            "warm-maintain",
            Box::new(move || {
                if let Err(e) = node.run_in(|| s.maintainer()) {
                    tracing::error!("warm maintainer: {e}");
                }
            }),
        )?);
        let (s, unix) = (
            shared.clone(),
            service.unix.try_clone().map_err(WarmPoolError::Thread)?,
        );
        // Functions reach this socket: each connection costs a thread, so
        // they are capped per caller namespace and in all, and idle ones close.
        let caps = ConnectionCaps::new(MAX_CLIENTS, MAX_CLIENTS_PER_CALLER);
        service.threads.push(spawn(
            "warm-accept",
            Box::new(move || {
                for stream in unix.incoming() {
                    if s.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else {
                        // Out of descriptors, say: let some close.
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    // Unidentified callers get no tenant, so nothing but refusals.
                    let caller_ns = crate::peer::identify(&stream).ok().map(|p| p.netns);
                    let Some(permit) = caps.enter(caller_ns) else {
                        continue; // over a cap: closed at once
                    };
                    if stream.set_read_timeout(Some(CLIENT_IDLE)).is_err() {
                        continue;
                    }
                    let s = s.clone();
                    let spawned = std::thread::Builder::new()
                        .name("warm-client".into())
                        .spawn(move || {
                            let _permit = permit;
                            s.serve_client(stream, caller_ns)
                        });
                    if let Err(e) = spawned {
                        tracing::warn!("warm client thread: {e}");
                    }
                }
            }),
        )?);
        if let Some(listener) = &service.peer_listener {
            let (s, listener) = (
                shared.clone(),
                listener.try_clone().map_err(WarmPoolError::Thread)?,
            );
            service.threads.push(spawn(
                "warm-peers",
                Box::new(move || peers::accept_loop(&s, listener)),
            )?);
        }
        Ok(service)
    }

    pub fn stats(&self) -> WarmStats {
        self.shared.stats()
    }

    pub fn socket_path(&self) -> &std::path::Path {
        &self.shared.config.socket_path
    }

    /// This agent's address towards other agents, if it serves channels.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.peer_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Keeps connections to another agent from now on.
    pub fn add_peer(&self, peer: SocketAddr) {
        self.shared.add_peer(peer);
    }

    /// Idle connections per destination, now.
    pub fn idle_by_destination(&self) -> HashMap<SocketAddr, usize> {
        lock(&self.shared.pools)
            .iter()
            .map(|(a, p)| (*a, p.idle.len()))
            .collect()
    }

    /// The local ports of the idle connections to `dest` (a port names a connection).
    pub fn idle_ports(&self, dest: SocketAddr) -> Vec<u16> {
        lock(&self.shared.pools)
            .get(&dest)
            .map(|p| {
                p.idle
                    .iter()
                    .filter_map(|c| c.stream.local_addr().ok().map(|a| a.port()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until every destination has `pool_size` idle connections.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let target = self.shared.config.pool_size;
        let mut pools = lock(&self.shared.pools);
        loop {
            if pools.values().all(|p| p.idle.len() >= target) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            pools = self
                .shared
                .ready
                .wait_timeout(pools, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for WarmService {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::Relaxed);
        s.wake_maintainer();
        s.ready.notify_all();
        s.channels.wake_all();
        // A connection wakes the accept loop, which then sees `stop`.
        let _ = UnixStream::connect(&s.config.socket_path);
        // Shutting a socket down wakes the thread blocked on it (accept or read).
        if let Some(l) = &self.peer_listener {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(l),
                nix::sys::socket::Shutdown::Both,
            );
        }
        for fd in lock(&s.open).values() {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                nix::sys::socket::Shutdown::Both,
            );
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        lock(&s.pools).clear();
        s.channels.clear();
        let _ = std::fs::remove_file(&s.config.socket_path);
    }
}

/// Binds the warm socket, replacing a stale one. Mode 0666: any local process
/// may ask; what it gets depends on the namespace the kernel says it is in.
fn bind_unix(path: &std::path::Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

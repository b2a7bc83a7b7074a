//! The agent's warm connections: per destination, established TCP connections
//! kept ready and handed to functions as file descriptors over a Unix socket
//! (protocol in `particle_net::warm::protocol`).
//!
//! Destinations are external services named in the config (each with the
//! tenants allowed to use it) and other nodes' agents (for function-to-function
//! channels, [`crate::warm_peers`]). A maintainer thread in the node's
//! namespace keeps `pool_size` idle connections per destination, closes dead
//! ones and those idle over `idle_timeout` beyond the target, and probes
//! agent-to-agent connections so their congestion window stays open. A
//! connection given back is pooled again only if it is clean
//! ([`crate::warm_health::check_clean`]) and is one this agent lent.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use particle_net::warm::fdpass::FdLines;
use particle_net::warm::{WarmRequest, WarmResponse, WarmStats};
use particle_net::NetNs;

use crate::warm_health::{check_clean, peer_netns_inode, socket_inode};
use crate::warm_peers;

/// Finds the tenant of the function whose network namespace has this inode
/// (`None`: not a claimed endpoint of this node).
pub type TenantOf = Arc<dyn Fn(u64) -> Option<String> + Send + Sync>;

/// Every tenant may use a destination listing this.
pub const ANY_TENANT: &str = "*";

/// An external service the agent keeps connections to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmDestination {
    pub addr: SocketAddr,
    /// Tenants allowed to use it ([`ANY_TENANT`] for all).
    pub tenants: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct WarmConfig {
    /// The Unix socket functions ask on.
    pub socket_path: PathBuf,
    /// Where this agent accepts other agents' warm connections (in the node's
    /// namespace); also its identity towards them. `None`: no channels.
    pub listen: Option<SocketAddr>,
    pub destinations: Vec<WarmDestination>,
    /// Other agents' `listen` addresses to keep connections to from the start
    /// (others are added when a channel first asks for them).
    pub peers: Vec<SocketAddr>,
    /// Connections kept per destination, idle or lent: lent ones count, so a
    /// connection given back does not find a fresh one made in its place.
    pub pool_size: usize,
    /// Most idle connections kept per destination (returned ones beyond the
    /// target are kept up to this many, then closed).
    pub max_idle: usize,
    /// Idle connections beyond `pool_size` are closed after this long.
    pub idle_timeout: Duration,
    /// A lent connection not given back within this long no longer counts
    /// towards `pool_size` (its function kept or lost it).
    pub lent_timeout: Duration,
    /// Keep-warm probes on agent-to-agent connections: every this often...
    pub probe_every: Option<Duration>,
    /// ... this many bytes.
    pub probe_bytes: usize,
    /// Turn `net.ipv4.tcp_slow_start_after_idle` off in the node's namespace
    /// (only where the agent owns it), so an idle connection keeps its window.
    pub slow_start_after_idle_off: bool,
    pub connect_timeout: Duration,
    /// How long the receiving end of a channel waits for the other end.
    pub channel_timeout: Duration,
    /// How often the maintainer looks at the pools.
    pub tick: Duration,
}

impl WarmConfig {
    pub fn new(socket_path: PathBuf) -> Self {
        Self {
            socket_path,
            listen: None,
            destinations: Vec::new(),
            peers: Vec::new(),
            pool_size: 4,
            max_idle: 8,
            idle_timeout: Duration::from_secs(60),
            lent_timeout: Duration::from_secs(60),
            probe_every: None,
            probe_bytes: 64 * 1024,
            slow_start_after_idle_off: false,
            connect_timeout: Duration::from_secs(2),
            channel_timeout: Duration::from_secs(10),
            tick: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WarmPoolError {
    #[error("warm socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("agent-to-agent listener on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("node namespace: {0}")]
    NetNs(#[from] particle_net::NetNsError),
    #[error("setting tcp_slow_start_after_idle: {0}")]
    Sysctl(io::Error),
    #[error("starting a thread: {0}")]
    Thread(io::Error),
    #[error("bad warm config: {0}")]
    Config(String),
}

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
    pub(crate) channels: warm_peers::Parked,
    /// Asks the maintainer to look now (a connection went out).
    wake: (Mutex<bool>, Condvar),
    pub(crate) stop: AtomicBool,
    pub(crate) counters: Counters,
    /// Streams to shut down on stop, so blocked threads return.
    pub(crate) open: Mutex<HashMap<u64, OwnedFd>>,
    next_open: AtomicU64,
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

    /// Records `c` as lent and returns what the reply says about it.
    fn lend(&self, dest: SocketAddr, c: &Idle) -> WarmResponse {
        if let Ok(ino) = socket_inode(c.stream.as_fd()) {
            lock(&self.lent).insert(
                ino,
                Lent {
                    dest,
                    uses: c.uses + 1,
                    since: Instant::now(),
                },
            );
        }
        bump(&self.counters.handed_out);
        if c.uses > 0 {
            bump(&self.counters.reused);
        }
        self.wake_maintainer();
        WarmResponse {
            local_port: c.stream.local_addr().ok().map(|a| a.port()),
            uses: Some(c.uses),
            ..WarmResponse::ok()
        }
    }

    fn allowed_destinations(&self, tenant: &str) -> Vec<String> {
        let mut out: Vec<String> = lock(&self.pools)
            .iter()
            .filter(|(_, p)| matches!(&p.kind, DestKind::External { tenants } if allows(tenants, tenant)))
            .map(|(a, _)| a.to_string())
            .collect();
        out.sort();
        out
    }

    fn get(&self, tenant: &str, dest: &str) -> Result<(WarmResponse, TcpStream), String> {
        let dest: SocketAddr = dest
            .parse()
            .map_err(|e| format!("destination {dest:?}: {e}"))?;
        let mut pools = lock(&self.pools);
        let pool = pools
            .get_mut(&dest)
            .ok_or_else(|| format!("{dest} is not a pooled destination of this node"))?;
        match &pool.kind {
            DestKind::Peer => {
                return Err(format!(
                    "{dest} is another agent: its connections are for channels"
                ))
            }
            DestKind::External { tenants } if !allows(tenants, tenant) => {
                return Err(format!("tenant {tenant:?} may not use {dest}"))
            }
            DestKind::External { .. } => {}
        }
        let Some(c) = Self::take_idle(pool, &self.counters) else {
            drop(pools);
            self.wake_maintainer();
            return Err(format!("no warm connection to {dest} ready"));
        };
        drop(pools);
        let reply = self.lend(dest, &c);
        Ok((reply, c.stream))
    }

    fn put(&self, fd: OwnedFd) -> WarmResponse {
        let stream = TcpStream::from(fd);
        let lent = socket_inode(stream.as_fd())
            .ok()
            .and_then(|ino| lock(&self.lent).remove(&ino));
        let Some(lent) = lent else {
            return WarmResponse::error("not a connection this agent lent");
        };
        let not_pooled = |reason: String| WarmResponse {
            pooled: Some(false),
            reason: Some(reason),
            ..WarmResponse::ok()
        };
        if let Err(e) = check_clean(stream.as_fd()) {
            bump(&self.counters.returned_dirty);
            return not_pooled(e.to_string());
        }
        // The function may have made it non-blocking; the agent's own reads block.
        if let Err(e) = stream.set_nonblocking(false) {
            bump(&self.counters.returned_dirty);
            return not_pooled(e.to_string());
        }
        let mut pools = lock(&self.pools);
        let Some(pool) = pools.get_mut(&lent.dest) else {
            return not_pooled(format!("{} is no longer pooled", lent.dest));
        };
        if pool.idle.len() >= self.config.max_idle {
            return not_pooled(format!(
                "{} already has {} idle",
                lent.dest,
                pool.idle.len()
            ));
        }
        let now = Instant::now();
        pool.idle.push(Idle {
            stream,
            uses: lent.uses,
            since: now,
            probed: now,
        });
        bump(&self.counters.returned_clean);
        self.ready.notify_all();
        WarmResponse {
            pooled: Some(true),
            ..WarmResponse::ok()
        }
    }

    /// Adds another agent as a destination (idempotent) and wakes the maintainer.
    pub(crate) fn add_peer(&self, peer: SocketAddr) {
        lock(&self.pools).entry(peer).or_insert_with(|| DestPool {
            kind: DestKind::Peer,
            idle: Vec::new(),
        });
        self.wake_maintainer();
    }

    /// Waits up to `timeout` for an idle connection to `dest`.
    pub(crate) fn wait_idle(&self, dest: SocketAddr, timeout: Duration) -> Option<Idle> {
        let deadline = Instant::now() + timeout;
        let mut pools = lock(&self.pools);
        loop {
            if let Some(c) = pools
                .get_mut(&dest)
                .and_then(|p| Self::take_idle(p, &self.counters))
            {
                drop(pools);
                self.wake_maintainer();
                return Some(c);
            }
            let now = Instant::now();
            if now >= deadline || self.stop.load(Ordering::Relaxed) {
                return None;
            }
            pools = self
                .ready
                .wait_timeout(pools, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// One client of the Unix socket, until it hangs up.
    fn serve_client(self: &Arc<Self>, stream: UnixStream) {
        let caller_ns = peer_netns_inode(&stream).ok();
        let tracked = self.track(&stream);
        let mut lines = FdLines::new(stream);
        while let Ok(Some(line)) = lines.recv() {
            let request = serde_json::from_slice::<WarmRequest>(&line.bytes)
                .map_err(|e| format!("malformed request: {e}"));
            // Looked up per request: the endpoint may be claimed after the
            // function connected, or released while it is still connected.
            let tenant = caller_ns.and_then(|ino| (self.tenant_of)(ino));
            let (reply, fd) = match request {
                Err(e) => (WarmResponse::error(e), None),
                Ok(r) => self.answer(r, tenant.as_deref(), line.fd),
            };
            if !reply.ok {
                bump(&self.counters.refused);
            }
            let Ok(bytes) = serde_json::to_vec(&reply) else {
                break;
            };
            if lines.send(&bytes, fd.as_ref().map(|s| s.as_fd())).is_err() {
                break;
            }
            // `fd` (the agent's copy of a lent connection) closes here.
        }
        self.untrack(tracked);
    }

    fn answer(
        self: &Arc<Self>,
        request: WarmRequest,
        tenant: Option<&str>,
        fd: Option<OwnedFd>,
    ) -> (WarmResponse, Option<TcpStream>) {
        const NOT_A_FUNCTION: &str = "the caller is not in an endpoint claimed on this node";
        match (request, tenant) {
            (WarmRequest::Stats {}, _) => (
                WarmResponse {
                    stats: Some(self.stats()),
                    ..WarmResponse::ok()
                },
                None,
            ),
            (WarmRequest::Put {}, _) => match fd {
                // Anyone may give back what it was lent; the inode says whether it was.
                Some(fd) => (self.put(fd), None),
                None => (
                    WarmResponse::error("put without a connection attached"),
                    None,
                ),
            },
            (_, None) => (WarmResponse::error(NOT_A_FUNCTION), None),
            (WarmRequest::Destinations {}, Some(tenant)) => (
                WarmResponse {
                    destinations: Some(self.allowed_destinations(tenant)),
                    ..WarmResponse::ok()
                },
                None,
            ),
            (WarmRequest::Get { dest }, Some(tenant)) => match self.get(tenant, &dest) {
                Ok((reply, stream)) => (reply, Some(stream)),
                Err(e) => (WarmResponse::error(e), None),
            },
            (WarmRequest::Channel { peer, key }, Some(tenant)) => {
                match warm_peers::open_channel(self, tenant, &peer, &key) {
                    Ok(stream) => {
                        bump(&self.counters.channels);
                        (WarmResponse::ok(), Some(stream))
                    }
                    Err(e) => (WarmResponse::error(e), None),
                }
            }
        }
    }

    /// One pass over the pools: drop what is dead or expired, probe, refill.
    fn maintain(&self) {
        let now = Instant::now();
        let mut to_probe = Vec::new();
        let mut wanted = Vec::new();
        let mut lent_to: HashMap<SocketAddr, usize> = HashMap::new();
        {
            let mut lent = lock(&self.lent);
            lent.retain(|_, l| now.duration_since(l.since) < self.config.lent_timeout);
            for l in lent.values() {
                *lent_to.entry(l.dest).or_default() += 1;
            }
        }
        {
            let mut pools = lock(&self.pools);
            for (dest, pool) in pools.iter_mut() {
                let before = pool.idle.len();
                pool.idle.retain(|c| check_clean(c.stream.as_fd()).is_ok());
                let dead = before - pool.idle.len();
                self.counters.dead.fetch_add(dead as u64, Ordering::Relaxed);
                // Beyond the target, the longest idle go first (they are at the front).
                while pool.idle.len() > self.config.pool_size
                    && pool
                        .idle
                        .first()
                        .is_some_and(|c| now.duration_since(c.since) > self.config.idle_timeout)
                {
                    pool.idle.remove(0);
                    bump(&self.counters.expired);
                }
                if let (DestKind::Peer, Some(every)) = (&pool.kind, self.config.probe_every) {
                    let (due, keep): (Vec<Idle>, Vec<Idle>) = pool
                        .idle
                        .drain(..)
                        .partition(|c| now.duration_since(c.probed) >= every);
                    pool.idle = keep;
                    to_probe.extend(due.into_iter().map(|c| (*dest, c)));
                }
                let have = pool.idle.len() + lent_to.get(dest).copied().unwrap_or(0);
                let missing = self.config.pool_size.saturating_sub(have);
                wanted.extend(std::iter::repeat_n(*dest, missing));
            }
        }
        for (dest, mut c) in to_probe {
            match warm_peers::probe(&c.stream, self.config.probe_bytes) {
                Ok(()) => {
                    bump(&self.counters.probes);
                    c.probed = Instant::now();
                    self.back_to_pool(dest, c);
                }
                Err(e) => {
                    tracing::debug!("probe to {dest} failed, closing: {e}");
                    bump(&self.counters.dead);
                }
            }
        }
        for dest in wanted {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            match TcpStream::connect_timeout(&dest, self.config.connect_timeout) {
                Ok(stream) => {
                    bump(&self.counters.connects);
                    self.back_to_pool(dest, Idle::fresh(stream));
                }
                Err(e) => {
                    bump(&self.counters.connect_errors);
                    tracing::debug!("warm connection to {dest}: {e}");
                }
            }
        }
        self.channels.expire(self.config.channel_timeout * 3);
    }

    fn back_to_pool(&self, dest: SocketAddr, c: Idle) {
        if let Some(pool) = lock(&self.pools).get_mut(&dest) {
            pool.idle.push(c);
            self.ready.notify_all();
        }
    }

    fn maintainer(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            self.maintain();
            let mut woken = lock(&self.wake.0);
            if !*woken {
                woken = self
                    .wake
                    .1
                    .wait_timeout(woken, self.config.tick)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            *woken = false;
        }
    }
}

fn allows(tenants: &[String], tenant: &str) -> bool {
    tenants.iter().any(|t| t == tenant || t == ANY_TENANT)
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
            channels: warm_peers::Parked::default(),
            wake: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            open: Mutex::new(HashMap::new()),
            next_open: AtomicU64::new(0),
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
        service.threads.push(spawn(
            "warm-accept",
            Box::new(move || {
                for stream in unix.incoming() {
                    if s.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let s = s.clone();
                    let spawned = std::thread::Builder::new()
                        .name("warm-client".into())
                        .spawn(move || s.serve_client(stream));
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
                Box::new(move || warm_peers::accept_loop(&s, listener)),
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

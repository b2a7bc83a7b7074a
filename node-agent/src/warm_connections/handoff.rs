//! Handing warm connections to functions: the Unix-socket conversation
//! (`particle_wire::warm`), lending a connection, taking it back (pooled again
//! only if clean and one this agent lent), and which destinations a tenant
//! may use.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use particle_net::warm::fdpass::FdLines;
use particle_wire::warm::{WarmRequest, WarmResponse};

use super::health::{check_clean, socket_inode};
use super::*;

impl Shared {
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
        // Every channel open names its peer: only a new one costs a rule
        // (an iptables run), never the channels after it.
        if lock(&self.pools).contains_key(&peer) {
            return;
        }
        if let Err(e) = self.pinning.allow(peer) {
            // Unpinned connections are never made: without the rule they fail.
            tracing::warn!("warm peer {peer}: {e}");
        }
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
    /// Serves one function's connection; `caller_ns` is its namespace as
    /// [`crate::peer::identify`] found it (`None`: refusals only).
    pub(super) fn serve_client(self: &Arc<Self>, stream: UnixStream, caller_ns: Option<u64>) {
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
                match peers::open_channel(self, tenant, &peer, &key) {
                    Ok(stream) => {
                        bump(&self.counters.channels);
                        (WarmResponse::ok(), Some(stream))
                    }
                    Err(e) => (WarmResponse::error(e), None),
                }
            }
        }
    }
}

fn allows(tenants: &[String], tenant: &str) -> bool {
    tenants.iter().any(|t| t == tenant || t == ANY_TENANT)
}

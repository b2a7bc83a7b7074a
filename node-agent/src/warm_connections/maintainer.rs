//! The maintainer: one thread in the node's namespace that keeps every
//! destination's idle connections at target, closes dead and expired ones,
//! and probes agent-to-agent connections so their window stays open.

use std::net::SocketAddr;
use std::sync::PoisonError;
use std::time::Instant;

use super::health::check_clean;
use super::pinning;
use super::*;

impl Shared {
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
                let mut probing = 0;
                if let (DestKind::Peer, Some(every)) = (&pool.kind, self.config.probe_every) {
                    let (due, keep): (Vec<Idle>, Vec<Idle>) = pool
                        .idle
                        .drain(..)
                        .partition(|c| now.duration_since(c.probed) >= every);
                    pool.idle = keep;
                    probing = due.len();
                    to_probe.extend(due.into_iter().map(|c| (*dest, c)));
                }
                // Connections out for a probe come back: they count.
                let have = pool.idle.len() + probing + lent_to.get(dest).copied().unwrap_or(0);
                let missing = self.config.pool_size.saturating_sub(have);
                wanted.extend(std::iter::repeat_n(*dest, missing));
            }
        }
        for (dest, mut c) in to_probe {
            match peers::probe(&c.stream, self.config.probe_bytes) {
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
            let is_peer = lock(&self.pools)
                .get(&dest)
                .is_some_and(|p| matches!(p.kind, DestKind::Peer));
            let connected =
                pinning::connect_pinned(dest, self.config.connect_timeout).and_then(|s| {
                    match is_peer {
                        true => peers::hello(&s, &self.config.peer_token).map(|()| s),
                        false => Ok(s),
                    }
                });
            match connected {
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

    pub(super) fn maintainer(&self) {
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

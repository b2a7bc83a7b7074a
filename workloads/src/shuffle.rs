//! The all-to-all exchange of burst-parallel analytics (a shuffle): every
//! function sends a block of `bytes` to every other function and receives
//! theirs, `size × (size − 1)` transfers in all. Block contents are a
//! deterministic stream of (seed, sender, receiver), so the receiver checks
//! each block's checksum against the one it computes itself.
//!
//! Prints the `exchange` phase line, then
//! `shuffle received=N bytes=B checksum=HEX nodes=K` (K: how many distinct
//! nodes the blocks came from) and `done_ns`.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::timeline::{self, now_ns};
use crate::wire::{self, Inbox, Message};
use particle_wire::function_env::FunctionEnv;

const BLOCK: u8 = 10;

#[derive(Debug, Clone)]
pub struct ShuffleOptions {
    /// Bytes each function sends to each other function.
    pub bytes: usize,
    pub seed: u64,
    /// Concurrent outgoing transfers per function.
    pub fan_out: usize,
    pub timeout: Duration,
}

impl Default for ShuffleOptions {
    fn default() -> Self {
        Self {
            bytes: 64 * 1024,
            seed: 1,
            fan_out: 8,
            timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShuffleReport {
    pub received: usize,
    pub bytes: usize,
    /// XOR of every received block's checksum.
    pub checksum: u64,
    /// Distinct nodes the blocks came from.
    pub nodes: usize,
}

/// The block `from` sends to `to`.
pub fn block(seed: u64, from: usize, to: usize, len: usize) -> Vec<u8> {
    let mut state = seed ^ ((from as u64) << 32 | to as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64*: fast and deterministic; not meant to be random-grade.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, 64 bits.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn run(
    env: &FunctionEnv,
    opts: &ShuffleOptions,
    out: &mut impl Write,
) -> io::Result<ShuffleReport> {
    writeln!(out, "{}={}", crate::ring::STARTED, now_ns())?;
    let deadline = Instant::now() + opts.timeout;
    let mut inbox = Inbox::listen(env.listen_port().map_err(io::Error::other)?)?;
    let start = now_ns();

    let others: Vec<usize> = (1..env.size).map(|o| env.peer_rank(o)).collect();
    let next = AtomicUsize::new(0);
    let report = std::thread::scope(|s| -> io::Result<ShuffleReport> {
        // A few senders walk the ranks after this one, so that not every
        // function starts by hitting rank 0.
        let senders: Vec<_> = (0..opts.fan_out.clamp(1, others.len().max(1)))
            .map(|_| {
                s.spawn(|| -> io::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&to) = others.get(i) else {
                            return Ok(());
                        };
                        let m = Message {
                            kind: BLOCK,
                            from: env.rank,
                            node: env.node.clone(),
                            payload: block(opts.seed, env.rank, to, opts.bytes),
                        };
                        wire::send(&env.peers[to], &m, deadline)?;
                    }
                })
            })
            .collect();

        let mut seen = vec![false; env.size];
        let mut report = ShuffleReport {
            received: 0,
            bytes: 0,
            checksum: 0,
            nodes: 0,
        };
        let mut nodes = BTreeSet::new();
        for _ in 0..others.len() {
            let m = inbox.recv(BLOCK, deadline)?;
            if m.from >= env.size || m.from == env.rank || seen[m.from] {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected or duplicate block from rank {}", m.from),
                ));
            }
            seen[m.from] = true;
            let got = checksum(&m.payload);
            let want = checksum(&block(opts.seed, m.from, env.rank, opts.bytes));
            if got != want || m.payload.len() != opts.bytes {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "block from rank {}: checksum {got:016x}, expected {want:016x}",
                        m.from
                    ),
                ));
            }
            report.received += 1;
            report.bytes += m.payload.len();
            report.checksum ^= got;
            nodes.insert(m.node);
        }
        report.nodes = nodes.len();
        for h in senders {
            h.join()
                .map_err(|_| io::Error::other("a sending thread panicked"))??;
        }
        Ok(report)
    })?;
    timeline::write_phase(out, timeline::EXCHANGE, start, now_ns())?;
    writeln!(
        out,
        "shuffle received={} bytes={} checksum={:016x} nodes={}",
        report.received, report.bytes, report.checksum, report.nodes
    )?;
    writeln!(out, "done_ns={}", now_ns())?;
    out.flush()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_differ_by_pair_and_are_reproducible() {
        assert_eq!(block(1, 2, 3, 100), block(1, 2, 3, 100));
        assert_ne!(block(1, 2, 3, 100), block(1, 3, 2, 100));
        assert_ne!(block(1, 2, 3, 100), block(2, 2, 3, 100));
        assert_eq!(block(1, 0, 1, 13).len(), 13);
        assert_ne!(checksum(b"a"), checksum(b"b"));
    }

    #[test]
    fn a_shuffle_in_threads_exchanges_every_pair() {
        let size = 4;
        let base = 18380u16; // this unit test's ports
        let peers: std::sync::Arc<[String]> = (0..size)
            .map(|r| format!("127.0.0.1:{}", base + r as u16))
            .collect();
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let env = FunctionEnv {
                    job: "t".into(),
                    rank,
                    size,
                    node: format!("n{}", rank % 2),
                    address: None,
                    peers: peers.clone(),
                };
                std::thread::spawn(move || {
                    let opts = ShuffleOptions {
                        bytes: 1000,
                        ..ShuffleOptions::default()
                    };
                    run(&env, &opts, &mut Vec::new())
                })
            })
            .collect();
        for h in handles {
            let r = h.join().unwrap().unwrap();
            assert_eq!((r.received, r.bytes, r.nodes), (3, 3000, 2));
        }
    }
}

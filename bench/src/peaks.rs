//! What a burst costs at its worst, watched from outside while it runs: the
//! kernel's neighbour (ARP) table, which is one table for every namespace of
//! the machine, and the peak memory of the cluster's controller and agents.
//!
//! The table: `/proc/net/stat/arp_cache` gives its entry count (permanent
//! entries included) and, per CPU, how often an allocation forced a garbage
//! collection and how often one failed because the table was full
//! (`table_fulls`: the kernel's "neighbor table overflow"). Since Linux 4.19
//! the thresholds (`gc_thresh1/2/3`) count only entries the kernel may
//! collect, not permanent ones; an allocation with `gc_thresh2` or more of
//! those forces a collection, so a burst with no forced collection never
//! had `gc_thresh2` learnt entries, let alone `gc_thresh3`. The counters are
//! the machine's: anything else running meanwhile counts too (only ever
//! upwards).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

const ARP_CACHE: &str = "/proc/net/stat/arp_cache";
const GC_THRESH: &str = "/proc/sys/net/ipv4/neigh/default/gc_thresh";

/// One reading of the table's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TableStat {
    entries: u64,
    forced_gc_runs: u64,
    table_fulls: u64,
}

impl TableStat {
    fn read() -> Result<Self> {
        let text =
            std::fs::read_to_string(ARP_CACHE).with_context(|| format!("reading {ARP_CACHE}"))?;
        parse_arp_cache(&text).with_context(|| format!("{ARP_CACHE} is not as expected: {text:?}"))
    }
}

/// The header names the columns; one line of hex numbers per CPU follows.
/// `entries` is the table's (the same on every line); the others are per
/// CPU and summed.
fn parse_arp_cache(text: &str) -> Option<TableStat> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (entries, forced, fulls) = (
        column("entries")?,
        column("forced_gc_runs")?,
        column("table_fulls")?,
    );
    let mut stat = TableStat::default();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let values: Vec<u64> = line
            .split_whitespace()
            .map(|v| u64::from_str_radix(v, 16))
            .collect::<Result<_, _>>()
            .ok()?;
        stat.entries = *values.get(entries)?;
        stat.forced_gc_runs += values.get(forced)?;
        stat.table_fulls += values.get(fulls)?;
    }
    Some(stat)
}

/// The neighbour table over one burst.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NeighbourTable {
    /// The most entries seen (permanent ones included: the thresholds do
    /// not count those).
    pub peak_entries: u64,
    /// Garbage collections an allocation forced meanwhile (0: the learnt
    /// entries never reached `gc_thresh2`).
    pub forced_gc_runs: u64,
    /// Allocations refused because the table was full (overflows).
    pub overflows: u64,
    pub gc_thresh2: u64,
    pub gc_thresh3: u64,
}

/// Samples the neighbour table every few milliseconds until stopped.
pub struct NeighbourTableWatch {
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<u64>,
    first: TableStat,
}

impl NeighbourTableWatch {
    pub fn start() -> Result<Self> {
        let first = TableStat::read()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = first.entries;
            while !stopping.load(Ordering::Relaxed) {
                if let Ok(s) = TableStat::read() {
                    peak = peak.max(s.entries);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        Ok(Self {
            stop,
            sampler,
            first,
        })
    }

    pub fn finish(self) -> Result<NeighbourTable> {
        self.stop.store(true, Ordering::Relaxed);
        let peak = self
            .sampler
            .join()
            .map_err(|_| anyhow::anyhow!("the neighbour-table sampler panicked"))?;
        let last = TableStat::read()?;
        let thresh = |n: u8| -> Result<u64> {
            let path = format!("{GC_THRESH}{n}");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            text.trim()
                .parse()
                .with_context(|| format!("{path}: {text:?}"))
        };
        Ok(NeighbourTable {
            peak_entries: peak.max(last.entries),
            forced_gc_runs: last
                .forced_gc_runs
                .saturating_sub(self.first.forced_gc_runs),
            overflows: last.table_fulls.saturating_sub(self.first.table_fulls),
            gc_thresh2: thresh(2)?,
            gc_thresh3: thresh(3)?,
        })
    }
}

/// Peak resident memory (`VmHWM`) of this process's cluster children.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClusterMemory {
    /// The largest controller's (KiB).
    pub controller_peak_kib: u64,
    /// The largest agent's (KiB).
    pub agent_peak_kib: u64,
    /// Every agent's peaks added up (KiB).
    pub agents_peak_kib_total: u64,
    pub agents: usize,
}

impl ClusterMemory {
    /// Reads the children of this process that run `particle controller` or
    /// `particle agent` (the cluster harness starts them so). A peak is the
    /// process's whole life: read it before the cluster stops.
    pub fn read() -> Self {
        let me = std::process::id() as i32;
        let mut memory = Self::default();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return memory;
        };
        for pid in entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        {
            let Some(stat) = particle_net::proc_stat::ProcStat::of(pid) else {
                continue;
            };
            if stat.ppid != me {
                continue;
            }
            let role = std::fs::read(format!("/proc/{pid}/cmdline"))
                .ok()
                .and_then(|c| {
                    let arg = c.split(|b| *b == 0).nth(1)?.to_vec();
                    String::from_utf8(arg).ok()
                });
            let Some(peak) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| vm_hwm_kib(&s))
            else {
                continue;
            };
            match role.as_deref() {
                Some("controller") => {
                    memory.controller_peak_kib = memory.controller_peak_kib.max(peak)
                }
                Some("agent") => {
                    memory.agent_peak_kib = memory.agent_peak_kib.max(peak);
                    memory.agents_peak_kib_total += peak;
                    memory.agents += 1;
                }
                _ => {}
            }
        }
        memory
    }
}

fn vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_cache_sums_per_cpu_counters_and_keeps_the_table_count() {
        let text = "entries  allocs   destroys hash_grows lookups  hits     res_failed rcv_probes_mcast rcv_probes_ucast periodic_gc_runs forced_gc_runs unresolved_discards table_fulls\n\
            00000402 00000001 00000000 00000000   00000000 00000000 00000000   00000000         00000000         0000000e         00000003       00000000            00000001\n\
            00000402 00000001 00000000 00000000   00000006 00000002 00000000   00000000         00000000         00000000         00000002       00000000            00000000\n";
        assert_eq!(
            parse_arp_cache(text),
            Some(TableStat {
                entries: 0x402,
                forced_gc_runs: 5,
                table_fulls: 1
            })
        );
        assert_eq!(parse_arp_cache("entries\nzz\n"), None);
        // This machine's own file parses.
        assert!(TableStat::read().is_ok());
    }

    #[test]
    fn peak_memory_is_read_from_status() {
        assert_eq!(
            vm_hwm_kib("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t 1024 kB\n"),
            Some(2048)
        );
        assert_eq!(vm_hwm_kib("Name:\tx\n"), None);
    }
}

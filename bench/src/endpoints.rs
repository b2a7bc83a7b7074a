//! `particle bench endpoints`: endpoint creation three ways in one run (one
//! `ip` process per command, `ip -batch`, Particle's batched engine), then
//! claims from a warm pool, then a check that teardown left nothing.
//!
//! Everything is built inside a scratch namespace of the run, from a /16 that
//! exists only there; the machine's own namespace is never touched.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, EndpointPool, EndpointSpec, PoolConfig, Run, RunPrefix};
use serde::Serialize;

use crate::agent_resources::AgentResources;
use crate::baselines::ip::{self, IpEndpoint, NamespacesGuard};
use crate::stats::{micros, percentile, rate};

/// The scratch namespace's private block: room for 65533 endpoints.
const SCRATCH_BLOCK: &str = "10.250.0.0/16";

#[derive(Debug, Clone)]
pub struct Options {
    pub count: usize,
    /// Particle's worker threads; 0 = one per core.
    pub workers: usize,
    /// Skip the slow one-process-per-command baseline.
    pub skip_ip_cmd: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub count: usize,
    pub workers: usize,
    pub ip_cmd_s: Option<f64>,
    pub ip_cmd_per_s: Option<f64>,
    pub ip_batch_s: f64,
    pub ip_batch_per_s: f64,
    /// Of `ip_batch_s`: namespaces and host ends (two processes).
    pub ip_batch_outside_s: f64,
    /// Of `ip_batch_s`: each endpoint's inside (one `ip -n NS -batch` each).
    pub ip_batch_inside_s: f64,
    pub particle_s: f64,
    pub particle_per_s: f64,
    /// Particle's rate over `ip -batch`'s, same run.
    pub particle_vs_ip_batch: f64,
    pub pool_fill_per_s: f64,
    /// What one warm endpoint costs the node, from the full pool of `count`.
    pub pool_footprint: PerEndpoint,
    pub claim_p50_us: f64,
    pub claim_p99_us: f64,
    pub claim_max_us: f64,
    /// Claims that found the pool empty (should be 0: the pool was warm).
    pub claim_misses: u64,
    /// Namespaces and links left after teardown; must be 0.
    pub leaked: usize,
    pub leaked_objects: Vec<String>,
}

pub fn run(opts: &Options) -> Result<Report> {
    if opts.count == 0 {
        bail!("--count must be at least 1");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("bench endpoints creates namespaces and links: run it as root");
    }
    particle_net::limits::raise_open_files().context("raising the open-file limit")?;
    // Leftovers of earlier crashed runs would skew the kernel's work and the leak count.
    let gc = particle_net::gc::collect(None);
    if gc.removed() > 0 {
        tracing::info!("collected {} leftovers of crashed runs", gc.removed());
    }

    let run = Run::start()?;
    let prefix = run.prefix().clone();
    let mut node = ScratchNode::new(&prefix, AddressBlock::parse(SCRATCH_BLOCK)?)
        .context("creating the scratch namespace")?;
    let scratch_name = prefix.label("scratch");
    node.netns.mount_as(&scratch_name)?;
    let bridge = node.bridge.name.to_string();
    let n = opts.count;

    // 1. One ip process per command.
    let (ip_cmd, cmd_guard) = if opts.skip_ip_cmd {
        (None, NamespacesGuard(vec![]))
    } else {
        let eps = ip_endpoints(&prefix, &mut node.block, 'c', n)?;
        let guard = NamespacesGuard(eps.iter().map(|e| e.netns.clone()).collect());
        tracing::info!("ip, one process per command: {n} endpoints");
        (
            Some(ip::create_per_command(&scratch_name, &bridge, &eps)?),
            guard,
        )
    };
    drop(cmd_guard);
    settle(&mut node, &prefix)?;

    // 2. ip -batch.
    let eps = ip_endpoints(&prefix, &mut node.block, 'i', n)?;
    let batch_guard = NamespacesGuard(eps.iter().map(|e| e.netns.clone()).collect());
    tracing::info!("ip -batch: {n} endpoints");
    let batch_times = ip::create_batched(&scratch_name, &bridge, &eps)?;
    let ip_batch = batch_times.total();
    drop(batch_guard);
    settle(&mut node, &prefix)?;

    // 3. Particle's batched engine.
    let factory = node.factory(opts.workers)?;
    let workers = factory.workers();
    let specs = EndpointSpec::allocate(&mut node.block, n);
    tracing::info!("particle: {n} endpoints");
    let start = Instant::now();
    let built = factory.create_batch(&specs);
    let particle = start.elapsed();
    let failures: Vec<_> = built.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(first) = failures.first() {
        bail!(
            "{} of {n} particle endpoints failed, first: {first}",
            failures.len()
        );
    }
    drop(built);
    settle(&mut node, &prefix)?;

    // 4. A warm pool of n, then n claims while the refiller tops it up behind them.
    let pool_block = AddressBlock::parse(SCRATCH_BLOCK)?;
    let config = PoolConfig {
        high_watermark: n,
        low_watermark: n / 2,
        batch_size: 64,
    };
    let before = Footprint::take()?;
    let pool = EndpointPool::start(factory, pool_block, config)?;
    let start = Instant::now();
    pool.wait_ready(n, Duration::from_secs(120 + n as u64 / 10))?;
    let pool_fill = start.elapsed();
    let footprint = before.per_endpoint(&Footprint::take()?, n);
    let mut latencies = Vec::with_capacity(n);
    let mut claimed = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let claim = pool.claim();
        latencies.push(t.elapsed());
        match claim {
            Ok(ep) => claimed.push(ep),
            Err(e) => tracing::warn!("claim: {e}"),
        }
    }
    let claim_misses = pool.stats().empty_claims;
    for ep in claimed {
        ep.discard();
    }
    drop(pool);

    // 5. Teardown is asynchronous in the kernel: wait for it, then count.
    let leaked_objects = wait_for_teardown(&mut node, &prefix, Duration::from_secs(30))?;
    drop(node);

    let report = Report {
        count: n,
        workers,
        ip_cmd_s: ip_cmd.map(|d| d.as_secs_f64()),
        ip_cmd_per_s: ip_cmd.map(|d| rate(n, d)),
        ip_batch_s: ip_batch.as_secs_f64(),
        ip_batch_per_s: rate(n, ip_batch),
        ip_batch_outside_s: batch_times.outside.as_secs_f64(),
        ip_batch_inside_s: batch_times.inside.as_secs_f64(),
        particle_s: particle.as_secs_f64(),
        particle_per_s: rate(n, particle),
        particle_vs_ip_batch: ip_batch.as_secs_f64() / particle.as_secs_f64(),
        pool_fill_per_s: rate(n, pool_fill),
        pool_footprint: footprint,
        claim_p50_us: micros(percentile(&mut latencies, 50.0)),
        claim_p99_us: micros(percentile(&mut latencies, 99.0)),
        claim_max_us: micros(percentile(&mut latencies, 100.0)),
        claim_misses,
        leaked: leaked_objects.len(),
        leaked_objects,
    };
    drop(run);
    Ok(report)
}

/// What a warm endpoint holds, averaged over a full pool: kernel objects
/// (in its namespace and its router's), the pool's fds and memory, and the
/// kernel memory it costs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerEndpoint {
    /// Kernel objects and process resources (the census of
    /// [`crate::agent_resources`] on this process), per endpoint.
    pub objects: BTreeMap<String, f64>,
    /// `/proc/meminfo`'s slab, kernel stacks, page tables and per-CPU
    /// memory, per endpoint (KiB): what the kernel spent on it.
    pub kernel_kib: f64,
    /// This process's resident memory, per endpoint (KiB).
    pub process_kib: f64,
}

/// A census of this process and the kernel's memory, for [`PerEndpoint`].
struct Footprint {
    census: AgentResources,
    kernel_kib: u64,
}

impl Footprint {
    fn take() -> Result<Self> {
        let census =
            AgentResources::read(std::process::id() as i32).context("census of this process")?;
        let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let kernel_kib = ["Slab", "KernelStack", "PageTables", "Percpu"]
            .iter()
            .filter_map(|field| meminfo_kib(&meminfo, field))
            .sum();
        Ok(Self { census, kernel_kib })
    }

    fn per_endpoint(&self, later: &Self, n: usize) -> PerEndpoint {
        let n = n.max(1) as f64;
        let mut objects: BTreeMap<String, f64> = self
            .census
            .delta(&later.census)
            .into_iter()
            .map(|(k, v)| (k, v as f64 / n))
            .collect();
        let process_kib = objects.remove("rss_kib").unwrap_or(0.0);
        PerEndpoint {
            objects,
            kernel_kib: (later.kernel_kib as f64 - self.kernel_kib as f64) / n,
            process_kib,
        }
    }
}

/// A `/proc/meminfo` field in KiB.
fn meminfo_kib(meminfo: &str, field: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Names and addresses for `n` endpoints of one `ip` baseline.
fn ip_endpoints(
    prefix: &RunPrefix,
    block: &mut AddressBlock,
    kind: char,
    n: usize,
) -> Result<Vec<IpEndpoint>> {
    let gateway = block.gateway().to_string();
    (0..n as u64)
        .map(|i| {
            Ok(IpEndpoint {
                netns: prefix.label(&format!("{kind}{i}")),
                host_ifname: prefix.ifname(kind, i)?.to_string(),
                address: block.allocate()?.to_string(),
                gateway: gateway.clone(),
            })
        })
        .collect()
}

/// The kernel tears namespaces down in the background, holding the locks
/// that creation needs: let one method's teardown finish before the next
/// method is timed, so none pays for another's.
fn settle(node: &mut ScratchNode, prefix: &RunPrefix) -> Result<()> {
    let left = wait_for_teardown(node, prefix, Duration::from_secs(60))?;
    if !left.is_empty() {
        bail!("teardown between methods left {}", left.join(", "));
    }
    Ok(())
}

/// Waits until the scratch namespace holds only its bridge and no named
/// namespace of this run but the scratch one is left; returns what is left.
fn wait_for_teardown(
    node: &mut ScratchNode,
    prefix: &RunPrefix,
    timeout: Duration,
) -> Result<Vec<String>> {
    let scratch_name = prefix.label("scratch");
    let start = Instant::now();
    loop {
        let mut left: Vec<String> = node
            .extra_links()?
            .into_iter()
            .map(|l| format!("link {l}"))
            .collect();
        if let Ok(entries) = std::fs::read_dir(particle_net::netns::NETNS_RUN_DIR) {
            left.extend(entries.flatten().filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name.starts_with(prefix.as_str()) && name != scratch_name)
                    .then(|| format!("netns {name}"))
            }));
        }
        if left.is_empty() || start.elapsed() > timeout {
            return Ok(left);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The human-readable table.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let row = |out: &mut String, name: &str, secs: Option<f64>, per_s: Option<f64>| {
        let (s, p, x) = match (secs, per_s) {
            (Some(s), Some(p)) => (
                format!("{s:9.3}"),
                format!("{p:10.0}"),
                format!("{:8.2}x", p / r.ip_batch_per_s),
            ),
            _ => ("  skipped".into(), "".into(), "".into()),
        };
        out.push_str(&format!("  {name:<28} {s} s {p} /s {x}\n"));
    };
    out.push_str(&format!(
        "Endpoint creation, {} endpoints (namespace + veth + addresses + route + bridge)\n",
        r.count
    ));
    out.push_str(&format!(
        "  {:<28} {:>11} {:>13} {:>9}\n",
        "method", "total", "rate", "vs batch"
    ));
    row(
        &mut out,
        "ip, one process per command",
        r.ip_cmd_s,
        r.ip_cmd_per_s,
    );
    row(
        &mut out,
        "ip -batch",
        Some(r.ip_batch_s),
        Some(r.ip_batch_per_s),
    );
    out.push_str(&format!(
        "  {:<28} ({:.3} s namespaces + host ends, {:.3} s insides: ip -batch cannot switch namespaces)\n",
        "", r.ip_batch_outside_s, r.ip_batch_inside_s
    ));
    row(
        &mut out,
        &format!("particle, {} workers", r.workers),
        Some(r.particle_s),
        Some(r.particle_per_s),
    );
    out.push_str(&format!(
        "\nWarm pool: filled at {:.0}/s; {} claims: p50 {:.2} µs, p99 {:.2} µs, max {:.2} µs, {} misses\n",
        r.pool_fill_per_s, r.count, r.claim_p50_us, r.claim_p99_us, r.claim_max_us, r.claim_misses
    ));
    let f = &r.pool_footprint;
    let objects: Vec<String> = f
        .objects
        .iter()
        .filter(|(_, v)| **v != 0.0)
        .map(|(k, v)| format!("{v:.2} {k}"))
        .collect();
    out.push_str(&format!(
        "Per warm endpoint (pool of {}): {:.1} KiB kernel memory, {:.1} KiB of this process; {}\n",
        r.count,
        f.kernel_kib,
        f.process_kib,
        objects.join(", ")
    ));
    out.push_str(&format!(
        "Leaked after teardown: {}{}\n",
        r.leaked,
        if r.leaked == 0 {
            String::new()
        } else {
            format!(" ({})", r.leaked_objects.join(", "))
        }
    ));
    out
}

//! `particle bench reuse`: the warm-connection experiment between two
//! simulated hosts with a delay on the underlay.
//!
//! Host A runs the agent's warm pool and the clients; host B a server that
//! answers an 8-byte request (a size) with that many bytes. Between them,
//! the fabric namespace forwards every frame through a [`DelayLine`] (tc
//! netem is not available on this kernel). Two experiments, same run:
//!
//! 1. Request latency, connect to completion, of an unmodified client
//!    process: plain (baseline), with the preload library in its do-nothing
//!    mode (dummy), and with the preload library taking the agent's warm
//!    connection (reuse). Modes alternate in rounds so drift hits all three.
//! 2. Flow completion time for sizes 10 KB to 4 MB on a new connection vs a
//!    warmed one (from the pool, ramped by earlier transfers, slow start after
//!    idle off), with and without a competing bulk flow.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_net::scratch::ScratchNode;
use particle_net::warm::WarmClient;
use particle_net::{AddressBlock, NetNs, Run};
use particle_node_agent::warm_connections::{WarmConfig, WarmDestination, WarmService, ANY_TENANT};
use particle_wire::warm::WarmStats;
use serde::Serialize;

use crate::delay_line::DelayLine;
use crate::stats::percentile;

/// The fabric's private block (exists only inside the run's namespaces).
const FABRIC_BLOCK: &str = "10.224.7.0/24";
const SERVER_PORT: u16 = 18150;
/// Bytes of each answer in the latency experiment.
pub const REQUEST_ANSWER: u64 = 100;
/// Asks the server to stream until the client goes (the bulk flow).
const FOREVER: u64 = u64::MAX;
pub const FLOW_SIZES: [u64; 8] = [
    10_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_000_000, 4_000_000,
];
const CDF_PERCENTILES: [f64; 9] = [1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0];
const ROUNDS: usize = 5;

#[derive(Debug, Clone)]
pub struct Options {
    /// Requests per mode in the latency experiment.
    pub runs: usize,
    /// One-way delay of the underlay.
    pub delay_ms: f64,
    /// Flows per size, kind and load.
    pub flow_runs: usize,
    /// The underlay's rate (tbf on both directions); 0: unshaped.
    pub link_mbit: u32,
    /// Where the CDF plot (SVG) goes.
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CdfPoint {
    pub percentile: f64,
    pub baseline_us: f64,
    pub dummy_us: f64,
    pub reuse_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    pub size_bytes: u64,
    pub congested: bool,
    /// Medians over `flow_runs`.
    pub fct_new_ms: f64,
    pub fct_warm_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub runs: usize,
    pub flow_runs: usize,
    pub delay_ms: f64,
    /// Always false here: the kernel has no sch_netem.
    pub netem: bool,
    pub delay_emulation: String,
    pub link_mbit: u32,
    /// Measured: ping between the hosts through the delay line (average).
    pub ping_rtt_ms: f64,
    /// Measured: the kernel's smoothed RTT of a warm connection.
    pub tcp_srtt_ms: f64,
    pub baseline_p50_us: f64,
    pub dummy_p50_us: f64,
    pub reuse_p50_us: f64,
    pub baseline_p99_us: f64,
    pub dummy_p99_us: f64,
    pub reuse_p99_us: f64,
    /// reuse p50 / baseline p50.
    pub reuse_vs_baseline_p50: f64,
    pub cdf: Vec<CdfPoint>,
    pub flows: Vec<Flow>,
    /// Warm flows that found no pooled connection (should be 0).
    pub warm_misses: usize,
    pub warm: WarmStats,
    pub plot: Option<String>,
}

/// The server on host B: per connection, answers each 8-byte size with that many bytes.
fn serve(listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { return };
        std::thread::spawn(move || {
            let chunk = vec![0x5au8; 64 * 1024];
            let mut req = [0u8; 8];
            while stream.read_exact(&mut req).is_ok() {
                let mut left = u64::from_be_bytes(req);
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if stream.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    if left != FOREVER {
                        left -= n as u64;
                    }
                }
            }
        });
    }
}

/// One request on `s`: ask for `size` bytes and read them all.
fn request(s: &mut TcpStream, size: u64, buf: &mut [u8]) -> std::io::Result<()> {
    s.write_all(&size.to_be_bytes())?;
    let mut left = size as usize;
    while left > 0 {
        let want = left.min(buf.len());
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        left -= n;
    }
    Ok(())
}

/// The client process of the latency experiment: a plain program (connect,
/// request, read, close), unaware of the agent. One untimed request first
/// (loads what the process loads once), then `runs` timed; prints the
/// latencies in µs as a JSON list.
pub fn client(dest: SocketAddr, runs: usize, size: u64) -> Result<String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut once = || -> Result<f64> {
        let start = Instant::now();
        let mut s = TcpStream::connect(dest).with_context(|| format!("connecting to {dest}"))?;
        request(&mut s, size, &mut buf)?;
        let us = start.elapsed().as_secs_f64() * 1e6;
        drop(s);
        Ok(us)
    };
    once()?;
    let lat: Vec<f64> = (0..runs).map(|_| once()).collect::<Result<_>>()?;
    Ok(serde_json::to_string(&lat)?)
}

/// The preload library, built next to this binary (`cargo build --release -p particle-preload`).
fn preload_library() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("binary has no directory")?;
    let lib = dir.join("libparticle_preload.so");
    if !lib.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p particle-preload` (or the profile of this binary)",
            lib.display()
        );
    }
    Ok(lib)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Baseline,
    Dummy,
    Reuse,
}

fn run_client(
    ns: &NetNs,
    mode: Mode,
    dest: SocketAddr,
    runs: usize,
    lib: &Path,
    socket: &Path,
) -> Result<Vec<f64>> {
    let exe = std::env::current_exe()?;
    let mut cmd = ns.command(&exe);
    cmd.args([
        "bench",
        "reuse-client",
        "--dest",
        &dest.to_string(),
        "--runs",
        &runs.to_string(),
    ]);
    cmd.env_remove("LD_PRELOAD");
    match mode {
        Mode::Baseline => {}
        Mode::Dummy => {
            cmd.env("LD_PRELOAD", lib)
                .env("PARTICLE_WARM_SOCKET", socket)
                .env("PARTICLE_PRELOAD_MODE", "passthrough");
        }
        Mode::Reuse => {
            cmd.env("LD_PRELOAD", lib)
                .env("PARTICLE_WARM_SOCKET", socket);
        }
    }
    let out = cmd.output().context("running the client")?;
    if !out.status.success() {
        bail!(
            "{mode:?} client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{mode:?} client output"))
}

/// Average RTT reported by `ping` from `ns` to `ip`.
fn ping_rtt_ms(ns: &NetNs, ip: &str) -> Result<f64> {
    let out = ns
        .command("ping")
        .args(["-q", "-c", "50", "-i", "0.01", ip])
        .output()
        .context("running ping (iputils-ping)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "rtt min/avg/max/mdev = 1.01/1.10/1.31/0.05 ms"
    let avg = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok());
    avg.with_context(|| format!("no RTT in ping's output: {text}"))
}

fn ip(ns: &NetNs, args: &[&str]) -> Result<()> {
    let out = ns.command("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn tc(ns: &NetNs, args: &[&str]) -> Result<()> {
    let out = ns.command("tc").args(args).output().context("running tc")?;
    if !out.status.success() {
        bail!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> f64 {
    percentile(&mut v, 50.0).as_secs_f64() * 1e3
}

fn to_durations(us: &[f64]) -> Vec<Duration> {
    us.iter()
        .map(|u| Duration::from_secs_f64(u / 1e6))
        .collect()
}

pub fn run(opts: &Options) -> Result<Report> {
    if opts.runs < ROUNDS {
        bail!("--runs must be at least {ROUNDS}");
    }
    if !(0.0..=1000.0).contains(&opts.delay_ms) {
        bail!("--delay-ms must be between 0 and 1000");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("bench reuse creates namespaces and links: run it as root");
    }
    let lib = preload_library()?;
    particle_net::limits::raise_open_files().context("raising the open-file limit")?;
    let gc = particle_net::gc::collect(None);
    if gc.removed() > 0 {
        tracing::info!("collected {} leftovers of crashed runs", gc.removed());
    }
    let run = Run::start()?;
    let mut fabric = ScratchNode::new(run.prefix(), AddressBlock::parse(FABRIC_BLOCK)?)
        .context("creating the fabric namespace")?;
    let hosts = fabric.hosts(2).context("creating the two hosts")?;
    let (a, b) = (&hosts[0], &hosts[1]);

    // The hosts' links leave the fabric's bridge; the delay line joins them instead.
    let ends: Vec<String> = hosts.iter().map(|h| h.host_ifname().to_string()).collect();
    for end in &ends {
        ip(&fabric.netns, &["link", "set", "dev", end, "nomaster"])?;
    }
    let delay = Duration::from_secs_f64(opts.delay_ms / 1e3);
    let line = DelayLine::start(&fabric.netns, &ends[0], &ends[1], delay)?;
    if opts.link_mbit > 0 {
        let rate = format!("{}mbit", opts.link_mbit);
        for end in &ends {
            tc(
                &fabric.netns,
                &[
                    "qdisc", "add", "dev", end, "root", "tbf", "rate", &rate, "burst", "256kb",
                    "latency", "20ms",
                ],
            )?;
        }
    }
    // The server's host keeps its window over idle too (the agent does the same on A).
    b.netns()
        .run_in(|| std::fs::write("/proc/sys/net/ipv4/tcp_slow_start_after_idle", "0"))?
        .context("setting tcp_slow_start_after_idle on the server's host")?;
    let dest = SocketAddr::new(b.address().ip().into(), SERVER_PORT);
    let listener = b
        .netns()
        .run_in(|| TcpListener::bind(dest))?
        .with_context(|| format!("server on {dest}"))?;
    std::thread::spawn(move || serve(listener));
    let ping_rtt_ms = ping_rtt_ms(a.netns(), &b.address().ip().to_string())?;

    let socket = PathBuf::from(format!("/run/particle/{}-warm.sock", run.prefix()));
    let mut config = WarmConfig::new(socket.clone());
    config.destinations = vec![WarmDestination {
        addr: dest,
        tenants: vec![ANY_TENANT.into()],
    }];
    config.pool_size = 2;
    config.max_idle = 4;
    config.slow_start_after_idle_off = true;
    // The bench's clients are its own processes: every caller counts as one tenant.
    let warm = WarmService::start(config, a.netns(), Arc::new(|_| Some("bench".to_string())))?;
    if !warm.wait_ready(Duration::from_secs(10)) {
        bail!("the warm pool did not fill: {:?}", warm.stats());
    }

    // 1. Request latency, the three modes in alternating rounds.
    let per_round = opts.runs / ROUNDS;
    let (mut base, mut dummy, mut reuse) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        base.extend(run_client(
            a.netns(),
            Mode::Baseline,
            dest,
            per_round,
            &lib,
            &socket,
        )?);
        dummy.extend(run_client(
            a.netns(),
            Mode::Dummy,
            dest,
            per_round,
            &lib,
            &socket,
        )?);
        reuse.extend(run_client(
            a.netns(),
            Mode::Reuse,
            dest,
            per_round,
            &lib,
            &socket,
        )?);
    }
    if warm.stats().handed_out < reuse.len() as u64 {
        bail!(
            "the reuse client did not get warm connections: {:?}",
            warm.stats()
        );
    }
    let (mut base, mut dummy, mut reuse) = (
        to_durations(&base),
        to_durations(&dummy),
        to_durations(&reuse),
    );
    let us = |v: &mut Vec<Duration>, p: f64| percentile(v, p).as_secs_f64() * 1e6;
    let cdf: Vec<CdfPoint> = CDF_PERCENTILES
        .iter()
        .map(|&p| CdfPoint {
            percentile: p,
            baseline_us: us(&mut base, p),
            dummy_us: us(&mut dummy, p),
            reuse_us: us(&mut reuse, p),
        })
        .collect();

    // 2. Flow completion times, inside host A.
    let (flows, warm_misses, tcp_srtt_ms) = a
        .netns()
        .run_in(|| flow_experiment(&socket, dest, opts.flow_runs))?
        .context("flow completion experiment")?;
    let (forwarded, send_errors) = line.counts();
    tracing::info!("delay line: {forwarded} frames forwarded, {send_errors} refused");

    let plot = match &opts.plot {
        Some(path) => {
            std::fs::write(path, cdf_svg(&base, &dummy, &reuse, opts.delay_ms))
                .with_context(|| format!("writing {}", path.display()))?;
            Some(path.display().to_string())
        }
        None => None,
    };
    let stats = warm.stats();
    drop(warm);
    drop(line);
    let report = Report {
        runs: per_round * ROUNDS,
        flow_runs: opts.flow_runs,
        delay_ms: opts.delay_ms,
        netem: false,
        delay_emulation: "tc netem is not available on this kernel (CONFIG_NET_SCH_NETEM unset); \
             a userspace delay line (AF_PACKET sockets in the fabric namespace) holds every frame \
             for the one-way delay in each direction"
            .into(),
        link_mbit: opts.link_mbit,
        ping_rtt_ms,
        tcp_srtt_ms,
        baseline_p50_us: us(&mut base, 50.0),
        dummy_p50_us: us(&mut dummy, 50.0),
        reuse_p50_us: us(&mut reuse, 50.0),
        baseline_p99_us: us(&mut base, 99.0),
        dummy_p99_us: us(&mut dummy, 99.0),
        reuse_p99_us: us(&mut reuse, 99.0),
        reuse_vs_baseline_p50: us(&mut reuse, 50.0) / us(&mut base, 50.0),
        cdf,
        flows,
        warm_misses,
        warm: stats,
        plot,
    };
    drop(hosts);
    drop(fabric);
    drop(run);
    Ok(report)
}

/// Runs on a thread inside host A: new vs warm flows, quiet and congested.
fn flow_experiment(
    socket: &Path,
    dest: SocketAddr,
    runs: usize,
) -> Result<(Vec<Flow>, usize, f64)> {
    let mut client = WarmClient::connect(socket)?;
    let mut buf = vec![0u8; 256 * 1024];
    // Ramp the pooled connections as earlier invocations would have.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = client.get(dest)?;
        request(&mut s, 8_000_000, &mut buf)?;
        held.push(s);
    }
    for s in held {
        client.put(s)?;
    }
    let tcp_srtt_ms = {
        let s = client.get(dest)?;
        let info =
            particle_node_agent::warm_connections::health::tcp_info(std::os::fd::AsFd::as_fd(&s))?;
        client.put(s)?;
        f64::from(info.tcpi_rtt) / 1e3
    };
    let mut flows = Vec::new();
    let mut misses = 0;
    for congested in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let bulk = if congested {
            let stop = stop.clone();
            // Spawned from this thread, so it runs in host A's namespace too.
            let mut s = TcpStream::connect(dest)?;
            s.write_all(&FOREVER.to_be_bytes())?;
            let t = std::thread::spawn(move || {
                let mut sink = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if matches!(s.read(&mut sink), Ok(0) | Err(_)) {
                        return;
                    }
                }
            });
            // Let it fill the bottleneck before measuring.
            std::thread::sleep(Duration::from_secs(1));
            Some(t)
        } else {
            None
        };
        for size in FLOW_SIZES {
            let (mut new, mut warm) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let start = Instant::now();
                let mut s = TcpStream::connect(dest)?;
                request(&mut s, size, &mut buf)?;
                new.push(start.elapsed());
                drop(s);
                let start = Instant::now();
                let (mut s, pooled) = WarmClient::get_or_connect(Some(&mut client), dest)?;
                request(&mut s, size, &mut buf)?;
                warm.push(start.elapsed());
                if pooled {
                    client.put(s)?;
                } else {
                    misses += 1;
                }
            }
            flows.push(Flow {
                size_bytes: size,
                congested,
                fct_new_ms: median(new),
                fct_warm_ms: median(warm),
            });
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(t) = bulk {
            let _ = t.join();
        }
    }
    Ok((flows, misses, tcp_srtt_ms))
}

/// The latency CDFs as a small SVG.
fn cdf_svg(base: &[Duration], dummy: &[Duration], reuse: &[Duration], delay_ms: f64) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 400.0, 60.0, 50.0, 30.0, 20.0);
    let sorted = |v: &[Duration]| {
        let mut v: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let series = [
        ("baseline", "#d62728", sorted(base)),
        ("dummy preload", "#7f7f7f", sorted(dummy)),
        ("reuse", "#1f77b4", sorted(reuse)),
    ];
    // The x axis stops at the slowest series' 99th percentile.
    let xmax = series
        .iter()
        .filter_map(|(_, _, v)| v.get(v.len().saturating_sub(1) * 99 / 100).copied())
        .fold(1.0, f64::max)
        * 1.05;
    let x = |us: f64| left + (us / xmax).min(1.0) * (w - left - right);
    let y = |q: f64| h - bottom - q * (h - bottom - top);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" text-anchor="middle">Request latency, connect to completion (one-way delay {delay_ms} ms)</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">latency (µs)</text><text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">CDF</text>
"#,
        w / 2.0,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom,
        w / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    for i in 0..=5 {
        let us = xmax * f64::from(i) / 5.0;
        svg += &format!(
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{us:.0}</text>"#,
            x(us),
            h - bottom + 16.0
        );
        let q = f64::from(i) / 5.0;
        svg += &format!(
            r#"<text x="{}" y="{:.1}" text-anchor="end">{q:.1}</text>"#,
            left - 6.0,
            y(q) + 4.0
        );
    }
    for (k, (name, color, v)) in series.iter().enumerate() {
        let n = v.len().max(1) as f64;
        let points: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(i, us)| format!("{:.1},{:.1}", x(*us), y((i + 1) as f64 / n)))
            .collect();
        svg += &format!(
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
        let ly = top + 16.0 * k as f64 + 10.0;
        svg += &format!(
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            w - 170.0,
            w - 145.0,
            w - 140.0,
            ly + 4.0
        );
    }
    svg + "</svg>\n"
}

/// The table.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    out += &format!(
        "underlay: {} ms one way, emulated by a userspace delay line (tc netem is not available on this kernel); \
         measured ping RTT {:.3} ms, TCP srtt {:.3} ms; link {}\n\n",
        r.delay_ms,
        r.ping_rtt_ms,
        r.tcp_srtt_ms,
        if r.link_mbit > 0 { format!("{} Mbit/s (tbf)", r.link_mbit) } else { "unshaped".into() }
    );
    out += &format!(
        "request latency, connect to completion ({} requests each), µs\n",
        r.runs
    );
    out += &format!(
        "{:>10} {:>10} {:>10} {:>10}\n",
        "percentile", "baseline", "dummy", "reuse"
    );
    for p in &r.cdf {
        out += &format!(
            "{:>10} {:>10.0} {:>10.0} {:>10.0}\n",
            format!("p{}", p.percentile),
            p.baseline_us,
            p.dummy_us,
            p.reuse_us
        );
    }
    out += &format!(
        "reuse p50 / baseline p50: {:.2}\n\n",
        r.reuse_vs_baseline_p50
    );
    out += &format!(
        "flow completion time, median of {} flows, ms\n",
        r.flow_runs
    );
    out += &format!(
        "{:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "size", "load", "new", "warm", "saved"
    );
    for f in &r.flows {
        out += &format!(
            "{:>10} {:>10} {:>10.2} {:>10.2} {:>10.2}\n",
            f.size_bytes,
            if f.congested { "bulk flow" } else { "quiet" },
            f.fct_new_ms,
            f.fct_warm_ms,
            f.fct_new_ms - f.fct_warm_ms
        );
    }
    if let Some(p) = &r.plot {
        out += &format!("\nCDF plot: {p}\n");
    }
    out
}

//! `particle bench startup`'s report: per system the time from "launch M
//! functions" to "every function runs and has reached a peer on another
//! node" (the ring probe's `reached_ns`), per-function startup percentiles,
//! ratios to Particle warm, and the startup-vs-M plot. The runs themselves
//! are driven by [`super::run`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{bail, Result};
use particle_workloads::ring::{parse_probe, REACHED};
use serde::Serialize;

use crate::cni_add::CniAddReport;
use crate::peaks::{ClusterMemory, NeighbourTable};

/// The systems, in the order they are reported (the JSON keys).
pub const SYSTEMS: [&str; 8] = [
    "particle-warm",
    "particle-cold",
    "particle-default",
    "linux-overlay",
    "cni-bridge",
    "docker-swarm",
    "no-network",
    "particle-cni",
];

/// One burst of one system.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Burst {
    pub functions: usize,
    /// Launch to the last function having reached its peer.
    pub total_s: f64,
    /// Launch to a function having reached its peer.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Reads every function's `reached_ns` and measures from `submitted_ns`.
/// A function that never reached its peer fails the burst.
pub fn burst(submitted_ns: u128, stdouts: &[String]) -> Result<Burst> {
    let mut startup_ms = Vec::with_capacity(stdouts.len());
    for (rank, out) in stdouts.iter().enumerate() {
        let Some(reached) = parse_probe(out, REACHED) else {
            bail!("function {rank} never reached its peer:\n{out}");
        };
        startup_ms.push(reached.saturating_sub(submitted_ns) as f64 / 1e6);
    }
    if startup_ms.is_empty() {
        bail!("no function ran");
    }
    startup_ms.sort_by(f64::total_cmp);
    let at = |p: f64| startup_ms[((startup_ms.len() - 1) as f64 * p).round() as usize];
    Ok(Burst {
        functions: stdouts.len(),
        total_s: startup_ms[startup_ms.len() - 1] / 1e3,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    })
}

/// One system in the report: its result at the largest burst, the sweep
/// for the plot, or why it did not run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SystemReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// total_s / Particle warm's total_s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_particle: Option<f64>,
    /// total_s / the no-network floor's total_s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_floor: Option<f64>,
    /// Where the largest burst's endpoints came from (Particle's systems).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Origins>,
    /// The kernel's neighbour table over the largest burst.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neighbour_table: Option<NeighbourTable>,
    /// Peak memory of the cluster the system ran on, over its whole life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<ClusterMemory>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sweep: Vec<Burst>,
    /// Per-ADD times (`particle-cni` and `cni-bridge`, from `bench cni`'s measurement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// Endpoints of a job by where they came from: the tenant's warm pool,
/// bound from the tenant-free pool, or built at launch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Origins {
    pub warm: usize,
    pub bound: usize,
    pub cold: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    pub nodes: usize,
    pub functions: usize,
    pub systems: BTreeMap<String, SystemReport>,
    /// Where the plot was written.
    pub plot: Option<String>,
}

impl StartupReport {
    pub fn new(nodes: usize, functions: usize) -> Self {
        Self {
            nodes,
            functions,
            systems: BTreeMap::new(),
            plot: None,
        }
    }

    pub fn add_burst(&mut self, system: &str, b: Burst) {
        let s = self.systems.entry(system.to_string()).or_default();
        s.sweep.push(b);
        if b.functions == self.functions {
            s.total_s = Some(b.total_s);
            s.p50_ms = Some(b.p50_ms);
            s.p99_ms = Some(b.p99_ms);
        }
    }

    /// What the largest burst of `system` took besides time.
    pub fn add_details(&mut self, system: &str, endpoints: Origins, table: NeighbourTable) {
        let s = self.systems.entry(system.to_string()).or_default();
        s.endpoints = (endpoints != Origins::default()).then_some(endpoints);
        s.neighbour_table = Some(table);
    }

    pub fn add_memory(&mut self, system: &str, memory: ClusterMemory) {
        self.systems.entry(system.to_string()).or_default().memory = Some(memory);
    }

    pub fn skip(&mut self, system: &str, why: impl Into<String>) {
        let s = self.systems.entry(system.to_string()).or_default();
        if s.skipped.is_none() && s.total_s.is_none() {
            s.skipped = Some(why.into());
        }
    }

    /// Per-ADD times of the CNI measurement, as the `particle-cni` system
    /// (and `cni-bridge`'s ADD beside its launch times).
    pub fn add_cni(&mut self, cni: &CniAddReport) {
        for (name, key) in [
            ("particle-cni", "particle-cni"),
            ("cni-bridge", "cni-bridge"),
        ] {
            if let Some(t) = cni.systems.get(key) {
                let s = self.systems.entry(name.to_string()).or_default();
                s.add_p50_ms = Some(t.add_p50_ms);
                s.add_p99_ms = Some(t.add_p99_ms);
            }
        }
    }

    /// Fills in every ratio to Particle warm and to the floor.
    pub fn finish(&mut self) {
        let total = |name: &str| {
            self.systems
                .get(name)
                .and_then(|s| s.total_s)
                .filter(|t| *t > 0.0)
        };
        let (warm, floor) = (total("particle-warm"), total("no-network"));
        for s in self.systems.values_mut() {
            s.ratio_to_particle = s.total_s.zip(warm).map(|(t, base)| t / base);
            s.ratio_to_floor = s.total_s.zip(floor).map(|(t, base)| t / base);
        }
    }
}

pub fn render(r: &StartupReport) -> String {
    let mut out = format!(
        "startup: {} functions over {} nodes (launch → every function has reached a peer on another node)\n",
        r.functions, r.nodes
    );
    let _ = writeln!(
        out,
        "{:<16} {:>9} {:>10} {:>10} {:>10} {:>8} {:>10}",
        "system", "total (s)", "p50 (ms)", "p99 (ms)", "x particle", "x floor", "ADD p50"
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for name in SYSTEMS {
        let Some(s) = r.systems.get(name) else {
            continue;
        };
        if let Some(why) = &s.skipped {
            let _ = writeln!(out, "{name:<16} skipped: {why}");
            continue;
        }
        let _ = writeln!(
            out,
            "{name:<16} {:>9} {:>10} {:>10} {:>10} {:>8} {:>10}",
            opt(s.total_s, 3),
            opt(s.p50_ms, 1),
            opt(s.p99_ms, 1),
            opt(s.ratio_to_particle, 2),
            opt(s.ratio_to_floor, 2),
            s.add_p50_ms.map_or("-".into(), |v| format!("{v:.2} ms")),
        );
    }
    render_details(&mut out, r);
    if let Some(p) = &r.plot {
        let _ = writeln!(out, "plot: {p}");
    }
    out
}

/// Per system at the largest burst: where its endpoints came from, the
/// neighbour table, the cluster's peak memory.
fn render_details(out: &mut String, r: &StartupReport) {
    for name in SYSTEMS {
        let Some(s) = r.systems.get(name).filter(|s| s.skipped.is_none()) else {
            continue;
        };
        let mut parts = Vec::new();
        if let Some(e) = s.endpoints {
            parts.push(format!(
                "endpoints {} warm / {} bound / {} cold",
                e.warm, e.bound, e.cold
            ));
        }
        if let Some(t) = s.neighbour_table {
            parts.push(format!(
                "ARP table peak {} entries (permanent included; gc_thresh3 {}), {} forced GC, {} overflows",
                t.peak_entries, t.gc_thresh3, t.forced_gc_runs, t.overflows
            ));
        }
        if let Some(m) = s.memory {
            parts.push(format!(
                "peak memory: controller {:.1} MiB, agents {:.1} MiB max / {:.1} MiB total",
                m.controller_peak_kib as f64 / 1024.0,
                m.agent_peak_kib as f64 / 1024.0,
                m.agents_peak_kib_total as f64 / 1024.0
            ));
        }
        if !parts.is_empty() {
            let _ = writeln!(out, "  {name}: {}", parts.join("; "));
        }
    }
}

const COLOURS: [&str; 8] = [
    "#d62728", "#ff7f0e", "#e377c2", "#1f77b4", "#2ca02c", "#9467bd", "#7f7f7f", "#8c564b",
];

/// Startup time (launch to every function reached a peer) against the
/// number of functions, one line per system, as the paper's figures show it.
pub fn plot_svg(r: &StartupReport) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 440.0, 70.0, 50.0, 40.0, 170.0);
    let series: Vec<(&str, &[Burst])> = SYSTEMS
        .iter()
        .filter_map(|n| r.systems.get(*n).map(|s| (*n, s.sweep.as_slice())))
        .filter(|(_, s)| !s.is_empty())
        .collect();
    let max_x = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|b| b.functions))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let max_y = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|b| b.total_s))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.1;
    let x = |v: f64| left + v / max_x * (w - left - right);
    let y = |v: f64| h - bottom - v / max_y * (h - bottom - top);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="14">Startup of a burst over {} nodes: launch → all functions reached a peer</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">functions</text>
<text x="18" y="{}" transform="rotate(-90 18 {})" text-anchor="middle">seconds</text>
"#,
        left,
        r.nodes,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom,
        (left + w - right) / 2.0,
        h - 12.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
    );
    for i in 0..=4 {
        let v = max_y * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{v:.2}</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>"##,
            left - 6.0,
            y(v) + 4.0,
            y(v),
            w - right,
            y(v)
        );
        let xv = max_x * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{xv:.0}</text>"#,
            x(xv),
            h - bottom + 16.0
        );
    }
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|b| format!("{:.1},{:.1}", x(b.functions as f64), y(b.total_s)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for b in points.iter() {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                x(b.functions as f64),
                y(b.total_s)
            );
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            w - right + 12.0,
            w - right + 32.0,
            w - right + 38.0,
            ly + 4.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(reached_ms: u128) -> String {
        format!(
            "started_ns=1\n{REACHED}={} peer=1\n",
            1_000_000_000 + reached_ms * 1_000_000
        )
    }

    #[test]
    fn bursts_measure_from_launch_and_fail_on_a_missing_probe() {
        let outs: Vec<String> = (1..=100).map(out).collect();
        let b = burst(1_000_000_000, &outs).unwrap();
        assert_eq!(b.functions, 100);
        assert!((b.total_s - 0.1).abs() < 1e-9);
        assert!((b.p50_ms - 51.0).abs() < 1e-9, "{b:?}");
        assert!((b.p99_ms - 99.0).abs() < 1e-9, "{b:?}");
        let mut broken = outs.clone();
        broken[7] = "started_ns=1\n".into();
        assert!(burst(1_000_000_000, &broken)
            .unwrap_err()
            .to_string()
            .contains("function 7"));
    }

    #[test]
    fn report_ratios_skips_and_plot() {
        let mut r = StartupReport::new(4, 100);
        let b = |f, t| Burst {
            functions: f,
            total_s: t,
            p50_ms: 1.0,
            p99_ms: 2.0,
        };
        r.add_burst("particle-warm", b(50, 0.1));
        r.add_burst("particle-warm", b(100, 0.2));
        r.add_burst("linux-overlay", b(100, 2.0));
        r.add_burst("no-network", b(100, 0.1));
        r.skip("docker-swarm", "no docker");
        r.finish();
        assert_eq!(r.systems["linux-overlay"].ratio_to_particle, Some(10.0));
        assert_eq!(r.systems["linux-overlay"].ratio_to_floor, Some(20.0));
        assert_eq!(r.systems["particle-warm"].ratio_to_particle, Some(1.0));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["systems"]["docker-swarm"]["skipped"], "no docker");
        assert_eq!(json["systems"]["linux-overlay"]["total_s"], 2.0);
        let svg = plot_svg(&r);
        assert!(svg.contains("polyline") && svg.contains("linux-overlay"));
        assert!(render(&r).contains("skipped: no docker"));
    }
}

//! `particle bench soak`'s report: bursts launched and ended for a while,
//! their startup over time, errors, and what every agent held at the start
//! and at the end (which must match: nothing leaks). The soak itself is
//! driven by [`super::run`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::agent_resources::AgentResources;

/// Counters reported as growth rather than leaks: the allocator keeps what
/// it got (RSS is bounded, not restored) and tokio's blocking threads idle
/// for 10 s before they exit. Every other counter must come back exactly.
pub const GROWTH_COUNTERS: [&str; 2] = ["rss_kib", "threads"];

/// One window of the soak: how startup behaved in it.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Seconds since the soak began, at the window's end.
    pub t_s: f64,
    pub jobs: usize,
    pub functions: usize,
    /// Launch to a function having reached its peer, over the window's functions.
    pub startup_p50_ms: f64,
    pub startup_p99_ms: f64,
}

/// One agent, at the start and the end.
#[derive(Debug, Clone, Serialize)]
pub struct AgentCensus {
    pub node: String,
    pub start: AgentResources,
    pub end: AgentResources,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub nodes: usize,
    pub tenants: usize,
    pub duration_s: f64,
    /// Jobs run to their end (ring bursts) or cancelled while running.
    pub jobs: usize,
    pub cancelled_jobs: usize,
    pub functions: usize,
    pub errors: usize,
    /// The first few errors, verbatim.
    pub error_samples: Vec<String>,
    pub startup_over_time: Vec<Window>,
    /// Counter → end minus start, summed over agents; all zero when
    /// nothing leaked (memory and threads are in `growth`).
    pub leaked: BTreeMap<String, i64>,
    /// [`GROWTH_COUNTERS`]: end minus start, summed over agents.
    pub growth: BTreeMap<String, i64>,
    pub agents: Vec<AgentCensus>,
}

impl SoakReport {
    /// Sums every agent's end-minus-start into `leaked` and `growth`.
    pub fn tally(&mut self) {
        self.leaked.clear();
        self.growth.clear();
        for a in &self.agents {
            for (name, d) in a.start.delta(&a.end) {
                let into = if GROWTH_COUNTERS.contains(&name.as_str()) {
                    &mut self.growth
                } else {
                    &mut self.leaked
                };
                *into.entry(name).or_default() += d;
            }
        }
    }

    /// Counters that did not come back to their starting level.
    pub fn leaks(&self) -> Vec<(&str, i64)> {
        self.leaked
            .iter()
            .filter(|(_, d)| **d != 0)
            .map(|(n, d)| (n.as_str(), *d))
            .collect()
    }
}

/// Groups (seconds since start, startup ms) samples of whole jobs into
/// windows of `width_s`; `jobs` holds (end of job s, its functions' startups).
pub fn windows(jobs: &[(f64, Vec<f64>)], width_s: f64) -> Vec<Window> {
    let mut out: Vec<Window> = Vec::new();
    let mut samples: Vec<f64> = Vec::new();
    let mut count = 0;
    let mut edge = width_s;
    let mut flush = |edge: f64, samples: &mut Vec<f64>, count: &mut usize| {
        if *count == 0 {
            return;
        }
        samples.sort_by(f64::total_cmp);
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        out.push(Window {
            t_s: edge,
            jobs: *count,
            functions: samples.len(),
            startup_p50_ms: at(0.5),
            startup_p99_ms: at(0.99),
        });
        samples.clear();
        *count = 0;
    };
    for (t, startups) in jobs {
        while *t > edge {
            flush(edge, &mut samples, &mut count);
            edge += width_s;
        }
        if !startups.is_empty() {
            samples.extend(startups);
            count += 1;
        }
    }
    flush(edge, &mut samples, &mut count);
    out
}

pub fn render(r: &SoakReport) -> String {
    let mut out = format!(
        "soak: {:.0} s over {} nodes, {} tenants: {} jobs ({} cancelled mid-run), {} functions, {} errors\n",
        r.duration_s, r.nodes, r.tenants, r.jobs, r.cancelled_jobs, r.functions, r.errors
    );
    for e in &r.error_samples {
        let _ = writeln!(out, "  error: {e}");
    }
    let _ = writeln!(out, "startup over time (launch → function reached a peer):");
    let _ = writeln!(
        out,
        "  {:>7} {:>6} {:>10} {:>9} {:>9}",
        "t (s)", "jobs", "functions", "p50 (ms)", "p99 (ms)"
    );
    for w in &r.startup_over_time {
        let _ = writeln!(
            out,
            "  {:>7.0} {:>6} {:>10} {:>9.1} {:>9.1}",
            w.t_s, w.jobs, w.functions, w.startup_p50_ms, w.startup_p99_ms
        );
    }
    let _ = writeln!(out, "held by each agent, start → end:");
    let names: Vec<&str> = r
        .agents
        .first()
        .map(|a| a.start.counters().iter().map(|(n, _)| *n).collect())
        .unwrap_or_default();
    let _ = write!(out, "  {:<6}", "node");
    for n in &names {
        let _ = write!(out, " {n:>16}");
    }
    out.push('\n');
    for a in &r.agents {
        let _ = write!(out, "  {:<6}", a.node);
        for ((_, s), (_, e)) in a.start.counters().iter().zip(a.end.counters()) {
            let _ = write!(out, " {:>16}", format!("{s} → {e}"));
        }
        out.push('\n');
    }
    let leaks = r.leaks();
    if leaks.is_empty() {
        let _ = writeln!(out, "nothing leaked: every counter back at its start");
    } else {
        let _ = writeln!(out, "LEAKED: {leaks:?}");
    }
    let _ = writeln!(out, "growth (not leaks): {:?}", r.growth);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_group_jobs_by_their_end() {
        let jobs = vec![
            (1.0, vec![10.0, 20.0]),
            (9.0, vec![30.0]),
            (25.0, vec![5.0]),
            (26.0, vec![]), // a cancelled job: no startups
        ];
        let w = windows(&jobs, 10.0);
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].t_s, w[0].jobs, w[0].functions), (10.0, 2, 3));
        assert_eq!(w[0].startup_p99_ms, 30.0);
        assert_eq!((w[1].t_s, w[1].jobs, w[1].startup_p50_ms), (30.0, 1, 5.0));
    }

    #[test]
    fn tally_separates_memory_and_finds_leaks() {
        let start = AgentResources {
            links: 10,
            rss_kib: 1000,
            ..Default::default()
        };
        let mut end = start.clone();
        end.rss_kib = 1500;
        end.threads = 2;
        let mut r = SoakReport {
            nodes: 1,
            tenants: 1,
            duration_s: 1.0,
            jobs: 0,
            cancelled_jobs: 0,
            functions: 0,
            errors: 0,
            error_samples: vec![],
            startup_over_time: vec![],
            leaked: BTreeMap::new(),
            growth: BTreeMap::new(),
            agents: vec![AgentCensus {
                node: "n0".into(),
                start: start.clone(),
                end: end.clone(),
            }],
        };
        r.tally();
        assert!(r.leaks().is_empty(), "{:?}", r.leaked);
        assert_eq!(r.growth["rss_kib"], 500);
        assert_eq!(r.growth["threads"], 2);
        assert_eq!(r.leaked["links"], 0);
        r.agents[0].end.links = 11;
        r.tally();
        assert_eq!(r.leaks(), vec![("links", 1)]);
        assert!(render(&r).contains("LEAKED"));
    }
}

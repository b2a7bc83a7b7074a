//! The video pipeline as a benchmark and a demo: the function command line,
//! and what a finished run's outputs say (job time, startup percentiles, the
//! output checked by decoding it, whether the neighbour exchange crossed
//! nodes). Whatever launched the functions (Particle, a baseline, plain
//! processes) hands over each function's node and output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use particle_workloads::ring::{parse_probe, STARTED};
use particle_workloads::timeline::fields;
use serde::Serialize;

use crate::stats::percentile;
use crate::timeline::Row;

/// The job: how big a video, split over how many functions.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub functions: usize,
    pub frames: usize,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    /// Where the collector writes the stream (a path every node sees).
    pub output: PathBuf,
    pub timeout: Duration,
    /// Run the functions under `nice -n N`: a burst that fills every core
    /// must not starve the control plane (agents' heartbeats) on a small machine.
    pub nice: Option<u8>,
}

impl PipelineSpec {
    /// `frames_per_function` frames for each of `functions`.
    pub fn new(functions: usize, frames_per_function: usize, output: PathBuf) -> Self {
        Self {
            functions,
            frames: functions * frames_per_function.max(1),
            width: 320,
            height: 240,
            seed: 1,
            output,
            timeout: Duration::from_secs(300),
            nice: None,
        }
    }

    /// The command every function runs.
    pub fn argv(&self, program: &Path) -> Vec<String> {
        let mut argv = match self.nice {
            Some(n) => vec!["nice".into(), "-n".into(), n.to_string()],
            None => Vec::new(),
        };
        argv.extend([
            program.display().to_string(),
            "--output".into(),
            self.output.display().to_string(),
            "--width".into(),
            self.width.to_string(),
            "--height".into(),
            self.height.to_string(),
            "--frames".into(),
            self.frames.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--timeout-s".into(),
            self.timeout.as_secs().max(1).to_string(),
        ]);
        argv
    }
}

/// One function's run, as its launcher saw it.
#[derive(Debug, Clone)]
pub struct FunctionRun {
    pub rank: usize,
    pub node: String,
    pub stdout: String,
}

/// What a pipeline run measured and checked.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineResult {
    pub functions: usize,
    pub nodes: usize,
    /// From submission to the last function's end.
    pub job_s: f64,
    /// From submission to each function's start.
    pub startup_p50_ms: f64,
    pub startup_p90_ms: f64,
    pub startup_p99_ms: f64,
    pub startup_max_ms: f64,
    pub frames: usize,
    pub width: usize,
    pub height: usize,
    pub output_bytes: usize,
    /// Boundary frames received, and how many came from another node.
    pub exchanges: usize,
    pub cross_node_exchanges: usize,
    pub output: PathBuf,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Checks a finished run and measures it. Fails if a function did not
/// finish, if an exchange is missing, or if the output does not decode to
/// the spec's frames at the spec's size.
pub fn evaluate(
    spec: &PipelineSpec,
    submitted_ns: u128,
    runs: &[FunctionRun],
) -> Result<PipelineResult> {
    if runs.len() != spec.functions {
        bail!("{} of {} functions reported", runs.len(), spec.functions);
    }
    let node_of: HashMap<usize, &str> = runs.iter().map(|r| (r.rank, r.node.as_str())).collect();
    let mut startups = Vec::with_capacity(runs.len());
    let mut end_ns = submitted_ns;
    let (mut exchanges, mut cross) = (0, 0);
    for r in runs {
        let started = parse_probe(&r.stdout, STARTED)
            .with_context(|| format!("rank {} never started:\n{}", r.rank, r.stdout))?;
        let done = parse_probe(&r.stdout, "done_ns")
            .with_context(|| format!("rank {} did not finish:\n{}", r.rank, r.stdout))?;
        startups.push(Duration::from_nanos(
            started.saturating_sub(submitted_ns) as u64
        ));
        end_ns = end_ns.max(done);
        let mut from_ranks = Vec::new();
        for line in r.stdout.lines().filter(|l| l.starts_with("exchanged ")) {
            let f: HashMap<&str, &str> = fields(line).collect();
            let from: usize = f
                .get("from")
                .and_then(|v| v.parse().ok())
                .context("exchange line")?;
            from_ranks.push(from);
            exchanges += 1;
            if f.get("node").copied() != node_of.get(&r.rank).copied() {
                cross += 1;
            }
        }
        let want = usize::from(r.rank > 0) + usize::from(r.rank + 1 < spec.functions);
        if from_ranks.len() != want {
            bail!("rank {} exchanged with {from_ranks:?}", r.rank);
        }
    }

    let stream = std::fs::read(&spec.output)
        .with_context(|| format!("reading the output {}", spec.output.display()))?;
    let frames = particle_video::decode(&stream).context("decoding the output")?;
    let (width, height) = frames.first().map_or((0, 0), |f| (f.width, f.height));
    if frames.len() != spec.frames || (width, height) != (spec.width, spec.height) {
        bail!(
            "the output has {} frames of {width}x{height}, expected {} of {}x{}",
            frames.len(),
            spec.frames,
            spec.width,
            spec.height
        );
    }

    let nodes = node_of
        .values()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    Ok(PipelineResult {
        functions: runs.len(),
        nodes,
        job_s: (end_ns - submitted_ns) as f64 / 1e9,
        startup_p50_ms: ms(percentile(&mut startups, 50.0)),
        startup_p90_ms: ms(percentile(&mut startups, 90.0)),
        startup_p99_ms: ms(percentile(&mut startups, 99.0)),
        startup_max_ms: ms(percentile(&mut startups, 100.0)),
        frames: frames.len(),
        width,
        height,
        output_bytes: stream.len(),
        exchanges,
        cross_node_exchanges: cross,
        output: spec.output.clone(),
    })
}

/// The timeline plot's rows, by rank.
pub fn timeline_rows(submitted_ns: u128, runs: &[FunctionRun]) -> Vec<Row> {
    let mut runs: Vec<&FunctionRun> = runs.iter().collect();
    runs.sort_by_key(|r| r.rank);
    runs.iter()
        .map(|r| {
            Row::from_output(
                format!("{} {}", r.rank, r.node),
                &r.stdout,
                Some(submitted_ns),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use particle_workloads::local::local_envs;
    use particle_workloads::ring::now_ns;

    /// The functions in threads on loopback (this test's ports: 18330..18334):
    /// the evaluation accepts a good run and refuses broken ones.
    #[test]
    fn a_local_run_evaluates_and_a_bad_output_is_refused() {
        let dir =
            std::env::temp_dir().join(format!("particle-bench-pipeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut spec = PipelineSpec::new(4, 2, dir.join("out.h264"));
        spec.width = 64;
        spec.height = 48;
        let opts = particle_video::VideoOptions {
            width: spec.width,
            height: spec.height,
            frames: spec.frames,
            seed: spec.seed,
            output: spec.output.clone(),
            timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let envs = local_envs("bench-pipeline", 4, 18330, 2);
        let submitted = now_ns();
        let handles: Vec<_> = envs
            .iter()
            .cloned()
            .map(|env| {
                let opts = opts.clone();
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    particle_video::run(&env, &opts, &mut out).unwrap();
                    FunctionRun {
                        rank: env.rank,
                        node: env.node,
                        stdout: String::from_utf8(out).unwrap(),
                    }
                })
            })
            .collect();
        let runs: Vec<FunctionRun> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let r = evaluate(&spec, submitted, &runs).unwrap();
        assert_eq!(
            (r.functions, r.nodes, r.frames, r.width, r.height),
            (4, 2, 8, 64, 48)
        );
        assert_eq!((r.exchanges, r.cross_node_exchanges), (6, 6));
        assert!(r.job_s > 0.0 && r.startup_max_ms >= r.startup_p50_ms);
        assert_eq!(timeline_rows(submitted, &runs).len(), 4);

        // Everyone on one node: nothing crossed.
        let same: Vec<FunctionRun> = runs
            .iter()
            .map(|r| FunctionRun {
                rank: r.rank,
                node: "n0".into(),
                stdout: r.stdout.replace("node=n1", "node=n0"),
            })
            .collect();
        assert_eq!(
            evaluate(&spec, submitted, &same)
                .unwrap()
                .cross_node_exchanges,
            0
        );
        // A function that did not finish, and a truncated output, are errors.
        let mut cut = runs.clone();
        cut[2].stdout = cut[2].stdout.replace("done_ns", "x");
        assert!(evaluate(&spec, submitted, &cut).is_err());
        let stream = std::fs::read(&spec.output).unwrap();
        std::fs::write(&spec.output, &stream[..stream.len() / 2]).unwrap();
        assert!(evaluate(&spec, submitted, &runs).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Per-function launch times of the Docker Swarm baseline, on its own:
//! `cargo run --release -p particle-bench --example docker_swarm_launch --
//! [--hosts N] [--functions M] [--storage overlay2|vfs]` (as root). Starts a
//! swarm over N namespaced hosts, launches M ring functions and prints, per
//! function, how long its `docker run -d` took and when (after the launch
//! began) it started and had reached its peer on the other host.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_bench::baselines::docker_swarm::{Swarm, SwarmHost, SwarmOptions};
use particle_bench::stats::percentile;
use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Run};
use particle_workloads::ring::{now_ns, parse_probe, REACHED, STARTED};

fn main() -> Result<()> {
    let mut hosts_n = 2usize;
    let mut functions = 20usize;
    let mut options = SwarmOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--hosts" => hosts_n = value.parse().context("--hosts")?,
            "--functions" => functions = value.parse().context("--functions")?,
            "--storage" => options.storage_driver = value,
            _ => bail!(
                "usage: docker_swarm_launch [--hosts N] [--functions M] [--storage overlay2|vfs]"
            ),
        }
    }
    common::require_root();
    let binary = common::function_binary();
    let run = Run::start()?;
    let prefix = run.prefix().clone();
    let mut node = ScratchNode::new(&prefix, AddressBlock::parse("10.235.2.0/24")?)?;
    let hosts = node.hosts(hosts_n)?;
    let swarm_hosts: Vec<SwarmHost> = hosts
        .iter()
        .map(|h| SwarmHost {
            netns: h.netns(),
            underlay_ip: ScratchNode::underlay_of(h).address,
        })
        .collect();

    let t = Instant::now();
    let swarm = Swarm::start_with(&swarm_hosts, &prefix, &binary, &options)
        .context("Docker Swarm cannot run here")?;
    println!(
        "swarm of {hosts_n} hosts ({} storage) up in {:.2} s",
        options.storage_driver,
        t.elapsed().as_secs_f64()
    );

    let argv: Vec<String> = ["/particle-fn", "ring"].map(String::from).to_vec();
    let launch_ns = now_ns();
    let t = Instant::now();
    let runs = swarm.launch(functions, &argv)?;
    let launch_total = t.elapsed();

    let ms = |ns: u128| ns.saturating_sub(launch_ns) as f64 / 1e6;
    println!("rank host  docker-run-ms  run-returned-ms  started-ms  reached-ms  exit");
    let mut run_latencies = Vec::new();
    let mut startups = Vec::new();
    let mut all_ok = true;
    for f in &runs {
        let started = parse_probe(&f.stdout, STARTED);
        let reached = parse_probe(&f.stdout, REACHED);
        println!(
            "{:4} {:4}  {:13.1}  {:15.1}  {:10}  {:10}  {:?}",
            f.rank,
            f.node,
            f.run_latency.as_secs_f64() * 1e3,
            f.launched_after.as_secs_f64() * 1e3,
            started.map_or("-".into(), |s| format!("{:.1}", ms(s))),
            reached.map_or("-".into(), |r| format!("{:.1}", ms(r))),
            f.exit_code
        );
        run_latencies.push(f.run_latency);
        match reached {
            Some(r) => startups.push(Duration::from_nanos(r.saturating_sub(launch_ns) as u64)),
            None => all_ok = false,
        }
        all_ok &= f.exit_code == Some(0);
    }
    let last_reached = startups.iter().max().copied().unwrap_or_default();
    println!(
        "{functions} functions on {hosts_n} hosts: all reached by {:.1} ms; docker run p50 {:.1} ms p99 {:.1} ms; \
         startup p50 {:.1} ms p99 {:.1} ms; launch() returned after {:.1} ms (incl. wait, logs, rm)",
        last_reached.as_secs_f64() * 1e3,
        percentile(&mut run_latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&mut run_latencies, 99.0).as_secs_f64() * 1e3,
        percentile(&mut startups, 50.0).as_secs_f64() * 1e3,
        percentile(&mut startups, 99.0).as_secs_f64() * 1e3,
        launch_total.as_secs_f64() * 1e3,
    );
    let t = Instant::now();
    if let Err(problems) = swarm.stop() {
        bail!("teardown left problems: {problems:#?}");
    }
    println!(
        "swarm stopped and cleaned up in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    if !all_ok {
        bail!("some functions failed");
    }
    Ok(())
}

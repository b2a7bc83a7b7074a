//! The Docker Swarm baseline on the real kernel: two namespaced hosts, a
//! swarm over their underlay, ring functions that find each other by name
//! through Docker's DNS across hosts, and a machine left exactly as it was.

mod common;

use std::path::Path;

use particle_bench::baselines::docker_swarm::{
    image::ImageError, HostState, Swarm, SwarmError, SwarmHost, SwarmUnavailable,
};
use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Run};
use particle_workloads::ring::{parse_probe, REACHED, STARTED};

fn ring(extra: &[&str]) -> Vec<String> {
    ["/particle-fn", "ring"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn a_two_host_swarm_runs_a_ring_across_hosts_and_leaves_the_machine_as_it_was() {
    common::require_root();
    let binary = common::function_binary();
    let run = Run::start().unwrap();
    let prefix = run.prefix().clone();
    let mut node =
        ScratchNode::new(&prefix, AddressBlock::parse("10.235.0.0/24").unwrap()).unwrap();
    let hosts = node.hosts(2).unwrap();
    let before = HostState::capture(&prefix);

    let swarm_hosts: Vec<SwarmHost> = hosts
        .iter()
        .map(|h| SwarmHost {
            netns: h.netns(),
            underlay_ip: ScratchNode::underlay_of(h).address,
        })
        .collect();
    let swarm = Swarm::start(&swarm_hosts, &prefix, &binary)
        .unwrap_or_else(|e| panic!("Docker Swarm cannot run on this machine: {e}"));

    assert_eq!(swarm.function_path(), "/particle-fn");
    // docker0 is the host namespace's, not the machine's.
    let links = hosts[0]
        .netns()
        .command("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(links.contains("docker0"), "{links}");
    assert_eq!(HostState::capture(&prefix).links, before.links);

    // Four functions, two a host: each reaches rank + 1, on the other host.
    let runs = swarm.launch(4, &ring(&["--timeout-s", "60"])).unwrap();
    assert_eq!(runs.len(), 4);
    for (rank, f) in runs.iter().enumerate() {
        assert_eq!(f.rank, rank);
        assert_eq!(f.node, rank % 2);
        assert_eq!(
            f.exit_code,
            Some(0),
            "rank {rank}: {} {}",
            f.stdout,
            f.stderr
        );
        let started = parse_probe(&f.stdout, STARTED).expect("started line");
        let reached = parse_probe(&f.stdout, REACHED).expect("reached line");
        assert!(reached >= started);
        assert!(
            f.stdout.contains(&format!("peer={}", (rank + 1) % 4)),
            "{}",
            f.stdout
        );
    }

    // A second job on the same swarm, with new names; a command that cannot
    // start is an error and leaves no container behind.
    let again = swarm.launch(2, &ring(&[])).unwrap();
    assert!(again.iter().all(|f| f.exit_code == Some(0)), "{again:?}");
    match swarm.launch(2, &["/no-such-program".to_string()]) {
        Err(SwarmError::Docker(e)) => assert!(e.command.starts_with("run"), "{e}"),
        other => panic!("a missing program must fail the launch: {other:?}"),
    }
    for pid in swarm.daemon_pids().into_iter().flatten() {
        assert!(Path::new(&format!("/proc/{pid}")).exists());
    }

    let pids = swarm.daemon_pids();
    if let Err(problems) = swarm.stop() {
        panic!("teardown: {problems:#?}");
    }
    for pid in pids.into_iter().flatten() {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "dockerd {pid} still runs"
        );
    }
    let after = HostState::capture(&prefix);
    assert_eq!(before.differences(&after), Vec::<String>::new());
    assert!(!Path::new("/run")
        .join(prefix.as_str())
        .join("docker-swarm")
        .exists());
}

#[test]
fn a_missing_function_binary_is_a_clear_reason_and_starts_nothing() {
    common::require_root();
    let run = Run::start().unwrap();
    let prefix = run.prefix().clone();
    let mut node =
        ScratchNode::new(&prefix, AddressBlock::parse("10.235.1.0/24").unwrap()).unwrap();
    let hosts = node.hosts(1).unwrap();
    let before = HostState::capture(&prefix);
    let swarm_hosts = [SwarmHost {
        netns: hosts[0].netns(),
        underlay_ip: ScratchNode::underlay_of(&hosts[0]).address,
    }];
    let missing = Path::new("/nonexistent/particle-fn");
    match Swarm::start(&swarm_hosts, &prefix, missing) {
        Err(SwarmUnavailable::Image(ImageError::NoBinary(p))) => assert_eq!(p, missing),
        Err(e) => panic!("wrong reason: {e}"),
        Ok(_) => panic!("a swarm without its function binary"),
    }
    assert_eq!(
        before.differences(&HostState::capture(&prefix)),
        Vec::<String>::new()
    );
    assert!(!Path::new("/run").join(prefix.as_str()).exists());
}

#[test]
fn dropping_a_one_host_swarm_cleans_up_like_stopping_it() {
    common::require_root();
    let binary = common::function_binary();
    let run = Run::start().unwrap();
    let prefix = run.prefix().clone();
    let mut node =
        ScratchNode::new(&prefix, AddressBlock::parse("10.235.4.0/24").unwrap()).unwrap();
    let hosts = node.hosts(1).unwrap();
    let before = HostState::capture(&prefix);
    let swarm_hosts = [SwarmHost {
        netns: hosts[0].netns(),
        underlay_ip: ScratchNode::underlay_of(&hosts[0]).address,
    }];
    let pids = {
        let swarm = Swarm::start(&swarm_hosts, &prefix, &binary)
            .unwrap_or_else(|e| panic!("Docker Swarm cannot run on this machine: {e}"));
        // Both functions on the one host: the ring still goes through the overlay.
        let runs = swarm.launch(2, &ring(&[])).unwrap();
        assert!(
            runs.iter().all(|f| f.exit_code == Some(0) && f.node == 0),
            "{runs:?}"
        );
        swarm.daemon_pids()
    };
    for pid in pids.into_iter().flatten() {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "dockerd {pid} still runs"
        );
    }
    assert_eq!(
        before.differences(&HostState::capture(&prefix)),
        Vec::<String>::new()
    );
    assert!(!Path::new("/run").join(prefix.as_str()).exists());
}

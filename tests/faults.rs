//! Faults, with real processes (`particle cluster up`, which restarts a
//! controller or agent that dies, as systemd or a DaemonSet would): an agent
//! killed mid-job, the controller killed and restarted mid-job, a node's
//! underlay cut, and a burst larger than the warm pools. Each job reports
//! what happened to every function, and nothing is left behind.

mod common;

use common::{eventually, eventually_within, Cluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use particle_bench::agent_resources::AgentResources;
use serde_json::Value;

/// Waits until every node has `ready` warm endpoints of `tenant`.
fn pools_full(cluster: &Cluster, tenant: &str, ready: u64) {
    eventually_within(60, "warm pools full", || {
        let nodes = cluster.api_json("GET", "/v1/nodes", "", 200);
        nodes.as_array().unwrap().iter().all(|n| {
            n["pools"][tenant]["ready"]
                .as_u64()
                .is_some_and(|r| r >= ready)
        })
    });
}

/// The kernel objects and processes an agent holds. Neighbour entries are
/// left out: ARP entries on the underlay come and go with traffic.
fn held(pid: i32) -> [usize; 8] {
    let r = AgentResources::read(pid).unwrap();
    [
        r.namespaces,
        r.links,
        r.addresses,
        r.routes,
        r.fdb,
        r.fds,
        r.processes,
        r.zombies,
    ]
}

/// Processes whose command line contains `needle` (a job's marker argument).
fn processes_with(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .count()
}

fn functions_on<'a>(job: &'a Value, node: &str) -> Vec<&'a Value> {
    job["functions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["node"] == node)
        .collect()
}

#[test]
fn an_agent_killed_mid_job_loses_its_functions_and_its_restart_leaks_nothing() {
    let cluster = Cluster::up(
        3,
        17_761,
        "10.215.0.0/24",
        &["--pool-size", "4", "--free-pool-size", "2"],
    );
    cluster.create_tenant("k", 321, "10.32.0.0/16", 4);
    pools_full(&cluster, "k", 4);
    let agent = cluster.agent_pid(1).expect("agent n1 runs");
    let before = held(agent);

    // A marker argument tells this job's processes from anything else's.
    let id = cluster.launch_detached("k", 9, &["/bin/sleep", "60.0761"]);
    eventually("every function runs", || processes_with("60.0761") == 9);
    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    let mut restarted = None;
    eventually("agent n1 started again", || {
        restarted = cluster.agent_pid(1).filter(|p| *p != agent);
        restarted.is_some()
    });
    // Its functions died with it (their supervisors watch the agent), and
    // the restarted agent's registration tells the controller so.
    eventually("n1's functions are gone", || processes_with("60.0761") == 6);
    let mut job = Value::Null;
    eventually("n1's functions are reported lost", || {
        job = cluster.api_json("GET", &format!("/v1/jobs/{id}"), "", 200);
        functions_on(&job, "n1")
            .iter()
            .all(|f| f["state"] == "lost")
    });
    for f in functions_on(&job, "n1") {
        let error = f["error"].as_str().unwrap_or_default();
        assert!(error.contains("restarted"), "{f}");
    }
    for node in ["n0", "n2"] {
        for f in functions_on(&job, node) {
            assert_eq!(f["state"], "running", "{f}");
        }
    }
    let job = cluster.api_json("DELETE", &format!("/v1/jobs/{id}"), "", 200);
    assert_eq!(job["state"], "cancelled", "{job}");
    eventually("the cancelled functions are gone", || {
        processes_with("60.0761") == 0
    });

    // The restarted agent rebuilt its pools from the controller's state and
    // holds exactly what the first one held: nothing adopted, nothing leaked.
    let restarted = restarted.unwrap();
    pools_full(&cluster, "k", 4);
    let mut now = [0; 8];
    eventually_within(30, "n1 holds what it held before the kill", || {
        now = held(restarted);
        now == before
    });
}

#[test]
fn a_controller_killed_mid_job_comes_back_knowing_the_job() {
    let cluster = Cluster::up(2, 17_762, "10.216.0.0/24", &["--pool-size", "4"]);
    cluster.create_tenant("c", 322, "10.33.0.0/16", 4);
    pools_full(&cluster, "c", 2);
    let id = cluster.launch_detached("c", 4, &["/bin/sleep", "3"]);
    let controller = cluster.controller_pid().expect("controller runs");
    kill(Pid::from_raw(controller), Signal::SIGKILL).unwrap();
    eventually("controller started again", || {
        cluster.controller_pid().is_some_and(|p| p != controller)
    });

    // The functions ran on; their exits, reported to the new controller,
    // end the job it restored from its jobs file.
    let job = cluster.ended_job(&id, 30);
    assert_eq!(job["state"], "succeeded", "{job}");
    for f in job["functions"].as_array().unwrap() {
        assert_eq!(f["exit_code"], 0, "{f}");
    }
    // New jobs get new ids and run.
    let next = cluster.launch_detached("c", 2, &["/bin/true"]);
    assert_ne!(next, id);
    assert_eq!(cluster.ended_job(&next, 20)["state"], "succeeded");
}

#[test]
fn a_node_cut_off_the_underlay_drops_out_and_its_functions_are_reported_lost() {
    let cluster = Cluster::up(
        3,
        17_763,
        "10.217.0.0/24",
        &["--pool-size", "2", "--heartbeat-timeout", "2"],
    );
    cluster.create_tenant("u", 323, "10.34.0.0/16", 2);
    pools_full(&cluster, "u", 2);
    let n0 = cluster.agent_pid(0).expect("agent n0 runs");
    let n2 = cluster.agent_pid(2).expect("agent n2 runs");
    let overlay_of_n0 = || {
        let r = AgentResources::read(n0).unwrap();
        (r.routes, r.fdb)
    };
    let full = overlay_of_n0();

    let id = cluster.launch_detached("u", 6, &["/bin/sleep", "5"]);
    let underlay = particle_net::NetNs::open(format!("/proc/{n2}/ns/net")).unwrap();
    let set = |state: &str| {
        let out = underlay
            .command("ip")
            .args(["link", "set", "eth0", state])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::text(&out));
    };
    set("down");

    let job = cluster.ended_job(&id, 30);
    assert_eq!(job["state"], "failed", "{job}");
    for f in functions_on(&job, "n2") {
        assert_eq!(f["state"], "lost", "{f}");
        assert!(f["error"].as_str().unwrap().contains("went away"), "{f}");
    }
    for f in functions_on(&job, "n0")
        .into_iter()
        .chain(functions_on(&job, "n1"))
    {
        assert_eq!(f["exit_code"], 0, "{f}");
    }
    let nodes = cluster.api_json("GET", "/v1/nodes", "", 200);
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["n0", "n1"]);
    // n0's tenant router dropped the route and FDB entry to n2's block.
    let mut cut = full;
    eventually("n0 drops n2's overlay entries", || {
        cut = overlay_of_n0();
        cut.0 == full.0 - 1 && cut.1 == full.1 - 1
    });

    // Back on the underlay, n2 registers again and the overlay is whole.
    set("up");
    eventually_within(30, "n2 rejoins", || {
        cluster
            .api_json("GET", "/v1/nodes", "", 200)
            .as_array()
            .unwrap()
            .len()
            == 3
    });
    eventually("n0 has n2's overlay entries again", || {
        overlay_of_n0() == full
    });
}

#[test]
fn a_burst_larger_than_the_warm_pools_builds_the_rest_and_runs() {
    // One warm endpoint per node and no tenant-free pool: nearly every
    // endpoint of the burst is built during the launch.
    let cluster = Cluster::up(
        3,
        17_764,
        "10.218.0.0/24",
        &["--pool-size", "1", "--free-pool-size", "0"],
    );
    cluster.create_tenant("d", 324, "10.35.0.0/16", 1);
    pools_full(&cluster, "d", 1);
    let function = env!("CARGO_BIN_EXE_particle");
    let out = cluster
        .command(&["launch"])
        .args(["--tenant", "d", "-n", "30", "--json"])
        .args(["--", function, "fn", "ring", "--offset", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    let (warm, cold) = (job["warm"].as_u64().unwrap(), job["cold"].as_u64().unwrap());
    assert_eq!(warm + cold, 30, "{job}");
    assert!(cold >= 27, "at most 3 warm endpoints existed: {job}");
}

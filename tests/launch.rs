//! The burst launch path end to end, with real processes: `particle cluster
//! up` (controller and agents in namespaced nodes), tenants over the API, and
//! `particle launch` starting functions in warm endpoints. Every function
//! of a 100-function job over 3 nodes reaches a function on another node
//! over the overlay and exchanges data; bad jobs get clear errors; a cancel
//! stops what runs.

mod common;

const PORT: u16 = 17_752;

#[test]
fn a_burst_reaches_peers_across_nodes_and_bad_jobs_are_refused() {
    let cluster = common::Cluster::up(3, PORT, "10.214.0.0/24", &["--pool-size", "8"]);
    cluster.create_tenant("a", 310, "10.31.0.0/16", 40);
    let function = env!("CARGO_BIN_EXE_particle");

    // --prewarm raises the warm target to 34 per node and waits for it.
    let out = cluster
        .command(&["launch"])
        .args([
            "--tenant",
            "a",
            "-n",
            "100",
            "--prewarm",
            "--json",
            "--output",
        ])
        .args([
            "--", function, "fn", "ring", "--offset", "2", "--bytes", "4096",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    // --json with --output: stdout is one JSON document, outputs inside.
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    let functions = job["functions"].as_array().unwrap();
    assert_eq!(functions.len(), 100);
    for f in functions {
        let rank = f["rank"].as_u64().unwrap() as usize;
        assert_eq!(f["exit_code"], 0, "{f}");
        let output = f["output"].as_str().unwrap_or_default();
        let peer: usize = output
            .lines()
            .find_map(|l| l.split("peer=").nth(1))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("rank {rank} reached no peer: {output}"));
        assert_eq!(peer, (rank + 2) % 100);
        assert_ne!(
            f["node"], functions[peer]["node"],
            "rank {rank} and its peer {peer} are on the same node"
        );
        assert!(f["address"].as_str().unwrap().starts_with("10.31."), "{f}");
    }
    let nodes: std::collections::BTreeSet<&str> = functions
        .iter()
        .map(|f| f["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 3, "spread over every node");

    for (args, expected) in [
        (
            vec!["--tenant", "a", "-n", "3", "--", "/no/such/program"],
            "not found",
        ),
        (
            vec!["--tenant", "nobody", "-n", "3", "--", function],
            "unknown tenant",
        ),
        (
            vec!["--tenant", "a", "-n", "0", "--", function],
            "at least one function",
        ),
    ] {
        let out = cluster.command(&["launch"]).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            common::text(&out).contains(expected),
            "{args:?}: {}",
            common::text(&out)
        );
    }

    // A job that would run for a minute, cancelled: its functions stop and
    // the job says so.
    let out = cluster
        .command(&["launch"])
        .args(["--tenant", "a", "-n", "6", "--detach", "--json"])
        .args(["--", "/bin/sleep", "60"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let out = cluster
        .command(&["job", "cancel"])
        .arg(&id)
        .output()
        .unwrap();
    assert!(
        common::text(&out).contains("Cancelled"),
        "{}",
        common::text(&out)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let sleeping = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| c.starts_with(b"/bin/sleep\x0060"))
            })
            .count();
        if sleeping == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{sleeping} cancelled functions still run"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A burst larger than the warm pools on a cluster with its tenant-free
/// pools: the rest is built in one batch (not bound one at a time), and the
/// job's counts say truly where each endpoint came from.
#[test]
fn a_burst_past_the_warm_pools_reports_true_counts() {
    let cluster = common::Cluster::up(
        2,
        17_753,
        "10.214.8.0/24",
        &["--pool-size", "2", "--free-pool-size", "4"],
    );
    cluster.create_tenant("d", 320, "10.33.0.0/16", 2);
    for socket in &cluster.sockets {
        common::eventually("tenant d's pools are warm", || {
            let out = common::particle()
                .args(["local", "--socket", socket, r#"{"op":"status"}"#])
                .output()
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s["pools"]["d"]["ready"].as_u64() >= Some(2))
        });
    }
    let out = cluster
        .command(&["launch"])
        .args(["--tenant", "d", "-n", "12", "--json", "--", "/bin/true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let count = |k: &str| job[k].as_u64().unwrap();
    let functions = job["functions"].as_array().unwrap();
    let flagged = |k: &str| functions.iter().filter(|f| f[k] == true).count() as u64;
    assert_eq!(count("warm") + count("bound") + count("cold"), 12, "{job}");
    assert_eq!(count("bound"), 0, "bursts do not bind: {job}");
    assert_eq!((count("warm"), count("cold")), (4, 8), "{job}");
    assert_eq!(
        (flagged("cold"), flagged("bound")),
        (count("cold"), 0),
        "{job}"
    );
}

/// A burst that the tenant's blocks cannot hold is refused before anything
/// is claimed (it used to start what fitted and fail the rest, with
/// `0.0.0.0` peers); one that fits runs whole.
#[test]
fn a_burst_past_the_blocks_is_refused_with_nothing_claimed() {
    let cluster = common::Cluster::up(2, 17_754, "10.214.9.0/24", &["--pool-size", "2"]);
    let body =
        r#"{"name":"s","vni":321,"subnet":"10.34.0.0/16","block_prefix":28,"warm_per_node":2}"#;
    cluster.api_json("POST", "/v1/tenants", body, 201);
    let launch = |n: &str| {
        cluster
            .command(&["launch"])
            .args(["--tenant", "s", "-n", n, "--json", "--", "/bin/true"])
            .output()
            .unwrap()
    };
    let out = launch("40");
    assert!(!out.status.success());
    let text = common::text(&out);
    assert!(text.contains("/28 blocks hold 13"), "{text}");
    // A tenant's router on a node is one bridge, of at most 1,023 ports:
    // 2,048 functions on two nodes do not fit, whatever the blocks hold.
    let body =
        r#"{"name":"w","vni":322,"subnet":"10.36.0.0/16","block_prefix":20,"warm_per_node":1}"#;
    cluster.api_json("POST", "/v1/tenants", body, 201);
    let out = cluster
        .command(&["launch"])
        .args(["--tenant", "w", "-n", "2048", "--json", "--", "/bin/true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = common::text(&out);
    assert!(text.contains("at most 1023 ports"), "{text}");
    let jobs = cluster.api_json("GET", "/v1/jobs", "", 200);
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "{jobs}");
    for socket in &cluster.sockets {
        let out = common::particle()
            .args(["local", "--socket", socket, r#"{"op":"status"}"#])
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["pools"]["s"]["claims_total"], 0, "{status}");
        assert_eq!(status["pools"]["w"]["claims_total"], 0, "{status}");
    }
    let out = launch("20");
    assert!(out.status.success(), "{}", common::text(&out));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
}

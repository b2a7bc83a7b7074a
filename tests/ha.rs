//! Several controllers on etcd (`particle cluster up --controllers 3
//! --store etcd`: a 3-member etcd cluster and three controllers in the
//! underlay, real processes): the leader killed in the middle of a burst of
//! 1,000, an etcd member killed, the whole etcd cluster stopped, and a
//! controller of another cluster refused.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, eventually_within, Cluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// A cluster with three controllers on a three-member etcd.
fn ha_cluster(nodes: usize, port: u16, underlay: &str, pool: usize) -> Cluster {
    let pool = pool.to_string();
    Cluster::up(
        nodes,
        port,
        underlay,
        &[
            "--controllers",
            "3",
            "--store",
            "etcd",
            "--pool-size",
            &pool,
        ],
    )
}

/// Launches without waiting; the job's id, or why not.
fn launch(cluster: &Cluster, tenant: &str, n: usize, argv: &[&str]) -> Result<String, String> {
    let job = cluster.try_launch_detached(tenant, n, argv)?;
    Ok(job["id"].as_str().unwrap_or_default().to_string())
}

/// The last lines of every controller's and etcd member's log, for a failure's message.
fn logs_tail(cluster: &Cluster) -> String {
    let mut out = String::new();
    let mut names: Vec<_> = std::fs::read_dir(&cluster.logs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.ends_with(".log") && (name.starts_with("controller") || name.starts_with("etcd"))
        })
        .collect();
    names.sort();
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with(' ')).collect();
        out.push_str(&format!("== {}\n", path.display()));
        for line in &lines[lines.len().saturating_sub(12)..] {
            out.push_str(&line.chars().take(300).collect::<String>());
            out.push('\n');
        }
    }
    out
}

fn all_exited_zero(job: &Value) -> bool {
    job["functions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["state"] == "exited" && f["exit_code"] == 0)
}

#[test]
fn the_leader_killed_mid_burst_of_1000_the_job_succeeds_and_a_new_leader_takes_over() {
    let cluster = ha_cluster(3, 17_771, "10.221.0.0/24", 32);
    // /22 blocks: a third of 1,000 functions per node.
    let tenant =
        r#"{"name":"h","vni":331,"subnet":"10.41.0.0/16","block_prefix":22,"warm_per_node":32}"#;
    cluster.api_json("POST", "/v1/tenants", tenant, 201);
    let (_, old) = cluster.leader().expect("a controller leads");
    let id = launch(&cluster, "h", 1000, &["/bin/sleep", "10"]).expect("the burst is accepted");
    // The job was accepted and its functions run: the leader dies now.
    kill(Pid::from_raw(old), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    while cluster
        .leader()
        // Another process: perhaps the killed one's restart (same address).
        .filter(|(_, pid)| *pid != old)
        .is_none()
    {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no controller took over in 30 s:\n{}",
            logs_tail(&cluster)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let takeover = killed.elapsed();
    // A new job launches through the new leader within the takeover.
    let next = loop {
        match launch(&cluster, "h", 3, &["/bin/true"]) {
            Ok(next) => break next,
            Err(e) => assert!(
                killed.elapsed() < Duration::from_secs(30),
                "no launch after the takeover: {e}"
            ),
        }
    };
    let relaunch = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    eprintln!("takeover {takeover:?}, next job accepted after {relaunch:?}");
    assert_ne!(next, id, "job ids are never handed out twice");
    assert_eq!(cluster.ended_job(&next, 30)["state"], "succeeded");

    // The new leader knew the burst from etcd and the agents' exit reports reached it.
    let job = cluster.ended_job(&id, 120);
    assert_eq!(
        job["state"],
        "succeeded",
        "{}",
        &job.to_string()[..2000.min(job.to_string().len())]
    );
    assert_eq!(job["functions"].as_array().unwrap().len(), 1000);
    assert!(all_exited_zero(&job));
}

/// The underlay's gateway, where the controllers and etcd members listen.
const GATEWAY: &str = "10.222.0.1";

/// One cluster (several would starve each other's etcd on two cores), in
/// turn: another cluster's controller refused, two writers fenced, a
/// member down, every member down.
#[test]
fn etcd_refuses_strangers_and_stale_leaders_and_its_failures_stop_no_function() {
    let cluster = ha_cluster(2, 17_772, "10.222.0.0/24", 4);
    a_controller_refuses_an_etcd_holding_another_clusters_state(&cluster);
    two_writers_of_one_state_revision_never_both_commit_and_a_deposed_leader_writes_nothing(
        &cluster,
    );
    an_etcd_member_down_stops_nothing(&cluster);
    etcd_down_writes_are_refused_with_503_and_functions_keep_their_network(&cluster);
}

fn an_etcd_member_down_stops_nothing(cluster: &Cluster) {
    cluster.create_tenant("m", 332, "10.42.0.0/16", 4);
    let members = cluster.etcd_pids();
    assert_eq!(members.len(), 3, "{members:?}");
    let (name, pid) = members[0].clone();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    // `cluster up` starts it again, as systemd would: keep it down (stopped).
    let mut again = None;
    eventually("the killed member is started again", || {
        again = cluster
            .etcd_pids()
            .into_iter()
            .find(|(n, p)| *n == name && *p != pid);
        again.is_some()
    });
    let (_, again) = again.unwrap();
    kill(Pid::from_raw(again), Signal::SIGSTOP).unwrap();
    // Writes, launches and job ends go on with two of three members.
    let body = r#"{"name":"m2","vni":333,"subnet":"10.43.0.0/16"}"#;
    cluster.api_json("POST", "/v1/tenants", body, 201);
    let id = launch(cluster, "m", 6, &["/bin/true"]).expect("a launch with a member down");
    assert_eq!(cluster.ended_job(&id, 30)["state"], "succeeded");
    kill(Pid::from_raw(again), Signal::SIGCONT).unwrap();
}

fn etcd_down_writes_are_refused_with_503_and_functions_keep_their_network(cluster: &Cluster) {
    cluster.create_tenant("d", 334, "10.44.0.0/16", 4);
    // Each function pings the next rank's address twice a second for 20 s:
    // one lost reply and it fails.
    let script = r#"IFS=, read -ra p <<< "$PARTICLE_PEERS"; n=${#p[@]}; peer=${p[$(( (PARTICLE_RANK + 1) % n ))]%:*}; for i in $(seq 40); do ping -c1 -W2 "$peer" >/dev/null || exit 1; sleep 0.5; done"#;
    let id = launch(cluster, "d", 4, &["/bin/bash", "-c", script]).expect("launch");
    std::thread::sleep(Duration::from_secs(2));
    let members = cluster.etcd_pids();
    assert_eq!(members.len(), 3, "{members:?}");
    for (_, pid) in &members {
        kill(Pid::from_raw(*pid), Signal::SIGSTOP).unwrap();
    }
    let body = r#"{"name":"x","vni":335,"subnet":"10.45.0.0/16"}"#;
    let (status, answer) = cluster.api("POST", "/v1/tenants", body);
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("etcd"), "the refusal says why: {answer}");
    // Longer than the leader's lease: every controller refuses, clearly.
    std::thread::sleep(Duration::from_secs(6));
    let (status, answer) = cluster.api("POST", "/v1/tenants", body);
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("etcd"), "{answer}");
    for (_, pid) in &members {
        kill(Pid::from_raw(*pid), Signal::SIGCONT).unwrap();
    }
    // The functions kept their network all along; their exits, reported
    // again until a controller could store them, end the job.
    let job = cluster.ended_job(&id, 60);
    assert_eq!(job["state"], "succeeded", "{job}");
    eventually_within(30, "writes are accepted again", || {
        cluster.api("POST", "/v1/tenants", body).0 == 201
    });
}

fn a_controller_refuses_an_etcd_holding_another_clusters_state(cluster: &Cluster) {
    let (_, etcd) = cluster.etcd_pids()[0].clone();
    let out = common::particle()
        .args(["controller", "--netns", &format!("/proc/{etcd}/ns/net")])
        .args(["--listen", &format!("{GATEWAY}:17799"), "--token-file"])
        .arg(&cluster.token_file)
        .args([
            "--store",
            &format!("etcd://{GATEWAY}:2379"),
            "--cluster-id",
            "another-cluster",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", common::text(&out));
    let text = common::text(&out);
    assert!(
        text.contains("refusing to start") && text.contains("another-cluster"),
        "{text}"
    );
}

/// Puts `PREFIX/leader` anew, as an election does; its create revision.
fn new_leader_key(
    rt: &tokio::runtime::Runtime,
    client: &particle_controller::store::etcd::EtcdClient,
) -> i64 {
    use base64::Engine;
    let key = client.key("leader");
    let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
    let delete = serde_json::json!({ "request_delete_range": { "key": b64(&key) } });
    let put = particle_controller::store::etcd::put(&key, b"test", 0);
    // Two transactions: etcd refuses a key twice in one.
    rt.block_on(client.txn(vec![], vec![delete], vec![]))
        .unwrap();
    rt.block_on(client.txn(vec![], vec![put], vec![])).unwrap();
    rt.block_on(client.range(&key, false)).unwrap()[0].create_revision
}

fn two_writers_of_one_state_revision_never_both_commit_and_a_deposed_leader_writes_nothing(
    cluster: &Cluster,
) {
    use particle_controller::state::Snapshot;
    use particle_controller::store::etcd::{EtcdClient, EtcdStore};
    use particle_controller::store::{Backend, StoreError};
    use std::sync::Arc;

    let (_, etcd) = cluster.etcd_pids()[0].clone();
    let underlay = particle_net::NetNs::open(format!("/proc/{etcd}/ns/net")).unwrap();
    // Inside the underlay (the client's threads are born there); under a
    // prefix of its own, beside the cluster's.
    underlay
        .run_in(|| {
            let prefix = format!("/particle-fence-test-{}", std::process::id());
            let endpoint = format!("{GATEWAY}:2379").parse().unwrap();
            let client = Arc::new(EtcdClient::new(vec![endpoint], &prefix));
            let rt = tokio::runtime::Runtime::new().unwrap();
            let wait = Duration::from_secs(10);
            let a = EtcdStore::connect(client.clone(), "fence-test", wait).unwrap();
            let b = EtcdStore::connect(client.clone(), "fence-test", wait).unwrap();
            let rev = new_leader_key(&rt, &client);
            a.set_fence(Some(rev));
            b.set_fence(Some(rev));
            assert!(a.load_state().unwrap().is_none());
            assert!(b.load_state().unwrap().is_none());
            let with_vni = |vni: u32| Snapshot {
                version: 1,
                tenants: vec![particle_wire::api::Tenant {
                    name: "t".into(),
                    vni,
                    subnet: "10.1.0.0/16".into(),
                    block_prefix: 24,
                    warm_per_node: None,
                    blocks: Default::default(),
                }],
                nodes: vec![],
            };
            // Both allocate from the same revision (a split brain): one commits.
            a.save_state(&with_vni(10)).unwrap();
            assert!(matches!(b.save_state(&with_vni(11)), Err(StoreError::NotLeader)));
            assert!(b.take_refused(), "the refused writer is told to step down");
            assert_eq!(b.load_state().unwrap().unwrap().tenants[0].vni, 10);
            // A new election: the deposed leader writes nothing, not even a record.
            let next = new_leader_key(&rt, &client);
            let record = vec![("next".to_string(), b"7".to_vec())];
            assert!(matches!(a.write_records(&[], record.clone()), Err(StoreError::NotLeader)));
            assert!(matches!(a.save_state(&with_vni(12)), Err(StoreError::NotLeader)));
            b.set_fence(Some(next));
            b.write_records(&[], record).unwrap();
            assert_eq!(b.records("next").unwrap()[0].1, b"7");
            // A follower (no fence) writes nothing either.
            a.set_fence(None);
            assert!(matches!(a.write_records(&[], vec![]), Ok(())));
            assert!(a.write_records(&["x".into()], vec![]).is_err());
            // Leave nothing behind.
            let all = serde_json::json!({
                "request_delete_range": {
                    "key": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, prefix.as_bytes()),
                    "range_end": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{prefix}0").as_bytes()),
                }
            });
            rt.block_on(client.txn(vec![], vec![all], vec![])).unwrap();
        })
        .unwrap();
}

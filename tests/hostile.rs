//! Hostile functions against their node, from inside real functions
//! launched through the API (`particle cluster up`): each attack fails and
//! the node, its agent and other tenants' functions are unharmed. Writing
//! the node's files (a canary this test makes, /etc, the particle binary),
//! reading the controller's token, seeing the node's processes, a fork
//! bomb (held at its pids limit), memory past its limit (only that function
//! is killed, and the job says why), filling /tmp (held at its size).

mod common;

use std::os::unix::fs::MetadataExt;

use common::Cluster;
use serde_json::Value;

/// Lines `v:KEY VALUE` of a function's output.
fn verdict<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("v:{key} ")))
        .unwrap_or_else(|| panic!("no v:{key} in:\n{output}"))
}

/// Launches `script` (busybox sh) as `n` functions of `tenant` and waits; the job.
fn run(cluster: &Cluster, tenant: &str, n: usize, flags: &[&str], script: &str) -> Value {
    let out = cluster
        .command(&["launch"])
        .args([
            "--tenant",
            tenant,
            "-n",
            &n.to_string(),
            "--json",
            "--output",
        ])
        .args(flags)
        .args(["--", "/bin/sh", "-c", script])
        .output()
        .unwrap();
    // --json with --output: one JSON document, outputs inside.
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", common::text(&out)))
}

fn output(job: &Value, rank: usize) -> String {
    job["functions"][rank]["output"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn agent_answers(cluster: &Cluster, i: usize) -> bool {
    common::particle()
        .args([
            "local",
            "--socket",
            &cluster.sockets[i],
            r#"{"op":"status"}"#,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn hostile_functions_leave_the_node_unharmed() {
    let cluster = Cluster::up(2, 17_781, "10.221.0.0/24", &["--pool-size", "2"]);
    cluster.create_tenant("evil", 341, "10.51.0.0/16", 2);
    cluster.create_tenant("good", 342, "10.52.0.0/16", 2);
    let particle = env!("CARGO_BIN_EXE_particle");
    let before = std::fs::metadata(particle).unwrap();
    // The cluster's directory is this test's (run prefix), removed with it.
    let canary = format!("{}/canary", cluster.logs);
    std::fs::write(&canary, "node\n").unwrap();

    let script = format!(
        r#"
exec 2>/dev/null
echo pwned >> {canary} 2>/dev/null && echo v:canary written || echo v:canary denied
echo 'evil::0:0::/:/bin/sh' >> /etc/passwd 2>/dev/null && echo v:passwd written || echo v:passwd denied
mkdir -p /etc/cron.d 2>/dev/null; echo '* * * * * root sh' > /etc/cron.d/evil 2>/dev/null && echo v:cron written || echo v:cron denied
cp /bin/busybox {particle} 2>/dev/null && echo v:binary replaced || echo v:binary denied
cat {token} >/dev/null 2>&1 && echo v:token read || echo v:token denied
n=0; for c in /proc/[0-9]*/cmdline; do case "$(cat $c 2>/dev/null)" in {particle}*) n=$((n+1));; esac; done; echo v:node-processes $n
set -- /proc/[0-9]*; echo v:processes $#
"#,
        token = cluster.token_file.display(),
    );
    let job = run(&cluster, "evil", 2, &[], &script);
    for rank in 0..2 {
        let out = output(&job, rank);
        for (k, v) in [
            ("canary", "denied"),
            ("passwd", "denied"),
            ("cron", "denied"),
            ("binary", "denied"),
            ("token", "denied"),
            ("node-processes", "0"),
        ] {
            assert_eq!(verdict(&out, k), v, "{k}:\n{out}");
        }
        let processes: usize = verdict(&out, "processes").parse().unwrap();
        assert!(processes <= 4, "it sees {processes} processes:\n{out}");
    }
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "node\n");
    let after = std::fs::metadata(particle).unwrap();
    assert_eq!(
        (before.ino(), before.size(), before.mtime()),
        (after.ino(), after.size(), after.mtime())
    );

    // Memory past the limit: that function alone is killed, and says why.
    let hog = "if [ $PARTICLE_RANK = 0 ]; then tail /dev/zero; else sleep 1; echo v:peer fine; fi";
    let job = run(&cluster, "evil", 2, &["--memory-mb", "32"], hog);
    let hogged = &job["functions"][0];
    assert_ne!(hogged["exit_code"], 0, "{job}");
    let reason = hogged["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("out of memory"), "{job}");
    assert_eq!(job["functions"][1]["exit_code"], 0, "{job}");
    assert_eq!(verdict(&output(&job, 1), "peer"), "fine");
    assert!(agent_answers(&cluster, 0) && agent_answers(&cluster, 1));

    // /tmp full at its size.
    let fill =
        "dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>/dev/null; echo v:size $(wc -c < /tmp/fill)";
    let job = run(&cluster, "evil", 1, &["--tmp-mb", "4"], fill);
    let size: u64 = verdict(&output(&job, 0), "size").parse().unwrap();
    assert!(size <= 4 << 20, "{size} bytes in a 4 MiB /tmp");

    // A fork bomb, held at its pids limit while another tenant's functions
    // run and the agents answer.
    let bomb = cluster
        .command(&["launch"])
        .args([
            "--tenant", "evil", "-n", "2", "--pids", "32", "--detach", "--json",
        ])
        .args(["--", "/bin/bash", "-c", ":(){ :|:& };: ; sleep 8"])
        .output()
        .unwrap();
    assert!(bomb.status.success(), "{}", common::text(&bomb));
    let bomb: Value = serde_json::from_slice(&bomb.stdout).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let peers = "sleep 1; echo v:peer fine";
    let job = run(&cluster, "good", 4, &[], peers);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(agent_answers(&cluster, 0) && agent_answers(&cluster, 1));
    let id = bomb["id"].as_str().unwrap();
    let ended = cluster.api_json("GET", &format!("/v1/jobs/{id}?wait_s=30"), "", 200);
    for f in ended["functions"].as_array().unwrap() {
        let reason = f["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("process limit of 32"), "{ended}");
    }
}

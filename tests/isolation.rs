//! What a function can and cannot do, tried from inside real functions
//! launched through the API (`particle cluster up`, two tenants, two nodes):
//! it reaches its own tenant's functions on another node, and nothing else:
//! not another tenant's functions on its own node or another, not the
//! controller, not its agent's API, not the agent's local socket (not even
//! its file: the function's root is its image, not the node's); and it
//! holds no capability with which to leave its namespaces or change its
//! network. What it can do to the node itself is `tests/hostile.rs`.

mod common;

use common::Cluster;
use serde_json::Value;

/// A TCP connect from inside the function, with the kernel's verdict:
/// `refused` proves a path to the host, `connected` a listener;
/// unreachable and timeouts mean no path.
const PROBE: &str = r#"
probe() {
  err=$(timeout 2 bash -c "exec 3<>/dev/tcp/$2/$3" 2>&1); rc=$?
  case "$rc:$err" in
    0:*) v=connected ;;
    *"refused"*) v=refused ;;
    124:*) v=timeout ;;
    *) v="unreachable ($err)" ;;
  esac
  echo "probe $1 $v"
}
"#;

fn verdicts(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("probe "))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_function_reaches_its_tenant_and_nothing_else() {
    let cluster = Cluster::up(2, 17_771, "10.219.0.0/24", &["--pool-size", "2"]);
    cluster.create_tenant("a", 331, "10.41.0.0/16", 2);
    cluster.create_tenant("b", 332, "10.42.0.0/16", 2);
    let nodes = cluster.api_json("GET", "/v1/nodes", "", 200);
    let node = |name: &str| -> Value {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()
            .clone()
    };
    let (n0, n1) = (node("n0"), node("n1"));
    let controller = "10.219.0.1"; // the underlay's gateway, where `cluster up` puts it

    // Tenant b's functions, one per node, idle while a probes them.
    let out = cluster
        .command(&["launch"])
        .args(["--tenant", "b", "-n", "2", "--detach", "--json", "--"])
        .args(["/bin/sleep", "30"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let b: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b_address = |rank: usize| {
        b["functions"][rank]["address"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // Tenant a: rank 0 on n0, rank 1 on n1. Each probes its peer on the other
    // node (the control: must be reachable), tenant b on both nodes, the
    // controller, both agents' APIs, the agent's socket, and its privileges.
    let particle = env!("CARGO_BIN_EXE_particle");
    let socket = &cluster.sockets[0];
    let script = format!(
        r#"{PROBE}
peer=$(echo "$PARTICLE_PEERS" | tr ',' '\n' | sed -n "$((1 - PARTICLE_RANK + 1))p" | cut -d: -f1)
probe own-tenant-other-node "$peer" 7999
probe other-tenant-n0 {b0} 7000
probe other-tenant-n1 {b1} 7000
probe controller {controller} {port}
probe agent-api-n0 {n0ip} {n0port}
probe agent-api-n1 {n1ip} {n1port}
if [ "$PARTICLE_RANK" = 0 ]; then
  answer=$({particle} local --socket {socket} '{{"op":"status"}}' 2>&1)
  if [ -e {socket} ]; then echo "probe agent-socket there: $answer"; else echo "probe agent-socket absent"; fi
fi
umount /proc 2>/dev/null && echo "probe umount done" || echo "probe umount denied"
ip link add pt-escape type bridge 2>/dev/null && echo "probe link-add done" || echo "probe link-add denied"
grep -q '^CapEff:[[:space:]]*0*$' /proc/self/status && echo "probe capabilities none" || echo "probe capabilities some"
"#,
        b0 = b_address(0),
        b1 = b_address(1),
        port = 17_771,
        n0ip = n0["underlay_ip"].as_str().unwrap(),
        n0port = n0["api_port"],
        n1ip = n1["underlay_ip"].as_str().unwrap(),
        n1port = n1["api_port"],
    );
    let out = cluster
        .command(&["launch"])
        .args(["--tenant", "a", "-n", "2", "--json", "--output", "--"])
        .args(["/bin/bash", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    // --json with --output: one JSON document, outputs inside.
    let a: Value = serde_json::from_slice(&out.stdout).unwrap();
    for f in a["functions"].as_array().unwrap() {
        let output = f["output"].as_str().unwrap_or_default();
        let v = verdicts(output);
        let get = |k: &str| {
            v.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("no probe {k} in:\n{output}"))
        };
        assert_eq!(get("own-tenant-other-node"), "refused", "{output}");
        for k in [
            "other-tenant-n0",
            "other-tenant-n1",
            "controller",
            "agent-api-n0",
            "agent-api-n1",
        ] {
            let verdict = get(k);
            assert!(
                verdict != "connected" && verdict != "refused",
                "{k}: {verdict}\n{output}"
            );
        }
        if f["rank"] == 0 {
            assert_eq!(get("agent-socket"), "absent", "{output}");
        }
        assert_eq!(get("umount"), "denied", "{output}");
        assert_eq!(get("link-add"), "denied", "{output}");
        assert_eq!(get("capabilities"), "none", "{output}");
    }
    // The agent's socket, the token and the controller's files are root's alone.
    use std::os::unix::fs::PermissionsExt;
    for file in [
        socket.clone(),
        cluster.token_file.display().to_string(),
        format!("{}/controller.json", cluster.logs),
        format!("{}/controller.json.jobs.log", cluster.logs),
    ] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{file} is {mode:o}");
    }
    // The socket still serves the node itself.
    let out = common::particle()
        .args(["local", "--socket", socket, r#"{"op":"status"}"#])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
}

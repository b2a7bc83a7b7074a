//! particle-cni driven the way containerd drives a plugin (environment +
//! stdin, a conflist chained with the reference `tuning` plugin), against
//! two namespaced nodes with running agents: containers get overlay
//! addresses and reach each other across nodes, CHECK/STATUS/GC/VERSION
//! answer, DEL leaves nothing behind, and bad input gets the spec's codes.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{links, nodes_with, plugin_dir, require_root};
use particle_bench::baselines::cni::{
    fd_path, CniCommand, CniPlugin, ConfList, Container, REFERENCE_PLUGIN_DIR,
};
use particle_net::{NetNs, PoolConfig};
use particle_wire::api::CreateTenant;
use serde_json::{json, Value};

const POOL: PoolConfig = PoolConfig {
    high_watermark: 4,
    low_watermark: 2,
    batch_size: 4,
};

fn plugin_dirs() -> Vec<PathBuf> {
    vec![plugin_dir(), PathBuf::from(REFERENCE_PLUGIN_DIR)]
}

fn particle() -> CniPlugin {
    CniPlugin::find("particle-cni", &plugin_dirs()).unwrap()
}

fn ip_of(result: &Value) -> String {
    let ips = result["ips"].as_array().unwrap();
    let last = ips.last().unwrap()["address"].as_str().unwrap();
    last.split('/').next().unwrap().to_string()
}

fn pings(ns: &NetNs, ip: &str) -> bool {
    ns.command("ping")
        .args(["-c1", "-W2", ip])
        .output()
        .unwrap()
        .status
        .success()
}

fn conf(network: &str, socket: &std::path::Path, tenant: &str, version: &str) -> Value {
    json!({
        "cniVersion": version, "name": network, "type": "particle-cni",
        "tenant": tenant, "agentSocket": socket,
        "dns": { "nameservers": ["10.227.0.1"], "search": ["particle.local"] }
    })
}

/// Runs particle-cni once and returns the spec error code (0 for success).
fn code(command: &str, container: &Container, config: &Value) -> (u32, Value) {
    let out = std::process::Command::new(&particle().binary)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &container.id)
        .env("CNI_IFNAME", &container.ifname)
        .env("CNI_NETNS", container.netns.as_ref().unwrap())
        .env("CNI_PATH", "/nonexistent")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            let body = match config {
                Value::String(raw) => raw.clone().into_bytes(),
                other => serde_json::to_vec(other).unwrap(),
            };
            // VERSION reads no stdin: a closed pipe is fine.
            let _ = c.stdin.take().unwrap().write_all(&body);
            c.wait_with_output()
        })
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if out.status.success() {
        (0, json)
    } else {
        (json["code"].as_u64().unwrap() as u32, json)
    }
}

/// The tuning plugin's state directory, removed even when the test fails.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn containers_on_two_nodes_get_overlay_addresses_through_the_plugin() {
    require_root();
    let tenant = CreateTenant {
        name: "a".into(),
        vni: 2260,
        subnet: "10.227.0.0/16".into(),
        block_prefix: None,
        warm_per_node: None,
    };
    let nodes = nodes_with(2, "10.226.0.0/24", POOL, tenant);
    let tuning = TempDir(std::env::temp_dir().join(format!("{}-tuning", nodes.prefix())));
    let tuning_dir = &tuning.0;

    // particle-cni then the reference `tuning` plugin, which works on the
    // interface particle-cni reported (chaining through prevResult). Node 0
    // plugs a pair onto the tenant's bridge (the default), node 1 moves a
    // warm endpoint's own interface in.
    let list = |node: usize| {
        let mut particle = conf("", nodes.socket(node), "a", "1.0.0");
        if node == 1 {
            particle["attachMode"] = json!("move");
        }
        ConfList::new(
            json!({
                "cniVersion": "1.0.0", "name": format!("particle-n{node}"),
                "plugins": [
                    particle,
                    { "type": "tuning", "mtu": 1400, "dataDir": tuning_dir }
                ]
            }),
            &plugin_dirs(),
        )
    };
    let (ns0, ns1) = (NetNs::create().unwrap(), NetNs::create().unwrap());
    let c0 = Container::in_netns("ctr0", &ns0, "eth0");
    let c1 = Container::in_netns("ctr1", &ns1, "eth0");
    let r0 = list(0).add(None, &c0).unwrap();
    let r1 = list(1).add(None, &c1).unwrap();

    // The result: the interface in the container's namespace, its overlay
    // address and gateway, the default route, the configured DNS.
    assert_eq!(r0["cniVersion"], "1.0.0");
    assert_eq!(r0["interfaces"][0]["name"], "eth0");
    assert_eq!(
        r0["interfaces"][0]["sandbox"],
        fd_path(&ns0).to_str().unwrap()
    );
    assert_eq!(r0["ips"][0]["interface"], 0);
    assert!(ip_of(&r0).starts_with("10.227."), "{r0}");
    assert_eq!(r0["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(r0["dns"]["nameservers"][0], "10.227.0.1");
    assert_ne!(ip_of(&r0), ip_of(&r1));
    assert_eq!(links(&ns0), ["lo", "eth0"]);
    let mtu = ns0
        .command("ip")
        .args(["-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&mtu.stdout).contains("mtu 1400"),
        "tuning applied its MTU to our interface: {}",
        String::from_utf8_lossy(&mtu.stdout)
    );

    // Across the two nodes, over the tenant's VXLAN overlay, both ways.
    assert!(pings(&ns0, &ip_of(&r1)), "node 0 → node 1");
    assert!(pings(&ns1, &ip_of(&r0)), "node 1 → node 0");

    // CHECK with the cached result; ADD again (a runtime retrying) is the same.
    list(0).check(None, &c0, &r0).unwrap();
    let again = list(0).add(None, &c0).unwrap();
    assert_eq!(ip_of(&again), ip_of(&r0));

    // STATUS and VERSION (spec 1.1).
    let status = conf("particle-n0", nodes.socket(0), "a", "1.1.0");
    assert_eq!(code("STATUS", &c0, &status).0, 0);
    let unknown = conf("particle-n0", nodes.socket(0), "nobody", "1.1.0");
    assert_eq!(code("STATUS", &c0, &unknown).0, 50);
    let (_, version) = code("VERSION", &c0, &status);
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.1.0")),
        "{version}"
    );

    // The spec's error codes and messages.
    let good = conf("particle-n0", nodes.socket(0), "a", "1.0.0");
    let bad_cmd = code("FROB", &c0, &good);
    assert_eq!(bad_cmd.0, 4, "{}", bad_cmd.1);
    assert_eq!(bad_cmd.1["msg"], "Invalid necessary environment variables");
    assert!(bad_cmd.1["details"]
        .as_str()
        .unwrap()
        .contains("CNI_COMMAND"));
    let c9 = Container::in_netns("ctr9", &ns0, "net9");
    for (what, config, expected) in [
        (
            "no tenant",
            json!({"cniVersion":"1.0.0","name":"n","type":"particle-cni","agentSocket":"/run/x.sock"}),
            7,
        ),
        (
            "unknown key",
            json!({"cniVersion":"1.0.0","name":"n","type":"particle-cni","tenant":"a","agentSocket":"/run/x.sock","bridge":"br0"}),
            2,
        ),
        (
            "ipam",
            json!({"cniVersion":"1.0.0","name":"n","type":"particle-cni","tenant":"a","agentSocket":"/run/x.sock","ipam":{"type":"host-local"}}),
            2,
        ),
        (
            "future version",
            conf("n", nodes.socket(0), "a", "9.0.0"),
            1,
        ),
        ("not JSON", Value::String("{not json".into()), 6),
        (
            "unknown tenant",
            conf("n", nodes.socket(0), "nobody", "1.0.0"),
            100,
        ),
        (
            "no agent",
            conf(
                "n",
                std::path::Path::new("/run/particle/none.sock"),
                "a",
                "1.0.0",
            ),
            11,
        ),
    ] {
        let (got, answer) = code("ADD", &c9, &config);
        assert_eq!(got, expected, "{what}: {answer}");
        assert!(
            answer["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {answer}"
        );
    }
    assert_eq!(links(&ns0), ["lo", "eth0"], "refused ADDs changed nothing");

    // GC: an attachment the runtime no longer lists is taken back.
    let ns2 = NetNs::create().unwrap();
    let c2 = Container::in_netns("ctr2", &ns2, "eth0");
    particle()
        .invoke(
            None,
            CniCommand::Add,
            &c2,
            &conf("particle-n0", nodes.socket(0), "a", "1.1.0"),
        )
        .unwrap()
        .0
        .result()
        .unwrap();
    assert_eq!(links(&ns2), ["lo", "eth0"]);
    let mut gc = conf("particle-n0", nodes.socket(0), "a", "1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID":"ctr0","ifname":"eth0"}]);
    let (outcome, _) = particle()
        .invoke(
            None,
            CniCommand::Gc,
            &Container {
                netns: None,
                ..c2.clone()
            },
            &gc,
        )
        .unwrap();
    outcome.ok().unwrap();
    assert_eq!(links(&ns2), ["lo"], "GC took the unlisted attachment back");
    assert_eq!(links(&ns0), ["lo", "eth0"], "and left the listed one");

    // DEL: the interfaces go back to their endpoints; again, and for a
    // container never seen, DEL still succeeds.
    list(0).del(None, &c0, Some(&r0)).unwrap();
    list(1).del(None, &c1, Some(&r1)).unwrap();
    assert_eq!(links(&ns0), ["lo"]);
    assert_eq!(links(&ns1), ["lo"]);
    list(0).del(None, &c0, Some(&r0)).unwrap();
    let never = Container::in_netns("never", &ns0, "eth0");
    list(0).del(None, &never, None).unwrap();
    // CHECK of what is gone fails.
    assert!(list(0).check(None, &c0, &r0).is_err());

    // Nothing left behind: the plugged pairs are gone with their peers (the
    // namespaces hold only lo); the moved endpoint came back clean and its
    // pool is full again. Plugging claims no endpoint at all.
    nodes.wait_ready("a", 4, Duration::from_secs(10)).unwrap();
    for (i, claimed) in [(0, 0), (1, 1)] {
        let status = nodes.request(i, &json!({"op":"status"})).unwrap();
        assert_eq!(status["pools"]["a"]["claims_total"], claimed, "{status}");
    }
}

//! What happens around the plugin: the benchmark's measuring function runs
//! (both plugins, both attach modes, nothing leaked), and an agent that goes
//! away takes its lent interfaces with it while DEL still succeeds.

mod common;

use std::time::{Duration, Instant};

use common::{links, nodes_with, plugin_dir, require_root};
use particle_bench::baselines::cni::{CniCommand, CniPlugin, Container, REFERENCE_PLUGIN_DIR};
use particle_bench::cni_add::{self, CniTarget};
use particle_net::{NetNs, PoolConfig};
use particle_wire::api::CreateTenant;

fn tenant() -> CreateTenant {
    CreateTenant {
        name: "t".into(),
        vni: 2290,
        subnet: "10.229.128.0/17".into(),
        block_prefix: Some(22),
        warm_per_node: None,
    }
}

const POOL: PoolConfig = PoolConfig {
    high_watermark: 4,
    low_watermark: 3,
    batch_size: 4,
};

#[test]
fn the_cni_benchmark_measures_both_plugins_and_leaks_nothing() {
    require_root();
    let nodes = nodes_with(1, "10.229.1.0/24", POOL, tenant());
    let ipam = std::env::temp_dir().join(nodes.prefix().label("lifecycle-ipam"));
    let bridge = nodes.prefix().ifname('c', 0).unwrap();
    let dir = plugin_dir();
    let target = CniTarget {
        node: nodes.node(0),
        agent_socket: nodes.socket(0),
        tenant: "t",
        plugin_dir: &dir,
        bridge_name: bridge.as_str(),
        ipam_dir: &ipam,
    };
    let report = cni_add::measure_adds(&target, 3);
    let _ = std::fs::remove_dir_all(&ipam);
    let report = report.unwrap();
    assert_eq!(report.leaked, 0);
    let names: Vec<_> = report.systems.keys().map(String::as_str).collect();
    assert_eq!(names, ["cni-bridge", "particle-cni", "particle-cni-move"]);
    for (name, s) in &report.systems {
        assert!(
            s.add_p50_ms > 0.0 && s.add_p99_ms >= s.add_p50_ms,
            "{name}: {s:?}"
        );
        assert!(s.del_p50_ms > 0.0, "{name}: {s:?}");
    }
    assert_eq!(report.systems["particle-cni"].ratio, 1.0);
    assert_eq!(report.ratio, report.systems["cni-bridge"].ratio);
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["systems"]["cni-bridge"]["add_p50_ms"].is_number());
    assert!(json["ratio"].is_number());
}

#[test]
fn an_agent_that_goes_takes_its_interfaces_and_del_still_succeeds() {
    require_root();
    let nodes = nodes_with(1, "10.229.2.0/24", POOL, tenant());
    let plugin =
        CniPlugin::find("particle-cni", &[plugin_dir(), REFERENCE_PLUGIN_DIR.into()]).unwrap();
    let mut containers = Vec::new();
    for (i, mode) in ["plug", "move"].into_iter().enumerate() {
        let ns = NetNs::create().unwrap();
        let c = Container::in_netns(format!("gone{i}"), &ns, "eth0");
        let mut conf = cni_add::particle_config("gone", "t", nodes.socket(0));
        conf["attachMode"] = mode.into();
        plugin
            .invoke(None, CniCommand::Add, &c, &conf)
            .unwrap()
            .0
            .result()
            .unwrap();
        assert_eq!(links(&ns), ["lo", "eth0"]);
        containers.push((ns, c, conf));
    }
    // The agent stops (as if killed): its tenant router goes, and with it
    // the host ends of both lent pairs.
    drop(nodes);
    let deadline = Instant::now() + Duration::from_secs(10);
    for (ns, c, conf) in &containers {
        while links(ns) != ["lo"] {
            assert!(Instant::now() < deadline, "interface outlived its agent");
            std::thread::sleep(Duration::from_millis(20));
        }
        // No agent: nothing left to undo, DEL succeeds.
        plugin
            .invoke(None, CniCommand::Del, c, conf)
            .unwrap()
            .0
            .ok()
            .unwrap();
    }
}

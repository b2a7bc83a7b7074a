//! `particle bench cni`: the time of one CNI ADD (and DEL) as a runtime
//! sees it, `particle-cni` against the reference `bridge` plugin with
//! `host-local` IPAM, in the same run, alternating one ADD of each so both
//! see the same machine noise.
//!
//! Both plugins run inside a namespaced node (the bridge plugin builds its
//! bridge and host-side veths where it runs; never in the machine's own
//! namespace), every container gets a fresh namespace made outside the timed
//! part, and the time is the whole invocation: process start to exit, as a
//! runtime waits for it. particle-cni asks the node's running agent, whose
//! warm pool holds an endpoint for every ADD (the design point: the network
//! is built before it is needed); the bridge plugin builds each one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use particle_cluster::{LocalCluster, Options};
use particle_net::endpoint::list_links;
use particle_net::{NetNs, NetlinkSocket, PoolConfig};
use particle_wire::api::CreateTenant;
use serde::Serialize;
use serde_json::{json, Value};

use crate::baselines::cni::{
    bridge_config, CniCommand, CniOutcome, CniPlugin, Container, REFERENCE_PLUGIN_DIR,
};
use crate::stats::percentile;

pub const PARTICLE_CNI: &str = "particle-cni";
/// particle-cni with `"attachMode": "move"`: a warm endpoint's own interface
/// moved into the container's namespace.
pub const PARTICLE_CNI_MOVE: &str = "particle-cni-move";
pub const CNI_BRIDGE: &str = "cni-bridge";

/// The tenant the benchmark's containers join.
const TENANT: &str = "bench";
const TENANT_SUBNET: &str = "10.232.0.0/16";
const BRIDGE_SUBNET: &str = "10.233.0.0/16";
const UNDERLAY: &str = "10.231.0.0/24";

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SystemTimes {
    pub add_p50_ms: f64,
    pub add_p99_ms: f64,
    pub del_p50_ms: f64,
    /// This system's ADD p50 over particle-cni's (particle-cni is 1).
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CniAddReport {
    pub adds: usize,
    /// `particle-cni` (plug, the default), `particle-cni-move` and `cni-bridge`.
    pub systems: BTreeMap<String, SystemTimes>,
    /// cni-bridge ADD p50 / particle-cni ADD p50: how many times faster an
    /// ADD through the warm pool is.
    pub ratio: f64,
    /// Links left in the node after every DEL (beyond the bridge plugin's
    /// bridge); must be 0.
    pub leaked: usize,
}

/// Where to run the plugins: a node namespace with a running agent.
#[derive(Debug, Clone, Copy)]
pub struct CniTarget<'a> {
    /// The node's namespace; both plugins run inside it.
    pub node: &'a NetNs,
    pub agent_socket: &'a Path,
    /// A tenant with a warm pool on that node of at least `adds` endpoints
    /// (for `particle-cni-move`; the default mode claims none).
    pub tenant: &'a str,
    /// The directory holding the `particle-cni` binary.
    pub plugin_dir: &'a Path,
    /// A name for the bridge plugin's bridge (≤ 15 bytes, the run's prefix).
    pub bridge_name: &'a str,
    /// Where host-local keeps its leases (a directory of the run).
    pub ipam_dir: &'a Path,
}

/// particle-cni's configuration for `tenant` at `agent_socket`.
pub fn particle_config(network: &str, tenant: &str, agent_socket: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": network, "type": PARTICLE_CNI,
        "tenant": tenant, "agentSocket": agent_socket,
    })
}

/// Where `particle-cni` is: next to the running binary, else `/opt/cni/bin`.
pub fn find_plugin_dir() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()?.parent() {
        candidates.push(dir.to_path_buf());
        // `cargo test` binaries live one level down, in deps/.
        if let Some(up) = dir.parent() {
            candidates.push(up.to_path_buf());
        }
    }
    candidates.push(PathBuf::from("/opt/cni/bin"));
    candidates
        .into_iter()
        .find(|d| d.join(PARTICLE_CNI).is_file())
        .context("no particle-cni binary next to this one or in /opt/cni/bin: cargo build --release -p particle-cni")
}

fn links_in(node: &NetNs) -> Result<Vec<String>> {
    let mut s = NetlinkSocket::open_in(node)?;
    Ok(list_links(&mut s)?.into_iter().map(|l| l.name).collect())
}

fn pings(ns: &NetNs, gateway: &str) -> Result<bool> {
    Ok(ns
        .command("ping")
        .args(["-c1", "-W2", gateway])
        .output()
        .context("running ping (scripts/install-deps)")?
        .status
        .success())
}

fn gateway_of(result: &Value) -> Option<String> {
    result["ips"].as_array()?.last()?["gateway"]
        .as_str()
        .map(str::to_string)
}

/// `adds` ADDs then as many DELs through each plugin, alternating, in
/// `target.node`; every container namespace is fresh. Checks that the first
/// container of each system reaches its gateway, and that DEL left nothing.
pub fn measure_adds(target: &CniTarget, adds: usize) -> Result<CniAddReport> {
    ensure!(adds > 0, "at least one ADD");
    let search = vec![
        target.plugin_dir.to_path_buf(),
        PathBuf::from(REFERENCE_PLUGIN_DIR),
    ];
    let mut moving = particle_config("bench-particle-move", target.tenant, target.agent_socket);
    moving["attachMode"] = json!("move");
    let systems = [
        (
            PARTICLE_CNI,
            CniPlugin::find(PARTICLE_CNI, &search)?,
            particle_config("bench-particle", target.tenant, target.agent_socket),
        ),
        (
            PARTICLE_CNI_MOVE,
            CniPlugin::find(PARTICLE_CNI, &search)?,
            moving,
        ),
        (
            CNI_BRIDGE,
            CniPlugin::find("bridge", &search)?,
            bridge_config(
                "bench-bridge",
                target.bridge_name,
                BRIDGE_SUBNET,
                target.ipam_dir,
            ),
        ),
    ];
    let links_before = links_in(target.node)?;

    let mut containers: Vec<Vec<(NetNs, Container)>> = systems.iter().map(|_| Vec::new()).collect();
    let mut add_times: Vec<Vec<Duration>> = systems.iter().map(|_| Vec::new()).collect();
    let mut del_times: Vec<Vec<Duration>> = systems.iter().map(|_| Vec::new()).collect();
    for i in 0..adds {
        for (s, (name, plugin, config)) in systems.iter().enumerate() {
            let netns = NetNs::create()?;
            let container = Container::in_netns(format!("{name}-{i}"), &netns, "eth0");
            let (outcome, took) =
                plugin.invoke(Some(target.node), CniCommand::Add, &container, config)?;
            let result = match outcome {
                CniOutcome::Success(Some(r)) => r,
                other => bail!("{name} ADD {i}: {other:?}"),
            };
            if i == 0 {
                let gateway = gateway_of(&result)
                    .with_context(|| format!("{name}: no gateway in {result}"))?;
                ensure!(
                    pings(&netns, &gateway)?,
                    "{name}: the first container cannot reach its gateway {gateway}"
                );
            }
            add_times[s].push(took);
            containers[s].push((netns, container));
        }
    }
    // Index-driven on purpose: the systems take turns, one DEL each.
    #[allow(clippy::needless_range_loop)]
    for i in 0..adds {
        for (s, (name, plugin, config)) in systems.iter().enumerate() {
            let (_, container) = &containers[s][i];
            let (outcome, took) =
                plugin.invoke(Some(target.node), CniCommand::Del, container, config)?;
            outcome.ok().with_context(|| format!("{name} DEL {i}"))?;
            del_times[s].push(took);
        }
    }
    drop(containers);
    let leaked = links_in(target.node)?
        .into_iter()
        .filter(|l| !links_before.contains(l) && l != target.bridge_name)
        .count();

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let particle_p50 = ms(percentile(&mut add_times[0], 50.0));
    let mut out = BTreeMap::new();
    for (s, (name, _, _)) in systems.iter().enumerate() {
        let add_p50 = ms(percentile(&mut add_times[s], 50.0));
        out.insert(
            name.to_string(),
            SystemTimes {
                add_p50_ms: add_p50,
                add_p99_ms: ms(percentile(&mut add_times[s], 99.0)),
                del_p50_ms: ms(percentile(&mut del_times[s], 50.0)),
                ratio: if particle_p50 > 0.0 {
                    add_p50 / particle_p50
                } else {
                    0.0
                },
            },
        );
    }
    let ratio = out[CNI_BRIDGE].ratio;
    Ok(CniAddReport {
        adds,
        systems: out,
        ratio,
        leaked,
    })
}

/// The whole benchmark: one namespaced node with a running agent and a warm
/// pool of `adds` endpoints, then [`measure_adds`].
pub fn run(adds: usize) -> Result<CniAddReport> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench cni creates namespaces and runs CNI plugins: run it as root");
    }
    ensure!(adds > 0, "--adds must be at least 1");
    particle_net::limits::raise_open_files().context("raising the open-file limit")?;
    let plugin_dir = find_plugin_dir()?;
    let pool = PoolConfig {
        high_watermark: adds,
        low_watermark: adds - adds / 4,
        batch_size: 64,
    };
    let cluster = LocalCluster::start(&Options::in_process(1, UNDERLAY, pool))?;
    cluster.create_tenant(&CreateTenant {
        name: TENANT.into(),
        vni: 2320,
        subnet: TENANT_SUBNET.into(),
        // Room for the warm pool and the plugged pairs: 4094 addresses.
        block_prefix: Some(20),
        warm_per_node: None,
    })?;
    cluster.wait_ready(TENANT, adds as u64, Duration::from_secs(120))?;
    let bridge_name = cluster.prefix().ifname('c', 0)?;
    let ipam_dir = std::env::temp_dir().join(cluster.prefix().label("host-local"));
    let target = CniTarget {
        node: cluster.node(0),
        agent_socket: cluster.socket(0),
        tenant: TENANT,
        plugin_dir: &plugin_dir,
        bridge_name: bridge_name.as_str(),
        ipam_dir: &ipam_dir,
    };
    let report = measure_adds(&target, adds);
    let _ = std::fs::remove_dir_all(&ipam_dir);
    report
}

pub fn render(r: &CniAddReport) -> String {
    let mut out = format!(
        "CNI ADD/DEL, {} each, same run, plugins run inside a namespaced node\n\n",
        r.adds
    );
    out.push_str(&format!(
        "{:<20}{:>14}{:>14}{:>14}{:>10}\n",
        "system", "ADD p50 ms", "ADD p99 ms", "DEL p50 ms", "ratio"
    ));
    for (name, s) in &r.systems {
        out.push_str(&format!(
            "{:<20}{:>14.2}{:>14.2}{:>14.2}{:>9.2}x\n",
            name, s.add_p50_ms, s.add_p99_ms, s.del_p50_ms, s.ratio
        ));
    }
    out.push_str(&format!(
        "\nparticle-cni ADD is {:.2}x faster than the bridge plugin's (p50); leaked: {}\n",
        r.ratio, r.leaked
    ));
    out
}

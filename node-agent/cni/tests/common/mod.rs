//! Shared by particle-cni's test crates: the plugin's directory, links in a
//! namespace, and namespaced nodes whose agents (`particle_cluster`, in
//! process) hold one tenant's warm pools.

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use particle_cluster::{LocalCluster, Options};
use particle_net::endpoint::list_links;
use particle_net::{NetNs, NetlinkSocket, PoolConfig};
use particle_wire::api::CreateTenant;

/// These tests drive the real kernel; without root they must fail, loudly.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and runs CNI plugins; run it as root (see README)"
    );
}

/// Where the particle-cni binary under test is.
pub fn plugin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_particle-cni"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The names of the links in `ns`.
pub fn links(ns: &NetNs) -> Vec<String> {
    let mut s = NetlinkSocket::open_in(ns).unwrap();
    list_links(&mut s)
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect()
}

/// `nodes` nodes on `underlay` whose agents keep `pool` warm, with `tenant`
/// created and its pool full on every node.
pub fn nodes_with(
    nodes: usize,
    underlay: &str,
    pool: PoolConfig,
    tenant: CreateTenant,
) -> LocalCluster {
    let cluster = LocalCluster::start(&Options::in_process(nodes, underlay, pool)).unwrap();
    cluster.create_tenant(&tenant).unwrap();
    let full = pool.high_watermark as u64;
    cluster
        .wait_ready(&tenant.name, full, Duration::from_secs(30))
        .unwrap();
    cluster
}

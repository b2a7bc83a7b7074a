//! Several controllers on etcd ([`Options::ha`](crate::Options)): a
//! three-member etcd cluster and the controllers, all in the underlay's
//! namespace (on its gateway address: nothing listens outside the
//! cluster's namespaces), each member's data in the cluster's directory
//! (removed with it). Members are processes of the cluster like the
//! controllers: killed when it stops, started again when they die.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use particle_net::NetNs;

use crate::processes::ChildGuard;
use crate::Options;

/// What a highly available cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ha {
    /// Controllers sharing the etcd cluster (one leads).
    pub controllers: usize,
}

/// etcd members (three: one may die and the cluster keeps its quorum).
pub const ETCD_MEMBERS: usize = 3;
/// Member `i` serves clients on this port + 2i and its peers on the next one.
const ETCD_PORT: u16 = 2379;
/// Where Debian's `etcd-server` puts it.
const ETCD_BINARY: &str = "/usr/bin/etcd";

/// Every controller's address: `first`, then the next ports.
pub(crate) fn controller_addrs(opts: &Options, first: SocketAddr) -> Vec<SocketAddr> {
    let n = opts.ha.map_or(1, |h| h.controllers.max(1)) as u16;
    (0..n)
        .map(|i| SocketAddr::new(first.ip(), first.port() + i))
        .collect()
}

/// The cluster id the controllers record in etcd: the cluster's directory name.
pub(crate) fn cluster_id(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "particle".into())
}

fn member_addr(ip: IpAddr, i: usize) -> (SocketAddr, SocketAddr) {
    let client = ETCD_PORT + 2 * i as u16;
    (SocketAddr::new(ip, client), SocketAddr::new(ip, client + 1))
}

/// Starts the members on `ip` in `fabric`; them, and the `--store` the controllers take.
pub(crate) fn start_etcd(
    ip: IpAddr,
    dir: &Path,
    fabric: &NetNs,
) -> Result<(Vec<ChildGuard>, String)> {
    let etcd = PathBuf::from(ETCD_BINARY);
    if !etcd.exists() {
        bail!("{ETCD_BINARY} not found: `scripts/install-deps` installs Debian's etcd-server");
    }
    let members: Vec<(SocketAddr, SocketAddr)> =
        (0..ETCD_MEMBERS).map(|i| member_addr(ip, i)).collect();
    let initial: Vec<String> = (members.iter().enumerate())
        .map(|(i, (_, peer))| format!("m{i}=http://{peer}"))
        .collect();
    let token = cluster_id(dir);
    let mut children = Vec::new();
    for (i, (client, peer)) in members.iter().enumerate() {
        let args: Vec<String> = [
            "--name".to_string(),
            format!("m{i}"),
            "--data-dir".into(),
            dir.join(format!("etcd-m{i}")).display().to_string(),
            "--listen-client-urls".into(),
            format!("http://{client}"),
            "--advertise-client-urls".into(),
            format!("http://{client}"),
            "--listen-peer-urls".into(),
            format!("http://{peer}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://{peer}"),
            "--initial-cluster".into(),
            initial.join(","),
            "--initial-cluster-state".into(),
            "new".into(),
            "--initial-cluster-token".into(),
            token.clone(),
            // Twice etcd's defaults: three members and three controllers
            // share a busy machine's cores with the nodes, and a member
            // that misses heartbeats must not start elections all the time.
            // (The shortest lease is then 1.5 x 10 ticks x 200 ms = 3 s,
            // the leader's.)
            "--heartbeat-interval".into(),
            "200".into(),
            "--election-timeout".into(),
            "2000".into(),
        ]
        .into();
        let log = dir.join(format!("etcd-m{i}.log"));
        children.push(ChildGuard::spawn_program(fabric, &etcd, &args, &log)?);
    }
    let endpoints: Vec<String> = members.iter().map(|(c, _)| c.to_string()).collect();
    Ok((children, format!("etcd://{}", endpoints.join(","))))
}

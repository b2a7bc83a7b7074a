//! A namespace a caller names (a container runtime's, in a CNI ADD) is taken
//! only if it is a network namespace that this process does not manage: a
//! path into the agent's own descriptors (`/proc/<agent>/fd/N`) must never
//! lend the caller a tenant router, an endpoint or a node.

mod common;

use std::os::fd::AsRawFd;

use particle_net::{NetNs, NetNsError};

fn fd_path(ns: &NetNs) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd())
}

#[test]
fn managed_and_non_namespace_paths_are_refused() {
    common::require_root();
    let runtime_ns = NetNs::create().unwrap();
    assert!(NetNs::open_foreign(fd_path(&runtime_ns)).is_ok());

    let managed = NetNs::create().unwrap().into_managed();
    let clone = managed.try_clone().unwrap();
    let r = NetNs::open_foreign(fd_path(&managed));
    assert!(matches!(r, Err(NetNsError::Ours { .. })), "{r:?}");
    // Still refused while any handle to it lives, free once all are gone.
    let inode = managed.inode().unwrap();
    drop(managed);
    assert!(particle_net::netns::is_managed(inode));
    drop(clone);
    assert!(!particle_net::netns::is_managed(inode));

    // The process's own namespace, and things that are not namespaces.
    let r = NetNs::open_foreign("/proc/self/ns/net");
    assert!(matches!(r, Err(NetNsError::Ours { .. })), "{r:?}");
    let r = NetNs::open_foreign("/proc/self/ns/uts");
    assert!(matches!(r, Err(NetNsError::NotNetNs { .. })), "{r:?}");
    let r = NetNs::open_foreign("/dev/null");
    assert!(matches!(r, Err(NetNsError::NotNetNs { .. })), "{r:?}");
}

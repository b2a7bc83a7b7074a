//! A run that crashes leaves mounted namespaces and links behind; the garbage
//! collector removes them, and never touches a live run's objects.

mod common;

use std::path::Path;
use std::process::Command;

use particle_net::bridge::Bridge;
use particle_net::scratch::ScratchNode;
use particle_net::{gc, AddressBlock, NetNs, NetlinkSocket, Run, RunPrefix};

const CHILD_ENV: &str = "PARTICLE_GC_TEST_CHILD_NODE";

/// Not a test of its own: the body of the child process that
/// `crashed_runs_leftovers_are_collected` starts and lets crash.
#[test]
fn crash_child() {
    let Ok(node_path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let run = Run::start().unwrap();
    let prefix = run.prefix().clone();
    // A mounted namespace of its own, with a bridge inside.
    let mut own = ScratchNode::new(&prefix, AddressBlock::parse("10.209.0.0/24").unwrap()).unwrap();
    own.netns.mount_as(&prefix.label("scratch")).unwrap();
    // A bridge and a mounted endpoint in the parent's node namespace.
    let node = NetNs::open(&node_path).unwrap();
    let mut socket = NetlinkSocket::open_in(&node).unwrap();
    Bridge::create(&mut socket, &prefix.ifname('b', 7).unwrap(), None).unwrap();
    println!("child-prefix={prefix}");
    std::mem::forget(run);
    std::mem::forget(own);
    std::process::abort();
}

#[test]
fn crashed_runs_leftovers_are_collected() {
    let mut t = common::scratch("10.208.0.0/24");
    let node_name = t.run.prefix().label("node");
    let node_path = t.node.netns.mount_as(&node_name).unwrap().to_owned();

    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &node_path)
        .output()
        .unwrap();
    assert!(!child.status.success(), "the child must crash");
    let stdout = String::from_utf8_lossy(&child.stdout);
    let prefix = stdout
        .split("child-prefix=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| {
            panic!(
                "child output: {stdout} {}",
                String::from_utf8_lossy(&child.stderr)
            )
        });
    let prefix = RunPrefix::parse(prefix).unwrap();
    assert!(!prefix.is_live());
    let child_mount = Path::new("/run/netns").join(prefix.label("scratch"));
    let child_bridge = prefix.ifname('b', 7).unwrap().to_string();
    assert!(child_mount.exists());
    assert!(t.node.extra_links().unwrap().contains(&child_bridge));

    let report = gc::collect(Some(&mut t.node.socket));
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(
        report.namespaces.contains(&prefix.label("scratch")),
        "{report:?}"
    );
    assert!(report.links.contains(&child_bridge), "{report:?}");
    assert!(report.runs.contains(&prefix.to_string()), "{report:?}");
    assert!(!child_mount.exists());
    assert!(!prefix.lock_path().exists());
    assert!(t.node.extra_links().unwrap().is_empty());

    // The live run's own objects are untouched.
    assert!(node_path.exists());
    assert!(Bridge::lookup(&mut t.node.socket, &t.node.bridge.name).is_ok());
    assert!(t.run.prefix().is_live());
}

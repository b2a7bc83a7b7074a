//! Shared set-up for the kernel tests: every test runs in its own scratch
//! namespace under its own run prefix, so tests in parallel never collide and
//! nothing lands in the machine's own namespace.
#![allow(dead_code)]

pub mod frames;
pub mod icmp;

use std::time::{Duration, Instant};

use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Run};

/// These tests drive the real kernel; without root they must fail, loudly.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces, veth pairs and bridges and needs root \
         (CAP_NET_ADMIN, CAP_SYS_ADMIN); run the suite as root (see README)"
    );
    let _ = particle_net::limits::raise_open_files();
}

pub struct TestNode {
    pub node: ScratchNode,
    pub run: Run,
}

pub fn scratch(block: &str) -> TestNode {
    require_root();
    let run = Run::start().expect("start a run");
    let node = ScratchNode::new(run.prefix(), AddressBlock::parse(block).expect("block"))
        .expect("scratch node");
    TestNode { node, run }
}

/// Polls until `f` is true or the deadline passes (kernel teardown is async).
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

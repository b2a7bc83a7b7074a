//! Shared set-up: a scratch underlay (a namespace with a bridge) under a run
//! of its own, so tests in parallel never collide.

use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Run};

/// These tests drive the real kernel; without root they must fail, loudly.
pub fn fabric(block: &str) -> (Run, ScratchNode) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and needs root; run the suite as root (see README)"
    );
    let _ = particle_net::limits::raise_open_files();
    let run = Run::start().unwrap();
    let fabric = ScratchNode::new(run.prefix(), AddressBlock::parse(block).unwrap()).unwrap();
    (run, fabric)
}

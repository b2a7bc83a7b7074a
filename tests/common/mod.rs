//! Shared by the `particle` binary's tests.

/// These tests drive the real kernel; without root they must fail, loudly.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and needs root; run the suite as root (see README)"
    );
}

//! Shared by the bench crate's kernel tests and examples.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// These tests drive the real kernel; without root they must fail, loudly.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and starts dockerd inside them and needs root; \
         run the suite as root (see README)"
    );
}

/// The function binary (`particle-fn`, release): `$PARTICLE_FN` when set,
/// else built now into its own target directory (so this never waits on the
/// lock of the build that runs the test; std only, it builds in seconds).
pub fn function_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PARTICLE_FN") {
        return PathBuf::from(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the workspace");
    let target = workspace.join("target/particle-fn-build");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--quiet", "--release", "-p", "particle-workloads"])
        .args(["--bin", "particle-fn", "--target-dir"])
        .arg(&target)
        .status()
        .expect("run cargo to build particle-fn");
    assert!(status.success(), "building particle-fn failed");
    target.join("release/particle-fn")
}

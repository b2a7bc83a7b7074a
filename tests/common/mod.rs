//! Shared by the `particle` binary's tests.

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

/// These tests drive the real kernel; without root they must fail, loudly.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and needs root; run the suite as root (see README)"
    );
}

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub fn particle() -> Command {
    Command::new(env!("CARGO_BIN_EXE_particle"))
}

/// A `particle cluster up` running in the background, stopped (SIGTERM, as
/// Ctrl-C) when dropped, even if the test fails.
pub struct Cluster {
    child: Child,
    pub port: u16,
    pub token_file: PathBuf,
}

impl Cluster {
    /// Starts it and waits for `ready`.
    pub fn up(nodes: usize, port: u16, underlay: &str, extra: &[&str]) -> Self {
        require_root();
        let mut child = particle()
            .args(["cluster", "up", "--nodes", &nodes.to_string()])
            .args(["--port", &port.to_string(), "--underlay", underlay])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut cluster = Self {
            child,
            port,
            token_file: PathBuf::new(),
        };
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(path) = line.trim().strip_prefix("token") {
                cluster.token_file = PathBuf::from(path.trim());
            }
            if line.starts_with("ready") {
                // Keep reading: it prints again when it stops.
                std::thread::spawn(move || lines.for_each(drop));
                return cluster;
            }
        }
        panic!("cluster up ended before it was ready");
    }

    /// `particle SUBCOMMAND --controller ... --token-file ...`; add the rest.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = particle();
        cmd.args(args)
            .args(["--controller", &format!("127.0.0.1:{}", self.port)])
            .arg("--token-file")
            .arg(&self.token_file);
        cmd
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
        let _ = self.child.wait();
    }
}

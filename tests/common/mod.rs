//! Shared by the `particle` binary's tests.

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// These tests drive the real kernel; without root they must fail, loudly.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and needs root; run the suite as root (see README)"
    );
}

pub fn particle() -> Command {
    Command::new(env!("CARGO_BIN_EXE_particle"))
}

/// stdout and stderr, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; the whole answer, status line
/// first. An error when the connection fails or is reset: tests kill the
/// controller behind `cluster up`'s relay and call again until it is back.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces: state, ppid.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The pid of the child of `parent` running `particle SUBCOMMAND` with an
/// argument that mentions `needle` (children only: an agent's forked
/// function supervisors share its command line but are not `cluster up`'s).
fn child_pid_of(parent: i32, needle: &str, subcommand: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        if parent_of(pid) != Some(parent) {
            return None;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let ours =
            args.get(1).is_some_and(|a| a == subcommand) && args.iter().any(|a| a.contains(needle));
        ours.then_some(pid)
    })
}

/// Every child of `parent`: its pid and command line.
pub fn children_of(parent: i32) -> Vec<(i32, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            if parent_of(pid) != Some(parent) {
                return None;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((pid, args))
        })
        .collect()
}

/// Links in the namespace of a process.
pub fn links_of(pid: i32) -> usize {
    let ns = particle_net::NetNs::open(format!("/proc/{pid}/ns/net")).unwrap();
    let mut socket = particle_net::NetlinkSocket::open_in(&ns).unwrap();
    particle_net::endpoint::list_links(&mut socket)
        .unwrap()
        .len()
}

/// Waits up to `secs` for `f`, failing the test with `what` otherwise.
pub fn eventually_within(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(20, what, f)
}

/// A `particle cluster up` running in the background, stopped (SIGTERM, as
/// Ctrl-C) when dropped, even if the test fails.
pub struct Cluster {
    /// `cluster up`; taken by [`Cluster::wait`].
    child: Option<Child>,
    pub port: u16,
    pub token_file: PathBuf,
    pub token: String,
    /// The cluster's files (logs, sockets, the controller's store).
    pub logs: String,
    /// Each node's agent socket, n0 first.
    pub sockets: Vec<String>,
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
            child: Some(child),
            port,
            token_file: PathBuf::new(),
            token: String::new(),
            logs: String::new(),
            sockets: Vec::new(),
        };
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(path) = line.trim().strip_prefix("token") {
                cluster.token_file = PathBuf::from(path.trim());
                cluster.token = std::fs::read_to_string(&cluster.token_file)
                    .unwrap()
                    .trim()
                    .to_string();
            }
            if let Some(path) = line.trim().strip_prefix("logs") {
                cluster.logs = path.trim().to_string();
            }
            if let Some(socket) = line.split("agent socket ").nth(1) {
                cluster.sockets.push(socket.trim().to_string());
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

    /// An API call through the relay: (status code, body); status 0 and the
    /// error when there was no answer (e.g. the controller is restarting).
    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let answer = match http(self.port, method, path, &self.token, body) {
            Ok(answer) => answer,
            Err(e) => return (0, format!("no answer: {e}")),
        };
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// An API call that must answer `expected`; its body as JSON.
    pub fn api_json(
        &self,
        method: &str,
        path: &str,
        body: &str,
        expected: u16,
    ) -> serde_json::Value {
        let (status, answer) = self.api(method, path, body);
        assert_eq!(status, expected, "{method} {path}: {answer}");
        serde_json::from_str(&answer).unwrap_or(serde_json::Value::Null)
    }

    /// Launches `n` functions of `tenant` running `argv` without waiting
    /// for them: the job as accepted, or why the launch failed.
    pub fn try_launch_detached(
        &self,
        tenant: &str,
        n: usize,
        argv: &[&str],
    ) -> Result<serde_json::Value, String> {
        let out = self
            .command(&["launch"])
            .args([
                "--tenant",
                tenant,
                "-n",
                &n.to_string(),
                "--detach",
                "--json",
            ])
            .arg("--")
            .args(argv)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(text(&out));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))
    }

    /// [`Self::try_launch_detached`], which must succeed; the job's id.
    pub fn launch_detached(&self, tenant: &str, n: usize, argv: &[&str]) -> String {
        let job = self
            .try_launch_detached(tenant, n, argv)
            .unwrap_or_else(|e| panic!("launching: {e}"));
        assert_eq!(job["state"], "running", "{job}");
        job["id"].as_str().unwrap().to_string()
    }

    /// The job once it has ended (waiting up to `secs`), as the controller
    /// that answers then reports it (it may be restarting, or taking over).
    pub fn ended_job(&self, id: &str, secs: u64) -> serde_json::Value {
        let mut job = serde_json::Value::Null;
        eventually_within(secs, &format!("job {id} ends"), || {
            let (status, body) = self.api("GET", &format!("/v1/jobs/{id}?wait_s=2"), "");
            if status != 200 {
                return false;
            }
            job = serde_json::from_str(&body).unwrap();
            job["state"] != "running"
        });
        job
    }

    /// Creates a tenant with `warm` endpoints per node.
    pub fn create_tenant(&self, name: &str, vni: u32, subnet: &str, warm: usize) {
        let body = format!(
            r#"{{"name":"{name}","vni":{vni},"subnet":"{subnet}","warm_per_node":{warm}}}"#
        );
        self.api_json("POST", "/v1/tenants", &body, 201);
    }

    fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .expect("cluster up runs until wait()")
            .id() as i32
    }

    /// The pid of node `i`'s agent now.
    pub fn agent_pid(&self, i: usize) -> Option<i32> {
        child_pid_of(self.pid(), &self.sockets[i], "agent")
    }

    pub fn controller_pid(&self) -> Option<i32> {
        child_pid_of(self.pid(), &self.logs, "controller")
    }

    /// Every controller now: its `--listen` address and pid.
    pub fn controller_pids(&self) -> Vec<(String, i32)> {
        children_of(self.pid())
            .into_iter()
            .filter(|(_, args)| args.get(1).is_some_and(|a| a == "controller"))
            .filter_map(|(pid, args)| {
                let i = args.iter().position(|a| a == "--listen")?;
                Some((args.get(i + 1)?.clone(), pid))
            })
            .collect()
    }

    /// The leading controller's address and pid, as `/leader` through the relay says.
    pub fn leader(&self) -> Option<(String, i32)> {
        let (status, body) = self.api("GET", "/leader", "");
        if status != 200 {
            return None;
        }
        let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
        if answer["is_leader"] != true {
            return None;
        }
        let me = answer["self"].as_str()?.to_string();
        self.controller_pids()
            .into_iter()
            .find(|(addr, _)| *addr == me)
    }

    /// Every etcd member now (`cluster up --store etcd`): its name and pid.
    pub fn etcd_pids(&self) -> Vec<(String, i32)> {
        children_of(self.pid())
            .into_iter()
            .filter(|(_, args)| args.first().is_some_and(|a| a.ends_with("etcd")))
            .filter_map(|(pid, args)| {
                let i = args.iter().position(|a| a == "--name")?;
                Some((args.get(i + 1)?.clone(), pid))
            })
            .collect()
    }

    /// Waits for `cluster up` to end by itself (e.g. after `cluster down`).
    pub fn wait(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("cluster up runs until wait()");
        child.wait().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

//! One dockerd (with the containerd it starts for itself) inside one host's
//! network namespace, with every root, socket and pid file of its own, and the
//! `docker` CLI pointed at it.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use particle_net::NetNs;

use super::{DockerFailed, SwarmOptions, SwarmUnavailable};

/// The CLI of Debian's docker.io first (it matches its dockerd), then PATH.
const DOCKER_CLI_PATHS: &[&str] = &["/usr/bin/docker"];
const DOCKERD_PATHS: &[&str] = &["/usr/sbin/dockerd", "/usr/bin/dockerd"];

pub(crate) struct Tools {
    pub dockerd: PathBuf,
    pub docker: PathBuf,
}

impl Tools {
    pub fn find() -> Result<Self, SwarmUnavailable> {
        let find = |preferred: &[&str], name: &'static str| {
            preferred
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .or_else(|| super::host_state::which(name))
                .ok_or(SwarmUnavailable::Missing {
                    tool: name,
                    hint: "apt-get install docker.io; scripts/install-deps does",
                })
        };
        Ok(Self {
            dockerd: find(DOCKERD_PATHS, "dockerd")?,
            docker: find(DOCKER_CLI_PATHS, "docker")?,
        })
    }
}

/// A running dockerd for host `host`.
pub(crate) struct Daemon {
    pub host: usize,
    pub dir: PathBuf,
    pub socket: PathBuf,
    docker: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// The directory layout under `dir`: `data/`, `exec/`, `docker.sock`,
    /// `dockerd.pid`, `dockerd.log`, `cli/` (the CLI's config dir).
    pub fn spawn(
        tools: &Tools,
        netns: &NetNs,
        host: usize,
        dir: PathBuf,
        cgroup_parent: &str,
        opts: &SwarmOptions,
    ) -> Result<Self, SwarmUnavailable> {
        let io_err = |what: &str, source| SwarmUnavailable::Io {
            what: format!("host {host}: {what}"),
            source,
        };
        fs::create_dir_all(dir.join("cli")).map_err(|e| io_err("creating the daemon dir", e))?;
        let log = fs::File::create(dir.join("dockerd.log"))
            .map_err(|e| io_err("creating dockerd.log", e))?;
        let log2 = log.try_clone().map_err(|e| io_err("dockerd.log", e))?;
        let socket = dir.join("docker.sock");
        // docker0 and docker_gwbridge get addresses from the project's test
        // range; they live in the host namespace only, but stay clear of
        // anything else a test may route.
        let bip = format!("10.238.{}.1/24", host % 256);
        fs::write(dir.join("daemon.json"), "{}\n").map_err(|e| io_err("writing daemon.json", e))?;
        let child = netns
            .command(&tools.dockerd)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args(["--storage-driver", &opts.storage_driver])
            .args(["--cgroup-parent", cgroup_parent])
            .args(["--bip", &bip])
            // The hosts' namespaces have no upstream resolver, and Docker's
            // embedded DNS never answers a name it cannot forward: a lookup
            // of a peer not yet known on this host would hang for the
            // client's 5 s timeout, an artefact no real host with a working
            // resolver has. With ndots set, Docker answers an unknown
            // single-label name (container names are) at once, empty, and
            // the function retries, as it would after a real NXDOMAIN.
            .args(["--dns-opt", "ndots:1"])
            .args(["--default-address-pool", "base=10.239.0.0/16,size=24"])
            // The daemon reads /etc/docker/daemon.json unless told otherwise.
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| io_err("starting dockerd", e))?;
        Ok(Self {
            host,
            dir,
            socket,
            docker: tools.docker.clone(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until the API answers `/_ping`, or the daemon exits, or `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), SwarmUnavailable> {
        let start = Instant::now();
        loop {
            if ping(&self.socket) {
                return Ok(());
            }
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if exited.is_some() || start.elapsed() > timeout {
                let why = match exited {
                    Some(s) => format!("dockerd exited ({s})"),
                    None => "no answer".into(),
                };
                return Err(SwarmUnavailable::DaemonStart {
                    host: self.host,
                    waited: start.elapsed(),
                    log_tail: format!("{why}; {}", self.log_tail(8)),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A `docker` command talking to this daemon.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.docker);
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            // Keeps the CLI's config (and anything it writes) out of ~/.docker.
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `docker ARGS` to completion; its stdout on success.
    pub fn docker(&self, args: &[&str]) -> Result<String, DockerFailed> {
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|e| self.failed(args, "could not start".into(), e.to_string()))?;
        self.check(args, out)
    }

    /// Runs `docker ARGS` with `input` on stdin.
    pub fn docker_with_input(&self, args: &[&str], input: &[u8]) -> Result<String, DockerFailed> {
        let spawn_err = |e: io::Error| self.failed(args, "could not start".into(), e.to_string());
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        self.check(args, out)
    }

    fn check(&self, args: &[&str], out: Output) -> Result<String, DockerFailed> {
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(self.failed(
                args,
                out.status.to_string(),
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ))
        }
    }

    pub fn failed(&self, args: &[&str], status: String, stderr: String) -> DockerFailed {
        DockerFailed {
            host: self.host,
            command: args.join(" "),
            status,
            stderr,
        }
    }

    /// Sends SIGTERM (dockerd then stops its containers, its containerd and
    /// undoes its mounts).
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }

    /// Waits for the daemon to exit after [`Self::terminate`]; kills it and its
    /// containerd when it has not within `timeout`. Returns what went wrong.
    pub fn wait_stopped(&mut self, timeout: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(mut child) = self.child.take() else {
            return problems;
        };
        // Read before dockerd goes: it removes the file on a clean stop.
        let containerd = fs::read_to_string(self.dir.join("exec/containerd/containerd.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => {
                    problems.push(format!(
                        "host {}: dockerd did not stop within {timeout:?}; killed",
                        self.host
                    ));
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Err(e) => {
                    problems.push(format!("host {}: waiting for dockerd: {e}", self.host));
                    break;
                }
            }
        }
        if let Some(pid) = containerd {
            // Still there only if dockerd was killed; the pid is its child's.
            if is_process(pid, "containerd") {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                problems.push(format!("host {}: containerd {pid} killed", self.host));
            }
        }
        problems
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate();
            for p in self.wait_stopped(Duration::from_secs(20)) {
                tracing::warn!("{p}");
            }
        }
    }
}

/// Stops a leftover process `pid` if it still runs `comm`: SIGTERM, then
/// SIGKILL after 20 s. Returns what it did.
pub(crate) fn stop_stale(pid: i32, comm: &str) -> Option<String> {
    if !is_process(pid, comm) {
        return None;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let start = Instant::now();
    while is_process(pid, comm) {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Some(format!("killed stale {comm} {pid}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(format!("stopped stale {comm} {pid}"))
}

/// Whether process `pid` exists, runs `name` and is not a zombie.
fn is_process(pid: i32, name: &str) -> bool {
    particle_net::proc_stat::ProcStat::of(pid).is_some_and(|s| s.comm == name && !s.is_zombie())
}

/// `GET /_ping` over the API socket.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    // "HTTP/1.1 200 OK"
    reply.split_whitespace().nth(1) == Some("200")
}

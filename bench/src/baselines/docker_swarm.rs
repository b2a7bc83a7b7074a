//! Docker Swarm's overlay, the way its users run it: one Docker engine per
//! host, the hosts in a swarm, an attachable overlay network, and each
//! function a `docker run -d --network NET` that finds its peers by container
//! name through Docker's embedded DNS.
//!
//! Every "host" is a network namespace (docs/design.md's one machine, many nodes):
//! dockerd runs inside it, so docker0, docker_gwbridge, the overlay's VXLAN
//! and dockerd's iptables rules land in that namespace and the machine's own
//! stay untouched. What dockerd still writes machine-wide (a trust key, a
//! load-balancer sandbox directory, plugin and shim socket directories, its
//! cgroups) is recorded before and removed after ([`HostState`]); one swarm
//! runs at a time on a machine (a lock file) so those global paths have one
//! owner. No registry: the function image is imported from a tar of a static
//! busybox, the function binary and its shared libraries.

mod daemon;
pub mod host_state;
pub mod image;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{umount2, MntFlags};
use particle_net::{NetNs, RunPrefix};
use particle_wire::function_env::{FunctionEnv, FUNCTION_PORT};

use daemon::{Daemon, Tools};
pub use host_state::HostState;

/// The overlay network's subnet (inside the hosts' namespaces only).
pub const OVERLAY_SUBNET: &str = "10.237.0.0/16";
/// Where swarm allocates its own networks from (the ingress network).
pub const SWARM_ADDRESS_POOL: &str = "10.236.0.0/16";
/// Swarm's manager port on each host's underlay address.
pub const SWARM_PORT: u16 = 2377;
/// Serialises swarms on one machine: dockerd's global paths have one owner.
pub const LOCK_PATH: &str = "/run/particle/docker-swarm.lock";
/// While a swarm runs: which of dockerd's global paths existed before it
/// started, one a line, so a crashed run's additions can be collected.
pub const GLOBAL_PATHS_RECORD: &str = "/run/particle/docker-swarm.global-paths";

/// One simulated host: the namespace dockerd runs in and its underlay address.
pub struct SwarmHost<'a> {
    pub netns: &'a NetNs,
    pub underlay_ip: Ipv4Addr,
}

/// One function of a launch, after it exited.
#[derive(Debug, Clone)]
pub struct FunctionRun {
    pub rank: usize,
    /// The host it ran on (index into the hosts given to [`Swarm::start`]).
    pub node: usize,
    /// Its exit code, as `docker wait` reported it.
    pub exit_code: Option<i32>,
    /// Its standard output (`docker logs`).
    pub stdout: String,
    pub stderr: String,
    /// How long its `docker run -d` took.
    pub run_latency: Duration,
    /// From the start of [`Swarm::launch`] until its `docker run -d` returned.
    pub launched_after: Duration,
}

/// How the engines run.
#[derive(Debug, Clone)]
pub struct SwarmOptions {
    /// `overlay2` (Docker's own choice on this kernel: image layers shared by
    /// all containers) or `vfs` (a full copy of the image per container).
    pub storage_driver: String,
    /// How long a dockerd may take to answer its API.
    pub daemon_start_timeout: Duration,
    /// How long the functions of one launch may run once all are launched.
    pub run_timeout: Duration,
    /// How long to wait for another swarm on this machine to finish.
    pub lock_timeout: Duration,
}

impl Default for SwarmOptions {
    fn default() -> Self {
        Self {
            storage_driver: "overlay2".into(),
            daemon_start_timeout: Duration::from_secs(60),
            run_timeout: Duration::from_secs(120),
            lock_timeout: Duration::from_secs(600),
        }
    }
}

/// A `docker` command that failed.
#[derive(Debug, thiserror::Error)]
#[error("host {host}: `docker {command}` failed ({status}): {stderr}")]
pub struct DockerFailed {
    pub host: usize,
    pub command: String,
    pub status: String,
    pub stderr: String,
}

/// Why the Docker Swarm baseline cannot run here (the benchmark prints it as
/// `skipped`).
#[derive(Debug, thiserror::Error)]
pub enum SwarmUnavailable {
    #[error("needs root: it starts dockerd inside network namespaces")]
    NotRoot,
    #[error("{tool} is not installed ({hint})")]
    Missing {
        tool: &'static str,
        hint: &'static str,
    },
    #[error("no hosts to run on")]
    NoHosts,
    #[error("the function image: {0}")]
    Image(#[from] image::ImageError),
    #[error("host {host}: dockerd did not come up within {waited:?}: {log_tail}")]
    DaemonStart {
        host: usize,
        waited: Duration,
        log_tail: String,
    },
    #[error(transparent)]
    Docker(#[from] DockerFailed),
    #[error("another Docker Swarm baseline held {LOCK_PATH} for over {0:?}")]
    Busy(Duration),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// A launch that failed; its containers are removed before this is returned.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error(transparent)]
    Docker(#[from] DockerFailed),
    #[error("host {host}: functions still running after {waited:?}")]
    Timeout { host: usize, waited: Duration },
    #[error("host {host}: `docker wait` printed {output:?} for {expected} containers")]
    WaitOutput {
        host: usize,
        output: String,
        expected: usize,
    },
    #[error("host {host}: waiting for functions: {source}")]
    Wait {
        host: usize,
        #[source]
        source: io::Error,
    },
}

/// A running swarm over namespaced hosts, with the function image imported
/// on every host and an attachable overlay network.
pub struct Swarm {
    prefix: RunPrefix,
    /// `/run/<prefix>/docker-swarm`: every daemon's roots, sockets and logs.
    root: PathBuf,
    daemons: Vec<Daemon>,
    /// Per daemon: whether it is in the swarm (and must leave).
    joined: Vec<bool>,
    network: String,
    image: String,
    /// The function binary's path inside the image.
    function_path: String,
    options: SwarmOptions,
    jobs: AtomicUsize,
    before: HostState,
    torn_down: bool,
    _lock: Flock<File>,
}

impl Swarm {
    /// Starts one dockerd per host inside that host's network namespace (own
    /// data root, exec root, pid file and API socket under `/run/<prefix>/`),
    /// forms a swarm over the underlay (init on host 0, the others join),
    /// imports the function image on every host and creates an attachable
    /// overlay network. Everything it did is undone when it is dropped.
    pub fn start(
        hosts: &[SwarmHost],
        prefix: &RunPrefix,
        function_binary: &Path,
    ) -> Result<Swarm, SwarmUnavailable> {
        Self::start_with(hosts, prefix, function_binary, &SwarmOptions::default())
    }

    /// [`Self::start`] with explicit options.
    pub fn start_with(
        hosts: &[SwarmHost],
        prefix: &RunPrefix,
        function_binary: &Path,
        options: &SwarmOptions,
    ) -> Result<Swarm, SwarmUnavailable> {
        if !nix::unistd::geteuid().is_root() {
            return Err(SwarmUnavailable::NotRoot);
        }
        if hosts.is_empty() {
            return Err(SwarmUnavailable::NoHosts);
        }
        if !function_binary.is_file() {
            return Err(image::ImageError::NoBinary(function_binary.to_owned()).into());
        }
        let tools = Tools::find()?;
        let lock = lock(options.lock_timeout)?;
        // Holding the lock, no other swarm is alive: whatever one left is stale.
        for line in collect_stale_swarms() {
            tracing::warn!("docker swarm gc: {line}");
        }
        let root = Path::new("/run").join(prefix.as_str()).join("docker-swarm");
        let before = HostState::capture(prefix);
        record_global_paths(&before.docker_paths)?;
        // From here on, dropping `swarm` undoes whatever was done so far.
        let mut swarm = Swarm {
            prefix: prefix.clone(),
            root: root.clone(),
            daemons: Vec::new(),
            joined: vec![false; hosts.len()],
            network: prefix.label("net"),
            image: prefix.label("fn"),
            function_path: String::new(),
            options: options.clone(),
            jobs: AtomicUsize::new(0),
            before,
            torn_down: false,
            _lock: lock,
        };
        let rootfs = image::build_rootfs(&root.join("rootfs"), function_binary)?;
        let archive = image::tar(&rootfs.dir)?;
        swarm.function_path = rootfs.function_path;

        for (i, host) in hosts.iter().enumerate() {
            let cgroup_parent = host_state::docker_cgroup_label(prefix, &i.to_string());
            swarm.daemons.push(Daemon::spawn(
                &tools,
                host.netns,
                i,
                root.join(format!("h{i}")),
                &cgroup_parent,
                options,
            )?);
        }
        let timeout = options.daemon_start_timeout;
        parallel(&mut swarm.daemons, |d| d.wait_ready(timeout))
            .into_iter()
            .collect::<Result<Vec<()>, _>>()?;

        let manager = &swarm.daemons[0];
        let listen = |ip: Ipv4Addr| format!("{ip}:{SWARM_PORT}");
        manager.docker(&[
            "swarm",
            "init",
            "--advertise-addr",
            &hosts[0].underlay_ip.to_string(),
            "--listen-addr",
            &listen(hosts[0].underlay_ip),
            "--default-addr-pool",
            SWARM_ADDRESS_POOL,
        ])?;
        swarm.joined[0] = true;
        let token = manager
            .docker(&["swarm", "join-token", "-q", "worker"])?
            .trim()
            .to_string();
        let manager_addr = listen(hosts[0].underlay_ip);
        let joins = parallel_ref(&swarm.daemons[1..], |d| {
            let ip = hosts[d.host].underlay_ip;
            d.docker(&[
                "swarm",
                "join",
                "--token",
                &token,
                "--advertise-addr",
                &ip.to_string(),
                "--listen-addr",
                &listen(ip),
                &manager_addr,
            ])
            .map(drop)
        });
        for (i, joined) in joins.iter().enumerate() {
            swarm.joined[i + 1] = joined.is_ok();
        }
        joins.into_iter().collect::<Result<Vec<()>, _>>()?;

        let image = swarm.image.clone();
        parallel_ref(&swarm.daemons, |d| {
            d.docker_with_input(&["import", "-", &image], &archive)
                .map(drop)
        })
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
        swarm.daemons[0].docker(&[
            "network",
            "create",
            "--driver",
            "overlay",
            "--attachable",
            "--subnet",
            OVERLAY_SUBNET,
            &swarm.network,
        ])?;
        // A worker detaches from an attachable network when its last
        // container on it exits, and a `docker run` racing that teardown
        // fails with "network not found". In a real cluster the network is in
        // use on every host; one idle container per host keeps it so.
        let (network, image) = (&swarm.network, &swarm.image);
        parallel_ref(&swarm.daemons, |d| {
            d.docker(&[
                "run",
                "--detach",
                "--network",
                network,
                "--name",
                &anchor_name(prefix, d.host),
                image,
                "/bin/sh",
                "-c",
                "exec sleep 2147483647",
            ])
            .map(drop)
        })
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
        Ok(swarm)
    }

    /// The hosts' daemon PIDs, by host.
    pub fn daemon_pids(&self) -> Vec<Option<u32>> {
        self.daemons.iter().map(Daemon::pid).collect()
    }

    /// Where the function binary is inside the image (`/<its file name>`,
    /// e.g. `/particle-fn`): `argv[0]` for [`Self::launch`].
    pub fn function_path(&self) -> &str {
        &self.function_path
    }

    /// The overlay network's name.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// Launches `functions` containers, rank `r` on host `r % n`, each
    /// `docker run -d --network NET --name <prefix>-j<job>-f<r>` with the
    /// function environment (`particle_wire::function_env`; peers are container
    /// names on port 7000) and `argv`. A host launches its containers one
    /// after another, the hosts in parallel, as each host's engine would.
    /// Waits for all to exit and returns each one's exit code and output;
    /// the containers are removed whatever happens.
    ///
    /// Every launch is a new job with its own container names, so a name is
    /// never reused while the overlay's DNS may still hold its old address.
    pub fn launch(
        &self,
        functions: usize,
        argv: &[String],
    ) -> Result<Vec<FunctionRun>, SwarmError> {
        if functions == 0 {
            return Ok(Vec::new());
        }
        let job = self
            .prefix
            .label(&format!("j{}", self.jobs.fetch_add(1, Ordering::SeqCst)));
        let names: Vec<String> = (0..functions).map(|r| format!("{job}-f{r}")).collect();
        let peers: std::sync::Arc<[String]> = names
            .iter()
            .map(|n| format!("{n}:{FUNCTION_PORT}"))
            .collect();
        let hosts = self.daemons.len();
        let ranks_of = |host: usize| (host..functions).step_by(hosts);
        let _cleanup = RemoveContainers {
            daemons: &self.daemons,
            names: &names,
        };

        let start = Instant::now();
        // One host failing stops the others launching more.
        let failed = AtomicBool::new(false);
        let launched = parallel_ref(&self.daemons, |d| {
            let mut runs = Vec::new();
            for rank in ranks_of(d.host) {
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                let env = FunctionEnv {
                    job: job.clone(),
                    rank,
                    size: functions,
                    node: d.host.to_string(),
                    address: None,
                    peers: peers.clone(),
                };
                let mut args: Vec<String> = ["run", "-d", "--network", &self.network]
                    .into_iter()
                    .chain(["--name", &names[rank]])
                    .map(str::to_string)
                    .collect();
                for (k, v) in env.vars() {
                    args.push("-e".into());
                    args.push(format!("{k}={v}"));
                }
                args.push(self.image.clone());
                args.extend(argv.iter().cloned());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let t0 = Instant::now();
                if let Err(e) = d.docker(&args) {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                runs.push((rank, t0.elapsed(), start.elapsed()));
            }
            Ok::<_, DockerFailed>(runs)
        });
        let launched: Vec<Vec<(usize, Duration, Duration)>> =
            launched.into_iter().collect::<Result<_, _>>()?;

        let deadline = Instant::now() + self.options.run_timeout;
        let exits = parallel_ref(&self.daemons, |d| {
            let mine: Vec<&str> = ranks_of(d.host).map(|r| names[r].as_str()).collect();
            wait_all(d, &mine, deadline)
        });
        let mut runs = Vec::with_capacity(functions);
        for ((host_runs, exits), d) in launched.into_iter().zip(exits).zip(&self.daemons) {
            let exits = exits?;
            for ((rank, run_latency, launched_after), exit_code) in host_runs.into_iter().zip(exits)
            {
                let (stdout, stderr) = logs(d, &names[rank]);
                runs.push(FunctionRun {
                    rank,
                    node: d.host,
                    exit_code,
                    stdout,
                    stderr,
                    run_latency,
                    launched_after,
                });
            }
        }
        runs.sort_by_key(|r| r.rank);
        Ok(runs)
    }

    /// Leaves the swarm, stops every dockerd by PID, removes the roots and
    /// puts back what changed on the machine; returns what could not be.
    pub fn stop(mut self) -> Result<(), Vec<String>> {
        let problems = self.teardown();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut problems = Vec::new();
        let prefix = &self.prefix;
        parallel_ref(&self.daemons, |d| {
            // Killed, not stopped: sleep as PID 1 ignores SIGTERM.
            let _ = d.docker(&["rm", "--force", &anchor_name(prefix, d.host)]);
        });
        // Workers first: a manager that leaves first strands them.
        let joined = self.joined.clone();
        for result in parallel_ref(&self.daemons[self.daemons.len().min(1)..], |d| {
            if joined[d.host] {
                d.docker(&["swarm", "leave", "--force"]).map(drop)
            } else {
                Ok(())
            }
        }) {
            problems.extend(result.err().map(|e| e.to_string()));
        }
        if let (Some(manager), Some(true)) = (self.daemons.first(), joined.first()) {
            if let Err(e) = manager.docker(&["swarm", "leave", "--force"]) {
                problems.push(e.to_string());
            }
        }
        for d in &self.daemons {
            d.terminate();
        }
        for p in parallel(&mut self.daemons, |d| {
            d.wait_stopped(Duration::from_secs(30))
        }) {
            problems.extend(p);
        }
        self.daemons.clear();
        problems.extend(unmount_under(&self.root));
        if let Err(e) = fs::remove_dir_all(&self.root) {
            if e.kind() != io::ErrorKind::NotFound {
                problems.push(format!("removing {}: {e}", self.root.display()));
            }
        }
        if let Some(run_dir) = self.root.parent() {
            // Only when empty: the directory may hold others' files of this run.
            let _ = fs::remove_dir(run_dir);
        }
        let now = HostState::capture(&self.prefix);
        problems.extend(self.before.restore(&now));
        if let Err(e) = fs::remove_file(GLOBAL_PATHS_RECORD) {
            problems.push(format!("removing {GLOBAL_PATHS_RECORD}: {e}"));
        }
        let after = HostState::capture(&self.prefix);
        problems.extend(
            self.before
                .differences(&after)
                .into_iter()
                .map(|d| format!("still changed after restoring: {d}")),
        );
        problems
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for p in self.teardown() {
            tracing::warn!("docker swarm teardown: {p}");
        }
    }
}

/// The idle container that keeps host `host` attached to the overlay.
fn anchor_name(prefix: &RunPrefix, host: usize) -> String {
    prefix.label(&format!("anchor-h{host}"))
}

/// Removes a launch's containers when the launch ends, however it ends.
struct RemoveContainers<'a> {
    daemons: &'a [Daemon],
    names: &'a [String],
}

impl Drop for RemoveContainers<'_> {
    fn drop(&mut self) {
        let hosts = self.daemons.len();
        parallel_ref(self.daemons, |d| {
            let mine: Vec<&str> = (d.host..self.names.len())
                .step_by(hosts)
                .map(|r| self.names[r].as_str())
                .collect();
            let mut args = vec!["rm", "--force"];
            args.extend(mine);
            // A container whose `docker run` failed early may not exist.
            if let Err(e) = d.docker(&args) {
                if !e.stderr.contains("No such container") {
                    tracing::warn!("{e}");
                }
            }
        });
    }
}

/// `docker wait NAMES...` (one exit code a line, in order), killed at `deadline`.
fn wait_all(d: &Daemon, names: &[&str], deadline: Instant) -> Result<Vec<Option<i32>>, SwarmError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut args = vec!["wait"];
    args.extend(names);
    let wait_err = |source| SwarmError::Wait {
        host: d.host,
        source,
    };
    let mut child = d
        .command()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(wait_err)?;
    let started = Instant::now();
    // A few bytes a container: the pipe never fills while we poll.
    while child.try_wait().map_err(wait_err)?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SwarmError::Timeout {
                host: d.host,
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().map_err(wait_err)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(d
            .failed(
                &args,
                out.status.to_string(),
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            )
            .into());
    }
    let codes: Vec<Option<i32>> = stdout.lines().map(|l| l.trim().parse().ok()).collect();
    if codes.len() != names.len() {
        return Err(SwarmError::WaitOutput {
            host: d.host,
            output: stdout.into_owned(),
            expected: names.len(),
        });
    }
    Ok(codes)
}

/// A container's stdout and stderr; what went wrong reading them, in stderr.
fn logs(d: &Daemon, name: &str) -> (String, String) {
    match d.command().args(["logs", name]).output() {
        Ok(o) => (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (String::new(), format!("docker logs {name}: {e}")),
    }
}

/// Removes what swarms of runs that died left behind: stops their dockerd
/// and containerd (by the pids in their pid files), detaches their mounts,
/// removes their directories and cgroups. Only called holding the swarm lock,
/// when no other swarm can be alive. Returns what it did and what failed.
pub fn collect_stale_swarms() -> Vec<String> {
    let mut report = collect_stale_daemons();
    // Last: the daemons above may still have written to these while stopping.
    if let Ok(record) = fs::read_to_string(GLOBAL_PATHS_RECORD) {
        let before: BTreeSet<PathBuf> = record.lines().map(PathBuf::from).collect();
        let now = host_state::current_docker_paths();
        for gone in now.difference(&before) {
            report.push(format!("removing a crashed swarm's {}", gone.display()));
        }
        report.extend(host_state::restore_docker_paths(&before, &now));
        if let Err(e) = fs::remove_file(GLOBAL_PATHS_RECORD) {
            report.push(format!("removing {GLOBAL_PATHS_RECORD}: {e}"));
        }
    }
    report
}

/// Writes [`GLOBAL_PATHS_RECORD`].
fn record_global_paths(existing: &BTreeSet<PathBuf>) -> Result<(), SwarmUnavailable> {
    let lines: String = existing
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    fs::write(GLOBAL_PATHS_RECORD, lines).map_err(|source| SwarmUnavailable::Io {
        what: format!("writing {GLOBAL_PATHS_RECORD}"),
        source,
    })
}

fn collect_stale_daemons() -> Vec<String> {
    let mut report = Vec::new();
    let Ok(entries) = fs::read_dir("/run") else {
        return report;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(prefix) = RunPrefix::parse(&name) else {
            continue;
        };
        let dir = entry.path().join("docker-swarm");
        if !dir.is_dir() {
            continue;
        }
        let hosts: Vec<PathBuf> = fs::read_dir(&dir)
            .map(|e| e.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for host in &hosts {
            for (file, comm) in [
                ("dockerd.pid", "dockerd"),
                ("exec/containerd/containerd.pid", "containerd"),
            ] {
                if let Some(pid) = fs::read_to_string(host.join(file))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    report.extend(daemon::stop_stale(pid, comm));
                }
            }
        }
        report.extend(unmount_under(&dir));
        match fs::remove_dir_all(&dir) {
            Ok(()) => report.push(format!("removed {}", dir.display())),
            Err(e) => report.push(format!("removing {}: {e}", dir.display())),
        }
        let _ = fs::remove_dir(entry.path());
        let mine = host_state::docker_cgroup_label(&prefix, "");
        for cgroup in host_state::cgroup_dirs(|n| n.starts_with(&mine)) {
            if let Err(e) = host_state::remove_cgroup(&cgroup) {
                report.push(format!("removing cgroup {}: {e}", cgroup.display()));
            }
        }
    }
    report
}

/// Takes the machine-wide swarm lock, waiting up to `timeout`.
fn lock(timeout: Duration) -> Result<Flock<File>, SwarmUnavailable> {
    let io_err = |source| SwarmUnavailable::Io {
        what: format!("opening {LOCK_PATH}"),
        source,
    };
    if let Some(dir) = Path::new(LOCK_PATH).parent() {
        fs::create_dir_all(dir).map_err(io_err)?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .map_err(io_err)?;
    let start = Instant::now();
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, _)) if start.elapsed() < timeout => {
                file = f;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(_) => return Err(SwarmUnavailable::Busy(timeout)),
        }
    }
}

/// Detaches every mount at or below `root`, deepest first.
fn unmount_under(root: &Path) -> Vec<String> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
        .into_iter()
        .filter_map(|p| {
            umount2(&p, MntFlags::MNT_DETACH)
                .err()
                .map(|e| format!("unmounting {}: {e}", p.display()))
        })
        .collect()
}

/// /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(s: &str) -> PathBuf {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Runs `f` on every item on its own thread; results in order. A panic in
/// one carries on in the caller, as it would have without the threads.
fn parallel<T: Send, R: Send>(items: &mut [T], f: impl Fn(&mut T) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let handles: Vec<_> = items.iter_mut().map(|t| s.spawn(|| f(t))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// [`parallel`] over shared items.
fn parallel_ref<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let handles: Vec<_> = items.iter().map(|t| s.spawn(|| f(t))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

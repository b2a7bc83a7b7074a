//! `particle cluster up|down`: a local cluster on one machine. Every node is a
//! network namespace (a simulated host) on a bridge that plays the underlay
//! switch; the controller runs in the underlay namespace and each agent in
//! its node's, as separate processes of the same `particle` binary that runs
//! on real hosts. Users reach the controller at 127.0.0.1 through a small TCP
//! relay, since the machine's own namespace is never wired to the underlay.
//!
//! Everything hangs off this foreground process: namespaces are held by fd,
//! children die with it (PR_SET_PDEATHSIG), so Ctrl-C, `cluster down` or a
//! crash leave nothing behind.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, Endpoint, NetNs, Run};
use particle_wire::client::{ApiClient, Method};

/// Where a running cluster's files live.
fn cluster_dir(run: &Run) -> PathBuf {
    Path::new("/run/particle").join(run.prefix().label("cluster"))
}

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: usize,
    /// The underlay's subnet (inside the cluster's namespaces only).
    pub underlay: String,
    /// Port of the controller (on the underlay) and of the relay on 127.0.0.1.
    pub port: u16,
    pub pool_size: usize,
    /// Tenant-free endpoints per node.
    pub free_pool_size: usize,
    /// The controller's `--heartbeat-timeout` (seconds); `None`: its default.
    pub heartbeat_timeout: Option<f64>,
}

/// A cluster process: how to start it, and the running child, killed and
/// reaped when dropped. A child that dies is started again (as systemd or a
/// DaemonSet would): a restarted agent rebuilds its node from the controller,
/// a restarted controller reloads its store.
struct ChildGuard {
    child: Child,
    netns: NetNs,
    args: Vec<String>,
    log: PathBuf,
    restarts: u32,
}

impl ChildGuard {
    fn restart_if_dead(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.restarts += 1;
            eprintln!(
                "{} exited ({status}); starting it again (restart {})",
                self.args.first().map(String::as_str).unwrap_or("?"),
                self.restarts
            );
            self.child = spawn_child(&self.netns, &self.args, &self.log)?;
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_in(ns: &NetNs, args: &[String], log: &Path) -> Result<ChildGuard> {
    Ok(ChildGuard {
        child: spawn_child(ns, args, log)?,
        netns: ns.try_clone()?,
        args: args.to_vec(),
        log: log.to_owned(),
        restarts: 0,
    })
}

fn spawn_child(ns: &NetNs, args: &[String], log: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the particle binary")?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = ns.command(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: prctl is async-signal-safe; it makes the child die with us.
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {args:?}"))
}

/// A running local cluster: its namespaces, its processes and its files, all
/// removed when it is dropped (processes first, then nodes, then the underlay).
pub struct LocalCluster {
    children: Vec<ChildGuard>,
    runtime: tokio::runtime::Runtime,
    // Held for the cluster's lifetime: the nodes' namespaces.
    _hosts: Vec<Endpoint>,
    fabric: ScratchNode,
    token: String,
    controller_addr: SocketAddr,
    relay_addr: Option<SocketAddr>,
    sockets: Vec<(IpAddr, PathBuf)>,
    dir: RemoveDir,
    run: Run,
}

impl LocalCluster {
    /// Builds the underlay and the nodes, starts the controller and the
    /// agents, and waits until every node has registered. With `relay`, the
    /// controller is also reachable at 127.0.0.1:`opts.port`.
    pub fn start(opts: &UpOptions, relay: bool) -> Result<Self> {
        if opts.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("a local cluster creates network namespaces: run it as root");
        }
        particle_net::limits::raise_open_files()?;
        let run = Run::start()?;
        let dir = cluster_dir(&run);
        std::fs::create_dir_all(&dir)?;
        let dir = RemoveDir(dir);
        std::fs::write(dir.0.join("pid"), std::process::id().to_string())?;
        let mut fabric = ScratchNode::new(run.prefix(), AddressBlock::parse(&opts.underlay)?)
            .context("creating the underlay")?;
        let hosts = fabric.hosts(opts.nodes).context("creating the nodes")?;

        let token_file = dir.0.join("token");
        let mut token = [0u8; 16];
        getrandom_token(&mut token)?;
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&token_file, &token)?;

        let controller_addr = SocketAddr::new(IpAddr::V4(fabric.block.gateway()), opts.port);
        let mut controller_args: Vec<String> = vec![
            "controller".into(),
            "--listen".into(),
            controller_addr.to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--state-file".into(),
            dir.0.join("controller.json").display().to_string(),
        ];
        if let Some(t) = opts.heartbeat_timeout {
            controller_args.extend(["--heartbeat-timeout".into(), t.to_string()]);
        }
        let mut children = vec![spawn_in(
            &fabric.netns,
            &controller_args,
            &dir.0.join("controller.log"),
        )?];
        let mut sockets = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let socket = dir.0.join(format!("n{i}.sock"));
            children.push(spawn_in(
                host.netns(),
                &[
                    "agent".into(),
                    "--node".into(),
                    format!("n{i}"),
                    "--controller".into(),
                    controller_addr.to_string(),
                    "--token-file".into(),
                    token_file.display().to_string(),
                    "--underlay-iface".into(),
                    particle_net::endpoint::ENDPOINT_IFNAME.into(),
                    "--underlay-ip".into(),
                    host.address().ip().to_string(),
                    "--socket".into(),
                    socket.display().to_string(),
                    "--pool-size".into(),
                    opts.pool_size.to_string(),
                    "--free-pool-size".into(),
                    opts.free_pool_size.to_string(),
                ],
                &dir.0.join(format!("n{i}.log")),
            )?);
            sockets.push((IpAddr::V4(host.address().ip()), socket));
        }

        let runtime = tokio::runtime::Runtime::new()?;
        let fabric_ns = Arc::new(fabric.netns.try_clone()?);
        let relay_addr = relay.then(|| SocketAddr::from(([127, 0, 0, 1], opts.port)));
        let cluster = Self {
            children,
            runtime,
            _hosts: hosts,
            fabric,
            token,
            controller_addr,
            relay_addr,
            sockets,
            dir,
            run,
        };
        let api = cluster.api()?;
        cluster.runtime.block_on(async {
            if let Some(relay_addr) = relay_addr {
                let relay = tokio::net::TcpListener::bind(relay_addr)
                    .await
                    .with_context(|| format!("relay on {relay_addr}"))?;
                tokio::spawn(relay_loop(relay, fabric_ns, controller_addr));
            }
            wait_for_nodes(&api, opts.nodes, Duration::from_secs(30)).await
        })?;
        Ok(cluster)
    }

    /// A client of the controller, dialling inside the underlay.
    pub fn api(&self) -> Result<ApiClient> {
        let dial = self.fabric.netns.try_clone()?.tcp_dialer();
        Ok(ApiClient::new(
            self.controller_addr,
            self.token.clone(),
            dial,
        ))
    }

    pub fn prefix(&self) -> &particle_net::RunPrefix {
        self.run.prefix()
    }

    /// Where the cluster's files (token, logs, sockets) are.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Every agent's node name and pid (as running now).
    pub fn agent_pids(&self) -> Vec<(String, i32)> {
        self.children
            .iter()
            .filter_map(|c| {
                let node = c.args.iter().position(|a| a == "--node")?;
                Some((c.args.get(node + 1)?.clone(), c.child.id() as i32))
            })
            .collect()
    }

    /// Restarts children that died.
    fn restart_dead(&mut self) -> Result<()> {
        for c in self.children.iter_mut() {
            c.restart_if_dead()?;
        }
        Ok(())
    }
}

pub fn up(opts: &UpOptions) -> Result<()> {
    let mut cluster = LocalCluster::start(opts, true)?;
    println!("cluster {} up: {} nodes", cluster.prefix(), opts.nodes);
    if let Some(relay) = cluster.relay_addr {
        println!(
            "  controller  http://{relay} (relayed to {} on the underlay)",
            cluster.controller_addr
        );
    }
    println!("  token       {}", cluster.dir().join("token").display());
    for (i, (ip, socket)) in cluster.sockets.iter().enumerate() {
        println!(
            "  node n{i}     underlay {ip}, agent socket {}",
            socket.display()
        );
    }
    println!("  logs        {}", cluster.dir().display());
    println!("ready (Ctrl-C or `particle cluster down` to stop)");
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(wait_for_stop(&mut cluster))?;
    let prefix = cluster.prefix().clone();
    drop(cluster);
    println!("cluster {prefix} down");
    Ok(())
}

async fn relay_loop(listener: tokio::net::TcpListener, fabric: Arc<NetNs>, target: SocketAddr) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        let fabric = fabric.clone();
        tokio::spawn(async move {
            let dialed = tokio::task::spawn_blocking(move || {
                fabric.run_in(|| std::net::TcpStream::connect(target))
            })
            .await;
            let Ok(Ok(Ok(outbound))) = dialed else {
                return;
            };
            if outbound.set_nonblocking(true).is_err() {
                return;
            }
            if let Ok(mut outbound) = tokio::net::TcpStream::from_std(outbound) {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

async fn wait_for_nodes(client: &ApiClient, nodes: usize, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let listed: Result<Vec<particle_wire::api::Node>, _> =
            client.call::<(), _>(Method::GET, "/v1/nodes", None).await;
        match listed {
            Ok(n) if n.len() == nodes => return Ok(()),
            _ if start.elapsed() > timeout => {
                bail!("only {listed:?} of {nodes} nodes registered after {timeout:?}; see the logs")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Returns on SIGINT/SIGTERM; restarts children that die meanwhile.
async fn wait_for_stop(cluster: &mut LocalCluster) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = check.tick() => cluster.restart_dead()?,
        }
    }
}

/// Stops every running local cluster (SIGTERM to their `cluster up`).
pub fn down() -> Result<usize> {
    let mut stopped = 0;
    for entry in std::fs::read_dir("/run/particle")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(prefix) = name.strip_suffix("-cluster") else {
            continue;
        };
        let pid_file = entry.path().join("pid");
        let Ok(pid) = std::fs::read_to_string(&pid_file) else {
            continue;
        };
        let pid: i32 = pid
            .trim()
            .parse()
            .with_context(|| format!("{}", pid_file.display()))?;
        let pid = nix::unistd::Pid::from_raw(pid);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
            let start = Instant::now();
            while entry.path().exists() && start.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("stopped cluster {prefix}");
            stopped += 1;
        }
    }
    Ok(stopped)
}

fn getrandom_token(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)?;
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// Removes the cluster's directory (token, logs, sockets) when the cluster stops.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

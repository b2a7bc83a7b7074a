//! [`Mode::Processes`](crate::Mode::Processes): the controller and the
//! agents as processes of the `particle` binary, each in its namespace, with
//! the same flags an operator gives them on real hosts.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use anyhow::{bail, Context, Result};
use particle_net::{Endpoint, NetNs, PoolConfig};

use crate::{node_name, Options};

/// Starts the controller in `fabric` and one agent per host; each one's
/// output goes to a log in `dir`.
pub(crate) fn start(
    opts: &Options,
    dir: &Path,
    fabric: &NetNs,
    hosts: &[Endpoint],
    controller: SocketAddr,
    sockets: &[PathBuf],
) -> Result<Vec<ChildGuard>> {
    let pool_size = warm_size(&opts.pool, "pool")?;
    let free_pool_size = match &opts.free_pool {
        Some(free) => warm_size(free, "free pool")?,
        None => 0,
    };
    let token_file = dir.join("token");
    let controllers = crate::ha::controller_addrs(opts, controller);
    let mut children = Vec::new();
    let store = match &opts.ha {
        Some(_) => {
            let (members, store) = crate::ha::start_etcd(controller.ip(), dir, fabric)?;
            children.extend(members);
            store
        }
        None => dir.join("controller.json").display().to_string(),
    };
    for (i, addr) in controllers.iter().enumerate() {
        let mut controller_args: Vec<String> = vec![
            "controller".into(),
            "--listen".into(),
            addr.to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--store".into(),
            store.clone(),
        ];
        if opts.ha.is_some() {
            controller_args.extend(["--cluster-id".into(), crate::ha::cluster_id(dir)]);
        }
        if let Some(t) = opts.heartbeat_timeout {
            controller_args.extend(["--heartbeat-timeout".into(), t.to_string()]);
        }
        let log = match opts.ha {
            Some(_) => dir.join(format!("controller-{i}.log")),
            None => dir.join("controller.log"),
        };
        children.push(ChildGuard::spawn(fabric, &controller_args, &log)?);
    }
    let controller_list: Vec<String> = controllers.iter().map(|a| a.to_string()).collect();
    let controller_list = controller_list.join(",");
    for (i, (host, socket)) in hosts.iter().zip(sockets).enumerate() {
        children.push(ChildGuard::spawn(
            host.netns(),
            &[
                "agent".into(),
                "--node".into(),
                node_name(i),
                "--controller".into(),
                controller_list.clone(),
                "--token-file".into(),
                token_file.display().to_string(),
                "--underlay-iface".into(),
                particle_net::endpoint::ENDPOINT_IFNAME.into(),
                "--underlay-ip".into(),
                host.address().ip().to_string(),
                "--socket".into(),
                socket.display().to_string(),
                "--pool-size".into(),
                pool_size.to_string(),
                "--free-pool-size".into(),
                free_pool_size.to_string(),
            ],
            &dir.join(format!("{}.log", node_name(i))),
        )?);
    }
    Ok(children)
}

/// The `--pool-size` that makes `pool` (an agent process builds
/// `PoolConfig::warm` of it).
fn warm_size(pool: &PoolConfig, what: &str) -> Result<usize> {
    if *pool != PoolConfig::warm(pool.high_watermark) {
        bail!("agent processes take a warm {what} size, not {pool:?}");
    }
    Ok(pool.high_watermark)
}

/// A cluster process: how to start it, and the running child, killed and
/// reaped when dropped.
pub(crate) struct ChildGuard {
    child: Child,
    netns: NetNs,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    restarts: u32,
}

impl ChildGuard {
    /// `particle ARGS` (this executable).
    fn spawn(ns: &NetNs, args: &[String], log: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the particle binary")?;
        Self::spawn_program(ns, &exe, args, log)
    }

    /// `PROGRAM ARGS` in `ns`.
    pub(crate) fn spawn_program(
        ns: &NetNs,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Self> {
        Ok(Self {
            child: spawn_child(ns, program, args, log)?,
            netns: ns.try_clone()?,
            program: program.to_owned(),
            args: args.to_vec(),
            log: log.to_owned(),
            restarts: 0,
        })
    }

    /// An agent's node name and pid.
    pub(crate) fn agent(&self) -> Option<(String, i32)> {
        let node = self.args.iter().position(|a| a == "--node")?;
        Some((self.args.get(node + 1)?.clone(), self.child.id() as i32))
    }

    /// A controller's listen address and pid.
    pub(crate) fn controller(&self) -> Option<(SocketAddr, i32)> {
        if self.args.first().map(String::as_str) != Some("controller") {
            return None;
        }
        let listen = self.args.iter().position(|a| a == "--listen")?;
        Some((
            self.args.get(listen + 1)?.parse().ok()?,
            self.child.id() as i32,
        ))
    }

    /// An etcd member's name and pid.
    pub(crate) fn etcd_member(&self) -> Option<(String, i32)> {
        if !self.program.ends_with("etcd") {
            return None;
        }
        let name = self.args.iter().position(|a| a == "--name")?;
        Some((self.args.get(name + 1)?.clone(), self.child.id() as i32))
    }

    pub(crate) fn restart_if_dead(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.restarts += 1;
            eprintln!(
                "{} exited ({status}); starting it again (restart {})",
                self.etcd_member()
                    .map(|_| "etcd")
                    .or(self.args.first().map(String::as_str))
                    .unwrap_or("?"),
                self.restarts
            );
            self.child = spawn_child(&self.netns, &self.program, &self.args, &self.log)?;
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

fn spawn_child(ns: &NetNs, exe: &Path, args: &[String], log: &Path) -> Result<Child> {
    use std::os::unix::fs::OpenOptionsExt;
    // Logs name tenants and jobs: the cluster's, not everyone's (0600).
    let log_file = std::fs::OpenOptions::new()
        .mode(0o600)
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

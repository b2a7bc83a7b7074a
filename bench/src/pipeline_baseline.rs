//! The pipeline's hand-built Linux overlay baseline: how an operator wires
//! containers across hosts by hand with iproute2 (Docker's overlay driver
//! does the same in-kernel pieces). Every node (a namespaced host on a
//! simulated underlay) has a bridge and a VXLAN device enslaved to it, with
//! head-end replication to every other node (one all-zero FDB entry per
//! remote), so all functions share one L2 overlay subnet. Per function, at
//! launch, one `ip` process per step: a named namespace, a veth pair into
//! it on the node's bridge, address, MTU, links up; then the function starts
//! with `ip netns exec`, as a script would. Nodes build their functions in
//! parallel, each node one at a time (a per-node agent working cold).
//!
//! The CNI bridge plugin baseline: what a CNI runtime does per container
//! with the reference plugins (Debian's `containernetworking-plugins`): per
//! node a /24, routes to the other nodes' /24s via their underlay addresses
//! (host-gw style, set up before the clock); per function at launch a named
//! namespace, the `loopback` plugin and the `bridge` plugin (gateway on the
//! node's bridge, `static` IPAM so every function's address is known before
//! any starts), then `ip netns exec`.
//!
//! These are the pipeline benchmark's own launchers; the startup benchmark's
//! launchers (bench/src/baselines) should replace them once they exist.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use particle_net::endpoint::Endpoint;
use particle_net::scratch::ScratchNode;
use particle_net::{AddressBlock, NetNs, Run};
use particle_wire::function_env::{FunctionEnv, FUNCTION_PORT};
use particle_workloads::ring::now_ns;

use crate::baselines::ip::NamespacesGuard;
use crate::pipeline::FunctionRun;

/// The overlay's subnet (inside the functions' namespaces only).
const OVERLAY_PREFIX: u8 = 16;
const VNI: &str = "4300";
/// VXLAN's 50 bytes of headers inside the underlay's 1500.
const FUNCTION_MTU: &str = "1450";

/// Where the CNI reference plugins are installed.
const CNI_PATH: &str = "/usr/lib/cni";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One L2 overlay subnet, `a.b.0.0/16`.
    Vxlan { overlay: [u8; 2] },
    /// Node `i`'s functions in `a.b.i.0/24`.
    CniBridge { subnets: [u8; 2] },
}

/// Nodes wired for one of the baselines, ready for functions.
pub struct Baseline {
    run: Run,
    // Dropped in this order: functions' namespaces, then the nodes, then the underlay.
    functions: NamespacesGuard,
    hosts: Vec<Endpoint>,
    _fabric: ScratchNode,
    kind: Kind,
}

fn run_ip(ns: &NetNs, args: &[&str]) -> Result<()> {
    let out = ns
        .command("ip")
        .args(args)
        .output()
        .context("running ip (is iproute2 installed? scripts/install-deps)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Baseline {
    /// `underlay` and `overlay` are subnets that exist only inside the
    /// benchmark's namespaces (`overlay` a /16: first two octets used).
    pub fn linux_overlay(nodes: usize, underlay: &str, overlay: [u8; 2]) -> Result<Self> {
        let run = Run::start()?;
        let mut fabric = ScratchNode::new(run.prefix(), AddressBlock::parse(underlay)?)
            .context("creating the underlay")?;
        let hosts = fabric.hosts(nodes).context("creating the nodes")?;
        let me = Self {
            functions: NamespacesGuard(Vec::new()),
            hosts,
            _fabric: fabric,
            kind: Kind::Vxlan { overlay },
            run,
        };
        let (br, vx) = (me.bridge(), me.vxlan());
        for (i, host) in me.hosts.iter().enumerate() {
            let ns = host.netns();
            let local = host.address().ip().to_string();
            run_ip(ns, &["link", "add", &br, "type", "bridge"])?;
            run_ip(ns, &["link", "set", &br, "up"])?;
            run_ip(
                ns,
                &[
                    "link", "add", &vx, "type", "vxlan", "id", VNI, "local", &local, "dstport",
                    "4789", "dev", "eth0",
                ],
            )?;
            run_ip(ns, &["link", "set", &vx, "master", &br, "up"])?;
            for (j, remote) in me.hosts.iter().enumerate() {
                if i != j {
                    let dst = remote.address().ip().to_string();
                    let out = ns
                        .command("bridge")
                        .args([
                            "fdb",
                            "append",
                            "00:00:00:00:00:00",
                            "dev",
                            &vx,
                            "dst",
                            &dst,
                        ])
                        .output()
                        .context("running bridge (iproute2)")?;
                    if !out.status.success() {
                        bail!(
                            "bridge fdb append: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                }
            }
        }
        Ok(me)
    }

    /// The CNI bridge plugin's nodes: `subnets` gives the first two octets
    /// of every node's /24 (node `i`: `a.b.i.0/24`, at most 250 nodes).
    pub fn cni_bridge(nodes: usize, underlay: &str, subnets: [u8; 2]) -> Result<Self> {
        anyhow::ensure!(nodes <= 250, "at most 250 nodes");
        for plugin in ["bridge", "loopback", "static"] {
            if !std::path::Path::new(CNI_PATH).join(plugin).exists() {
                bail!("{CNI_PATH}/{plugin} is missing (scripts/install-deps installs containernetworking-plugins)");
            }
        }
        let run = Run::start()?;
        let mut fabric = ScratchNode::new(run.prefix(), AddressBlock::parse(underlay)?)
            .context("creating the underlay")?;
        let hosts = fabric.hosts(nodes).context("creating the nodes")?;
        let me = Self {
            functions: NamespacesGuard(Vec::new()),
            hosts,
            _fabric: fabric,
            kind: Kind::CniBridge { subnets },
            run,
        };
        for (i, host) in me.hosts.iter().enumerate() {
            let ns = host.netns();
            let out = ns
                .command("sysctl")
                .args(["-qw", "net.ipv4.ip_forward=1"])
                .output()
                .context("running sysctl")?;
            if !out.status.success() {
                bail!(
                    "sysctl ip_forward: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            for (j, remote) in me.hosts.iter().enumerate() {
                if i != j {
                    let dst = format!("{}.{}.{j}.0/24", subnets[0], subnets[1]);
                    let via = remote.address().ip().to_string();
                    run_ip(ns, &["route", "add", &dst, "via", &via, "dev", "eth0"])?;
                }
            }
        }
        Ok(me)
    }

    fn bridge(&self) -> String {
        format!("{}obr", self.run.prefix().as_str())
    }

    fn vxlan(&self) -> String {
        format!("{}ovx", self.run.prefix().as_str())
    }

    /// Function `rank`'s address (rank r runs on node r mod nodes).
    fn address(&self, rank: usize) -> String {
        match self.kind {
            Kind::Vxlan { overlay } => {
                let host = rank + 2;
                format!(
                    "{}.{}.{}.{}",
                    overlay[0],
                    overlay[1],
                    (host >> 8) & 255,
                    host & 255
                )
            }
            Kind::CniBridge { subnets } => {
                let nodes = self.hosts.len().max(1);
                format!(
                    "{}.{}.{}.{}",
                    subnets[0],
                    subnets[1],
                    rank % nodes,
                    rank / nodes + 2
                )
            }
        }
    }

    /// Launches `size` functions (rank r on node r mod nodes, as Particle
    /// places them), each right after its network is built, and waits for
    /// all. Returns when the launch began (wall ns) and every function's run.
    pub fn launch(
        &mut self,
        argv: &[String],
        size: usize,
        timeout: Duration,
    ) -> Result<(u128, Vec<FunctionRun>)> {
        let fits = match self.kind {
            Kind::Vxlan { .. } => size + 2 < 65_536,
            Kind::CniBridge { .. } => size.div_ceil(self.hosts.len().max(1)) + 2 < 255,
        };
        anyhow::ensure!(fits, "{size} functions do not fit the address plan");
        anyhow::ensure!(!argv.is_empty(), "empty command");
        let peers: std::sync::Arc<[String]> = (0..size)
            .map(|r| format!("{}:{FUNCTION_PORT}", self.address(r)))
            .collect();
        let names: Vec<String> = (0..size)
            .map(|r| self.run.prefix().label(&format!("f{r}")))
            .collect();
        self.functions.0.extend(names.iter().cloned());
        let nodes = self.hosts.len();
        let submitted = now_ns();
        let deadline = Instant::now() + timeout;
        let me = &*self;
        let started: Vec<Result<Vec<Started>>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..nodes)
                .map(|i| {
                    let (peers, names) = (&peers, &names);
                    s.spawn(move || -> Result<Vec<Started>> {
                        let host = &me.hosts[i];
                        let mut started = Vec::new();
                        for rank in (i..size).step_by(nodes) {
                            let env = FunctionEnv {
                                job: "baseline".into(),
                                rank,
                                size,
                                node: format!("n{i}"),
                                address: Some(me.address(rank)),
                                peers: peers.clone(),
                            };
                            started.push(me.start_one(host.netns(), &names[rank], &env, argv)?);
                        }
                        Ok(started)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a node's launcher panicked")))
                })
                .collect()
        });
        let mut all = Vec::with_capacity(size);
        for s in started {
            all.extend(s?);
        }
        let mut runs = Vec::with_capacity(size);
        for mut f in all {
            let left = deadline.saturating_duration_since(Instant::now());
            let status = wait_until(&mut f.child, left)?;
            let stdout = f
                .stdout
                .take()
                .and_then(|h| h.join().ok())
                .unwrap_or_default();
            if !status.is_some_and(|s| s.success()) {
                bail!("baseline rank {} ended {status:?}:\n{stdout}", f.rank);
            }
            runs.push(FunctionRun {
                rank: f.rank,
                node: f.node.clone(),
                stdout,
            });
        }
        Ok((submitted, runs))
    }

    /// Builds one function's network the way a script does, then starts it.
    fn start_one(
        &self,
        node: &NetNs,
        name: &str,
        env: &FunctionEnv,
        argv: &[String],
    ) -> Result<Started> {
        run_ip(node, &["netns", "add", name])?;
        match self.kind {
            Kind::Vxlan { .. } => {
                let host_end = format!("{}oh{}", self.run.prefix().as_str(), env.rank);
                let address = format!("{}/{OVERLAY_PREFIX}", self.address(env.rank));
                run_ip(
                    node,
                    &[
                        "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns",
                        name,
                    ],
                )?;
                run_ip(
                    node,
                    &["link", "set", &host_end, "master", &self.bridge(), "up"],
                )?;
                run_ip(node, &["-n", name, "addr", "add", &address, "dev", "eth0"])?;
                run_ip(
                    node,
                    &["-n", name, "link", "set", "eth0", "mtu", FUNCTION_MTU, "up"],
                )?;
                run_ip(node, &["-n", name, "link", "set", "lo", "up"])?;
            }
            Kind::CniBridge { subnets } => {
                let i = env.rank % self.hosts.len().max(1);
                let gateway = format!("{}.{}.{i}.1", subnets[0], subnets[1]);
                let network = self.run.prefix().label("cni");
                let bridge = format!("{}cbr", self.run.prefix().as_str());
                let loopback =
                    format!(r#"{{"cniVersion":"1.0.0","name":"{network}-lo","type":"loopback"}}"#);
                let conf = format!(
                    r#"{{"cniVersion":"1.0.0","name":"{network}","type":"bridge","bridge":"{bridge}","isGateway":true,"ipMasq":false,"ipam":{{"type":"static","addresses":[{{"address":"{}/24","gateway":"{gateway}"}}],"routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
                    self.address(env.rank)
                );
                self.cni_add(node, name, "lo", "loopback", &loopback)?;
                self.cni_add(node, name, "eth0", "bridge", &conf)?;
            }
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", name])
            .args(argv)
            .envs(env.vars())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting rank {}", env.rank))?;
        let stdout = child.stdout.take().map(|mut out| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = out.read_to_string(&mut s);
                s
            })
        });
        Ok(Started {
            rank: env.rank,
            node: env.node.clone(),
            child,
            stdout,
        })
    }
}

impl Baseline {
    /// Runs CNI plugin `plugin` with `ADD` for namespace `name`, in the node.
    fn cni_add(
        &self,
        node: &NetNs,
        name: &str,
        ifname: &str,
        plugin: &str,
        conf: &str,
    ) -> Result<()> {
        use std::io::Write;
        let mut child = node
            .command(std::path::Path::new(CNI_PATH).join(plugin))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", name)
            .env("CNI_NETNS", format!("/run/netns/{name}"))
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running the CNI {plugin} plugin"))?;
        child
            .stdin
            .take()
            .context("CNI plugin stdin")?
            .write_all(conf.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "CNI {plugin} ADD for {name}: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// A started function; killed if dropped while it runs.
struct Started {
    rank: usize,
    node: String,
    child: Child,
    stdout: Option<JoinHandle<String>>,
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_until(child: &mut Child, left: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + left;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

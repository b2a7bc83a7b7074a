//! Real containers through a real runtime: Podman (Debian 12's 4.3, its CNI
//! backend, runc) runs two busybox containers, one on each of two namespaced
//! nodes' Particle networks. Podman creates the containers' namespaces in the
//! machine's namespace and runs particle-cni there; the plugin asks each
//! node's agent, which moves a warm endpoint's interface in. The containers
//! get overlay addresses and reach each other across the nodes; removing them
//! (CNI DEL) leaves nothing behind, and the machine's own links, routes and
//! firewall are as they were.
//!
//! A second test gives the containers NET_ADMIN and NET_RAW and has one of
//! them try to spoof: another source address, a gratuitous ARP claim for a
//! neighbour's address, another MAC. Its tenant router drops all of it.
//!
//! Podman is pointed only at particle-cni: its own configuration, storage
//! (vfs) and network config directory live in a temporary directory of this
//! test, so no default podman/CNI network is created or used.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use particle_cluster::LocalCluster;
use particle_net::PoolConfig;
use particle_wire::api::CreateTenant;
use serde_json::json;

/// One Podman test at a time: each has its own root, runroot and tmpdir (so
/// runs on one machine leave each other alone), but two at once on two
/// cores only slow each other's containers past their timeouts.
static ONE_PODMAN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn require_root_and_podman() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs Podman and creates network namespaces; run it as root (see README)"
    );
    assert!(
        Command::new("podman")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
            && Path::new("/bin/busybox").exists(),
        "podman and busybox-static are needed: run scripts/install-deps"
    );
}

/// The machine's own network state, to prove the runtime left it alone.
fn host_network() -> String {
    let mut out = String::new();
    for args in [
        &["-o", "link", "show"][..],
        &["-4", "route", "show", "table", "all"][..],
        &["-6", "route", "show", "table", "all"][..],
    ] {
        let o = Command::new("ip").args(args).output().unwrap();
        // Link counters and states flap with other tests' traffic; names and
        // kinds are what matter.
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let fields: Vec<&str> = line.split_whitespace().take(2).collect();
            out.push_str(&fields.join(" "));
            out.push('\n');
        }
    }
    for tool in ["iptables-save", "nft"] {
        let args: &[&str] = if tool == "nft" {
            &["list", "ruleset"]
        } else {
            &[]
        };
        if let Ok(o) = Command::new(tool).args(args).output() {
            // iptables-save's comment lines carry the time; its counters
            // ([packets:bytes]) move with any traffic.
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if !line.starts_with('#') {
                    out.push_str(line.split(" [").next().unwrap_or(line));
                    out.push('\n');
                }
            }
        }
    }
    out
}

struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn new(dir: &Path, plugin_dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                r#"[containers]
# The VM's hard limits are below podman's defaults.
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["{}"]
network_config_dir = "{}"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
# crun refuses this VM's hybrid cgroup layout; runc runs.
runtime = "runc"
"#,
                plugin_dir.display(),
                dir.join("net.d").display()
            ),
        )
        .unwrap();
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            // Libpod's state (default /run/libpod) too: with it shared, one
            // run's `system reset` stopped another run's containers, whose
            // CNI DEL then never came and whose netns stayed behind.
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--storage-driver", "vfs"]);
        c
    }

    /// Whether `podman ARGS` succeeds.
    fn ok(&self, args: &[&str]) -> bool {
        let out = self.cmd().args(args).output().unwrap();
        if !out.status.success() {
            eprintln!(
                "podman {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn network(&self, name: &str, socket: &Path, mode: &str) {
        let conflist = json!({
            "cniVersion": "1.0.0", "name": name,
            "plugins": [{
                "type": "particle-cni", "tenant": "a", "agentSocket": socket, "attachMode": mode
            }]
        });
        std::fs::write(
            self.dir.join("net.d").join(format!("{name}.conflist")),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .unwrap();
    }

    /// A local image from the static busybox: no registry involved.
    fn import_busybox(&self) {
        let rootfs = self.dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "sleep", "ping", "ip", "arping", "cat"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = self
            .cmd()
            .args(["import", "-", "localhost/particle-busybox"])
            .stdin(tar.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(tar.wait().unwrap().success(), "tar of the rootfs failed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "-af", "-t", "0"]).output();
        let _ = self.cmd().args(["system", "reset", "-f"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn address_in(podman: &Podman, container: &str) -> String {
    let out = podman.run(&["exec", container, "ip", "-4", "-o", "addr", "show", "eth0"]);
    let cidr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no address in {out:?}"));
    cidr.split('/').next().unwrap().to_string()
}

#[test]
fn podman_containers_on_two_nodes_reach_each_other_over_particle() {
    let _one = ONE_PODMAN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    require_root_and_podman();
    let before = host_network();
    let (nodes, podman) = two_nodes_and_podman(2280, "10.228.0.0/16", "10.229.0.0/24");

    let image = "localhost/particle-busybox";
    for (name, net) in [("c0", "particle-n0"), ("c1", "particle-n1")] {
        podman.run(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net,
            image,
            "sleep",
            "600",
        ]);
    }
    let (a0, a1) = (address_in(&podman, "c0"), address_in(&podman, "c1"));
    assert!(
        a0.starts_with("10.228.") && a1.starts_with("10.228."),
        "{a0} {a1}"
    );
    assert_ne!(a0, a1);
    for (from, to) in [("c0", &a1), ("c1", &a0)] {
        podman.run(&["exec", from, "ping", "-c", "1", "-W", "2", to]);
    }
    // Node 1 lent a warm endpoint; node 0 plugged a pair on the warm bridge.
    for (i, claimed) in [(0, 0), (1, 1)] {
        let status = nodes.request(i, &json!({"op":"status"})).unwrap();
        assert_eq!(status["pools"]["a"]["claims_total"], claimed, "{status}");
    }

    // Removing the containers runs CNI DEL: the interfaces go back to their
    // endpoints and the endpoints back to the warm pools.
    podman.run(&["rm", "-f", "-t", "0", "c0", "c1"]);
    nodes.wait_ready("a", 2, Duration::from_secs(10)).unwrap();
    let gone = nodes
        .request(
            0,
            &json!({"op":"detach","container_id":"x","ifname":"eth0"}),
        )
        .unwrap();
    assert_eq!(gone["found"], false);
    drop(podman);
    drop(nodes);
    assert_eq!(before, host_network(), "the machine's own network changed");
}

/// The MAC `container` has for `ip` in its ARP cache, if any.
fn arp_entry(podman: &Podman, container: &str, ip: &str) -> String {
    let out = podman.run(&["exec", container, "ip", "neigh", "show", ip]);
    out.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Whether `command` (split at spaces) succeeds in `container`.
fn exec(podman: &Podman, container: &str, command: &str) -> bool {
    let mut args = vec!["exec", container];
    args.extend(command.split_whitespace());
    podman.ok(&args)
}

fn ping(podman: &Podman, from: &str, to: &str) -> bool {
    exec(podman, from, &format!("ping -c 1 -W 2 {to}"))
}

/// Two nodes with agents keeping tenant `a` (VNI `vni`, `subnet`) warm, and
/// a Podman whose networks plug (node 0) and move (node 1).
fn two_nodes_and_podman(vni: u32, subnet: &str, underlay: &str) -> (LocalCluster, Podman) {
    let tenant = CreateTenant {
        name: "a".into(),
        vni,
        subnet: subnet.into(),
        block_prefix: None,
        warm_per_node: None,
    };
    let pool = PoolConfig {
        high_watermark: 2,
        low_watermark: 1,
        batch_size: 2,
    };
    let nodes = common::nodes_with(2, underlay, pool, tenant);
    let podman = Podman::new(
        &std::env::temp_dir().join(format!("{}-podman", nodes.prefix())),
        &common::plugin_dir(),
    );
    // Both ways of lending an interface, one per node.
    podman.network("particle-n0", nodes.socket(0), "plug");
    podman.network("particle-n1", nodes.socket(1), "move");
    podman.import_busybox();
    (nodes, podman)
}

#[test]
fn podman_containers_with_net_admin_cannot_spoof_on_the_overlay() {
    let _one = ONE_PODMAN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    require_root_and_podman();
    let before = host_network();
    let (nodes, podman) = two_nodes_and_podman(2300, "10.230.0.0/16", "10.231.0.0/24");
    // More than Kubernetes' runtimes give by default (NET_RAW).
    let names = ["attacker", "victim", "witness", "remote"];
    for name in names {
        let net = if name == "remote" {
            "particle-n1"
        } else {
            "particle-n0"
        };
        podman.run(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net,
            "--cap-add",
            "NET_ADMIN,NET_RAW",
            "localhost/particle-busybox",
            "sleep",
            "600",
        ]);
    }
    let [attacker, victim, witness, remote] = names.map(|c| address_in(&podman, c));
    // The first packets wait for the agents to apply each other's overlay
    // entries and for ARP: give honest paths a few tries.
    let reaches = |from: &str, to: &str| (0..5).any(|_| ping(&podman, from, to));
    assert!(reaches("attacker", &victim), "attacker -> victim, honestly");
    assert!(reaches("attacker", &remote), "attacker -> remote, honestly");
    assert!(
        reaches("witness", &victim),
        "the witness learns the victim's MAC"
    );

    another_source_address(&podman, &attacker, &victim);
    arp_claim_for_the_victim(&podman, &victim);
    another_mac(&podman, &witness);
    assert!(
        ping(&podman, "attacker", &witness),
        "the attacker's honest traffic still flows"
    );
    podman.run(&[
        "rm", "-f", "-t", "0", "attacker", "victim", "witness", "remote",
    ]);
    drop(podman);
    drop(nodes);
    assert_eq!(before, host_network(), "the machine's own network changed");
}

/// A ping from a spare address of the node's block the attacker added
/// itself: the echo request is dropped at its port, and so would be its
/// answer to the victim's ARP for that address.
fn another_source_address(podman: &Podman, attacker: &str, victim: &str) {
    let spare = format!("{}.250", attacker.rsplit_once('.').unwrap().0);
    assert!(exec(
        podman,
        "attacker",
        &format!("ip addr add {spare}/32 dev eth0")
    ));
    assert!(
        !exec(
            podman,
            "attacker",
            &format!("ping -c 1 -W 2 -I {spare} {victim}")
        ),
        "a ping from an address the attacker was not given got through"
    );
    assert!(exec(
        podman,
        "attacker",
        &format!("ip addr del {spare}/32 dev eth0")
    ));
}

/// Gratuitous ARP (request and reply) claiming the victim's address: the
/// witness keeps the victim's MAC, and the victim stays reachable.
fn arp_claim_for_the_victim(podman: &Podman, victim: &str) {
    let victim_mac = arp_entry(podman, "witness", victim);
    assert!(!victim_mac.is_empty());
    assert!(exec(
        podman,
        "attacker",
        &format!("ip addr add {victim}/32 dev eth0")
    ));
    for mode in ["-U", "-A"] {
        let _ = exec(
            podman,
            "attacker",
            &format!("arping {mode} -c 3 -I eth0 -s {victim} {victim}"),
        );
    }
    assert_eq!(
        arp_entry(podman, "witness", victim),
        victim_mac,
        "the witness's ARP entry for the victim was poisoned"
    );
    assert!(
        ping(podman, "witness", victim) && ping(podman, "remote", victim),
        "the victim is still reachable"
    );
    assert!(exec(
        podman,
        "attacker",
        &format!("ip addr del {victim}/32 dev eth0")
    ));
}

/// Another MAC: nothing the attacker sends gets through until it takes
/// its own back.
fn another_mac(podman: &Podman, witness: &str) {
    let own = podman.run(&["exec", "attacker", "cat", "/sys/class/net/eth0/address"]);
    assert!(exec(
        podman,
        "attacker",
        "ip link set eth0 address 02:aa:00:00:00:01"
    ));
    assert!(
        !ping(podman, "attacker", witness),
        "a frame from a made-up MAC got through"
    );
    assert!(exec(
        podman,
        "attacker",
        &format!("ip link set eth0 address {own}")
    ));
}

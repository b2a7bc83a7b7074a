//! Lent connections stay pinned to their destination. A socket handed to a
//! function lives in the node's namespace, and TCP lets its holder
//! disconnect it (`connect(AF_UNSPEC)`) and dial anywhere the node can
//! reach: the controller, another agent's API. So every warm socket is made
//! with a file-system uid of its own ([`SOCKET_UID`]; the kernel stamps a
//! socket with its creator's fsuid for good), and the node's firewall lets
//! packets of sockets with that uid go only to the pooled destinations:
//! whatever a function re-dials is reset at its first SYN.
//!
//! The rules live in one iptables chain per service (named from its socket
//! path, so a restarted agent replaces what a crashed one left), jumped to
//! from `OUTPUT` for that uid only; they go when the service stops.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nix::unistd::{setfsuid, Uid};
use particle_net::NetNs;

/// The uid warm sockets are created with: an unassigned one (not `nobody`,
/// whose daemons the rules would catch).
pub const SOCKET_UID: u32 = 0x7fff_ff00;

/// The firewall rules of one warm service, in its node's namespace.
pub struct Pinning {
    node: NetNs,
    chain: String,
}

impl Pinning {
    /// Installs the chain (replacing a leftover of the same name) allowing
    /// `destinations`.
    pub fn install(node: &NetNs, chain: String, destinations: &[SocketAddr]) -> io::Result<Self> {
        let pinning = Self {
            node: node.try_clone().map_err(io::Error::other)?,
            chain,
        };
        pinning.remove();
        pinning.iptables(&["-N", &pinning.chain])?;
        pinning.jump("-I")?;
        for d in destinations {
            pinning.allow(*d)?;
        }
        // Anything else: a TCP reset for TCP, an ICMP error for the rest.
        let chain = pinning.chain.clone();
        pinning.iptables(&[
            "-A",
            &chain,
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ])?;
        pinning.iptables(&["-A", &chain, "-j", "REJECT"])?;
        Ok(pinning)
    }

    /// Lets warm sockets reach `dest` (inserted before the final rejects).
    pub fn allow(&self, dest: SocketAddr) -> io::Result<()> {
        let SocketAddr::V4(v4) = dest else {
            return Err(io::Error::other(format!("{dest}: IPv4 destinations only")));
        };
        let (ip, port) = (v4.ip().to_string(), v4.port().to_string());
        let rule = ["-p", "tcp", "-d", &ip, "--dport", &port, "-j", "ACCEPT"];
        let mut check = vec!["-C", &self.chain];
        check.extend(rule);
        if self.iptables(&check).is_ok() {
            return Ok(());
        }
        let mut insert = vec!["-I", &self.chain, "1"];
        insert.extend(rule);
        self.iptables(&insert)
    }

    /// Inserts (`-I`) or deletes (`-D`) the jump from `OUTPUT` for warm sockets.
    fn jump(&self, op: &str) -> io::Result<()> {
        let uid = SOCKET_UID.to_string();
        self.iptables(&[
            op,
            "OUTPUT",
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "-j",
            &self.chain,
        ])
    }

    fn remove(&self) {
        while self.jump("-D").is_ok() {}
        let _ = self.iptables(&["-F", &self.chain]);
        let _ = self.iptables(&["-X", &self.chain]);
    }

    fn iptables(&self, args: &[&str]) -> io::Result<()> {
        let out = self
            .node
            .command("iptables")
            .arg("-w")
            .args(args)
            .output()
            .map_err(|e| {
                io::Error::other(format!("iptables (install it: scripts/install-deps): {e}"))
            })?;
        if out.status.success() {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The chain name for the service at `socket_path` (iptables allows 28 bytes).
pub fn chain_for(socket_path: &std::path::Path) -> String {
    // FNV-1a: stable across runs, unlike std's hasher.
    let hash = socket_path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    format!("PT-WARM-{hash:016x}")
}

/// Connects to `dest` with a socket stamped [`SOCKET_UID`]; the calling
/// thread's fsuid is changed around the socket's creation only (fsuid is
/// per thread).
pub fn connect_pinned(dest: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let previous = setfsuid(Uid::from_raw(SOCKET_UID));
    let connected = TcpStream::connect_timeout(&dest, timeout);
    setfsuid(previous);
    connected
}

//! Endpoints built with iproute2's `ip`, the way scripts and early network
//! plugins build them.
//!
//! Two ways: one `ip` process per command, and `ip -batch`, one process reading
//! many commands. `ip -batch` cannot switch namespaces between commands, so
//! what runs inside each endpoint (lo up, eth0 up, address, route) still takes
//! one `ip -n NS -batch` process per endpoint: that is as close to one
//! sequential client as `ip` gets.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One endpoint as the `ip` baselines build it.
#[derive(Debug, Clone)]
pub struct IpEndpoint {
    /// Named namespace (`/run/netns/NAME`).
    pub netns: String,
    /// Host end of the veth pair, in the scratch namespace.
    pub host_ifname: String,
    /// Address with prefix length, e.g. `10.250.0.2/16`.
    pub address: String,
    pub gateway: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
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

fn ip_batch(netns: Option<&str>, commands: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip -batch (is iproute2 installed? scripts/install-deps)")?;
    child
        .stdin
        .take()
        .context("ip -batch stdin")?
        .write_all(commands.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn host_side(bridge: &str, e: &IpEndpoint) -> [String; 2] {
    [
        format!(
            "link add {} type veth peer name eth0 netns {}",
            e.host_ifname, e.netns
        ),
        format!("link set {} master {bridge} up", e.host_ifname),
    ]
}

fn inside(e: &IpEndpoint) -> [String; 4] {
    [
        "link set lo up".to_string(),
        "link set eth0 up".to_string(),
        format!("addr add {} dev eth0", e.address),
        format!("route add default via {} dev eth0", e.gateway),
    ]
}

/// One `ip` process per command: 7 per endpoint.
pub fn create_per_command(
    scratch_ns: &str,
    bridge: &str,
    endpoints: &[IpEndpoint],
) -> Result<Duration> {
    let start = Instant::now();
    for e in endpoints {
        ip(&["netns", "add", &e.netns])?;
        for line in host_side(bridge, e) {
            let mut args = vec!["-n", scratch_ns];
            args.extend(line.split_whitespace());
            ip(&args)?;
        }
        for line in inside(e) {
            let mut args = vec!["-n", e.netns.as_str()];
            args.extend(line.split_whitespace());
            ip(&args)?;
        }
    }
    Ok(start.elapsed())
}

/// Time `ip -batch` took: for the namespaces and host ends (two processes),
/// and for the endpoints' insides (one process each).
#[derive(Debug, Clone, Copy)]
pub struct BatchTimes {
    pub outside: Duration,
    pub inside: Duration,
}

impl BatchTimes {
    pub fn total(&self) -> Duration {
        self.outside + self.inside
    }
}

/// `ip -batch`: one process for the namespaces, one for the host ends, one
/// per endpoint for its inside.
pub fn create_batched(
    scratch_ns: &str,
    bridge: &str,
    endpoints: &[IpEndpoint],
) -> Result<BatchTimes> {
    let start = Instant::now();
    let namespaces: String = endpoints
        .iter()
        .map(|e| format!("netns add {}\n", e.netns))
        .collect();
    ip_batch(None, &namespaces)?;
    let host: String = endpoints
        .iter()
        .flat_map(|e| host_side(bridge, e))
        .map(|l| l + "\n")
        .collect();
    ip_batch(Some(scratch_ns), &host)?;
    let outside = start.elapsed();
    let start = Instant::now();
    for e in endpoints {
        let lines: String = inside(e).into_iter().map(|l| l + "\n").collect();
        ip_batch(Some(&e.netns), &lines)?;
    }
    Ok(BatchTimes {
        outside,
        inside: start.elapsed(),
    })
}

/// Deletes named namespaces (and with them everything inside) in one process.
pub fn delete_namespaces<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<()> {
    let lines: String = names
        .into_iter()
        .filter(|n| std::path::Path::new("/run/netns").join(n).exists())
        .map(|n| format!("netns del {n}\n"))
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    ip_batch(None, &lines)
}

/// Deletes the namespaces it was given when dropped, so a failed benchmark
/// leaves nothing behind.
pub struct NamespacesGuard(pub Vec<String>);

impl Drop for NamespacesGuard {
    fn drop(&mut self) {
        if let Err(e) = delete_namespaces(self.0.iter().map(String::as_str)) {
            tracing::warn!("removing baseline namespaces: {e:#}");
        }
    }
}

//! Any CNI plugin binary, invoked the way a runtime (containerd, CRI-O,
//! Podman's CNI backend) invokes it: `CNI_COMMAND`, `CNI_CONTAINERID`,
//! `CNI_NETNS`, `CNI_IFNAME`, `CNI_PATH` in the environment, the network
//! configuration on stdin, the result or the error JSON on stdout.
//!
//! Plugins run inside a namespace of the caller's choosing (a namespaced
//! node): the reference `bridge` plugin builds its bridge and host-side veths
//! in the namespace it runs in, and must never run in the machine's own.
//! A configuration list runs like a runtime runs it: ADD in order with each
//! plugin's result as the next one's `prevResult`, DEL in reverse.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use particle_net::NetNs;
use rscni_types::error::Error as CniError;
use rscni_types::types::{CNIResult, ErrorResult};
use serde_json::{json, Value};

/// Where Debian's containernetworking-plugins puts the reference plugins.
pub const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";

/// A CNI operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl CniCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }
}

/// The container side of an invocation.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    /// `CNI_NETNS`; `None` leaves it unset (DEL of a gone namespace, GC, STATUS).
    pub netns: Option<PathBuf>,
    pub ifname: String,
}

impl Container {
    /// A container whose namespace is `netns`, named by a path into this
    /// process's fds, so nothing is mounted (and nothing can leak if the
    /// caller dies): valid while `netns` is open.
    pub fn in_netns(id: impl Into<String>, netns: &NetNs, ifname: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            netns: Some(fd_path(netns)),
            ifname: ifname.into(),
        }
    }
}

/// `/proc/PID/fd/FD` of a namespace this process holds.
pub fn fd_path(netns: &NetNs) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        netns.as_raw_fd()
    ))
}

/// What a plugin answered.
#[derive(Debug)]
pub enum CniOutcome {
    /// Exit 0; the ADD result (or VERSION's answer) if it printed one.
    Success(Option<Value>),
    /// Non-zero exit with the spec's error JSON, as rscni reads it back.
    Failure {
        error: CniError,
        code: u32,
        raw: Value,
    },
}

impl CniOutcome {
    /// The ADD result, or an error saying what the plugin said.
    pub fn result(self) -> Result<CNIResult> {
        match self {
            Self::Success(Some(v)) => serde_json::from_value(v).context("decoding the CNI result"),
            Self::Success(None) => bail!("the plugin printed no result"),
            Self::Failure { raw, .. } => bail!("the plugin failed: {raw}"),
        }
    }

    pub fn ok(self) -> Result<()> {
        match self {
            Self::Success(_) => Ok(()),
            Self::Failure { raw, .. } => bail!("the plugin failed: {raw}"),
        }
    }
}

/// A plugin binary and where it (and the plugins it delegates to) live.
#[derive(Debug, Clone)]
pub struct CniPlugin {
    pub binary: PathBuf,
    /// `CNI_PATH`.
    pub search_path: Vec<PathBuf>,
}

impl CniPlugin {
    /// The plugin named `kind` (a config's `type`) in the first directory of
    /// `search_path` that has it.
    pub fn find(kind: &str, search_path: &[PathBuf]) -> Result<Self> {
        let binary = search_path
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "no CNI plugin {kind:?} in {search_path:?} (the reference plugins come with \
                     containernetworking-plugins: scripts/install-deps)"
                )
            })?;
        Ok(Self {
            binary,
            search_path: search_path.to_vec(),
        })
    }

    /// Runs the plugin once, inside `inside` (or in the caller's namespace
    /// if `None`), with `config` on stdin; returns what it answered and how
    /// long the whole invocation took (process start to exit).
    pub fn invoke(
        &self,
        inside: Option<&NetNs>,
        command: CniCommand,
        container: &Container,
        config: &Value,
    ) -> Result<(CniOutcome, Duration)> {
        let mut cmd = match inside {
            Some(ns) => ns.command(&self.binary),
            None => Command::new(&self.binary),
        };
        let search = std::env::join_paths(&self.search_path).context("CNI_PATH")?;
        cmd.env_clear()
            .env("CNI_COMMAND", command.as_str())
            .env("CNI_CONTAINERID", &container.id)
            .env("CNI_IFNAME", &container.ifname)
            .env("CNI_PATH", search)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = &container.netns {
            cmd.env("CNI_NETNS", netns);
        }
        let input = serde_json::to_vec(config)?;
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        match child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(&input)
        {
            // A plugin may answer without reading its config (VERSION).
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(e).context("writing the config to the plugin")
            }
            _ => {}
        }
        let out = child.wait_with_output()?;
        let took = started.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let parsed: Option<Value> = if stdout.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(stdout.trim()).with_context(|| {
                format!(
                    "{} {} printed no JSON: {stdout:?} (stderr {:?})",
                    self.binary.display(),
                    command.as_str(),
                    String::from_utf8_lossy(&out.stderr)
                )
            })?)
        };
        if out.status.success() {
            return Ok((CniOutcome::Success(parsed), took));
        }
        let raw = parsed.ok_or_else(|| {
            anyhow!(
                "{} {} failed ({}) without an error result; stderr: {}",
                self.binary.display(),
                command.as_str(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let wire: ErrorResult =
            serde_json::from_value(raw.clone()).context("decoding the plugin's error result")?;
        let error = CniError::from(wire);
        let code = u32::from(&error);
        Ok((CniOutcome::Failure { error, code, raw }, took))
    }
}

/// A network configuration list (`.conflist`) and the plugins it names.
#[derive(Debug, Clone)]
pub struct ConfList {
    pub list: Value,
    pub search_path: Vec<PathBuf>,
}

impl ConfList {
    pub fn new(list: Value, search_path: &[PathBuf]) -> Self {
        Self {
            list,
            search_path: search_path.to_vec(),
        }
    }

    fn plugins(&self) -> Result<Vec<Value>> {
        self.list
            .get("plugins")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| anyhow!("a conflist needs a \"plugins\" array"))
    }

    /// The stdin a runtime gives one plugin of the list: its object plus the
    /// list's `name` and `cniVersion`, and the previous result if any.
    fn plugin_config(&self, plugin: &Value, prev: Option<&Value>) -> Result<Value> {
        let mut conf = plugin.clone();
        let obj = conf
            .as_object_mut()
            .ok_or_else(|| anyhow!("a plugin entry must be an object"))?;
        obj.insert("name".into(), self.list["name"].clone());
        obj.insert("cniVersion".into(), self.list["cniVersion"].clone());
        if let Some(prev) = prev {
            obj.insert("prevResult".into(), prev.clone());
        }
        Ok(conf)
    }

    fn plugin(&self, conf: &Value) -> Result<CniPlugin> {
        let kind = conf
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("a plugin entry needs a \"type\""))?;
        CniPlugin::find(kind, &self.search_path)
    }

    /// ADD through every plugin, chaining results; the final result.
    pub fn add(&self, inside: Option<&NetNs>, container: &Container) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins()? {
            let conf = self.plugin_config(&plugin, prev.as_ref())?;
            let (outcome, _) =
                self.plugin(&conf)?
                    .invoke(inside, CniCommand::Add, container, &conf)?;
            match outcome {
                CniOutcome::Success(Some(result)) => prev = Some(result),
                CniOutcome::Success(None) => bail!("{} printed no ADD result", conf["type"]),
                CniOutcome::Failure { raw, .. } => bail!("{} ADD failed: {raw}", conf["type"]),
            }
        }
        prev.ok_or_else(|| anyhow!("an empty conflist"))
    }

    /// CHECK through every plugin with the cached ADD result.
    pub fn check(
        &self,
        inside: Option<&NetNs>,
        container: &Container,
        result: &Value,
    ) -> Result<()> {
        for plugin in self.plugins()? {
            let conf = self.plugin_config(&plugin, Some(result))?;
            let (outcome, _) =
                self.plugin(&conf)?
                    .invoke(inside, CniCommand::Check, container, &conf)?;
            outcome
                .ok()
                .with_context(|| format!("{} CHECK", conf["type"]))?;
        }
        Ok(())
    }

    /// DEL through every plugin in reverse, each told the cached result.
    pub fn del(
        &self,
        inside: Option<&NetNs>,
        container: &Container,
        result: Option<&Value>,
    ) -> Result<()> {
        for plugin in self.plugins()?.iter().rev() {
            let conf = self.plugin_config(plugin, result)?;
            let (outcome, _) =
                self.plugin(&conf)?
                    .invoke(inside, CniCommand::Del, container, &conf)?;
            outcome
                .ok()
                .with_context(|| format!("{} DEL", conf["type"]))?;
        }
        Ok(())
    }
}

/// The reference `bridge` plugin with `host-local` IPAM, kept off the
/// machine's own state: its address leases go to `data_dir` (host-local's
/// default is /var/lib/cni), no masquerading (no iptables rules).
pub fn bridge_config(network: &str, bridge: &str, subnet: &str, data_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": network,
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "subnet": subnet,
            "dataDir": data_dir,
            "routes": [{ "dst": "0.0.0.0/0" }]
        }
    })
}

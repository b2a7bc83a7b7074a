//! What a function is allowed: its root file system, its host uid range,
//! its cgroup limits, and its tenant's share of the node.
//!
//! - **Root file system**: by default an image the agent assembles once at
//!   start ([`image`]: busybox plus the binaries Particle ships, with their
//!   libraries), under its run directory, removed on stop; an operator may
//!   name a directory or an unpacked OCI image per tenant (settings) or per
//!   job ([`particle_wire::api::LaunchJob::image`]). Mounted read-only.
//! - **User namespace**: root inside is a range of 65536 unprivileged host
//!   ids, one range per tenant ([`IdSlots`]): two tenants never share a host
//!   uid on a node, and the node's files are never the function's.
//! - **Limits**: pids, memory and CPU weight per function, in its own cgroup
//!   under one this agent owns ([`cgroup`], v1 and v2); defaults here,
//!   overridden per job.
//! - **Quotas**: at most so many endpoints and functions per tenant on the
//!   node (enforced by the job reserve, [`crate::jobs`]).

pub mod cgroup;
pub mod image;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use particle_wire::api::FunctionLimits;
use serde::{Deserialize, Serialize};

use cgroup::{CgroupError, CgroupTree, FunctionCgroup};
use image::{Image, ImageError};

/// Ids each tenant's user namespace maps (0..65536 inside).
pub const IDS_PER_TENANT: u32 = 65536;
/// The highest host gid a function may have: the top of the
/// `ping_group_range` endpoints open (`0 2147483647`), so ICMP sockets work.
const MAX_HOST_ID: u64 = 2_147_483_647;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("image {0}: {1}")]
    BadImage(String, String),
    #[error("{0}")]
    BadLimits(String),
    #[error("no host uid range left for tenant {0:?} (every range of this node is taken)")]
    NoIds(String),
}

/// The agent's sandbox settings (the `sandbox:` key of its settings file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Every tenant's image instead of the assembled one.
    pub image: Option<PathBuf>,
    /// Tenant name → its image.
    pub tenant_images: BTreeMap<String, PathBuf>,
    /// More binaries for the assembled image (with their libraries), at
    /// their own paths and in `/usr/local/bin`.
    pub binaries: Vec<PathBuf>,
    /// Per-function defaults, for what a job leaves unset.
    pub pids: u64,
    pub memory_mb: u64,
    pub cpu_weight: u64,
    pub tmp_mb: u64,
    /// Endpoints a tenant may hold on this node (claimed, by jobs or the local API).
    pub max_endpoints_per_tenant: usize,
    /// Functions a tenant may have reserved or running on this node.
    pub max_functions_per_tenant: usize,
    /// The first host id of the first tenant's range.
    pub id_base: u32,
    /// Files of the node every function sees at the same path (the warm
    /// connections' socket); set by the agent, not by settings.
    #[serde(skip)]
    pub binds: Vec<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            image: None,
            tenant_images: BTreeMap::new(),
            binaries: Vec::new(),
            pids: 256,
            memory_mb: 512,
            cpu_weight: 100,
            tmp_mb: 64,
            max_endpoints_per_tenant: 4096,
            max_functions_per_tenant: 2048,
            id_base: 1 << 20,
            binds: Vec::new(),
        }
    }
}

/// A function's limits, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub pids: u64,
    pub memory_bytes: u64,
    /// 1..=10000, 100 an even share (cgroup v2's `cpu.weight`).
    pub cpu_weight: u64,
    pub tmp_bytes: u64,
}

impl Limits {
    /// The weight as cgroup v1's `cpu.shares` (1024 an even share).
    pub fn cpu_shares(&self) -> u64 {
        (self.cpu_weight * 1024 / 100).max(2)
    }
}

/// A tenant's host ids: `host_base..host_base + count` are 0.. inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub host_base: u32,
    pub count: u32,
}

/// Which tenant has which id range on this node.
#[derive(Debug)]
pub struct IdSlots {
    base: u32,
    slots: usize,
    by_tenant: HashMap<String, usize>,
    taken: HashMap<usize, String>,
}

impl IdSlots {
    pub fn new(base: u32) -> Self {
        let room = MAX_HOST_ID.saturating_sub(base as u64) + 1;
        Self {
            base,
            slots: (room / IDS_PER_TENANT as u64) as usize,
            by_tenant: HashMap::new(),
            taken: HashMap::new(),
        }
    }

    /// The tenant's range. Its preferred slot comes from its name, so a
    /// tenant has the same range on every node unless a clash moved it; a
    /// clash on this node moves it to the next free slot.
    pub fn of(&mut self, tenant: &str) -> Option<IdRange> {
        if self.slots == 0 {
            return None;
        }
        let slot = match self.by_tenant.get(tenant) {
            Some(&s) => s,
            None => {
                let first = (fnv1a(tenant.as_bytes()) % self.slots as u64) as usize;
                let slot = (0..self.slots)
                    .map(|i| (first + i) % self.slots)
                    .find(|s| !self.taken.contains_key(s))?;
                self.by_tenant.insert(tenant.to_string(), slot);
                self.taken.insert(slot, tenant.to_string());
                slot
            }
        };
        Some(IdRange {
            host_base: self.base + slot as u32 * IDS_PER_TENANT,
            count: IDS_PER_TENANT,
        })
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The node's sandbox: its default image, its cgroups, its id ranges.
pub struct Sandbox {
    config: SandboxConfig,
    image: Image,
    cgroups: CgroupTree,
    ids: Mutex<IdSlots>,
}

impl Sandbox {
    /// Assembles the default image in `dir` and makes this agent's cgroup
    /// parent, both named after `label` (the run prefix and node).
    pub fn start(config: SandboxConfig, dir: &Path, label: &str) -> Result<Self, SandboxError> {
        let mut sources = image::Sources::for_agent(&config.binaries);
        sources.mount_points.clone_from(&config.binds);
        let image = Image::assemble(dir, label, &sources)?;
        let cgroups = CgroupTree::create(label)?;
        let ids = Mutex::new(IdSlots::new(config.id_base));
        Ok(Self {
            config,
            image,
            cgroups,
            ids,
        })
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The default image's root.
    pub fn default_root(&self) -> &Path {
        self.image.root()
    }

    /// The root a function of `tenant` gets: the job's image, the tenant's,
    /// the operator's default, else the assembled one. An unpacked OCI
    /// image (a directory with `rootfs/`) is its `rootfs/`.
    pub fn root_for(&self, tenant: &str, job_image: Option<&str>) -> Result<PathBuf, SandboxError> {
        let chosen = job_image
            .map(PathBuf::from)
            .or_else(|| self.config.tenant_images.get(tenant).cloned())
            .or_else(|| self.config.image.clone());
        let Some(dir) = chosen else {
            return Ok(self.image.root().to_owned());
        };
        let shown = dir.display().to_string();
        if !dir.is_absolute() {
            return Err(SandboxError::BadImage(shown, "not an absolute path".into()));
        }
        let root = if dir.join("rootfs").is_dir() {
            dir.join("rootfs")
        } else {
            dir
        };
        // Mount points the launcher needs and cannot make in a read-only root.
        for needed in ["proc", "tmp", "dev"] {
            if !root.join(needed).is_dir() {
                return Err(SandboxError::BadImage(
                    shown,
                    format!("has no /{needed} directory"),
                ));
            }
        }
        Ok(root)
    }

    /// A job's output directory, checked: an absolute directory of the node
    /// the function can have at the same path (under `/tmp`, made in its
    /// private `/tmp`, or a directory the image has).
    pub fn output_dir(&self, root: &Path, dir: &str) -> Result<PathBuf, SandboxError> {
        let bad = |why: &str| SandboxError::BadImage(dir.to_string(), why.to_string());
        let path = PathBuf::from(dir);
        if !path.is_absolute()
            || path
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(bad("output_dir must be an absolute path without `..`"));
        }
        if !path.is_dir() {
            return Err(bad("output_dir is not a directory on this node"));
        }
        let under_tmp = path.starts_with("/tmp") && path != Path::new("/tmp");
        let in_image = root.join(path.strip_prefix("/").unwrap_or(&path)).is_dir();
        if !under_tmp && !in_image {
            return Err(bad(
                "output_dir must be under /tmp or a directory of the image",
            ));
        }
        Ok(path)
    }

    /// A job's limits with this node's defaults filled in, checked.
    pub fn limits(&self, asked: &FunctionLimits) -> Result<Limits, SandboxError> {
        let c = &self.config;
        let mb = |v: u64, what: &str| {
            v.checked_mul(1 << 20)
                .ok_or_else(|| SandboxError::BadLimits(format!("{what} of {v} MiB is too large")))
        };
        let limits = Limits {
            pids: asked.pids.unwrap_or(c.pids),
            memory_bytes: mb(asked.memory_mb.unwrap_or(c.memory_mb), "memory_mb")?,
            cpu_weight: asked.cpu_weight.unwrap_or(c.cpu_weight),
            tmp_bytes: mb(asked.tmp_mb.unwrap_or(c.tmp_mb), "tmp_mb")?,
        };
        if limits.pids == 0 || limits.memory_bytes == 0 || limits.tmp_bytes == 0 {
            return Err(SandboxError::BadLimits(
                "pids, memory_mb and tmp_mb must be at least 1".into(),
            ));
        }
        if !(1..=10_000).contains(&limits.cpu_weight) {
            return Err(SandboxError::BadLimits(format!(
                "cpu_weight {} is not within 1..=10000",
                limits.cpu_weight
            )));
        }
        Ok(limits)
    }

    /// The tenant's host id range on this node.
    pub fn ids(&self, tenant: &str) -> Result<IdRange, SandboxError> {
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .of(tenant)
            .ok_or_else(|| SandboxError::NoIds(tenant.to_string()))
    }

    /// Everything function `name` of `tenant` runs in, its cgroup made.
    pub fn prepare(
        &self,
        name: &str,
        tenant: &str,
        root: PathBuf,
        limits: Limits,
    ) -> Result<FunctionBox, SandboxError> {
        let ids = self.ids(tenant)?;
        let cgroup = self.cgroups.function(name, &limits)?;
        Ok(FunctionBox {
            root,
            binds: self.config.binds.clone(),
            writable: None,
            ids,
            limits,
            cgroup,
        })
    }
}

/// One function's sandbox; its cgroup goes when it is dropped.
pub struct FunctionBox {
    root: PathBuf,
    binds: Vec<PathBuf>,
    writable: Option<PathBuf>,
    ids: IdRange,
    limits: Limits,
    cgroup: FunctionCgroup,
}

impl FunctionBox {
    pub fn isolation(&self) -> crate::launcher::Isolation<'_> {
        crate::launcher::Isolation {
            root: &self.root,
            ids: self.ids,
            tmp_bytes: self.limits.tmp_bytes,
            cgroup_procs: self.cgroup.procs(),
            limits: self.limits,
            binds: &self.binds,
            writable: self.writable.as_deref(),
        }
    }

    /// Lets the function write `dir` of the node (checked with
    /// [`Sandbox::output_dir`]), at the same path.
    pub fn with_writable(mut self, dir: Option<PathBuf>) -> Self {
        self.writable = dir;
        self
    }

    /// Why the function ended, as its cgroup saw it: killed at its memory
    /// limit, or forks refused at its process limit.
    pub fn verdict(&self) -> Option<String> {
        let mut reasons = Vec::new();
        if self.cgroup.oom_kills() > 0 {
            reasons.push(format!(
                "out of memory: killed at its limit of {} MiB",
                self.limits.memory_bytes >> 20
            ));
        }
        if self.cgroup.pids_refused() > 0 {
            reasons.push(format!(
                "hit its process limit of {} (forks refused)",
                self.limits.pids
            ));
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Removes the cgroup once the last of its processes is gone; waits up
    /// to a second for stragglers (processes of the PID namespace still
    /// exiting).
    pub async fn remove(self) {
        for _ in 0..20 {
            if self.cgroup.remove().is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tracing::warn!("cgroup of a function outlived it; the agent removes it on stop");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_get_disjoint_ranges_below_the_ping_range_top() {
        let mut slots = IdSlots::new(1 << 20);
        let a = slots.of("a").unwrap();
        assert_eq!(slots.of("a"), Some(a), "stable per tenant");
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..2000 {
            let r = slots.of(&format!("t{i}")).unwrap();
            assert!(r.host_base >= 1 << 20);
            assert!(r.host_base as u64 + r.count as u64 - 1 <= MAX_HOST_ID);
            assert_eq!(r.host_base % IDS_PER_TENANT, 0);
            assert!(seen.insert(r.host_base), "shared range {r:?}");
        }
        assert!(!seen.contains(&a.host_base));
        // Full: every slot taken, then none left.
        let mut tiny = IdSlots::new((MAX_HOST_ID as u32) - 2 * IDS_PER_TENANT + 1);
        assert!(tiny.of("x").is_some() && tiny.of("y").is_some());
        assert!(tiny.of("z").is_none());
    }
}

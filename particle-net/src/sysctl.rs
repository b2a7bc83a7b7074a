//! Writing a per-namespace sysctl in many network namespaces, fast.
//!
//! `/proc/sys/net` shows the namespace of the thread that looks it up, and
//! the kernel keeps one cached `net` dentry per namespace under the same
//! parent: every lookup walks all of them (measured here: opening
//! `/proc/sys/net/ipv4/ping_group_range` costs ~40 µs with 250 namespaces
//! alive, ~360 µs with 1000, and it grows with every namespace on the
//! machine). A procfs instance of our own has its own dentries, so a worker
//! writes through one mounted in a mount namespace of its own thread,
//! renewed every [`RENEW_EVERY`] writes: ~30 µs a write plus ~13 µs of
//! mounting, whatever the count. Nothing is visible outside the thread,
//! and its mount namespace dies with it.

use std::io;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Writes through one procfs instance before it is replaced, bounding
/// the dentries a lookup walks.
pub const RENEW_EVERY: usize = 64;

/// Sysctl writes for the calling thread's network namespace.
#[derive(Debug)]
pub(crate) struct SysctlWriter {
    /// Whether the thread has a mount namespace of its own (else it writes
    /// through the shared `/proc`, correct but slower).
    private: bool,
    /// Whether our own procfs is mounted over `/proc` there.
    mounted: bool,
    writes: usize,
}

impl SysctlWriter {
    /// Moves the calling thread into a mount namespace of its own, with
    /// private propagation so nothing it mounts reaches anyone else. For
    /// threads that live for their whole job (the endpoint workers).
    pub(crate) fn for_this_thread() -> Self {
        let private = unshare(CloneFlags::CLONE_NEWNS)
            .and_then(|()| {
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
            })
            .map_err(|e| tracing::debug!("no private mount namespace for sysctls: {e}"))
            .is_ok();
        Self {
            private,
            mounted: false,
            writes: 0,
        }
    }

    /// Writes `value` to `/proc/sys/<key>` of the namespace the thread is in.
    pub(crate) fn write(&mut self, key: &str, value: &[u8]) -> io::Result<()> {
        // A procfs that cannot be mounted (a seccomp or LSM policy) costs
        // speed, not correctness: fall back to the shared /proc.
        if self.private {
            if let Err(e) = self.renew() {
                tracing::warn!("sysctls through the shared /proc from now on: {e}");
                self.private = false;
            }
        }
        self.writes += 1;
        std::fs::write(format!("/proc/sys/{key}"), value)
    }

    /// Mounts a fresh procfs over `/proc` (ours only) every RENEW_EVERY
    /// writes, dropping the previous one and its dentries. If unmounting
    /// fails, the old instance stays and still works.
    fn renew(&mut self) -> io::Result<()> {
        if self.mounted && self.writes % RENEW_EVERY != 0 {
            return Ok(());
        }
        if self.mounted {
            umount2("/proc", MntFlags::MNT_DETACH)?;
            self.mounted = false;
        }
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )?;
        self.mounted = true;
        Ok(())
    }
}

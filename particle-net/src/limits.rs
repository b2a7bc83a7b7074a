//! Process limits a pool of namespaces needs, and the priority of its
//! background threads.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Open files a node process asks for: every pooled endpoint holds its
/// namespace by fd, and every caller of its sockets holds one more.
pub const WANTED_OPEN_FILES: u64 = 1 << 20;

/// Raises the open-file limit: the default soft limit (1024) is smaller than
/// a warm pool for a large burst, and a flood of connections must meet the
/// agent's own caps, not the kernel's. Root may raise the hard limit too (up
/// to `fs.nr_open`); others get their hard limit. Returns the new soft limit.
pub fn raise_open_files() -> std::io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let wanted = WANTED_OPEN_FILES.min(ceiling).max(hard);
    if wanted > hard && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return Ok(wanted);
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// The nice value of pool maintenance (refills, recycling, sweeps): on a
/// busy node a burst's functions come first, and the pool catches up in the
/// gaps. On two cores, refilling a thousand endpoints at full priority while
/// a thousand functions start doubled the burst's time.
pub const BACKGROUND_NICE: i32 = 19;

/// Sets the calling thread's nice value (Linux: a thread's own). Lowering it
/// again needs CAP_SYS_NICE, which the agent has as root.
pub fn set_current_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: plain integer arguments; gettid names this thread.
    let r = unsafe {
        nix::libc::setpriority(
            nix::libc::PRIO_PROCESS,
            nix::libc::gettid() as nix::libc::id_t,
            nice,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

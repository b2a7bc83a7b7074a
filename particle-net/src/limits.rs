//! Process limits a pool of namespaces needs.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises the soft open-file limit to the hard limit: every pooled endpoint
/// holds its namespace by fd, and the default soft limit (1024) is smaller than
/// a warm pool for a large burst. Returns the new soft limit.
pub fn raise_open_files() -> std::io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

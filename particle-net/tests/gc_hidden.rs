//! A dead run's namespace hidden under `/run/netns` is collected. Its own
//! test binary: the scenario puts a file in the shared `/run/netns` that a
//! collection running beside it (`tests/gc.rs`) would take for its own.

mod common;

use std::path::Path;
use std::process::Command;

use particle_net::{gc, NetNs, Run, RunPrefix};

const DEAD_ENV: &str = "PARTICLE_GC_TEST_DEAD_RUN";

/// Not a test of its own: starts a run and dies with it, leaving its lock
/// file unlocked (a dead run's), for `hidden_namespaces_are_collected`.
#[test]
fn dead_run_child() {
    if std::env::var(DEAD_ENV).is_err() {
        return;
    }
    let run = Run::start().unwrap();
    println!("child-prefix={}", run.prefix());
    std::mem::forget(run);
    std::process::abort();
}

/// A dead run's namespace mounted under `/run/netns` before the directory was
/// a mount of its own, then hidden when `ip netns add` bind-mounted the
/// directory over itself: neither `ip` nor a plain collection could see or
/// remove it. All of it happens in a private mount namespace of one thread,
/// so the machine's mounts are never touched.
#[test]
fn hidden_namespaces_are_collected() {
    common::require_root();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "dead_run_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DEAD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout);
    let prefix = stdout
        .split("child-prefix=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| RunPrefix::parse(p).ok())
        .unwrap_or_else(|| panic!("child output: {stdout}"));
    let name = prefix.label("hidden");
    let report = std::thread::spawn(move || {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
        let none = None::<&str>;
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).unwrap();
        // As on a machine where nothing made /run/netns a mount point yet.
        std::fs::create_dir_all("/run/netns").unwrap();
        while umount2("/run/netns", MntFlags::MNT_DETACH).is_ok() {}
        let path = Path::new("/run/netns").join(&name);
        std::fs::File::create(&path).unwrap();
        let ns = NetNs::create().unwrap();
        let source = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&ns));
        mount(Some(source.as_str()), &path, none, MsFlags::MS_BIND, none).unwrap();
        // What `ip netns add` does the first time: hides it.
        let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
        mount(Some("/run/netns"), "/run/netns", none, bind, none).unwrap();
        let report = gc::collect_hidden_namespaces();
        let mounts = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        let still_mounted = mounts.contains(&format!("/run/netns/{name} "));
        // The directory is a mount again, where it was.
        let dir_mounted = mounts.contains(" /run/netns ");
        let _ = std::fs::remove_file(&path);
        (report, still_mounted, dir_mounted, path.exists())
    })
    .join()
    .unwrap();
    let (report, still_mounted, dir_mounted, file_left) = report;
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(
        report.namespaces.contains(&prefix.label("hidden")),
        "{report:?}"
    );
    assert!(!still_mounted && dir_mounted && !file_left);
    let _ = std::fs::remove_file(prefix.lock_path());
}

//! The agent census on the real kernel: a stand-in agent (`sleep`) in a fresh
//! namespace of this run, its kernel state changed one step at a time, and
//! each step's census differs from the last by exactly what the step made;
//! when it is all removed again the census is the fresh one. Namespaces held
//! by fd or by a descendant count, zombies count, a dead agent is an error.
//!
//! Everything lives in namespaces held by this test's fds and the children's
//! (interfaces named with the run's prefix, addresses only inside them): the
//! kernel removes it all when the children are killed (on drop, even when an
//! assertion fails) and the handles go.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use particle_bench::agent_resources::{AgentResources, ResourcesError};
use particle_net::{NetNs, Run};

/// These tests drive the real kernel; without root they must fail, loudly.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces, veth pairs and bridges and needs root \
         (CAP_NET_ADMIN, CAP_SYS_ADMIN); run the suite as root (see README)"
    );
}

/// A stand-in agent: a process group, killed whole and reaped on drop.
struct Agent(Child);

impl Agent {
    fn spawn(mut cmd: Command) -> Self {
        // Its own group, so a kill reaches the children it started too.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Self(cmd.spawn().expect("start the stand-in agent"))
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).expect("pid fits in i32")
    }

    /// Waits until the agent sleeps: spawn returns at exec, while the dynamic
    /// loader still maps memory and opens libraries (an extra fd for a while).
    fn settled(self) -> Self {
        let stat = format!("/proc/{}/stat", self.pid());
        eventually("the agent to go to sleep", || {
            let text = std::fs::read_to_string(&stat).ok()?;
            let state = text
                .get(text.rfind(')')? + 1..)?
                .split_whitespace()
                .next()?;
            (state == "S").then_some(())
        });
        self
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Runs `ip` or `bridge` inside `ns`; a failure fails the test with its stderr.
fn run_in(ns: &NetNs, tool: &str, args: &[&str]) {
    let out =
        ns.command(tool).args(args).output().unwrap_or_else(|e| {
            panic!("run {tool} (iproute2 installed? scripts/install-deps): {e}")
        });
    assert!(
        out.status.success(),
        "{tool} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh namespace with IPv6 off: with it on, links' multicast lists
/// (which the FDB dump shows) grow by themselves as IPv6 comes up, and its
/// traffic teaches bridges entries. Even off, every link joins the IPv6
/// all-nodes group (`33:33:00:00:00:01`) when it is created.
fn quiet_namespace() -> NetNs {
    let ns = NetNs::create().expect("create a namespace");
    ns.run_in(|| {
        for scope in ["all", "default"] {
            let path = format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6");
            std::fs::write(&path, "1").unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    })
    .expect("enter the namespace");
    ns
}

fn census(pid: i32) -> AgentResources {
    AgentResources::read(pid).unwrap_or_else(|e| panic!("census of {pid}: {e}"))
}

/// The census delta without memory, which no step controls.
fn delta(before: &AgentResources, after: &AgentResources) -> BTreeMap<String, i64> {
    let mut d = before.delta(after);
    d.remove("rss_kib");
    d
}

/// A delta that is zero except for `changed`.
fn only(changed: &[(&str, i64)]) -> BTreeMap<String, i64> {
    let mut d = delta(&AgentResources::default(), &AgentResources::default());
    for (name, v) in changed {
        *d.get_mut(*name).expect("a counter name") = *v;
    }
    d
}

/// Applies `step` and checks the census moved by exactly `expected`.
fn step(
    agent: &Agent,
    before: &mut AgentResources,
    what: &str,
    expected: &[(&str, i64)],
    step: impl FnOnce(),
) {
    step();
    let after = census(agent.pid());
    assert_eq!(
        delta(before, &after),
        only(expected),
        "{what}: before {before:?}, after {after:?}"
    );
    *before = after;
}

/// What the process's fds point at, for failure messages.
fn fd_links(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .map(|e| {
                    let link = std::fs::read_link(e.path()).unwrap_or_default();
                    format!("{} -> {}", e.file_name().to_string_lossy(), link.display())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn each_kernel_object_added_in_the_agents_namespace_counts_once_and_goes_back_to_zero() {
    require_root();
    let run = Run::start().expect("start a run");
    let name = |kind, n| run.prefix().ifname(kind, n).expect("name").to_string();
    let (v0, v1, br) = (name('v', 0), name('v', 1), name('b', 0));

    let ns = quiet_namespace();
    let mut sleep = ns.command("sleep");
    sleep.arg("300");
    let agent = Agent::spawn(sleep).settled();

    let fresh = census(agent.pid());
    assert!(fresh.rss_kib > 0, "{fresh:?}");
    // stdin, stdout, stderr, and whatever this test inherited without
    // close-on-exec (a jobserver pipe, under cargo).
    assert!(fresh.fds >= 3, "fds: {:?}", fd_links(agent.pid()));
    // A fresh namespace: lo, down, and nothing else.
    assert_eq!(
        AgentResources {
            rss_kib: 0,
            fds: 0,
            ..fresh.clone()
        },
        AgentResources {
            namespaces: 1,
            links: 1,
            threads: 1,
            processes: 1,
            ..Default::default()
        }
    );

    let mut now = fresh.clone();
    // Each end joins the IPv6 all-nodes group at once, even with IPv6 off.
    step(
        &agent,
        &mut now,
        "a veth pair, down",
        &[("links", 2), ("fdb", 2)],
        || {
            run_in(
                &ns,
                "ip",
                &["link", "add", &v0, "type", "veth", "peer", "name", &v1],
            )
        },
    );
    // The kernel adds a local route for the address at once; the prefix and
    // broadcast routes wait for the link to come up.
    step(
        &agent,
        &mut now,
        "an address on a down link",
        &[("addresses", 1), ("routes", 1)],
        || run_in(&ns, "ip", &["addr", "add", "10.77.0.1/24", "dev", &v0]),
    );
    // Up: the prefix route and the broadcast route, and each end joins the
    // IPv4 all-hosts group (`01:00:5e:00:00:01`).
    step(
        &agent,
        &mut now,
        "both ends up",
        &[("routes", 2), ("fdb", 2)],
        || {
            run_in(&ns, "ip", &["link", "set", &v0, "up"]);
            run_in(&ns, "ip", &["link", "set", &v1, "up"]);
        },
    );
    step(&agent, &mut now, "a route", &[("routes", 1)], || {
        run_in(
            &ns,
            "ip",
            &[
                "route",
                "add",
                "10.77.1.0/24",
                "via",
                "10.77.0.2",
                "dev",
                &v0,
            ],
        );
    });
    step(
        &agent,
        &mut now,
        "a permanent neighbour",
        &[("neighbours", 1)],
        || {
            run_in(
                &ns,
                "ip",
                &[
                    "neigh",
                    "add",
                    "10.77.0.2",
                    "lladdr",
                    "02:00:00:00:00:02",
                    "dev",
                    &v0,
                    "nud",
                    "permanent",
                ],
            );
        },
    );
    // A bridge (down, so it learns nothing) with a fixed MAC, so the port
    // does not take it over: its own MAC, its all-nodes group, and the port's
    // MAC.
    step(
        &agent,
        &mut now,
        "a bridge with a port",
        &[("links", 1), ("fdb", 3)],
        || {
            run_in(
                &ns,
                "ip",
                &[
                    "link",
                    "add",
                    &br,
                    "address",
                    "02:00:00:00:00:0b",
                    "type",
                    "bridge",
                ],
            );
            run_in(&ns, "ip", &["link", "set", &v1, "master", &br]);
        },
    );
    step(
        &agent,
        &mut now,
        "a static FDB entry",
        &[("fdb", 1)],
        || {
            run_in(
                &ns,
                "bridge",
                &[
                    "fdb",
                    "add",
                    "02:00:00:00:00:aa",
                    "dev",
                    &v1,
                    "master",
                    "static",
                ],
            );
        },
    );

    // Removing the links removes everything that hung off them.
    run_in(&ns, "ip", &["link", "del", &v0]);
    run_in(&ns, "ip", &["link", "del", &br]);
    let end = census(agent.pid());
    assert_eq!(delta(&fresh, &end), only(&[]), "end {end:?}");
}

#[test]
fn namespaces_held_by_fd_or_by_a_descendant_count_once_each() {
    require_root();
    let _run = Run::start().expect("start a run");
    let home = quiet_namespace();
    let other = quiet_namespace();
    let other_fd = format!("/proc/{}/fd/{}", std::process::id(), other.as_raw_fd());

    // The same agent without the extra fds: what it inherits from this test.
    let mut cmd = home.command("sleep");
    cmd.arg("300");
    let plain = census(Agent::spawn(cmd).settled().pid());
    assert_eq!((plain.namespaces, plain.links), (1, 1), "{plain:?}");

    // An agent holding a second namespace by two fds: still one namespace.
    let mut cmd = home.command("sh");
    cmd.arg("-c")
        .arg(format!("exec sleep 300 3<{other_fd} 4<{other_fd}"));
    let holder = Agent::spawn(cmd).settled();
    let held = census(holder.pid());
    assert_eq!(held.fds, plain.fds + 2, "{held:?}");
    assert_eq!(held.namespaces, 2, "{held:?}");
    assert_eq!(held.links, 2, "one lo in each: {held:?}");
    assert_eq!(held.processes, 1, "{held:?}");
    drop(holder);

    // An agent whose child runs in the other namespace, with no fd to it.
    let mut cmd = home.command("sh");
    cmd.arg("-c")
        .arg(format!("nsenter --net={other_fd} sleep 300 & wait"));
    let parent = Agent::spawn(cmd);
    let other_inode = other.inode().expect("inode");
    let child_in_other = || {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", parent.pid())).ok()?;
        let child: i32 = children.split_whitespace().next()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).ok()?;
        let link = std::fs::read_link(format!("/proc/{child}/ns/net")).ok()?;
        (comm.trim() == "sleep" && link.to_str()? == format!("net:[{other_inode}]")).then_some(())
    };
    eventually(
        "nsenter to exec sleep in the other namespace",
        child_in_other,
    );
    let tree = census(parent.pid());
    assert_eq!(tree.processes, 2, "{tree:?}");
    assert_eq!(tree.namespaces, 2, "{tree:?}");
    assert_eq!(tree.links, 2, "{tree:?}");
}

#[test]
fn an_unreaped_child_is_a_zombie_and_a_dead_agent_is_an_error() {
    require_root();
    let ns = quiet_namespace();

    // `sleep 0` exits; the shell becomes `sleep 300`, which never waits.
    let mut cmd = ns.command("sh");
    cmd.arg("-c").arg("sleep 0 & exec sleep 300");
    let agent = Agent::spawn(cmd);
    let r = eventually("the child to exit unreaped", || {
        let r = census(agent.pid());
        (r.zombies == 1).then_some(r)
    });
    assert_eq!(r.processes, 1, "zombies are not live: {r:?}");
    assert_eq!(r.namespaces, 1, "{r:?}");

    // An exited child this test has not reaped yet is a zombie: not running.
    let mut exited = Command::new("true").spawn().expect("start true");
    let pid = i32::try_from(exited.id()).expect("pid fits in i32");
    let err = eventually("true to exit", || match AgentResources::read(pid) {
        Err(e @ ResourcesError::NotRunning { .. }) => Some(e),
        _ => None,
    });
    assert!(err.to_string().contains(&pid.to_string()), "{err}");
    exited.wait().expect("reap true");
}

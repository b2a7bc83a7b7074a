//! The launcher on the real kernel: a function joins its endpoint's network
//! namespace and gets its own user, PID, mount, UTS and IPC namespaces, on
//! the read-only function image with a private `/tmp`, in its own cgroup,
//! through the built-in launcher and through runc.

mod common;

use std::os::fd::AsFd;
use std::path::PathBuf;

use particle_net::{NetNs, Run};
use particle_node_agent::launcher::{self, FunctionSpec, LaunchError, PeersFile, Runtime};
use particle_node_agent::sandbox::{FunctionBox, Sandbox, SandboxConfig};
use particle_wire::api::FunctionLimits;
use particle_wire::function_env::{FunctionEnv, JobPeers};

const PROBE: &str = "echo pid=$$; hostname; for l in net uts; do readlink /proc/1/ns/$l; done; \
    echo uid=$(id -u) map=$(cat /proc/self/uid_map); echo $PARTICLE_RANK";

/// A sandbox of this test's own run (image and cgroups carry its prefix),
/// removed with its directory when dropped, even if the test fails.
struct TestSandbox {
    sandbox: Sandbox,
    dir: PathBuf,
}

impl std::ops::Deref for TestSandbox {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sandbox(run: &Run, config: SandboxConfig) -> TestSandbox {
    let dir = std::path::Path::new("/run/particle").join(run.prefix().label("launcher"));
    std::fs::create_dir_all(&dir).unwrap();
    let sandbox = Sandbox::start(config, &dir, &run.prefix().label("node")).unwrap();
    TestSandbox { sandbox, dir }
}

struct Launched {
    code: i32,
    out: String,
    err: String,
    verdict: Option<String>,
}

async fn launch(
    sandbox: &Sandbox,
    runtime: &Runtime,
    netns: &NetNs,
    name: &str,
    argv: &[&str],
    limits: FunctionLimits,
) -> Launched {
    let env = [("PARTICLE_RANK".to_string(), "7".to_string())];
    launch_with(sandbox, runtime, netns, name, argv, limits, (&env, None)).await
}

/// The job's side of a launch: its environment and peer file.
type JobSide<'a> = (&'a [(String, String)], Option<&'a std::path::Path>);

async fn launch_with(
    sandbox: &Sandbox,
    runtime: &Runtime,
    netns: &NetNs,
    name: &str,
    argv: &[&str],
    limits: FunctionLimits,
    (env, peers_file): JobSide<'_>,
) -> Launched {
    let dir = std::env::temp_dir().join(format!("particle-launcher-{}-{name}", std::process::id()));
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let boxed: FunctionBox = sandbox
        .prepare(
            name,
            "tenant-a",
            sandbox.default_root().to_owned(),
            sandbox.limits(&limits).unwrap(),
        )
        .unwrap();
    let spec = FunctionSpec {
        argv: &argv,
        env,
        netns: Some(netns.as_fd()),
        name,
        bundle_dir: &dir,
        isolation: boxed.isolation(),
        peers_file,
    };
    let child = launcher::spawn(&spec, runtime).unwrap();
    let out = child.wait_with_output().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let verdict = boxed.verdict();
    boxed.remove().await;
    Launched {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
        verdict,
    }
}

fn expect_container(out: &str, netns: &NetNs, name: &str, sandbox: &Sandbox) {
    let ns_inode = netns.inode().unwrap();
    assert!(out.contains("pid=1\n"), "PID 1 of its own namespace: {out}");
    assert!(out.contains(&format!("{name}\n")), "hostname: {out}");
    assert!(
        out.contains(&format!("net:[{ns_inode}]")),
        "endpoint netns: {out}"
    );
    let host_uts = std::fs::read_link("/proc/self/ns/uts").unwrap();
    assert!(
        !out.contains(&*host_uts.to_string_lossy()),
        "own UTS namespace: {out}"
    );
    let ids = sandbox.ids("tenant-a").unwrap();
    assert!(
        out.contains(&format!("uid=0 map= 0 {} {}", ids.host_base, ids.count)),
        "root inside is the tenant's host range: {out}"
    );
    assert!(out.trim_end().ends_with('7'), "job environment: {out}");
}

#[tokio::test]
async fn builtin_launcher_isolates_the_function_in_its_endpoint() {
    let (run, _fabric) = common::fabric("10.212.0.0/24");
    let sandbox = sandbox(&run, SandboxConfig::default());
    let netns = NetNs::create().unwrap();
    let name = run.prefix().label("f0");
    let l = launch(
        &sandbox,
        &Runtime::Builtin,
        &netns,
        &name,
        &["/bin/sh", "-c", PROBE],
        FunctionLimits::default(),
    )
    .await;
    assert_eq!(l.code, 0, "{}{}", l.out, l.err);
    expect_container(&l.out, &netns, &name, &sandbox);
}

#[tokio::test]
async fn the_function_sees_its_image_not_the_node() {
    let (run, _fabric) = common::fabric("10.212.3.0/24");
    // A node file functions are given (as the warm socket is), in the
    // sandbox's directory (removed with it).
    let shared = std::path::Path::new("/run/particle")
        .join(run.prefix().label("launcher"))
        .join("shared");
    std::fs::create_dir_all(shared.parent().unwrap()).unwrap();
    std::fs::write(&shared, "shared\n").unwrap();
    let config = SandboxConfig {
        binds: vec![shared.clone()],
        ..Default::default()
    };
    let sandbox = sandbox(&run, config);
    let netns = NetNs::create().unwrap();
    // A node file of this test's own (never a real system file).
    let canary = sandbox.dir.join(run.prefix().label("canary"));
    std::fs::write(&canary, "node\n").unwrap();
    let script = format!(
        "echo x >> /etc/passwd 2>/dev/null && echo v:etc written || echo v:etc denied; \
         cat {c} 2>/dev/null && echo v:canary seen || echo v:canary unseen; \
         echo x > /bin/sh 2>/dev/null && echo v:bin written || echo v:bin denied; \
         echo hi > /tmp/t && echo v:tmp $(cat /tmp/t); \
         set -- /proc/[0-9]*; echo v:procs $#; \
         ls /run/particle/runs >/dev/null 2>&1 && echo v:run seen || echo v:run unseen; \
         grep -q '^CapEff:[[:space:]]*0*$' /proc/self/status && echo v:caps none || echo v:caps some; \
         grep -q '^NoNewPrivs:[[:space:]]*1' /proc/self/status && echo v:nnp set || echo v:nnp unset; \
         bash -c 'echo v:bash ok'; echo v:shared $(cat {s})",
        c = canary.display(),
        s = shared.display()
    );
    let name = run.prefix().label("f3");
    let l = launch(
        &sandbox,
        &Runtime::Builtin,
        &netns,
        &name,
        &["/bin/sh", "-c", &script],
        FunctionLimits::default(),
    )
    .await;
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "node\n");
    assert_eq!(l.code, 0, "{}{}", l.out, l.err);
    for want in [
        "v:etc denied",
        "v:canary unseen",
        "v:bin denied",
        "v:tmp hi",
        "v:procs 1\n",
        "v:run unseen",
        "v:caps none",
        "v:nnp set",
        "v:bash ok",
        "v:shared shared",
    ] {
        assert!(l.out.contains(want), "{want}: {}{}", l.out, l.err);
    }
}

#[tokio::test]
async fn limits_hold_and_say_why_a_function_ended() {
    let (run, _fabric) = common::fabric("10.212.4.0/24");
    let sandbox = sandbox(&run, SandboxConfig::default());
    let netns = NetNs::create().unwrap();
    let memory = FunctionLimits {
        memory_mb: Some(32),
        ..Default::default()
    };
    // `tail` of an endless line keeps all of it in memory.
    let l = launch(
        &sandbox,
        &Runtime::Builtin,
        &netns,
        &run.prefix().label("hog"),
        &["/bin/sh", "-c", "tail /dev/zero"],
        memory,
    )
    .await;
    assert_ne!(l.code, 0);
    let verdict = l.verdict.unwrap_or_default();
    assert!(verdict.contains("out of memory"), "{verdict:?} {}", l.err);

    let pids = FunctionLimits {
        pids: Some(16),
        ..Default::default()
    };
    // ash gives up at the first refused fork: a subshell forks, the
    // function counts what it got with builtins only.
    let bomb =
        "(for i in $(seq 64); do sleep 5 & done) 2>/dev/null; set -- /proc/[0-9]*; echo v:procs $#";
    let l = launch(
        &sandbox,
        &Runtime::Builtin,
        &netns,
        &run.prefix().label("bomb"),
        &["/bin/sh", "-c", bomb],
        pids,
    )
    .await;
    let procs: usize = l
        .out
        .split("v:procs ")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}{}", l.out, l.err));
    assert!(procs <= 16, "{procs} processes under a limit of 16");
    assert!(l.verdict.unwrap_or_default().contains("process limit"));

    let tmp = FunctionLimits {
        tmp_mb: Some(2),
        ..Default::default()
    };
    let fill =
        "dd if=/dev/zero of=/tmp/fill bs=1M count=8 2>/dev/null; echo v:size $(wc -c < /tmp/fill)";
    let l = launch(
        &sandbox,
        &Runtime::Builtin,
        &netns,
        &run.prefix().label("fill"),
        &["/bin/sh", "-c", fill],
        tmp,
    )
    .await;
    let size: u64 = l
        .out
        .split("v:size ")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}{}", l.out, l.err));
    assert!(size <= 2 << 20, "{size} bytes in a 2 MiB /tmp");
}

#[tokio::test]
async fn icmp_works_where_the_endpoint_opens_ping_sockets() {
    let (run, _fabric) = common::fabric("10.212.5.0/24");
    let sandbox = sandbox(&run, SandboxConfig::default());
    let netns = NetNs::create().unwrap();
    // What endpoints set (particle-net): every gid may open ICMP sockets.
    let set = netns
        .command("sh")
        .args([
            "-c",
            "ip link set lo up && sysctl -qw net.ipv4.ping_group_range='0 2147483647'",
        ])
        .status()
        .unwrap();
    assert!(set.success());
    let l = launch(
        &sandbox,
        &Runtime::Builtin,
        &netns,
        &run.prefix().label("ping"),
        &["/bin/ping", "-c", "1", "-W", "2", "127.0.0.1"],
        FunctionLimits::default(),
    )
    .await;
    assert_eq!(l.code, 0, "{}{}", l.out, l.err);
}

#[tokio::test]
async fn exit_codes_and_bad_commands_come_back() {
    let (run, _fabric) = common::fabric("10.212.1.0/24");
    let sandbox = sandbox(&run, SandboxConfig::default());
    let netns = NetNs::create().unwrap();
    let l = launch(
        &sandbox,
        &Runtime::Builtin,
        &netns,
        &run.prefix().label("f1"),
        &["/bin/sh", "-c", "exit 3"],
        FunctionLimits::default(),
    )
    .await;
    assert_eq!(l.code, 3);

    // Cancelling kills the supervisor; the function (and all its PID
    // namespace) must go with it.
    let name = run.prefix().label("f2");
    let boxed = sandbox
        .prepare(
            &name,
            "tenant-a",
            sandbox.default_root().to_owned(),
            sandbox.limits(&FunctionLimits::default()).unwrap(),
        )
        .unwrap();
    let argv = [
        "/bin/sh".to_string(),
        "-c".into(),
        "sleep 30 & sleep 30".into(),
    ];
    let spec = FunctionSpec {
        argv: &argv,
        env: &[],
        netns: Some(netns.as_fd()),
        name: &name,
        bundle_dir: &sandbox.dir,
        isolation: boxed.isolation(),
        peers_file: None,
    };
    let mut child = launcher::spawn(&spec, &Runtime::Builtin).unwrap();
    let supervisor = child.id().unwrap();
    let children = format!("/proc/{supervisor}/task/{supervisor}/children");
    let mut function = String::new();
    for _ in 0..200 {
        function = std::fs::read_to_string(&children).unwrap_or_default();
        if !function.trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let function: u32 = function.trim().parse().expect("the function process");
    child.kill().await.unwrap();
    let gone = (0..400).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(5));
        !std::path::Path::new(&format!("/proc/{function}")).exists()
            || std::fs::read_to_string(format!("/proc/{function}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    });
    assert!(
        gone,
        "the function {function} outlived its cancelled supervisor"
    );

    let root = sandbox.default_root();
    assert!(matches!(
        launcher::resolve(root, "/no/such/program"),
        Err(LaunchError::NotFound(_))
    ));
    assert!(matches!(
        launcher::resolve(root, ""),
        Err(LaunchError::EmptyCommand)
    ));
    assert_eq!(
        launcher::resolve(root, "sh").unwrap().file_name().unwrap(),
        "sh"
    );
    // On the node, not in the image: not found.
    assert!(matches!(
        launcher::resolve(root, "/usr/sbin/runc"),
        Err(LaunchError::NotFound(_))
    ));
    let argv = ["/no/such/program".to_string()];
    let spec = FunctionSpec {
        argv: &argv,
        ..spec
    };
    let err = launcher::spawn(&spec, &Runtime::Builtin).unwrap_err();
    assert!(err.to_string().contains("/no/such/program"), "{err}");
}

#[tokio::test]
async fn oci_runtime_runs_the_function_in_its_endpoint() {
    let runc = PathBuf::from("/usr/sbin/runc");
    assert!(
        runc.exists(),
        "runc is missing: scripts/install-deps installs it (Debian package runc)"
    );
    let (run, _fabric) = common::fabric("10.212.2.0/24");
    let sandbox = sandbox(&run, SandboxConfig::default());
    let netns = NetNs::create().unwrap();
    let name = run.prefix().label("oci");
    let probe = format!("{PROBE}; grep NoNewPrivs /proc/self/status");
    let l = launch(
        &sandbox,
        &Runtime::Oci { binary: runc },
        &netns,
        &name,
        &["/bin/sh", "-c", &probe],
        FunctionLimits::default(),
    )
    .await;
    assert_eq!(l.code, 0, "{}{}", l.out, l.err);
    expect_container(
        &l.out.replace("NoNewPrivs:\t1\n", ""),
        &netns,
        &name,
        &sandbox,
    );
    assert!(l.out.contains("NoNewPrivs:\t1"), "{}", l.out);
}

/// A 10,000-function job's peers (200 KB) do not fit one environment string
/// (the kernel's limit is 128 KiB: exec fails with E2BIG): the function
/// finds them in a read-only file instead, under both runtimes, and the
/// contract reads it back.
#[tokio::test]
async fn a_large_jobs_peers_reach_the_function_in_a_read_only_file() {
    let (run, _fabric) = common::fabric("10.212.4.0/24");
    let sandbox = sandbox(&run, SandboxConfig::default());
    let netns = NetNs::create().unwrap();
    let peers: Vec<String> = (0..10_000)
        .map(|r| format!("10.64.{}.{}:7000", r / 250, r % 250))
        .collect();
    let job_peers = JobPeers::new(&peers);
    let file = PeersFile::write(&sandbox.dir.join("peers"), "job-big", &job_peers)
        .unwrap()
        .expect("10,000 peers go in a file");
    let env = FunctionEnv {
        job: "big".into(),
        rank: 9_999,
        size: 10_000,
        node: "n0".into(),
        address: None,
        peers: peers.clone().into(),
    };
    let vars = env.vars_with(&job_peers);
    assert!(vars.iter().all(|(k, _)| k != "PARTICLE_PEERS"));
    let size = job_peers.file().unwrap().len();
    let script = "echo file=$PARTICLE_PEERS_FILE; wc -l < $PARTICLE_PEERS_FILE; \
         tail -n 1 $PARTICLE_PEERS_FILE; echo x >> $PARTICLE_PEERS_FILE && echo WROTE; \
         rm -f $PARTICLE_PEERS_FILE && echo REMOVED; wc -c < $PARTICLE_PEERS_FILE";
    let runc = PathBuf::from("/usr/sbin/runc");
    for runtime in [Runtime::Builtin, Runtime::Oci { binary: runc }] {
        let name = run.prefix().label(match runtime {
            Runtime::Builtin => "peers",
            Runtime::Oci { .. } => "peers-oci",
        });
        let l = launch_with(
            &sandbox,
            &runtime,
            &netns,
            &name,
            &["/bin/sh", "-c", script],
            FunctionLimits::default(),
            (&vars, Some(file.path())),
        )
        .await;
        let mut lines = l.out.lines();
        assert_eq!(
            lines.next(),
            Some("file=/tmp/particle-peers"),
            "{runtime:?}: {} {}",
            l.out,
            l.err
        );
        assert_eq!(
            lines.next().map(str::trim),
            Some("10000"),
            "{runtime:?}: {}",
            l.out
        );
        assert_eq!(
            lines.next(),
            Some(peers[9_999].as_str()),
            "{runtime:?}: {}",
            l.out
        );
        assert!(
            !l.out.contains("WROTE") && !l.out.contains("REMOVED"),
            "{runtime:?}: the function changed its peer file: {}",
            l.out
        );
        assert_eq!(
            lines.last().map(str::trim),
            Some(&*size.to_string()),
            "{runtime:?}: {}",
            l.out
        );
    }
    // The node's copy is untouched, and what the contract reads is the list.
    let text = std::fs::read_to_string(file.path()).unwrap();
    assert_eq!(text.lines().count(), 10_000);
    let read = FunctionEnv::from_lookup(|k| match k {
        "PARTICLE_RANK" => Some("9999".into()),
        "PARTICLE_SIZE" => Some("10000".into()),
        "PARTICLE_PEERS_FILE" => Some(file.path().display().to_string()),
        _ => None,
    })
    .unwrap();
    assert_eq!(&*read.peers, &peers[..]);
    let path = file.path().to_owned();
    drop(file);
    assert!(!path.exists(), "the peer file goes with its guard");
}

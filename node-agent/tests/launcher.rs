//! The launcher on the real kernel: a function joins its endpoint's network
//! namespace and gets its own PID, mount, UTS and IPC namespaces, through the
//! built-in launcher and through runc.

mod common;

use std::os::fd::AsFd;

use particle_net::NetNs;
use particle_node_agent::launcher::{self, FunctionSpec, LaunchError, Runtime};

const PROBE: &str =
    "echo pid=$$; hostname; readlink /proc/1/ns/net /proc/1/ns/uts; echo $PARTICLE_RANK";

async fn run(runtime: &Runtime, netns: &NetNs, name: &str) -> (i32, String, String) {
    let dir = tempdir(name);
    let argv = ["/bin/sh".to_string(), "-c".into(), PROBE.into()];
    let env = [("PARTICLE_RANK".to_string(), "7".to_string())];
    let spec = FunctionSpec {
        argv: &argv,
        env: &env,
        netns: Some(netns.as_fd()),
        name,
        bundle_dir: &dir,
    };
    let child = launcher::spawn(&spec, runtime).unwrap();
    let out = child.wait_with_output().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tempdir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("particle-launcher-{}-{name}", std::process::id()))
}

fn expect_container(out: &str, netns: &NetNs, name: &str) {
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
    assert!(out.trim_end().ends_with('7'), "job environment: {out}");
}

#[tokio::test]
async fn builtin_launcher_isolates_the_function_in_its_endpoint() {
    let (run_, _fabric) = common::fabric("10.212.0.0/24");
    let netns = NetNs::create().unwrap();
    let name = run_.prefix().label("f0");
    let (code, out, err) = run(&Runtime::Builtin, &netns, &name).await;
    assert_eq!(code, 0, "{out}{err}");
    expect_container(&out, &netns, &name);
}

#[tokio::test]
async fn exit_codes_and_bad_commands_come_back() {
    let (run_, _fabric) = common::fabric("10.212.1.0/24");
    let netns = NetNs::create().unwrap();
    let dir = tempdir("codes");
    let argv = ["/bin/sh".to_string(), "-c".into(), "exit 3".into()];
    let name = run_.prefix().label("f1");
    let spec = FunctionSpec {
        argv: &argv,
        env: &[],
        netns: Some(netns.as_fd()),
        name: &name,
        bundle_dir: &dir,
    };
    let out = launcher::spawn(&spec, &Runtime::Builtin)
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));

    // Cancelling kills the supervisor; the function (and all its PID
    // namespace) must go with it.
    let argv = [
        "/bin/sh".to_string(),
        "-c".into(),
        "sleep 30 & sleep 30".into(),
    ];
    let spec = FunctionSpec {
        argv: &argv,
        ..spec
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

    assert!(matches!(
        launcher::resolve("/no/such/program"),
        Err(LaunchError::NotFound(_))
    ));
    assert!(matches!(
        launcher::resolve(""),
        Err(LaunchError::EmptyCommand)
    ));
    assert_eq!(launcher::resolve("sh").unwrap().file_name().unwrap(), "sh");
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
    let runc = std::path::PathBuf::from("/usr/sbin/runc");
    assert!(
        runc.exists(),
        "runc is missing: scripts/install-deps installs it (Debian package runc)"
    );
    let (run_, _fabric) = common::fabric("10.212.2.0/24");
    let netns = NetNs::create().unwrap();
    let name = run_.prefix().label("oci");
    let (code, out, err) = run(&Runtime::Oci { binary: runc }, &netns, &name).await;
    assert_eq!(code, 0, "{out}{err}");
    expect_container(&out, &netns, &name);
}

//! The OCI path: a generated bundle for a real OCI runtime (runc), with the
//! same sandbox as the built-in launcher: the image as a read-only root,
//! the tenant's user namespace mapping, `no_new_privs`, and the function's
//! limits as the bundle's resources (the runtime makes its own cgroup).

use std::os::fd::AsRawFd;
use std::path::Path;

use particle_wire::function_env::PEERS_FILE_PATH;
use serde_json::json;
use tokio::process::Command;

use super::{base_env, FunctionSpec, LaunchError};

pub(super) fn command(spec: &FunctionSpec<'_>, binary: &Path) -> Result<Command, LaunchError> {
    let bundle = spec.bundle_dir.join(spec.name);
    let bundle_err = |source| LaunchError::Bundle {
        path: bundle.clone(),
        source,
    };
    std::fs::create_dir_all(&bundle).map_err(bundle_err)?;
    let config = config(spec);
    let text = serde_json::to_vec_pretty(&config).map_err(|e| bundle_err(e.into()))?;
    std::fs::write(bundle.join("config.json"), text).map_err(bundle_err)?;
    let mut cmd = Command::new(binary);
    cmd.arg("--root")
        .arg(spec.bundle_dir.join("state"))
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg(spec.name);
    Ok(cmd)
}

fn config(spec: &FunctionSpec<'_>) -> serde_json::Value {
    let iso = &spec.isolation;
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "mode=755", "size=64k"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", format!("size={}", iso.tmp_bytes.max(4096))]}),
    ];
    if let Some(file) = spec.peers_file {
        mounts.push(
            json!({"destination": PEERS_FILE_PATH, "type": "bind", "source": file,
            "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}),
        );
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "user"}),
    ];
    if let Some(fd) = spec.netns {
        namespaces.push(json!({"type": "network",
            "path": format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())}));
    }
    let mut env: Vec<String> = base_env().iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    let ids = json!([{"containerID": 0, "hostID": iso.ids.host_base, "size": iso.ids.count}]);
    let limits = iso.limits;
    json!({
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0},
            "args": spec.argv, "env": env, "cwd": "/", "noNewPrivileges": true},
        "root": {"path": iso.root, "readonly": true},
        "hostname": spec.name,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "uidMappings": ids,
            "gidMappings": ids,
            "resources": {
                "pids": {"limit": limits.pids},
                "memory": {"limit": limits.memory_bytes},
                "cpu": {"shares": limits.cpu_shares()},
            },
        },
    })
}

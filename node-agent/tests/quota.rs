//! A tenant's quota on a node: a reserve that would take it over its
//! functions or endpoints is refused with a 429 before anything is claimed,
//! and leaves nothing counted behind; bad limits and a program missing from
//! the function's image are 400s, also before any claim.

use std::sync::Arc;

use particle_net::Run;
use particle_node_agent::claims::Claims;
use particle_node_agent::jobs::{LaunchSettings, NodeJobs};
use particle_node_agent::sandbox::{Sandbox, SandboxConfig};
use particle_wire::api::{FunctionLimits, ReserveFunctions, RuntimeKind};

/// Removes the sandbox's directory, even if the test fails.
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn reserve(ranks: usize, program: &str, limits: FunctionLimits) -> ReserveFunctions {
    ReserveFunctions {
        tenant: "t".into(),
        ranks: (0..ranks).collect(),
        program: program.into(),
        runtime: RuntimeKind::Builtin,
        limits,
        image: None,
        output_dir: None,
    }
}

#[test]
fn a_tenant_over_its_quota_is_refused_before_any_claim() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (cgroups)");
    let run = Run::start().unwrap();
    let dir = Dir(std::path::Path::new("/run/particle").join(run.prefix().label("quota")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let config = SandboxConfig {
        max_functions_per_tenant: 2,
        max_endpoints_per_tenant: 3,
        ..Default::default()
    };
    let sandbox = Sandbox::start(config, &dir.0, &run.prefix().label("q")).unwrap();
    let settings = LaunchSettings {
        node: "n0".into(),
        oci_runtime: None,
        bundle_dir: dir.0.join("bundles"),
        peers_dir: dir.0.join("peers"),
        instance: "i".into(),
        sandbox: Arc::new(sandbox),
    };
    let claims = Arc::new(Claims::new(None));
    let (jobs, _exits) = NodeJobs::new(claims.clone(), settings);

    for attempt in ["first", "again"] {
        let e = jobs
            .reserve(attempt, reserve(3, "sh", FunctionLimits::default()))
            .unwrap_err();
        assert_eq!(e.status.as_u16(), 429, "{}", e.message);
        // Nothing was counted by the refused attempt before it.
        assert!(
            e.message.contains("3 more functions on top of the 0"),
            "{}",
            e.message
        );
        assert_eq!(claims.held_by("t"), 0);
    }
    let e = jobs
        .reserve(
            "bad",
            reserve(1, "/usr/sbin/runc", FunctionLimits::default()),
        )
        .unwrap_err();
    assert_eq!(e.status.as_u16(), 400);
    assert!(e.message.contains("not found"), "{}", e.message);
    let zero = FunctionLimits {
        memory_mb: Some(0),
        ..Default::default()
    };
    let e = jobs.reserve("bad2", reserve(1, "sh", zero)).unwrap_err();
    assert_eq!(e.status.as_u16(), 400, "{}", e.message);
    assert_eq!(jobs.running(), 0);
}

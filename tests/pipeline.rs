//! The video pipeline through the real launch path: `particle demo` starts a
//! local cluster of 2 namespaced nodes, launches 8 functions through the
//! burst launch API, and the output decodes to the input's frames and size;
//! the neighbour exchange crossed nodes.

mod common;

use std::process::Command;

/// This test's relay port, underlay and tenant subnet (its own).
const PORT: &str = "18350";

#[test]
fn eight_functions_over_two_nodes_write_a_playable_stream() {
    common::require_root();
    let dir = std::env::temp_dir().join(format!("particle-pipeline-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let output = dir.join("out.h264");
    let plot = dir.join("timeline.svg");

    let out = Command::new(env!("CARGO_BIN_EXE_particle"))
        .args([
            "demo",
            "--nodes",
            "2",
            "--functions",
            "8",
            "--frames-per-function",
            "3",
        ])
        .args(["--width", "176", "--height", "144", "--port", PORT])
        .args([
            "--underlay",
            "10.231.0.0/24",
            "--subnet",
            "10.232.0.0/16",
            "--json",
        ])
        .arg("--output")
        .arg(&output)
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["functions"], 8);
    assert_eq!(summary["nodes"], 2);
    assert_eq!(summary["frames"], 24);
    // 7 neighbour pairs, both ways; round-robin placement puts neighbours
    // on different nodes, so every one of them crossed.
    assert_eq!(summary["exchanges"], 14);
    assert_eq!(summary["cross_node_exchanges"], 14);
    assert_eq!(summary["cold"], 0, "the pools were prewarmed");

    // Independently of the demo's own check: the file decodes to the input's
    // frame count and size.
    let frames = particle_video::decode(&std::fs::read(&output).unwrap()).unwrap();
    assert_eq!(frames.len(), 24);
    assert!(frames.iter().all(|f| (f.width, f.height) == (176, 144)));
    let svg = std::fs::read_to_string(&plot).unwrap();
    // A row per function: network wait and its four phases.
    assert!(svg.matches("<title>").count() >= 8 * 5, "{svg}");
}

#[test]
fn the_pipeline_benchmark_reports_every_system_and_the_ratio() {
    common::require_root();
    let dir = std::env::temp_dir().join(format!(
        "particle-bench-pipeline-test-{}",
        std::process::id()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_particle"))
        .args(["bench", "pipeline", "--nodes", "2", "--functions", "6"])
        .args([
            "--frames-per-function",
            "1",
            "--port",
            "18354",
            "--json",
            "--dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for system in ["particle", "linux_overlay", "cni_bridge", "no_network"] {
        let s = &report[system];
        assert!(s["job_s"].as_f64().unwrap() > 0.0, "{system}: {s}");
        assert_eq!(s["frames"], 6, "{system}");
        assert_eq!(s["cross_node_exchanges"], 10, "{system}");
    }
    let ratio = report["ratio"].as_f64().unwrap();
    let want = report["linux_overlay"]["job_s"].as_f64().unwrap()
        / report["particle"]["job_s"].as_f64().unwrap();
    assert!((ratio - want).abs() < 1e-9, "{ratio} vs {want}");
}

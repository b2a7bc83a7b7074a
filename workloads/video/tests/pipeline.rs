//! The video pipeline as real processes on loopback: 8 functions said to
//! run on 2 nodes (alternating), one output file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use particle_video::{decode, luma_psnr, reference_stream, VideoOptions};
use particle_workloads::local::{local_envs, run_local};
use particle_workloads::source::temporal_filter;
use particle_workloads::timeline::{fields, parse_phases};

/// This test's loopback ports: 18300..18308 (and 18320.. for the failure case).
const BASE_PORT: u16 = 18300;

/// A scratch directory removed at the end, even when the test fails.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn video_args(opts: &VideoOptions, timeout_s: u64) -> Vec<String> {
    vec![
        "--output".into(),
        opts.output.display().to_string(),
        "--width".into(),
        opts.width.to_string(),
        "--height".into(),
        opts.height.to_string(),
        "--frames".into(),
        opts.frames.to_string(),
        "--seed".into(),
        opts.seed.to_string(),
        "--timeout-s".into(),
        timeout_s.to_string(),
    ]
}

#[test]
fn eight_functions_encode_exchange_and_collect_one_playable_stream() {
    let dir = ScratchDir::new("particle-video-test");
    let size = 8;
    let opts = VideoOptions {
        width: 176,
        height: 144,
        frames: 27, // chunks of 3 and 4 frames
        seed: 5,
        output: dir.0.join("out.h264"),
        ..VideoOptions::default()
    };
    let envs = local_envs("video-test", size, BASE_PORT, 2);
    let outputs = run_local(
        Path::new(env!("CARGO_BIN_EXE_particle-video")),
        &video_args(&opts, 60),
        &envs,
        Duration::from_secs(120),
    )
    .unwrap();

    for o in &outputs {
        assert!(
            o.succeeded(),
            "rank {}: {:?}\n{}{}",
            o.rank,
            o.status,
            o.stdout,
            o.stderr
        );
        // The neighbour exchange happened, with the right ranks, across nodes.
        let mut from: Vec<usize> = Vec::new();
        for line in o.stdout.lines().filter(|l| l.starts_with("exchanged ")) {
            let f: HashMap<&str, &str> = fields(line).collect();
            from.push(f["from"].parse().unwrap());
            assert_ne!(f["node"], envs[o.rank].node, "rank {}: {line}", o.rank);
        }
        let mut want = Vec::new();
        if o.rank > 0 {
            want.push(o.rank - 1);
        }
        if o.rank + 1 < size {
            want.push(o.rank + 1);
        }
        assert_eq!(from, want, "rank {}:\n{}", o.rank, o.stdout);
        // Its timeline has every phase, in order.
        let phases = parse_phases(&o.stdout);
        let names: Vec<&str> = phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["source", "exchange", "encode", "collect"],
            "rank {}",
            o.rank
        );
        for pair in phases.windows(2) {
            assert!(pair[0].start_ns <= pair[0].end_ns && pair[0].end_ns <= pair[1].start_ns);
        }
    }
    let collector = &outputs[0].stdout;
    assert!(
        collector.contains(&format!("output path={} frames=27", opts.output.display())),
        "{collector}"
    );

    let stream = std::fs::read(&opts.output).unwrap();
    let frames = decode(&stream).unwrap();
    assert_eq!(frames.len(), opts.frames);
    let p = opts.pattern();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!((f.width, f.height), (opts.width, opts.height), "frame {i}");
        let input = temporal_filter(
            &p.frame(i.max(1) - 1),
            &p.frame(i),
            &p.frame((i + 1).min(opts.frames - 1)),
        );
        let psnr = luma_psnr(f, &input);
        assert!(psnr > 30.0, "frame {i}: {psnr:.1} dB");
    }
    // Byte for byte what one process makes with the true neighbour frames:
    // a boundary frame that went missing or wrong would change the filtered
    // edge frames and so the stream.
    assert!(
        stream == reference_stream(&opts, size).unwrap(),
        "the distributed stream differs from the single-process reference"
    );
}

#[test]
fn a_missing_neighbour_fails_the_pipeline_at_its_deadline() {
    let dir = ScratchDir::new("particle-video-missing");
    let opts = VideoOptions {
        width: 64,
        height: 48,
        frames: 3,
        output: dir.0.join("never.h264"),
        ..VideoOptions::default()
    };
    let envs = local_envs("video-missing", 3, BASE_PORT + 20, 1);
    // Rank 1 never starts: ranks 0 and 2 wait for its boundary frames.
    let outputs = run_local(
        Path::new(env!("CARGO_BIN_EXE_particle-video")),
        &video_args(&opts, 2),
        &[envs[0].clone(), envs[2].clone()],
        Duration::from_secs(30),
    )
    .unwrap();
    for o in &outputs {
        assert!(o.status.is_some(), "rank {} hung past its timeout", o.rank);
        assert!(
            !o.succeeded(),
            "rank {} passed without its neighbour",
            o.rank
        );
    }
    assert!(!opts.output.exists());
}

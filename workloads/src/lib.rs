//! Real jobs on Particle: the programs a burst launches as functions.
//!
//! - What every function learns from its environment (rank, size, peers),
//!   the contract between the launcher and the functions, is
//!   `particle_wire::function_env`, shared with the agent that sets it.
//! - [`ring`]: the startup probe: each function reaches a peer on another
//!   node and exchanges a message; the benchmarks time it.
//! - [`source`]: the video pipeline's generated source video and its
//!   temporal filter; the pipeline itself is the `particle-video` crate
//!   (workloads/video), kept apart because it links a C++ codec.
//! - [`shuffle`]: the all-to-all exchange, network heavy, checksummed.
//! - [`local`]: runs a job as plain processes on loopback (tests, floor).
//! - [`wire`]: acknowledged framed messages between functions; [`timeline`]:
//!   the `phase=` lines functions print for the job's timeline plot.
//!
//! `particle-fn` (src/bin) is the binary functions run, one subcommand per
//! job ([`jobs`]: ring, shuffle); `particle fn` runs the same jobs. The video
//! job is `particle-video` (workloads/video).

pub mod args;
pub mod jobs;
pub mod local;
pub mod ring;
pub mod shuffle;
pub mod source;
pub mod timeline;
pub mod wire;

//! Real jobs on Particle: the programs a burst launches as functions.
//!
//! - [`env`]: what every function learns from its environment (rank, size,
//!   peers), the contract between the launcher and the functions.
//! - [`ring`]: the startup probe: each function reaches a peer on another
//!   node and exchanges a message; the benchmarks time it.
//!
//! `particle-fn` (src/bin) is the binary functions run, one subcommand per
//! job ([`jobs`]); `particle fn` runs the same jobs.

pub mod env;
pub mod jobs;
pub mod ring;

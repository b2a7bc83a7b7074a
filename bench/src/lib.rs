//! Particle's benchmarks. Each one runs the real baselines and Particle in the
//! same run, on the same machine, and reports rates and ratios: these machines
//! are noisy, so an absolute time alone proves nothing.

pub mod agent_resources;
pub mod baselines;
pub mod cli;
pub mod cni_add;
pub mod delay_line;
pub mod endpoints;
pub mod failover;
pub mod jobs;
pub mod no_network;
pub mod peaks;
pub mod pipeline;
pub mod pipeline_baseline;
pub mod reuse;
pub mod soak;
pub mod startup;
pub mod stats;
pub mod timeline;

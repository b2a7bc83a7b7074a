//! Particle's benchmarks. Each one runs the real baselines and Particle in the
//! same run, on the same machine, and reports rates and ratios: these machines
//! are noisy, so an absolute time alone proves nothing.

pub mod baselines;
pub mod endpoints;
pub mod pipeline;
pub mod pipeline_baseline;
pub mod stats;
pub mod timeline;

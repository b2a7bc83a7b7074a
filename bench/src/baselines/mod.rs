//! Real baselines: the tools operators use today, run as they run them.

pub mod cni;
pub mod docker_swarm;
pub mod ip;

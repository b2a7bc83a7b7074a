//! The launcher → function contract. Every function of a job gets:
//!
//! | variable | meaning |
//! | --- | --- |
//! | `PARTICLE_JOB` | the job's id |
//! | `PARTICLE_RANK` | this function's rank, `0..PARTICLE_SIZE` |
//! | `PARTICLE_SIZE` | how many functions the job has |
//! | `PARTICLE_NODE` | the node it runs on |
//! | `PARTICLE_ADDRESS` | its own overlay address (absent without a network) |
//! | `PARTICLE_PEERS` | every function's `host:port`, comma-separated, by rank |
//!
//! A function listens on the port of its own `PARTICLE_PEERS` entry (on all
//! addresses) and reaches rank `r` at entry `r`. Entries are usually overlay
//! addresses with one port; without per-function networks (the benchmarks'
//! floor) functions of a node share its address and differ by port; under
//! Docker they are container names.

use std::fmt;

pub const JOB: &str = "PARTICLE_JOB";
pub const RANK: &str = "PARTICLE_RANK";
pub const SIZE: &str = "PARTICLE_SIZE";
pub const NODE: &str = "PARTICLE_NODE";
pub const ADDRESS: &str = "PARTICLE_ADDRESS";
pub const PEERS: &str = "PARTICLE_PEERS";

/// The port functions listen on when every function has its own address.
pub const FUNCTION_PORT: u16 = 7000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionEnv {
    pub job: String,
    pub rank: usize,
    pub size: usize,
    pub node: String,
    pub address: Option<String>,
    /// `host:port` of every function, by rank.
    pub peers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvError(String);

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EnvError {}

impl FunctionEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the contract through `get` (testable without touching the environment).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let need = |k: &str| get(k).ok_or_else(|| EnvError(format!("{k} is not set")));
        let number = |k: &str| -> Result<usize, EnvError> {
            need(k)?
                .parse()
                .map_err(|_| EnvError(format!("{k} is not a number")))
        };
        let rank = number(RANK)?;
        let size = number(SIZE)?;
        let peers: Vec<String> = need(PEERS)?.split(',').map(str::to_string).collect();
        if size == 0 || rank >= size {
            return Err(EnvError(format!("rank {rank} is outside a job of {size}")));
        }
        if peers.len() != size {
            return Err(EnvError(format!(
                "{PEERS} has {} entries for a job of {size}",
                peers.len()
            )));
        }
        Ok(Self {
            job: get(JOB).unwrap_or_default(),
            rank,
            size,
            node: get(NODE).unwrap_or_default(),
            address: get(ADDRESS),
            peers,
        })
    }

    /// The port this function listens on (from its own peers entry).
    pub fn listen_port(&self) -> Result<u16, EnvError> {
        let own = &self.peers[self.rank];
        own.rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| EnvError(format!("peer entry {own:?} has no port")))
    }

    /// Rank `offset` places further on, wrapping around.
    pub fn peer_rank(&self, offset: usize) -> usize {
        (self.rank + offset) % self.size
    }

    /// The environment a launcher gives function `rank` of a job.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            (JOB.to_string(), self.job.clone()),
            (RANK.to_string(), self.rank.to_string()),
            (SIZE.to_string(), self.size.to_string()),
            (NODE.to_string(), self.node.clone()),
            (PEERS.to_string(), self.peers.join(",")),
        ];
        if let Some(a) = &self.address {
            vars.push((ADDRESS.to_string(), a.clone()));
        }
        vars
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn round_trips_and_rejects_inconsistent_environments() {
        let env = FunctionEnv {
            job: "j1".into(),
            rank: 1,
            size: 2,
            node: "n0".into(),
            address: Some("10.1.0.3".into()),
            peers: vec!["10.1.0.2:7000".into(), "10.1.0.3:7000".into()],
        };
        let vars = env.vars();
        let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(FunctionEnv::from_lookup(lookup(&pairs)), Ok(env.clone()));
        assert_eq!(env.listen_port(), Ok(7000));
        assert_eq!(env.peer_rank(1), 0);

        for bad in [
            vec![(RANK, "2"), (SIZE, "2"), (PEERS, "a:1,b:1")],
            vec![(RANK, "0"), (SIZE, "3"), (PEERS, "a:1,b:1")],
            vec![(RANK, "x"), (SIZE, "2"), (PEERS, "a:1,b:1")],
            vec![(SIZE, "2"), (PEERS, "a:1,b:1")],
        ] {
            assert!(FunctionEnv::from_lookup(lookup(&bad)).is_err(), "{bad:?}");
        }
    }
}

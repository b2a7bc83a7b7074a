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
//! | `PARTICLE_PEERS_FILE` | instead of `PARTICLE_PEERS` for large jobs: a read-only file, one `host:port` a line, by rank |
//!
//! A job's peer list grows with the job (10,000 functions: about 200 KB),
//! and the kernel refuses to exec with one environment string over 128 KiB
//! (E2BIG); so past [`MAX_PEERS_VAR`] bytes launchers hand the list over as a
//! file the function's root shows at [`PEERS_FILE_PATH`] (one file per job
//! and node, bind-mounted read-only), and name it in `PARTICLE_PEERS_FILE`.
//! [`FunctionEnv::from_env`] reads either.
//!
//! A function listens on the port of its own `PARTICLE_PEERS` entry (on all
//! addresses) and reaches rank `r` at entry `r`. Entries are usually overlay
//! addresses with one port; without per-function networks (the benchmarks'
//! floor) functions of a node share its address and differ by port; under
//! Docker they are container names.

use std::fmt;
use std::sync::Arc;

pub const JOB: &str = "PARTICLE_JOB";
pub const RANK: &str = "PARTICLE_RANK";
pub const SIZE: &str = "PARTICLE_SIZE";
pub const NODE: &str = "PARTICLE_NODE";
pub const ADDRESS: &str = "PARTICLE_ADDRESS";
pub const PEERS: &str = "PARTICLE_PEERS";
pub const PEERS_FILE: &str = "PARTICLE_PEERS_FILE";

/// Where a function finds its job's peer file, when it has one.
pub const PEERS_FILE_PATH: &str = "/tmp/particle-peers";
/// The longest `PARTICLE_PEERS` a launcher sets; longer lists go in a file
/// (half the kernel's 128 KiB limit on one string, for the job's own
/// variables beside it).
pub const MAX_PEERS_VAR: usize = 64 << 10;

/// The port functions listen on when every function has its own address.
pub const FUNCTION_PORT: u16 = 7000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionEnv {
    pub job: String,
    pub rank: usize,
    pub size: usize,
    pub node: String,
    pub address: Option<String>,
    /// `host:port` of every function, by rank; shared by every function of
    /// the job (10,000 functions must not make 10,000 copies of 10,000).
    pub peers: Arc<[String]>,
}

/// A job's peer list as its launcher hands it over: built once per job (on
/// each node), not once per function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPeers {
    /// Comma-separated (the variable) or one a line (the file).
    text: Arc<str>,
    in_file: bool,
}

impl JobPeers {
    pub fn new(peers: &[String]) -> Self {
        let length: usize = peers.iter().map(|p| p.len() + 1).sum();
        let in_file = length > MAX_PEERS_VAR;
        let text = match in_file {
            true => peers.iter().flat_map(|p| [p.as_str(), "\n"]).collect(),
            false => peers.join(","),
        };
        Self {
            text: text.into(),
            in_file,
        }
    }

    /// The file's contents, if the list is too long for the variable.
    pub fn file(&self) -> Option<&str> {
        self.in_file.then_some(&*self.text)
    }

    /// The variable the function gets: the list, or where its file is.
    fn var(&self) -> (String, String) {
        match self.in_file {
            true => (PEERS_FILE.to_string(), PEERS_FILE_PATH.to_string()),
            false => (PEERS.to_string(), self.text.to_string()),
        }
    }
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
        let peers: Vec<String> = match (get(PEERS), get(PEERS_FILE)) {
            (Some(list), _) => list.split(',').map(str::to_string).collect(),
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| EnvError(format!("{PEERS_FILE} {path}: {e}")))?
                .lines()
                .map(str::to_string)
                .collect(),
            (None, None) => return Err(EnvError(format!("{PEERS} is not set"))),
        };
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
            peers: peers.into(),
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

    /// The environment a launcher gives function `rank` of a job (a job
    /// small enough for its peers to fit the variable).
    pub fn vars(&self) -> Vec<(String, String)> {
        self.vars_with(&JobPeers::new(&self.peers))
    }

    /// The environment, with the peers as `peers` (the job's, built once)
    /// hands them over.
    pub fn vars_with(&self, peers: &JobPeers) -> Vec<(String, String)> {
        let mut vars = vec![
            (JOB.to_string(), self.job.clone()),
            (RANK.to_string(), self.rank.to_string()),
            (SIZE.to_string(), self.size.to_string()),
            (NODE.to_string(), self.node.clone()),
            peers.var(),
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
            peers: vec!["10.1.0.2:7000".into(), "10.1.0.3:7000".into()].into(),
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

    #[test]
    fn long_peer_lists_go_in_a_file_the_function_reads() {
        let peers: Vec<String> = (0..10_000)
            .map(|r| format!("10.64.{}.{}:7000", r / 250, r % 250))
            .collect();
        let short = JobPeers::new(&peers[..100]);
        assert_eq!(short.file(), None);
        assert_eq!(short.var(), (PEERS.to_string(), peers[..100].join(",")));

        let long = JobPeers::new(&peers);
        let text = long.file().expect("10,000 peers do not fit the variable");
        assert_eq!(
            long.var(),
            (PEERS_FILE.to_string(), PEERS_FILE_PATH.to_string())
        );
        let dir = std::env::temp_dir().join(format!("particle-peers-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("peers");
        std::fs::write(&file, text).unwrap();
        let path = file.display().to_string();
        let got = FunctionEnv::from_lookup(lookup(&[
            (RANK, "9999"),
            (SIZE, "10000"),
            (PEERS_FILE, &path),
        ]));
        std::fs::remove_dir_all(&dir).unwrap();
        let got = got.unwrap();
        assert_eq!(&*got.peers, &peers[..]);
        assert_eq!(got.listen_port(), Ok(7000));

        let missing = FunctionEnv::from_lookup(lookup(&[
            (RANK, "0"),
            (SIZE, "1"),
            (PEERS_FILE, "/nonexistent/peers"),
        ]));
        assert!(missing
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/peers"));
    }
}

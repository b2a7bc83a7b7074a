//! Where the controller's durable state lives: the [`Backend`] trait and its
//! two implementations.
//!
//! - [`json`]: the embedded store, the default: the state in one JSON file,
//!   job records in an append-only log beside it. One controller.
//! - [`etcd`]: an etcd cluster (`--store etcd://HOST:PORT,...`), which
//!   several controllers share; one of them leads ([`crate::leader`]) and
//!   only its writes are accepted (each one fenced in an etcd transaction).
//!
//! Two kinds of data, both small per write: the *state* (tenants, their
//! per-node blocks, nodes, the overlay version: O(tenants x nodes), written
//! whole on every change, compared on its revision so two controllers can
//! never both commit an allocation), and *records*: keyed blobs the jobs
//! table keeps (a job's header, its functions in chunks, its changes as
//! deltas), written one change at a time, never the whole table.

pub mod etcd;
pub mod json;

use std::io;
use std::path::PathBuf;

use crate::state::Snapshot;

pub use json::{JsonStore, Store};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("encoding state: {0}")]
    Encode(serde_json::Error),
    /// The store cannot be reached (every etcd endpoint down or without quorum).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// This controller does not lead (any more): its writes are refused.
    #[error("this controller is not the leader (its writes are fenced off)")]
    NotLeader,
    /// etcd holds another cluster's state under our prefix.
    #[error("etcd at {endpoints} holds cluster {found:?}'s state under {prefix:?}, not cluster {ours:?}'s: refusing to start (use another --cluster-id or prefix, or another etcd)")]
    ForeignCluster {
        endpoints: String,
        prefix: String,
        found: String,
        ours: String,
    },
    /// etcd answered something we cannot read.
    #[error("etcd: {0}")]
    Etcd(String),
}

impl StoreError {
    /// Errors a client should retry later (503), as opposed to a broken store (500).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::NotLeader)
    }
}

/// A record: its key (relative to the store's prefix) and value (JSON).
pub type Record = (String, Vec<u8>);

/// What the controller needs of a store. Calls block (a file write and
/// fsync, or an etcd round trip); they are made under the lock that keeps
/// writes in order, as the JSON file always was.
pub trait Backend: Send + Sync {
    /// For logs: where the state is.
    fn describe(&self) -> String;
    /// The stored state, `None` on a first start.
    fn load_state(&self) -> Result<Option<Snapshot>, StoreError>;
    /// Replaces the stored state.
    fn save_state(&self, snapshot: &Snapshot) -> Result<(), StoreError>;
    /// Every record whose key starts with `prefix`, by key.
    fn records(&self, prefix: &str) -> Result<Vec<Record>, StoreError>;
    /// Deletes every record under each of `delete` (prefixes), then writes
    /// `puts` in order (a reader that sees a later one sees the earlier).
    fn write_records(&self, delete: &[String], puts: Vec<Record>) -> Result<(), StoreError>;
}

/// Which store a controller uses, as `--store` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// The embedded JSON store at this path.
    Json(PathBuf),
    /// etcd: its client endpoints and the key prefix.
    Etcd {
        endpoints: Vec<std::net::SocketAddr>,
        prefix: String,
    },
}

/// The key prefix when `--store etcd://...` names none.
pub const DEFAULT_ETCD_PREFIX: &str = "/particle";

impl std::str::FromStr for StoreSpec {
    type Err = String;
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`, or a path (`json:PATH` or plain).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("etcd://") {
            let (hosts, prefix) = match rest.split_once('/') {
                Some((h, p)) if !p.is_empty() => (h, format!("/{}", p.trim_end_matches('/'))),
                Some((h, _)) => (h, DEFAULT_ETCD_PREFIX.to_string()),
                None => (rest, DEFAULT_ETCD_PREFIX.to_string()),
            };
            let endpoints = hosts
                .split(',')
                .map(|h| {
                    h.parse().map_err(|e| {
                        format!("etcd endpoint {h:?}: {e} (want HOST:PORT with HOST an IP address)")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Self::Etcd { endpoints, prefix });
        }
        let path = s.strip_prefix("json:").unwrap_or(s);
        if path.is_empty() || path.contains("://") {
            return Err(format!(
                "--store {s:?}: want etcd://HOST:PORT[,HOST:PORT...] or a file path"
            ));
        }
        Ok(Self::Json(PathBuf::from(path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_specs_parse() {
        assert_eq!(
            "etcd://10.0.0.1:2379,10.0.0.2:2379".parse(),
            Ok(StoreSpec::Etcd {
                endpoints: vec![
                    "10.0.0.1:2379".parse().unwrap(),
                    "10.0.0.2:2379".parse().unwrap()
                ],
                prefix: "/particle".into()
            })
        );
        assert_eq!(
            "etcd://127.0.0.1:2379/a/b/".parse(),
            Ok(StoreSpec::Etcd {
                endpoints: vec!["127.0.0.1:2379".parse().unwrap()],
                prefix: "/a/b".into()
            })
        );
        assert_eq!(
            "/var/lib/p.json".parse(),
            Ok(StoreSpec::Json("/var/lib/p.json".into()))
        );
        assert!("etcd://nohost".parse::<StoreSpec>().is_err());
        assert!("http://x".parse::<StoreSpec>().is_err());
        assert!("".parse::<StoreSpec>().is_err());
    }
}

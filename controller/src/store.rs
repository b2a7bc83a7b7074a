//! Persistence: the "embedded store" choice.
//!
//! The controller keeps its durable state (tenants, their per-node block
//! assignments, the known nodes and their underlay ips, the overlay version)
//! in one JSON file instead of an external database: the state is small
//! (O(tenants x nodes)), there is a single controller, and a file needs no
//! extra service to run. Every change rewrites the whole file atomically:
//! write a temporary file in the same directory, fsync it, rename it over the
//! old one, so a crash leaves either the old or the new state, never half.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

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
}

#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored value, or `None` if there is no file yet (first start).
    pub fn load<T: DeserializeOwned>(&self) -> Result<Option<T>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Parse {
                path: self.path.clone(),
                source,
            })
    }

    /// Replaces the stored value atomically (temp file + rename).
    pub fn save<T: Serialize>(&self, value: &T) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(value).map_err(StoreError::Encode)?;
        let tmp = self.temp_path();
        let write_err = |source| StoreError::Write {
            path: tmp.clone(),
            source,
        };
        {
            // Tenants, nodes and jobs are the operator's business only.
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(write_err)?;
            file.write_all(&json).map_err(write_err)?;
            // Data must be on disk before the rename makes it visible.
            file.sync_all().map_err(write_err)?;
        }
        fs::rename(&tmp, &self.path).map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })?;
        // Persist the rename itself; best effort (not every fs allows it).
        if let Some(dir) = self.dir() {
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    fn dir(&self) -> Option<&Path> {
        match self.path.parent() {
            Some(p) if p.as_os_str().is_empty() => Some(Path::new(".")),
            other => other,
        }
    }

    /// Same directory, so the rename never crosses filesystems.
    fn temp_path(&self) -> PathBuf {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state".to_string());
        self.path.with_file_name(format!(".{name}.tmp"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Snapshot, StoredNode};

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "particle-controller-store-{tag}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn missing_file_is_an_empty_start_and_saves_round_trip() {
        let dir = temp_dir("roundtrip");
        let store = Store::new(dir.join("state.json"));
        assert_eq!(store.load::<Snapshot>().unwrap(), None);
        let snap = Snapshot {
            version: 7,
            tenants: vec![],
            nodes: vec![StoredNode {
                api_port: None,
                name: "n1".into(),
                underlay_ip: "10.0.0.1".parse().unwrap(),
            }],
        };
        store.save(&snap).unwrap();
        assert_eq!(store.load().unwrap(), Some(snap.clone()));
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["state.json"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_is_reported_with_the_path() {
        let dir = temp_dir("garbage");
        let path = dir.join("state.json");
        fs::write(&path, b"{not json").unwrap();
        let e = Store::new(&path).load::<Snapshot>().unwrap_err();
        assert!(matches!(e, StoreError::Parse { .. }));
        assert!(e.to_string().contains("state.json"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! The embedded store, the default.
//!
//! The controller keeps its state (tenants, their per-node block
//! assignments, the known nodes and their underlay ips, the overlay version)
//! in one JSON file: the state is small (O(tenants x nodes)), there is a
//! single controller, and a file needs no extra service to run. Every change
//! rewrites the whole file atomically: write a temporary file in the same
//! directory, fsync it, rename it over the old one, so a crash leaves either
//! the old or the new state, never half.
//!
//! Job records go to an append-only log beside it (`STATE.jobs.log`, one
//! JSON line per change, fsynced), so a change costs what it changed, not
//! the whole jobs table; the log is rewritten compactly at start and when
//! it has grown to several times what is live.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Backend, Record, StoreError};
use crate::state::Snapshot;

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
        self.save_bytes(&json)
    }

    fn save_bytes(&self, json: &[u8]) -> Result<(), StoreError> {
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
            file.write_all(json).map_err(write_err)?;
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

/// One line of the record log: prefixes deleted, then records written.
#[derive(Serialize, Deserialize, Default)]
struct LogLine {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    del: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    put: Vec<(String, String)>,
}

/// The records, live in memory, and the log they are appended to.
struct RecordLog {
    path: PathBuf,
    live: BTreeMap<String, Vec<u8>>,
    /// Bytes in the log file now.
    logged: u64,
}

/// The log is rewritten when it is this many times what is live (and over 1 MiB).
const COMPACT_FACTOR: u64 = 4;

impl RecordLog {
    fn open(path: PathBuf) -> Result<Self, StoreError> {
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let mut live = BTreeMap::new();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        for (i, line) in lines.iter().enumerate() {
            let entry: LogLine = match serde_json::from_str(line) {
                Ok(e) => e,
                // A crash in the middle of an append leaves a torn last line: it was never acknowledged.
                Err(_) if i + 1 == lines.len() => break,
                Err(source) => return Err(StoreError::Parse { path, source }),
            };
            apply(&mut live, entry);
        }
        let mut log = Self {
            path,
            live,
            logged: 0,
        };
        log.compact()?;
        Ok(log)
    }

    fn live_size(&self) -> u64 {
        self.live
            .iter()
            .map(|(k, v)| (k.len() + v.len() + 8) as u64)
            .sum()
    }

    /// Rewrites the log as one line holding what is live.
    fn compact(&mut self) -> Result<(), StoreError> {
        let line = LogLine {
            del: Vec::new(),
            put: self
                .live
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
        };
        let mut bytes = serde_json::to_vec(&line).map_err(StoreError::Encode)?;
        bytes.push(b'\n');
        Store::new(&self.path).save_bytes(&bytes)?;
        self.logged = bytes.len() as u64;
        Ok(())
    }

    fn append(&mut self, entry: LogLine) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec(&entry).map_err(StoreError::Encode)?;
        bytes.push(b'\n');
        let write_err = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(write_err)?;
        file.write_all(&bytes).map_err(write_err)?;
        // On disk before the change is acknowledged.
        file.sync_data().map_err(write_err)?;
        self.logged += bytes.len() as u64;
        apply(&mut self.live, entry);
        if self.logged > (1 << 20) && self.logged > COMPACT_FACTOR * self.live_size() {
            self.compact()?;
        }
        Ok(())
    }
}

fn apply(live: &mut BTreeMap<String, Vec<u8>>, entry: LogLine) {
    for prefix in entry.del {
        live.retain(|k, _| !k.starts_with(&prefix));
    }
    for (k, v) in entry.put {
        live.insert(k, v.into_bytes());
    }
}

/// The embedded store: the state file and the record log beside it.
pub struct JsonStore {
    state: Store,
    records: Mutex<RecordLog>,
}

impl JsonStore {
    /// The store at `state_file` (the log is `STATE.jobs.log` beside it).
    pub fn open(state_file: &Path) -> Result<Self, StoreError> {
        let mut name = state_file
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "state".into());
        name.push(".jobs.log");
        Ok(Self {
            state: Store::new(state_file),
            records: Mutex::new(RecordLog::open(state_file.with_file_name(name))?),
        })
    }
}

impl Backend for JsonStore {
    fn describe(&self) -> String {
        self.state.path().display().to_string()
    }

    fn load_state(&self) -> Result<Option<Snapshot>, StoreError> {
        self.state.load()
    }

    fn save_state(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.state.save(snapshot)
    }

    fn records(&self, prefix: &str) -> Result<Vec<Record>, StoreError> {
        let log = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(log
            .live
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write_records(&self, delete: &[String], puts: Vec<Record>) -> Result<(), StoreError> {
        let entry = LogLine {
            del: delete.to_vec(),
            put: puts
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect(),
        };
        let mut log = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        log.append(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StoredNode;

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
    fn records_survive_a_reopen_and_a_torn_last_line() {
        let dir = temp_dir("records");
        let state = dir.join("state.json");
        let store = JsonStore::open(&state).unwrap();
        store
            .write_records(
                &[],
                vec![
                    ("jobs/a/h".into(), b"1".to_vec()),
                    ("jobs/b/h".into(), b"2".to_vec()),
                ],
            )
            .unwrap();
        store
            .write_records(
                &["jobs/a/".into()],
                vec![("jobs/c/h".into(), b"3".to_vec())],
            )
            .unwrap();
        drop(store);
        let log = dir.join("state.json.jobs.log");
        let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"put\":[[\"jobs/d").unwrap();
        drop(f);
        let again = JsonStore::open(&state).unwrap();
        let keys: Vec<String> = again
            .records("jobs/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["jobs/b/h", "jobs/c/h"]);
        // Reopening compacted the log to one line.
        assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 1);
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

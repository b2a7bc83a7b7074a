//! Names of the kernel objects Particle creates, and the run that owns them.
//!
//! Every object carries a per-run prefix (`pt` + 5 random characters), so that
//! parallel runs never collide and the garbage collector can tell a crashed
//! run's leftovers from a live run's objects: a live run holds an exclusive
//! `flock` on `/run/particle/runs/<prefix>.lock`; the kernel drops it when the
//! process dies, however it dies.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Linux refuses interface names longer than this (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Every run prefix starts with this tag.
pub const PREFIX_TAG: &str = "pt";
const PREFIX_RANDOM_LEN: usize = 5;
const PREFIX_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const BASE36_DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Where live runs keep their lock files.
pub const RUN_DIR: &str = "/run/particle/runs";

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("interface name {name:?} is {len} bytes; the kernel allows at most {IFNAME_MAX}")]
    TooLong { name: String, len: usize },
    #[error("interface name must not be empty")]
    Empty,
    #[error("interface name {0:?} contains '/', whitespace or a NUL byte")]
    BadCharacter(String),
    #[error("{0:?} is not a Particle run prefix (expected {PREFIX_TAG} followed by {PREFIX_RANDOM_LEN} of [a-z0-9])")]
    NotAPrefix(String),
    #[error("no randomness for a run prefix: {0}")]
    Random(String),
    #[error("cannot take the run lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// An interface name the kernel will accept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > IFNAME_MAX {
            return Err(NameError::TooLong {
                len: name.len(),
                name,
            });
        }
        if name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(NameError::BadCharacter(name));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The prefix all of one run's objects carry, e.g. `ptk3x9a`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunPrefix(String);

impl RunPrefix {
    /// A fresh random prefix.
    pub fn random() -> Result<Self, NameError> {
        let mut bytes = [0u8; PREFIX_RANDOM_LEN];
        getrandom::fill(&mut bytes).map_err(|e| NameError::Random(e.to_string()))?;
        let mut s = String::from(PREFIX_TAG);
        for b in bytes {
            s.push(PREFIX_ALPHABET[b as usize % PREFIX_ALPHABET.len()] as char);
        }
        Ok(Self(s))
    }

    /// Parses a prefix, e.g. one given on a command line or found in a name.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let ok = s.len() == PREFIX_TAG.len() + PREFIX_RANDOM_LEN
            && s.starts_with(PREFIX_TAG)
            && s[PREFIX_TAG.len()..]
                .bytes()
                .all(|b| PREFIX_ALPHABET.contains(&b));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(NameError::NotAPrefix(s.to_string()))
        }
    }

    /// The run prefix a name starts with, if it looks like one of ours.
    pub fn of_name(name: &str) -> Option<Self> {
        name.get(..PREFIX_TAG.len() + PREFIX_RANDOM_LEN)
            .and_then(|p| Self::parse(p).ok())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An interface name: the prefix, a one-letter kind and a number in base 36.
    /// `pt` + 5 + 1 leaves 7 characters: 78 billion names per kind and run.
    pub fn ifname(&self, kind: char, number: u64) -> Result<IfName, NameError> {
        IfName::new(format!("{}{}{}", self.0, kind, base36(number)))
    }

    /// A name without the 15-byte limit (named namespaces, files).
    pub fn label(&self, what: &str) -> String {
        format!("{}-{}", self.0, what)
    }

    pub fn lock_path(&self) -> PathBuf {
        Path::new(RUN_DIR).join(format!("{}.lock", self.0))
    }

    /// Whether a live process holds this prefix's run lock. A prefix without a
    /// lock file is not known to be Particle's, and counts as live so that
    /// nothing unknown is ever removed.
    pub fn is_live(&self) -> bool {
        let file = match File::open(self.lock_path()) {
            Ok(f) => f,
            Err(_) => return true,
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(_released_on_drop) => false,
            Err((_, _)) => true,
        }
    }
}

impl fmt::Display for RunPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn base36(mut n: u64) -> String {
    if n == 0 {
        return "0".into();
    }
    let mut digits = Vec::new();
    while n > 0 {
        digits.push(BASE36_DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    digits.iter().rev().map(|&d| d as char).collect()
}

/// A live run: its prefix, and the lock that tells the garbage collector so.
/// Dropping it releases the lock and removes the lock file.
#[derive(Debug)]
pub struct Run {
    prefix: RunPrefix,
    _lock: Flock<File>,
}

impl Run {
    /// Starts a run with a fresh random prefix.
    pub fn start() -> Result<Self, NameError> {
        Self::with_prefix(RunPrefix::random()?)
    }

    /// Starts (or, after a crash, resumes) a run with a given prefix.
    pub fn with_prefix(prefix: RunPrefix) -> Result<Self, NameError> {
        let path = prefix.lock_path();
        let lock_err = |source| NameError::Lock {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(RUN_DIR).map_err(lock_err)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(lock_err)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| lock_err(io::Error::from(errno)))?;
        Ok(Self {
            prefix,
            _lock: lock,
        })
    }

    pub fn prefix(&self) -> &RunPrefix {
        &self.prefix
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.prefix.lock_path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_respect_the_kernel_limit() {
        assert!(IfName::new("eth0").is_ok());
        assert!(IfName::new("a".repeat(15)).is_ok());
        let err = IfName::new("a".repeat(16)).unwrap_err();
        assert!(err.to_string().contains("16 bytes"), "{err}");
        assert!(matches!(IfName::new(""), Err(NameError::Empty)));
        assert!(matches!(
            IfName::new("a/b"),
            Err(NameError::BadCharacter(_))
        ));
        assert!(matches!(
            IfName::new("a b"),
            Err(NameError::BadCharacter(_))
        ));
    }

    #[test]
    fn prefixes_round_trip_and_fit_names() {
        let p = RunPrefix::random().unwrap();
        assert_eq!(RunPrefix::parse(p.as_str()).unwrap(), p);
        let name = p.ifname('v', u64::from(u32::MAX) * 4).unwrap();
        assert!(name.as_str().len() <= IFNAME_MAX);
        assert_eq!(RunPrefix::of_name(name.as_str()), Some(p.clone()));
        assert!(p.ifname('v', 36u64.pow(7)).is_err(), "8 digits overflow");
        assert_eq!(RunPrefix::of_name("eth0"), None);
        assert_eq!(RunPrefix::of_name("ptABCDEv0"), None);
        assert!(RunPrefix::parse("xx12345").is_err());
    }

    #[test]
    fn base36_counts() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
    }
}

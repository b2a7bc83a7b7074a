//! The default root file system of functions, assembled once per agent from
//! what the node already has: the static busybox (Debian's
//! `busybox-static`: `sh` and the usual tools as applets), bash, and the
//! binaries Particle ships (the agent's own binary, `particle-fn`,
//! `particle-video`, `particle-warm-fn` beside it), each at its own path and
//! in `/usr/local/bin`, with the shared libraries `ldd` names.
//!
//! Bash is in because tests, the demo and tenants' scripts use it (its
//! `/dev/tcp`, arrays) and the libraries it needs are those the Particle
//! binaries need anyway (plus libtinfo): a megabyte more. iputils' ping is
//! in because busybox's needs a raw socket (no capability inside), while
//! iputils' falls back to an unprivileged ICMP socket; coreutils' nice
//! because busybox has none and the pipeline runs its workers niced.
//!
//! The image is content-addressed: its directory name carries a hash of
//! every source's path, size, mtime and inode, and of this layout's version,
//! so a changed binary makes a new image and an unchanged one is reused. It
//! is built beside under a temporary name and renamed into place (a crash
//! midway leaves no half image under the real name), and removed when the
//! agent stops. Big files are hard links when the node allows (same file
//! system; the mount is read-only and the user namespace makes them
//! nobody's inside, so the function cannot write them), else copies.

use std::collections::BTreeSet;
use std::fs;
use std::hash::Hasher;
use std::io;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the layout changes.
const FORMAT: u64 = 1;
/// Tools of the node copied in (never linked: a copy drops file
/// capabilities, e.g. ping's cap_net_raw, which must not apply inside).
const TOOLS: &[&str] = &["/bin/bash", "/bin/ping", "/usr/bin/nice"];
/// Binaries Particle ships, looked for beside the agent's own binary.
const SHIPPED: &[&str] = &[
    "particle",
    "particle-fn",
    "particle-video",
    "particle-warm-fn",
    // LD_PRELOADed by programs that want warm connections.
    "libparticle_preload.so",
];
const BUSYBOX: &str = "/bin/busybox";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{BUSYBOX} is missing: install busybox-static (scripts/install-deps)")]
    NoBusybox,
    #[error("assembling the function image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What goes into the image besides busybox.
#[derive(Debug, Clone)]
pub struct Sources {
    pub busybox: PathBuf,
    /// Linked when possible.
    pub binaries: Vec<PathBuf>,
    /// Always copied.
    pub tools: Vec<PathBuf>,
    /// Empty files where the launcher bind-mounts node files.
    pub mount_points: Vec<PathBuf>,
}

impl Sources {
    /// The agent's: its binary and the shipped ones beside it, bash, and
    /// the operator's `extra` binaries.
    pub fn for_agent(extra: &[PathBuf]) -> Self {
        let mut binaries = Vec::new();
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                binaries.extend(SHIPPED.iter().map(|n| dir.join(n)).filter(|p| p.is_file()));
            }
            if !binaries.contains(&exe) {
                binaries.push(exe);
            }
        }
        binaries.extend(extra.iter().cloned());
        Self {
            busybox: PathBuf::from(BUSYBOX),
            binaries,
            tools: TOOLS
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.is_file())
                .collect(),
            mount_points: Vec::new(),
        }
    }

    /// The content address: every source's identity and the layout version.
    fn hash(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write_u64(FORMAT);
        for p in std::iter::once(&self.busybox)
            .chain(&self.binaries)
            .chain(&self.tools)
        {
            h.write(p.as_os_str().as_encoded_bytes());
            if let Ok(m) = fs::metadata(p) {
                h.write_u64(m.len());
                h.write_i64(m.mtime());
                h.write_i64(m.mtime_nsec());
                h.write_u64(m.ino());
            }
        }
        for p in &self.mount_points {
            h.write(p.as_os_str().as_encoded_bytes());
        }
        h.finish()
    }
}

/// An assembled image, removed when dropped.
#[derive(Debug)]
pub struct Image {
    root: PathBuf,
}

impl Image {
    /// Assembles (or finds) the image for `sources` in `dir`, named after `label`.
    pub fn assemble(dir: &Path, label: &str, sources: &Sources) -> Result<Self, ImageError> {
        if !sources.busybox.is_file() {
            return Err(ImageError::NoBusybox);
        }
        collect_leftovers(dir);
        let root = dir.join(format!("{label}-rootfs-{:016x}", sources.hash()));
        if root.is_dir() {
            return Ok(Self { root });
        }
        let partial = dir.join(format!(".{label}-rootfs.partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir_all(&partial).map_err(io_err(&partial))?;
        let built = build(&partial, sources).and_then(|()| {
            fs::rename(&partial, &root).or_else(|e| {
                // Someone else (a twin agent of the same label) was faster.
                if root.is_dir() {
                    Ok(())
                } else {
                    Err(io_err(&root)(e))
                }
            })
        });
        let _ = fs::remove_dir_all(&partial);
        built.map(|()| Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Never follows the image's symlinks: removes links, not targets.
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Images (and half-built ones) in `dir` of Particle runs that are not live
/// (the agent that made them crashed): a live run holds its lock file.
fn collect_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.contains("-rootfs") {
            continue;
        }
        let dead = particle_net::RunPrefix::of_name(name.trim_start_matches('.'))
            .is_some_and(|p| !p.lock_path().exists() || !p.is_live());
        if dead {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// `path` (absolute, as the function will see it) under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn build(root: &Path, sources: &Sources) -> Result<(), ImageError> {
    for d in ["bin", "usr/local/bin", "etc", "dev", "proc", "tmp"] {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(io_err(&p))?;
    }
    // One bin directory, as on merged-/usr systems.
    for (link, target) in [
        ("sbin", "bin"),
        ("usr/bin", "../bin"),
        ("usr/sbin", "../bin"),
    ] {
        let p = root.join(link);
        symlink(target, &p).map_err(io_err(&p))?;
    }
    let mut libraries = BTreeSet::new();
    let linked = std::iter::once(&sources.busybox).chain(&sources.binaries);
    let all = linked
        .map(|b| (b, true))
        .chain(sources.tools.iter().map(|t| (t, false)));
    for (bin, link) in all {
        place(root, bin, link)?;
        libraries.extend(libraries_of(bin));
        let Some(name) = bin.file_name() else {
            continue;
        };
        let in_path = ["/bin", "/usr/bin", "/sbin", "/usr/sbin"]
            .iter()
            .any(|d| bin.parent() == Some(Path::new(d)))
            || name.to_string_lossy().ends_with(".so");
        let link = root.join("usr/local/bin").join(name);
        if !in_path && fs::symlink_metadata(&link).is_err() {
            symlink(bin, &link).map_err(io_err(&link))?;
        }
    }
    for lib in &libraries {
        place(root, lib, false)?;
    }
    applets(root, &sources.busybox)?;
    for point in &sources.mount_points {
        let p = inside(root, point);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        fs::write(&p, "").map_err(io_err(&p))?;
    }
    for (file, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
    ] {
        let p = root.join(file);
        fs::write(&p, text).map_err(io_err(&p))?;
    }
    Ok(())
}

/// Puts the node's `src` at the same path in the image: a hard link when
/// `link` allows and the file system does, else a copy.
fn place(root: &Path, src: &Path, link: bool) -> Result<(), ImageError> {
    let dst = inside(root, src);
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    if fs::symlink_metadata(&dst).is_ok() {
        return Ok(());
    }
    // The file itself, not a symlink to it (which would point outside).
    let real = fs::canonicalize(src).map_err(io_err(src))?;
    if link && fs::hard_link(&real, &dst).is_ok() {
        return Ok(());
    }
    fs::copy(&real, &dst).map_err(io_err(&dst))?;
    // No set-id bits in the image (they would not work there anyway).
    let mode = fs::metadata(&dst)
        .map_err(io_err(&dst))?
        .permissions()
        .mode()
        & 0o755;
    fs::set_permissions(&dst, fs::Permissions::from_mode(mode)).map_err(io_err(&dst))?;
    Ok(())
}

/// The shared libraries (and loader) `bin` needs, as `ldd` finds them;
/// none for a static binary.
fn libraries_of(bin: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(bin).output() else {
        return Vec::new();
    };
    parse_ldd(&String::from_utf8_lossy(&out.stdout))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => l,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A `/bin` link to busybox for each of its applets the image lacks.
fn applets(root: &Path, busybox: &Path) -> Result<(), ImageError> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(io_err(busybox))?;
    let target = inside(Path::new("/"), busybox);
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet.contains('/') || applet == "busybox" {
            continue;
        }
        let link = root.join("bin").join(applet);
        if fs::symlink_metadata(&link).is_err() {
            symlink(&target, &link).map_err(io_err(&link))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_from_ldd_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n\tnot a dynamic executable\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}

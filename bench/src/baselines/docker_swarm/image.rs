//! The function image, built without a registry: a root filesystem holding a
//! static busybox (a shell to look inside a container with), the function
//! binary at `/<its file name>`, and the shared libraries `ldd` lists for it
//! (particle-fn links glibc dynamically), packed by `tar` for `docker import`.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where busybox-static installs busybox.
const BUSYBOX_PATHS: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "busybox is not installed (apt-get install busybox-static; scripts/install-deps does)"
    )]
    NoBusybox,
    #[error(
        "the function binary {0} does not exist (cargo build --release -p particle-workloads)"
    )]
    NoBinary(PathBuf),
    #[error("ldd {path}: {reason}")]
    Ldd { path: PathBuf, reason: String },
    #[error("tar: {0}")]
    Tar(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A built root filesystem.
#[derive(Debug)]
pub struct Rootfs {
    pub dir: PathBuf,
    /// The function binary's path inside the image, e.g. `/particle-fn`.
    pub function_path: String,
}

/// Builds the image's root filesystem in `dir` (which must not exist yet).
pub fn build_rootfs(dir: &Path, function_binary: &Path) -> Result<Rootfs, ImageError> {
    if !function_binary.is_file() {
        return Err(ImageError::NoBinary(function_binary.to_owned()));
    }
    let busybox = BUSYBOX_PATHS
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or(ImageError::NoBusybox)?;
    let file_name = function_binary
        .file_name()
        .ok_or_else(|| ImageError::NoBinary(function_binary.to_owned()))?;
    for sub in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        mkdir(&dir.join(sub))?;
    }
    copy(busybox, &dir.join("bin/busybox"))?;
    let sh = dir.join("bin/sh");
    symlink("busybox", &sh).map_err(|source| ImageError::Io {
        what: "symlink",
        path: sh,
        source,
    })?;
    copy(function_binary, &dir.join(file_name))?;
    for binary in [busybox, function_binary] {
        for lib in shared_libraries(binary)? {
            let inside = dir.join(lib.strip_prefix("/").unwrap_or(&lib));
            if let Some(parent) = inside.parent() {
                mkdir(parent)?;
            }
            // fs::copy follows symlinks: the loader path is one on Debian.
            copy(&lib, &inside)?;
        }
    }
    Ok(Rootfs {
        dir: dir.to_owned(),
        function_path: format!("/{}", file_name.to_string_lossy()),
    })
}

/// `tar -C dir -c .`: the archive `docker import -` reads.
pub fn tar(dir: &Path) -> Result<Vec<u8>, ImageError> {
    let out = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-c", "."])
        .output()
        .map_err(|e| ImageError::Tar(e.to_string()))?;
    if !out.status.success() {
        return Err(ImageError::Tar(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(out.stdout)
}

/// The absolute library paths `ldd` prints for `binary` (none for a static one).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| ImageError::Ldd {
            path: binary.to_owned(),
            reason: e.to_string(),
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // ldd exits 1 for a static binary; anything else is a real failure.
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(ImageError::Ldd {
            path: binary.to_owned(),
            reason: stderr.trim().to_string(),
        });
    }
    Ok(parse_ldd(&stdout))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x…)` give a path; the vDSO gives none.
fn parse_ldd(output: &str) -> Vec<PathBuf> {
    output
        .lines()
        .filter_map(|line| {
            let target = match line.split_once("=>") {
                Some((_, right)) => right,
                None => line,
            };
            let path = target.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn mkdir(path: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(path).map_err(|source| ImageError::Io {
        what: "mkdir",
        path: path.to_owned(),
        source,
    })
}

fn copy(from: &Path, to: &Path) -> Result<(), ImageError> {
    fs::copy(from, to)
        .map(drop)
        .map_err(|source| ImageError::Io {
            what: "copy",
            path: from.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_library_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f5b)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f5b)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f5b)\n";
        assert_eq!(
            parse_ldd(out),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tstatically linked\n").is_empty());
    }
}

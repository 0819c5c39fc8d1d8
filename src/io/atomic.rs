//! Atomic file writes: write a temporary file beside the target, flush it to disk, then rename over the target,
//! so a crash leaves either the old file or the new one, never a torn one. A failed write (a full disk, a
//! read-only directory) removes its temporary file and leaves the target as it was; temporary files left by a
//! process that was killed mid-write are removed by [`remove_stale_temps`].

use crate::error::io_at;
use crate::{NvError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The directory a path is written in (`.` for a bare file name).
fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into())
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = dir_of(path);
    std::fs::create_dir_all(dir).map_err(io_at(dir, "create directory"))?;
    let tmp = dir.join(format!(".{}.{}.tmp", file_name(path), std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        let kill_at = fault::take();
        if kill_at {
            // The test-only fault hook: half the file on disk, then the process dies as if SIGKILLed.
            f.write_all(&bytes[..bytes.len() / 2])?;
            f.sync_all()?;
            fault::kill_self();
        }
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(NvError::io(path, "write", e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(NvError::io(path, "replace", e));
    }
    // Persist the rename itself where the platform allows opening directories.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The temporary files [`write_atomic`] leaves beside `path` when the writing process dies mid-write.
pub fn stale_temps(path: &Path) -> Result<Vec<PathBuf>> {
    let dir = dir_of(path);
    let prefix = format!(".{}.", file_name(path));
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(NvError::io(dir, "list", e)),
    };
    let mut out = vec![];
    for entry in rd {
        let p = entry.map_err(io_at(dir, "list"))?.path();
        let name = file_name(&p);
        if let Some(mid) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".tmp"))
        {
            if !mid.is_empty() && mid.bytes().all(|b| b.is_ascii_digit()) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes the temporary files of interrupted writes of `path`; returns how many. Call it only while holding
/// the run's lock ([`crate::io::RunLock`]), so that no live writer's file is taken.
pub fn remove_stale_temps(path: &Path) -> Result<usize> {
    let stale = stale_temps(path)?;
    for p in &stale {
        std::fs::remove_file(p).map_err(io_at(p, "remove stale temporary file"))?;
    }
    Ok(stale.len())
}

/// The test-only fault hook: `normvision train --fault-kill-in-write N` kills the process halfway through its
/// N-th atomic write, to test that a crash mid-checkpoint loses nothing.
#[doc(hidden)]
pub mod fault {
    use super::*;

    static COUNTDOWN: AtomicU64 = AtomicU64::new(0);

    /// Arms the hook: the `n`-th atomic write from now (1-based) dies halfway; 0 disarms it.
    pub fn kill_in_write(n: u64) {
        COUNTDOWN.store(n, Ordering::SeqCst);
    }

    /// Whether this write is the one to die in.
    pub(super) fn take() -> bool {
        COUNTDOWN
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
            .is_ok_and(|c| c == 1)
    }

    pub(super) fn kill_self() -> ! {
        #[cfg(unix)]
        // SAFETY: kill(2) on our own pid with SIGKILL; it does not return.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort()
    }
}

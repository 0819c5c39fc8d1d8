//! The lock a run holds on its output: two processes writing the same checkpoint are refused, not interleaved.
//! It is an `flock`-style advisory lock on a hidden file beside the checkpoint, which the kernel releases when
//! the process dies (a SIGKILL included), so a killed run never blocks its own resume. A run that ends removes
//! the lock file.

use crate::error::io_at;
use crate::{NvError, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// Held for the life of a run; dropping it releases the lock.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// The lock file of output `target`: `.<name>.lock` in the same directory.
    pub fn path_for(target: &Path) -> PathBuf {
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "out".into());
        dir.join(format!(".{name}.lock"))
    }

    /// Takes the lock on `target`'s output, creating its directory. Fails at once, naming the path, when the
    /// directory cannot be written (which checks writability before any training) or another process holds
    /// the lock.
    pub fn acquire(target: &Path) -> Result<RunLock> {
        if target.is_dir() {
            return Err(NvError::Config(format!(
                "{}: the output path is a directory; give a file name such as {}",
                target.display(),
                target.join("model.safetensors").display()
            )));
        }
        let path = Self::path_for(target);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_at(dir, "create directory"))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_at(&path, "create lock file"))?;
        match file.try_lock() {
            // The lock file is removed when the run ends; a process that opened it just before that and locked
            // it just after holds a lock on a removed file: it must see that and count as refused.
            Ok(()) if same_file(&file, &path) => Ok(RunLock { _file: file, path }),
            Ok(()) => Err(NvError::Config(format!(
                "{}: another normvision process was finishing with this output; try again",
                target.display()
            ))),
            Err(TryLockError::WouldBlock) => Err(NvError::Config(format!(
                "{}: another normvision process is writing this output (it holds {}); wait for it to finish \
                 or choose another output path",
                target.display(),
                path.display()
            ))),
            Err(TryLockError::Error(e)) => Err(NvError::io(&path, "lock", e)),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether `file` is still the file at `path` (not removed or replaced since it was opened).
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

impl Drop for RunLock {
    /// Removes the lock file while still holding the lock, so a finished run leaves nothing beside its
    /// checkpoint (a killed one leaves the hidden file, which the next run reuses).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

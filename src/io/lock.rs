//! The lock a run holds on its output: two processes writing the same checkpoint are refused, not interleaved.
//! It is an `flock`-style advisory lock on a hidden file beside the checkpoint, which the kernel releases when
//! the process dies (a SIGKILL included), so a killed run never blocks its own resume.

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
            Ok(()) => Ok(RunLock { _file: file, path }),
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

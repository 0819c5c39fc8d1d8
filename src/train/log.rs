//! JSON-lines run logs: one object per line (`{"event":"step",...}`, `{"event":"eval",...}`), for machines.
//! Each event is written with one `write` call and no buffering, so a killed run loses at most the event being
//! written; a resumed run first cuts the log back to its checkpoint's step ([`JsonLog::resume`]), so that no
//! step is logged twice and no line is left half-written.

use crate::error::io_at;
use crate::{NvError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends JSON objects, one per line; a no-op when created without a path.
pub struct JsonLog {
    out: Option<(std::fs::File, PathBuf)>,
}

/// The step an event belongs to (`None` for events without one, such as `start`).
fn event_step(v: &serde_json::Value) -> Option<u64> {
    v.get("step")
        .or_else(|| v.get("eval").and_then(|e| e.get("step")))
        .or_else(|| v.get("steps"))
        .and_then(|s| s.as_u64())
}

impl JsonLog {
    pub fn disabled() -> Self {
        JsonLog { out: None }
    }

    /// Creates (truncates) the log file, making parent directories.
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(io_at(d, "create directory"))?;
        }
        let f = std::fs::File::create(path).map_err(io_at(path, "create"))?;
        Ok(JsonLog {
            out: Some((f, path.to_path_buf())),
        })
    }

    /// Opens the log of a run resumed at `step`: the events after that step (which the resumed run will
    /// repeat) and a final line cut short by a crash are removed first (the file is rewritten atomically);
    /// then events are appended. A missing log is created.
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let text = match std::fs::read(path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::create(path),
            Err(e) => return Err(NvError::io(path, "read", e)),
        };
        let mut kept = String::with_capacity(text.len());
        for line in text.split_inclusive('\n') {
            if !line.ends_with('\n') {
                break; // cut mid-line by a crash
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                break;
            };
            if event_step(&v).is_some_and(|s| s > step) {
                break;
            }
            kept.push_str(line);
        }
        if kept.len() != text.len() {
            crate::io::write_atomic(path, kept.as_bytes())?;
        }
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io_at(path, "open for appending"))?;
        Ok(JsonLog {
            out: Some((f, path.to_path_buf())),
        })
    }

    /// Writes one event as one line, straight to the file.
    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        if let Some((f, path)) = self.out.as_mut() {
            let mut line = serde_json::to_vec(v)
                .map_err(std::io::Error::other)
                .map_err(io_at(path, "write"))?;
            line.push(b'\n');
            f.write_all(&line).map_err(io_at(path, "write"))?;
        }
        Ok(())
    }

    /// Kept for callers that flush at the end; every event is already written.
    pub fn flush(&mut self) -> Result<()> {
        if let Some((f, path)) = self.out.as_mut() {
            f.flush().map_err(io_at(path, "write"))?;
        }
        Ok(())
    }
}

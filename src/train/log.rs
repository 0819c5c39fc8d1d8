//! JSON-lines run logs: one object per line (`{"event":"step",...}`, `{"event":"eval",...}`), for machines.

use crate::Result;
use std::io::Write;
use std::path::Path;

/// Appends JSON objects, one per line; a no-op when created without a path.
pub struct JsonLog {
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl JsonLog {
    pub fn disabled() -> Self {
        JsonLog { out: None }
    }
    /// Creates (truncates) the log file, making parent directories.
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        Ok(JsonLog {
            out: Some(std::io::BufWriter::new(std::fs::File::create(path)?)),
        })
    }
    /// Opens for appending (resumed runs).
    pub fn append(path: &Path) -> Result<Self> {
        Ok(JsonLog {
            out: Some(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
        })
    }
    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        if let Some(o) = self.out.as_mut() {
            serde_json::to_writer(&mut *o, v).map_err(std::io::Error::other)?;
            o.write_all(b"\n")?;
        }
        Ok(())
    }
    pub fn flush(&mut self) -> Result<()> {
        if let Some(o) = self.out.as_mut() {
            o.flush()?;
        }
        Ok(())
    }
}

//! The durable results store of one suite: `<out>/<suite>/results.jsonl` plus its lock.
//!
//! Durability rules: a record is one line, written with a single `write_all` and fsynced before the
//! next case starts, so a kill -9 of the orchestrator loses at most the case that was running. The
//! only damage a kill can leave is a torn last line; readers skip it with a warning, and the writer
//! cuts it off before appending, so a torn line never ends up mid-file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::record::Record;

pub const RESULTS_FILE: &str = "results.jsonl";
pub const LOCK_FILE: &str = ".lock";

/// An open, locked results directory. The lock is released when this is dropped (or the process
/// dies: it is an OS file lock).
pub struct Store {
    dir: PathBuf,
    results: File,
    _lock: File,
}

impl Store {
    /// Creates `dir` if needed, takes its lock and repairs a torn tail. Fails with a clear message
    /// if the directory cannot be written or another bench holds the lock.
    pub fn open(dir: &Path) -> Result<Store> {
        match Store::open_if_free(dir)? {
            Some(store) => Ok(store),
            None => bail!(
                "another `cargo xtask bench` is running on {} (it holds {}); wait for it to finish, \
                 or give this run another --out directory",
                dir.display(),
                dir.join(LOCK_FILE).display()
            ),
        }
    }

    /// As [`Store::open`], but `Ok(None)` while another process holds the lock: for readers that
    /// write only when nobody else does (`status` merging finished tasks' records).
    pub fn open_if_free(dir: &Path) -> Result<Option<Store>> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create results directory {}; choose another with --out or fix its permissions",
                dir.display()
            )
        })?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| {
                format!(
                    "cannot write in results directory {} (creating {}); choose another with --out or fix its permissions",
                    dir.display(),
                    lock_path.display()
                )
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", lock_path.display()))
            }
        }
        let path = dir.join(RESULTS_FILE);
        let mut results = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        repair_tail(&mut results)
            .with_context(|| format!("repairing the end of {}", path.display()))?;
        Ok(Some(Store {
            dir: dir.to_path_buf(),
            results,
            _lock: lock,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn results_path(&self) -> PathBuf {
        self.dir.join(RESULTS_FILE)
    }

    /// Appends one record as one line and fsyncs it. If the write fails part way (disk full),
    /// the partial line is cut off again so that the next append cannot bury it mid-file.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let mut line = record.to_line();
        line.push('\n');
        let before = self.results.metadata().map(|m| m.len());
        let written = self
            .results
            .write_all(line.as_bytes())
            .and_then(|_| self.results.sync_data());
        if let Err(e) = written {
            if let Ok(len) = before {
                let _ = self.results.set_len(len);
            }
            return Err(e)
                .with_context(|| format!("appending to {}", self.results_path().display()));
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` so that readers see either the old file or the whole new one, never a
/// part, even when the machine dies: a temporary name in the same directory, fsynced, renamed over
/// `path`, and the directory fsynced so the rename itself survives. Several processes (nodes of a
/// cluster on a shared file system) may write different paths of one directory at once.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    // Unique per writer: host (nodes share the directory), process, and time.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}-{nanos}",
        name.to_string_lossy(),
        host.trim(),
        std::process::id()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {} (through {})", path.display(), tmp.display()))
}

/// Cuts the file back to its last complete line: what follows the last '\n' is what a killed
/// writer left half-written. A tail that is a whole record (only its newline is missing, e.g.
/// after a hand edit) is kept and given its newline instead.
fn repair_tail(f: &mut File) -> Result<()> {
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    // Scan backwards in chunks for the last newline.
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    let keep = loop {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(pos) = buf[..n].iter().rposition(|&b| b == b'\n') {
            break start + pos as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        end = start;
    };
    if keep < len {
        let mut tail = vec![0u8; (len - keep) as usize];
        f.seek(SeekFrom::Start(keep))?;
        f.read_exact(&mut tail)?;
        if Record::from_line(&String::from_utf8_lossy(&tail)).is_ok() {
            // Appends go to the end whatever the cursor says (the file is opened in append mode).
            f.write_all(b"\n")?;
            f.sync_data()?;
            return Ok(());
        }
        eprintln!(
            "warning: results file ended in a torn line ({} bytes, from an interrupted run); removed it",
            len - keep
        );
        f.set_len(keep)?;
        f.sync_data()?;
    }
    Ok(())
}

/// What [`read`] found: the records in file order, and warnings about lines it skipped.
#[derive(Debug, Default)]
pub struct ReadResult {
    pub records: Vec<Record>,
    pub warnings: Vec<String>,
}

/// Reads a results file without taking the lock (a report may run beside a bench). A missing file
/// is empty. A line that does not parse is skipped with a warning: the torn last line of a run
/// killed while writing, or a line from a newer schema.
pub fn read(path: &Path) -> Result<ReadResult> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ReadResult::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut out = ReadResult::default();
    let ends_clean = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match Record::from_line(line) {
            Ok(r) => out.records.push(r),
            Err(e) => {
                let torn = i + 1 == lines.len() && !ends_clean;
                out.warnings.push(format!(
                    "{}:{}: skipped {}: {e:#}",
                    path.display(),
                    i + 1,
                    if torn {
                        "a torn last line (an interrupted write)"
                    } else {
                        "a line"
                    }
                ));
            }
        }
    }
    Ok(out)
}

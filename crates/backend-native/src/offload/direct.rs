//! The disk tier's I/O: files opened with `O_DIRECT` (read and written through the 4096-byte
//! aligned buffers of [`crate::device::alloc`]), so that the page cache neither helps nor hides
//! the disk's speed; and the offload directory itself (checked before generation, one private
//! subdirectory per run, removed on drop).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context, Result};

use super::stats::{Link, Stats};
pub use crate::device::alloc::{align_up, AlignedBuf, ALIGN};

/// Bytes per read request of [`DirectFile::read_at`].
pub const REQUEST: usize = 16 << 20;

/// Read requests [`DirectFile::read_at`] keeps in flight.
pub const QUEUE_DEPTH: usize = 4;

/// A file of the disk tier. Offsets and lengths of every read and write are multiples of
/// [`ALIGN`] and buffers are [`AlignedBuf`]s, as O_DIRECT requires.
pub struct DirectFile {
    file: File,
    path: PathBuf,
}

/// Set once a filesystem refused O_DIRECT, so the warning is printed once per process.
static BUFFERED_FALLBACK: AtomicBool = AtomicBool::new(false);

/// Whether some offload file had to fall back to buffered I/O (the result's notes say so).
pub fn used_buffered_fallback() -> bool {
    BUFFERED_FALLBACK.load(Ordering::Relaxed)
}

impl DirectFile {
    /// Creates (truncates) `path` for reading and writing with O_DIRECT. Filesystems without
    /// O_DIRECT (tmpfs, some overlays) get buffered I/O and a warning: their numbers then include
    /// the page cache.
    pub fn create(path: &Path) -> Result<DirectFile> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true).create(true).truncate(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let file = match open(true) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                if !BUFFERED_FALLBACK.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "flexbench-native: warning: the filesystem of {} refuses O_DIRECT; offload \
                         files use buffered I/O, so disk numbers include the page cache (put the \
                         offload directory on a real disk to measure it)",
                        path.display()
                    );
                }
                open(false).with_context(|| format!("creating offload file {}", path.display()))?
            }
            Err(e) => {
                return Err(e).with_context(|| format!("creating offload file {}", path.display()))
            }
        };
        Ok(DirectFile {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing file read-only with O_DIRECT (buffered where the filesystem refuses).
    pub fn open_read(path: &Path) -> Result<DirectFile> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let file = match open(true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                BUFFERED_FALLBACK.store(true, Ordering::Relaxed);
                open(false)
            }
            r => r,
        }
        .with_context(|| format!("opening {}", path.display()))?;
        Ok(DirectFile {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Length of the file in bytes.
    pub fn size(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .with_context(|| format!("reading the size of {}", self.path.display()))?
            .len())
    }

    /// Writes `buf[..len]` at `offset` (both multiples of [`ALIGN`]).
    pub fn write_at(&self, buf: &AlignedBuf, len: usize, offset: u64) -> Result<()> {
        ensure!(
            len.is_multiple_of(ALIGN) && offset.is_multiple_of(ALIGN as u64) && len <= buf.len(),
            "unaligned offload write"
        );
        self.file
            .write_all_at(&buf.bytes()[..len], offset)
            .map_err(|e| io_error(e, "writing", &self.path))
    }

    /// Reads `len` bytes at `offset` into `buf[..len]` (multiples of [`ALIGN`]).
    pub fn read_at(&self, buf: &mut AlignedBuf, len: usize, offset: u64) -> Result<()> {
        ensure!(
            len.is_multiple_of(ALIGN) && offset.is_multiple_of(ALIGN as u64) && len <= buf.len(),
            "unaligned offload read"
        );
        // requests of at most REQUEST bytes, QUEUE_DEPTH of them in flight (as DeepSpeed's aio
        // and NVMe drivers do): one large request at a time leaves the device's queue mostly
        // empty. The requests are of equal size, a multiple of QUEUE_DEPTH of them, so that the
        // lanes end together: 16 MiB pieces and a short remainder left one lane reading alone
        // at the end of every weight unit.
        let pieces = len.div_ceil(REQUEST).next_multiple_of(QUEUE_DEPTH);
        let size = align_up(len.div_ceil(pieces)).max(ALIGN);
        let chunks: Vec<(usize, &mut [u8])> = buf.bytes_mut()[..len]
            .chunks_mut(size)
            .enumerate()
            .collect();
        if chunks.len() <= 1 {
            for (i, c) in chunks {
                self.read_chunk(c, offset + (i * size) as u64)?;
            }
            return Ok(());
        }
        let lanes = QUEUE_DEPTH.min(chunks.len());
        let mut per_lane: Vec<Vec<(usize, &mut [u8])>> = (0..lanes).map(|_| Vec::new()).collect();
        for (n, c) in chunks.into_iter().enumerate() {
            per_lane[n % lanes].push(c);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = per_lane
                .into_iter()
                .map(|lane| {
                    s.spawn(move || -> Result<()> {
                        for (i, c) in lane {
                            self.read_chunk(c, offset + (i * size) as u64)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a read thread panicked")))
            })
        })
    }

    /// Reads exactly `chunk.len()` bytes at `offset` in one request (O_DIRECT: both aligned).
    pub fn read_chunk(&self, chunk: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(chunk, offset)
            .map_err(|e| io_error(e, "reading", &self.path))
    }

    /// Reserves `len` bytes on disk now, so that a full disk fails here, before generation.
    pub fn allocate(&self, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on an open file descriptor we own.
        let r = unsafe {
            libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&self.file), 0, len as i64)
        };
        match r {
            0 => Ok(()),
            // filesystems without fallocate: the writes will tell
            libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
            e => Err(io_error(
                std::io::Error::from_raw_os_error(e),
                "reserving space for",
                &self.path,
            )),
        }
    }
}

fn io_error(e: std::io::Error, what: &str, path: &Path) -> anyhow::Error {
    let hint = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            ": the offload directory's disk is full; free space or pass another --offload-dir"
        }
        _ => "",
    };
    anyhow::Error::new(e).context(format!("{what} offload file {}{hint}", path.display()))
}

/// The offload directory of one run: a private subdirectory of the given directory, created on
/// open and removed (with everything in it) on drop, so a failed run leaves no stray files.
#[derive(Debug)]
pub struct OffloadDir {
    dir: PathBuf,
}

impl OffloadDir {
    /// Checks `parent` (exists, is a writable directory, has `need_bytes` free) and creates the
    /// run's subdirectory in it. Every failure says what to do.
    pub fn open(parent: &Path, need_bytes: u64) -> Result<OffloadDir> {
        ensure!(
            parent.exists(),
            "offload directory {} does not exist: create it or pass another --offload-dir",
            parent.display()
        );
        ensure!(
            parent.is_dir(),
            "offload directory {} is not a directory: pass a directory with --offload-dir",
            parent.display()
        );
        let free = free_bytes(parent)?;
        if need_bytes > free {
            bail!(
                "offload directory {} has {} free, the placement needs {} on disk: \
                 free space, pass another --offload-dir, or move less to disk",
                parent.display(),
                human(free),
                human(need_bytes)
            );
        }
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = parent.join(format!(
            "flexbench-offload-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => {
                    " (it is read-only: pass a writable --offload-dir)"
                }
                _ => "",
            };
            anyhow::Error::new(e).context(format!(
                "creating a subdirectory in offload directory {}{hint}",
                parent.display()
            ))
        })?;
        Ok(OffloadDir { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn file(&self, name: &str) -> Result<DirectFile> {
        DirectFile::create(&self.dir.join(name))
    }
}

impl Drop for OffloadDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!(
                "flexbench-native: warning: could not remove offload files in {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// Bytes for messages: GiB, MiB or KiB.
fn human(b: u64) -> String {
    let f = b as f64;
    if b >= 1 << 30 {
        format!("{:.2} GiB", f / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", f / 1024.0)
    }
}

/// Sequential O_DIRECT read bandwidth over `paths`, read whole in blocks of `block` bytes (as
/// `dd if=FILE of=/dev/null bs=BLOCK iflag=direct`): (bytes, seconds).
pub fn sequential_read(paths: &[PathBuf], block: usize) -> Result<(u64, f64)> {
    let block = align_up(block);
    let mut buf = AlignedBuf::new(block)?;
    let mut total = 0u64;
    let t0 = std::time::Instant::now();
    for p in paths {
        let f = DirectFile::open_read(p)?;
        let len = f.size()? as usize;
        let mut off = 0;
        while off < len {
            let n = align_up(block.min(len - off));
            f.read_at(&mut buf, n, off as u64)?;
            off += n;
            total += n as u64;
        }
    }
    Ok((total, t0.elapsed().as_secs_f64()))
}

/// Reads `span` of `file` in requests of `chunk` bytes, one in flight, on a helper thread, into
/// the buffers of `ring` in turn, and hands each filled one to `consume` (file offset, bytes read,
/// buffer) on this thread while the reader fills the next. Disk time and bytes go to `stats`.
/// An error on either side stops both and is returned.
pub fn read_span_staged(
    file: &DirectFile,
    span: std::ops::Range<usize>,
    chunk: usize,
    ring: &mut [AlignedBuf],
    stats: &Stats,
    mut consume: impl FnMut(usize, usize, &AlignedBuf) -> Result<()>,
) -> Result<()> {
    use std::sync::mpsc::channel;
    ensure!(
        chunk.is_multiple_of(ALIGN) && ring.iter().all(|b| b.len() >= chunk) && !ring.is_empty(),
        "staged reads need a ring of buffers of at least one {chunk}-byte aligned chunk"
    );
    let (free_tx, free_rx) = channel::<&mut AlignedBuf>();
    let (full_tx, full_rx) = channel::<Result<(usize, usize, &mut AlignedBuf)>>();
    for b in ring.iter_mut() {
        free_tx.send(b).expect("the receiver is alive");
    }
    std::thread::scope(|sc| {
        sc.spawn(move || {
            let mut at = span.start;
            while at < span.end {
                // a closed channel: the consumer stopped (an error); stop too
                let Ok(buf) = free_rx.recv() else { return };
                let len = chunk.min(span.end - at);
                let t0 = std::time::Instant::now();
                let r = file.read_chunk(&mut buf.bytes_mut()[..len], at as u64);
                stats.add_disk_busy(t0.elapsed().as_secs_f64());
                let failed = r.is_err();
                if full_tx.send(r.map(|()| (at, len, buf))).is_err() || failed {
                    return;
                }
                stats.moved(Link::DiskRead, len);
                at += len;
            }
        });
        // owned here, so that returning early (an error) closes both channels before the scope
        // waits for the reader, which then stops instead of waiting for a buffer forever
        let (free_tx, full_rx) = (free_tx, full_rx);
        for msg in full_rx.iter() {
            let (at, len, buf) = msg?;
            consume(at, len, buf)?;
            // the reader is gone once it has read the whole span
            let _ = free_tx.send(buf);
        }
        Ok(())
    })
}

/// Bytes available to this user on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("offload directory {} has a NUL in its name", path.display()))?;
    // SAFETY: statvfs fills the struct we pass; c is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(anyhow::Error::new(std::io::Error::last_os_error())).with_context(|| {
            format!(
                "checking free space of offload directory {}",
                path.display()
            )
        });
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_round_trip_and_cleanup() {
        let parent = std::env::temp_dir();
        let dir = OffloadDir::open(&parent, 0).unwrap();
        let sub = dir.path().to_path_buf();
        let f = dir.file("t.bin").unwrap();
        let mut b = AlignedBuf::new(3 * ALIGN).unwrap();
        for (i, x) in b.bytes_mut().iter_mut().enumerate() {
            *x = (i * 7 % 251) as u8;
        }
        f.write_at(&b, 2 * ALIGN, ALIGN as u64).unwrap();
        let mut r = AlignedBuf::new(2 * ALIGN).unwrap();
        f.read_at(&mut r, 2 * ALIGN, ALIGN as u64).unwrap();
        assert_eq!(&r.bytes()[..2 * ALIGN], &b.bytes()[..2 * ALIGN]);
        assert!(
            f.write_at(&b, 100, 0).is_err(),
            "unaligned writes are refused"
        );
        drop(f);
        drop(dir);
        assert!(!sub.exists(), "the run's subdirectory is removed");
    }

    #[test]
    fn staged_reads_deliver_every_chunk_in_order_and_stop_on_errors() {
        let dir = OffloadDir::open(&std::env::temp_dir(), 0).unwrap();
        let f = dir.file("staged.bin").unwrap();
        let mut b = AlignedBuf::new(10 * ALIGN).unwrap();
        for (i, x) in b.bytes_mut().iter_mut().enumerate() {
            *x = (i * 7 % 251) as u8;
        }
        f.write_at(&b, 10 * ALIGN, 0).unwrap();
        let stats = Stats::new();
        let mut ring: Vec<AlignedBuf> = (0..2)
            .map(|_| AlignedBuf::new(3 * ALIGN).unwrap())
            .collect();
        // a span from one page in, ending in a short chunk: 3 + 3 + 2 pages
        let mut got = Vec::new();
        read_span_staged(
            &f,
            ALIGN..9 * ALIGN,
            3 * ALIGN,
            &mut ring,
            &stats,
            |at, len, buf| {
                assert_eq!(at, ALIGN + got.len());
                got.extend_from_slice(&buf.bytes()[..len]);
                Ok(())
            },
        )
        .unwrap();
        assert!(got == b.bytes()[ALIGN..9 * ALIGN]);
        assert_eq!(stats.bytes(Link::DiskRead), 8 * ALIGN as u64);
        // the consumer fails on the second chunk: an error, not a reader waiting forever for a
        // buffer (on a thread of its own, so that a hang fails the test)
        let (tx, rx) = std::sync::mpsc::channel();
        let path = f.path().to_path_buf();
        std::thread::spawn(move || {
            let f = DirectFile::open_read(&path).unwrap();
            let mut ring = vec![AlignedBuf::new(ALIGN).unwrap()];
            let mut calls = 0;
            let r = read_span_staged(
                &f,
                0..10 * ALIGN,
                ALIGN,
                &mut ring,
                &Stats::new(),
                |_, _, _| {
                    calls += 1;
                    anyhow::ensure!(calls < 2, "consumer failed");
                    Ok(())
                },
            );
            tx.send(r.map_err(|e| format!("{e:#}"))).ok();
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a failing consumer must end the read, not leave the reader waiting");
        assert!(r.unwrap_err().contains("consumer failed"));
        // a read past the end of the file fails on the reader's side
        let r = read_span_staged(
            &f,
            0..12 * ALIGN,
            3 * ALIGN,
            &mut ring,
            &stats,
            |_, _, _| Ok(()),
        );
        assert!(r.is_err());
    }

    #[test]
    fn directory_errors_say_what_to_do() {
        let e = OffloadDir::open(Path::new("/nonexistent/flexbench"), 0).unwrap_err();
        assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
        let e = OffloadDir::open(&std::env::temp_dir(), u64::MAX / 2).unwrap_err();
        assert!(format!("{e:#}").contains("free"), "{e:#}");
    }
}

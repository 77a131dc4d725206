//! Storage backends: the one interface through which twinbd touches a node's data disk.
//!
//! A backend serves positional reads and writes, flush, trim and write-zeroes on a regular file
//! or a block device. Two engines implement it:
//!
//! * [`UringBackend`]: io_uring, many requests in flight, completion driven (an eventfd wakes a
//!   reaper task); requests are submitted from the calling task itself, so a request that the
//!   kernel completes inline (a page-cache hit) costs no thread hand-off at all.
//! * [`SyncBackend`]: positional `pread`/`pwrite` on tokio's blocking pool, the portable fallback
//!   used when io_uring is unavailable (old kernel, seccomp, `kernel.io_uring_disabled`).
//!
//! [`open_disk`] probes io_uring once at start-up and logs the engine it chose.
//! A flush (and a FUA write) completes only once the data is durable (`fdatasync`).

mod buf;
mod cached;
pub mod fault;
mod sync;
mod uring;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use buf::IoBuf;
pub use cached::FileRange;
use fault::FaultOp;
pub use fault::{FaultSpec, Faults};
pub use sync::SyncBackend;
pub use uring::UringBackend;

/// Errors of the storage layer. Each carries what an operator needs: the operation, the byte
/// range and the OS error.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open disk {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk {path} is not a regular file or block device")]
    NotADisk { path: PathBuf },
    #[error("disk {path} is in use by another process (another twinbd daemon for it?)")]
    InUse { path: PathBuf },
    #[error("{op} of {len} bytes at offset {offset} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("{op} of {len} bytes at offset {offset} is beyond the end of the disk ({size} bytes)")]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{op} of {len} bytes at offset {offset}: unexpected end of disk after {done} bytes")]
    ShortTransfer {
        op: &'static str,
        offset: u64,
        len: u64,
        done: u64,
    },
    #[error("the storage engine has shut down")]
    Closed,
}

impl StorageError {
    /// The errno that best describes this error to a block-device client.
    pub fn errno(&self) -> i32 {
        match self {
            StorageError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::ENOSPC,
                Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => libc::EPERM,
                _ => libc::EIO,
            },
            StorageError::OutOfRange { .. } => libc::ENOSPC,
            _ => libc::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// The operations every storage engine provides. Offsets and lengths are in bytes; callers
/// keep requests within [`Backend::size`] (the engines check again and refuse otherwise).
pub trait Backend: Send + Sync + 'static {
    /// Short engine name for logs and status ("io_uring", "sync").
    fn engine(&self) -> &'static str;
    /// Usable size in bytes.
    fn size(&self) -> u64;
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = Result<IoBuf>> + Send;
    /// Writes `data` at `offset`; with `fua` the data is durable when this completes.
    fn write(&self, offset: u64, data: IoBuf, fua: bool)
        -> impl Future<Output = Result<()>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    /// Discards a range (a hint: the range may read back as anything until written).
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<()>> + Send;
    /// Makes a range read back as zeroes; `may_trim` allows deallocating it.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> impl Future<Output = Result<()>> + Send;
    /// The range as a file range every page of which is in the page cache now, so that a
    /// reply can send it straight to a socket (a splice) instead of reading it into memory
    /// first; `None` when it is not all cached, or when a read must take the ordinary path
    /// (injected faults, a failed disk read through the peer).
    fn cached_range(&self, _offset: u64, _len: usize) -> Option<FileRange> {
        None
    }
}

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring if the kernel allows it, else the portable fallback.
    Auto,
    Uring,
    Sync,
}

impl EngineChoice {
    /// Reads `TWINBD_IO_ENGINE`: unset or empty means `Auto`; a value other than `auto`,
    /// `uring` (or `io_uring`) and `sync` is refused, so a typo never goes unnoticed.
    pub fn from_env() -> std::result::Result<EngineChoice, String> {
        let raw = std::env::var_os("TWINBD_IO_ENGINE");
        // A value that is not UTF-8 names no engine either: it is refused like any other.
        EngineChoice::parse(raw.as_ref().map(|v| v.to_string_lossy()).as_deref())
    }

    fn parse(v: Option<&str>) -> std::result::Result<EngineChoice, String> {
        match v {
            None | Some("") | Some("auto") => Ok(EngineChoice::Auto),
            Some("uring") | Some("io_uring") => Ok(EngineChoice::Uring),
            Some("sync") => Ok(EngineChoice::Sync),
            Some(other) => Err(format!(
                "TWINBD_IO_ENGINE={other:?} is not an IO engine: use auto, uring or sync"
            )),
        }
    }
}

/// The engine chosen at start-up.
pub enum Engine {
    Uring(UringBackend),
    Sync(SyncBackend),
}

/// A data disk: its engine, and, in tests, injected faults.
pub struct Disk {
    engine: Engine,
    faults: Option<Faults>,
}

impl Disk {
    /// Makes this disk fail as `spec` says (tests only).
    pub fn with_faults(mut self, spec: FaultSpec) -> Disk {
        tracing::warn!(faults = %spec, "fault injection enabled on the data disk (testing only)");
        self.faults = Some(Faults::new(spec));
        self
    }

    /// Allocates every block of a disk that is a regular file (its usable part; data already
    /// there is kept), so that a copy over the whole disk, such as a full resync, does not
    /// pay the filesystem's block allocation write by write. Blocking. Returns `false` for a
    /// block device or a filesystem that cannot preallocate.
    pub fn preallocate_blocking(&self) -> Result<bool> {
        let disk = self.disk_file();
        if disk.is_block || disk.size == 0 {
            return Ok(false);
        }
        match fallocate(&disk.file, 0, 0, disk.size) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => Ok(false),
            Err(source) => Err(StorageError::Io {
                op: "preallocate",
                offset: 0,
                len: disk.size,
                source,
            }),
        }
    }

    /// Writes bulk data that is not part of the application's working set (what a resync
    /// copies): with direct IO where the disk allows it and the range is aligned, so that it
    /// neither evicts the page cache nor pays for filling it, else as a plain write. Not
    /// durable before the next flush, like any write without FUA.
    ///
    /// Why: a full resync into a fresh target allocates a page-cache page for every block,
    /// then writes them all back; on this VM that ran at 300-400 MB/s where the same disk
    /// takes direct writes at 2.5 GB/s (`docs/benchmarks.md`, "Resync throughput"). The
    /// kernel keeps the two paths coherent: a direct write first writes back dirty cached
    /// pages of its range and drops the cached ones after; callers must not write the same
    /// range concurrently by another path (resync writes hold a range ticket).
    pub async fn write_bulk(&self, offset: u64, data: IoBuf) -> Result<()> {
        let disk = Arc::clone(self.disk_file());
        let len = data.len() as u64;
        let Some(direct) = disk.direct.clone().filter(|_| direct_aligned(offset, len)) else {
            return self.write(offset, data, false).await;
        };
        self.check(FaultOp::Write, "write", offset, len).await?;
        disk.check_range("write", offset, len)?;
        tokio::task::spawn_blocking(move || {
            write_direct_blocking(&direct, &disk.file, offset, &data)
        })
        .await
        .map_err(|_| StorageError::Closed)?
    }

    /// Reads bulk data (what a resync copies): with direct IO where the disk allows it, the
    /// range is aligned and none of it is in the page cache; else as a plain read. Data
    /// written recently (what a bitmap resync mostly copies) is still cached, often dirty:
    /// copying it from the cache is cheaper than writing it back and reading it from the disk,
    /// which is what a direct read of it would have to do to return the latest data.
    pub async fn read_bulk(&self, offset: u64, len: usize) -> Result<IoBuf> {
        let disk = Arc::clone(self.disk_file());
        let Some(direct) = disk.direct.clone().filter(|_| {
            direct_aligned(offset, len as u64) && cached::none_cached(&disk.file, offset, len)
        }) else {
            return self.read(offset, len).await;
        };
        self.check(FaultOp::Read, "read", offset, len as u64)
            .await?;
        disk.check_range("read", offset, len as u64)?;
        tokio::task::spawn_blocking(move || read_direct_blocking(&direct, &disk.file, offset, len))
            .await
            .map_err(|_| StorageError::Closed)?
    }

    /// Whether `write_bulk` and `read_bulk` bypass the page cache on this disk.
    #[cfg(test)]
    pub(crate) fn has_direct_io(&self) -> bool {
        self.disk_file().direct.is_some()
    }

    fn disk_file(&self) -> &Arc<DiskFile> {
        match &self.engine {
            Engine::Uring(b) => b.disk_file(),
            Engine::Sync(b) => b.disk_file(),
        }
    }

    /// An injected fault for this operation, if any: `EIO`, or (mode `hang`) no answer ever.
    async fn check(&self, kind: FaultOp, op: &'static str, offset: u64, len: u64) -> Result<()> {
        match &self.faults {
            Some(f) if f.fails(kind, offset, len) => {
                if f.hangs() {
                    std::future::pending::<()>().await;
                }
                Err(StorageError::Io {
                    op,
                    offset,
                    len,
                    source: io::Error::from_raw_os_error(libc::EIO),
                })
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Disk({}, {} bytes)", self.engine(), self.size())
    }
}

/// Opens `path` as a data disk exposing its first `limit` bytes (`None`: the whole disk).
/// Must be called inside a tokio runtime (the io_uring engine spawns its completion reaper).
pub fn open_disk(path: &Path, limit: Option<u64>, choice: EngineChoice) -> Result<Disk> {
    let file = DiskFile::open(path, limit)?;
    let engine = match choice {
        EngineChoice::Sync => {
            tracing::info!(disk = %path.display(), "storage engine: sync (positional IO), as requested");
            Engine::Sync(SyncBackend::new(file))
        }
        EngineChoice::Uring => Engine::Uring(UringBackend::new(file)?),
        EngineChoice::Auto => match UringBackend::probe() {
            Ok(()) => {
                tracing::info!(disk = %path.display(), "storage engine: io_uring");
                Engine::Uring(UringBackend::new(file)?)
            }
            Err(e) => {
                tracing::warn!(disk = %path.display(), error = %e,
                    "io_uring unavailable; storage engine: sync (positional IO) fallback");
                Engine::Sync(SyncBackend::new(file))
            }
        },
    };
    Ok(Disk {
        engine,
        faults: None,
    })
}

impl Backend for Disk {
    fn engine(&self) -> &'static str {
        match &self.engine {
            Engine::Uring(b) => b.engine(),
            Engine::Sync(b) => b.engine(),
        }
    }
    fn size(&self) -> u64 {
        match &self.engine {
            Engine::Uring(b) => b.size(),
            Engine::Sync(b) => b.size(),
        }
    }
    async fn read(&self, offset: u64, len: usize) -> Result<IoBuf> {
        self.check(FaultOp::Read, "read", offset, len as u64)
            .await?;
        match &self.engine {
            Engine::Uring(b) => b.read(offset, len).await,
            Engine::Sync(b) => b.read(offset, len).await,
        }
    }
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<()> {
        self.check(FaultOp::Write, "write", offset, data.len() as u64)
            .await?;
        match &self.engine {
            Engine::Uring(b) => b.write(offset, data, fua).await,
            Engine::Sync(b) => b.write(offset, data, fua).await,
        }
    }
    async fn flush(&self) -> Result<()> {
        self.check(FaultOp::Flush, "flush", 0, 0).await?;
        match &self.engine {
            Engine::Uring(b) => b.flush().await,
            Engine::Sync(b) => b.flush().await,
        }
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check(FaultOp::Write, "trim", offset, len).await?;
        match &self.engine {
            Engine::Uring(b) => b.trim(offset, len).await,
            Engine::Sync(b) => b.trim(offset, len).await,
        }
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.check(FaultOp::Write, "write_zeroes", offset, len)
            .await?;
        match &self.engine {
            Engine::Uring(b) => b.write_zeroes(offset, len, may_trim).await,
            Engine::Sync(b) => b.write_zeroes(offset, len, may_trim).await,
        }
    }
    fn cached_range(&self, offset: u64, len: usize) -> Option<FileRange> {
        // Injected faults apply to reads, which a range sent from the cache would bypass.
        if self.faults.is_some() {
            return None;
        }
        let disk = self.disk_file();
        disk.check_range("read", offset, len as u64).ok()?;
        cached::resident(&disk.file, offset, len).then(|| FileRange {
            file: Arc::clone(&disk.file),
            offset,
            len,
        })
    }
}

/// An open data disk: the file, whether it is a block device, and the usable size.
#[derive(Debug)]
pub struct DiskFile {
    pub file: Arc<File>,
    /// The same disk opened for direct IO (bypassing the page cache), where the filesystem
    /// allows it; used for bulk copies only (`Disk::write_bulk`).
    pub direct: Option<Arc<File>>,
    pub path: PathBuf,
    pub is_block: bool,
    pub size: u64,
}

impl DiskFile {
    pub fn open(path: &Path, limit: Option<u64>) -> Result<DiskFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| StorageError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        lock_exclusive(&file, path)?;
        let md = file.metadata().map_err(|source| StorageError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let ft = md.file_type();
        let (is_block, raw_size) = if ft.is_block_device() {
            (
                true,
                block_device_size(&file).map_err(|source| StorageError::Open {
                    path: path.to_path_buf(),
                    source,
                })?,
            )
        } else if ft.is_file() {
            (false, md.len())
        } else {
            return Err(StorageError::NotADisk {
                path: path.to_path_buf(),
            });
        };
        let size = limit.map_or(raw_size, |l| l.min(raw_size));
        // No flock on this one: the lock taken above covers the disk while `file` is open.
        let direct = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::info!(disk = %path.display(), error = %e,
                    "direct IO unavailable: resync data goes through the page cache");
                None
            }
        };
        Ok(DiskFile {
            file: Arc::new(file),
            direct,
            path: path.to_path_buf(),
            is_block,
            size,
        })
    }

    /// Checks that `[offset, offset+len)` lies within the disk.
    pub fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(StorageError::OutOfRange {
                op,
                offset,
                len,
                size: self.size,
            }),
        }
    }
}

/// Offset, length and memory alignment of direct reads and writes: the largest logical
/// block size of common disks, so it suits any of them.
const DIRECT_ALIGN: u64 = 4096;

fn direct_aligned(offset: u64, len: u64) -> bool {
    offset % DIRECT_ALIGN == 0 && len % DIRECT_ALIGN == 0 && len > 0
}

/// A buffer of `len` bytes at an address aligned for direct IO: a window into a pooled
/// buffer one alignment larger (a payload received from the network, or a buffer from the
/// pool, sits at whatever address the allocator gave).
fn aligned_window(buf: &mut IoBuf, len: usize) -> &mut [u8] {
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN as usize);
    &mut buf[start..start + len]
}

/// Writes `data` at `offset` through `direct` (the disk opened with `O_DIRECT`) from an
/// aligned copy of it; through `cached` (the same disk) if the disk refuses the alignment.
fn write_direct_blocking(direct: &File, cached: &File, offset: u64, data: &[u8]) -> Result<()> {
    let io_err = |source: io::Error| StorageError::Io {
        op: "write",
        offset,
        len: data.len() as u64,
        source,
    };
    let mut bounce = IoBuf::with_len(data.len() + DIRECT_ALIGN as usize);
    let aligned = aligned_window(&mut bounce, data.len());
    aligned.copy_from_slice(data);
    match direct.write_all_at(aligned, offset) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!(error = %e, offset, "direct write refused; writing through the page cache");
            cached.write_all_at(data, offset).map_err(io_err)
        }
        r => r.map_err(io_err),
    }
}

/// Reads `len` bytes at `offset` through `direct` into an aligned buffer, then into one of
/// the exact length; through `cached` if the disk refuses the alignment.
fn read_direct_blocking(direct: &File, cached: &File, offset: u64, len: usize) -> Result<IoBuf> {
    let io_err = |source: io::Error| StorageError::Io {
        op: "read",
        offset,
        len: len as u64,
        source,
    };
    let mut out = IoBuf::with_len(len);
    let mut bounce = IoBuf::with_len(len + DIRECT_ALIGN as usize);
    let aligned = aligned_window(&mut bounce, len);
    match direct.read_exact_at(aligned, offset) {
        Ok(()) => out.copy_from_slice(aligned),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!(error = %e, offset, "direct read refused; reading through the page cache");
            cached.read_exact_at(&mut out, offset).map_err(io_err)?;
        }
        Err(e) => return Err(io_err(e)),
    }
    Ok(out)
}

/// Takes an exclusive advisory lock on the disk for as long as `file` stays open, so two
/// daemons (or `create-md` and a running daemon) can never work on the same disk.
fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(StorageError::InUse {
            path: path.to_path_buf(),
        });
    }
    Err(StorageError::Open {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Size of the disk at `path` (regular file length or block device size), and the disk itself.
/// The disk stays locked while the returned `DiskFile` lives.
pub fn disk_size(path: &Path) -> Result<(u64, DiskFile)> {
    DiskFile::open(path, None).map(|d| (d.size, d))
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// Blocking trim of a range: BLKDISCARD on block devices, hole punching on files.
/// Filesystems that cannot punch holes make trim a no-op (trim is advisory).
pub(crate) fn trim_blocking(disk: &DiskFile, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let res = if disk.is_block {
        let range = [offset, len];
        // SAFETY: BLKDISCARD reads a [u64; 2] through the pointer, valid for the call.
        unsafe { blkdiscard(disk.file.as_raw_fd(), &range) }
            .map(|_| ())
            .map_err(io::Error::from)
    } else {
        fallocate(
            &disk.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) if unsupported(&e) => Ok(()),
        Err(source) => Err(StorageError::Io {
            op: "trim",
            offset,
            len,
            source,
        }),
    }
}

/// Blocking write-zeroes: BLKZEROOUT / fallocate, falling back to writing zero buffers.
pub(crate) fn write_zeroes_blocking(
    disk: &DiskFile,
    offset: u64,
    len: u64,
    may_trim: bool,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let res = if disk.is_block {
        let range = [offset, len];
        // SAFETY: BLKZEROOUT reads a [u64; 2] through the pointer, valid for the call.
        unsafe { blkzeroout(disk.file.as_raw_fd(), &range) }
            .map(|_| ())
            .map_err(io::Error::from)
    } else {
        let mode = if may_trim {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        fallocate(&disk.file, mode, offset, len)
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) if unsupported(&e) => write_zero_buffers(disk, offset, len),
        Err(source) => Err(StorageError::Io {
            op: "write_zeroes",
            offset,
            len,
            source,
        }),
    }
}

fn write_zero_buffers(disk: &DiskFile, offset: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        disk.file
            .write_all_at(&zeroes[..n], offset + done)
            .map_err(|source| StorageError::Io {
                op: "write_zeroes",
                offset: offset + done,
                len: n as u64,
                source,
            })?;
        done += n as u64;
    }
    Ok(())
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: plain syscall on an fd we own; no pointers involved.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

#[cfg(test)]
mod tests;

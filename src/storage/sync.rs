//! The portable engine: positional reads and writes run on tokio's blocking thread pool.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::{trim_blocking, write_zeroes_blocking, Backend, DiskFile, IoBuf, Result, StorageError};

/// Positional IO (`pread`/`pwrite`/`fdatasync`) on the blocking pool.
pub struct SyncBackend {
    disk: Arc<DiskFile>,
}

impl SyncBackend {
    pub(crate) fn disk_file(&self) -> &Arc<DiskFile> {
        &self.disk
    }

    pub fn new(disk: DiskFile) -> SyncBackend {
        SyncBackend {
            disk: Arc::new(disk),
        }
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&DiskFile) -> Result<T> + Send + 'static,
    {
        let disk = Arc::clone(&self.disk);
        tokio::task::spawn_blocking(move || f(&disk))
            .await
            .map_err(|_| StorageError::Closed)?
    }
}

impl Backend for SyncBackend {
    fn engine(&self) -> &'static str {
        "sync"
    }

    fn size(&self) -> u64 {
        self.disk.size
    }

    async fn read(&self, offset: u64, len: usize) -> Result<IoBuf> {
        self.disk.check_range("read", offset, len as u64)?;
        self.blocking(move |d| {
            let mut buf = IoBuf::with_len(len);
            d.file
                .read_exact_at(&mut buf, offset)
                .map_err(|source| StorageError::Io {
                    op: "read",
                    offset,
                    len: len as u64,
                    source,
                })?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<()> {
        self.disk.check_range("write", offset, data.len() as u64)?;
        self.blocking(move |d| {
            let len = data.len() as u64;
            d.file
                .write_all_at(&data, offset)
                .map_err(|source| StorageError::Io {
                    op: "write",
                    offset,
                    len,
                    source,
                })?;
            if fua {
                d.file.sync_data().map_err(|source| StorageError::Io {
                    op: "fua flush",
                    offset,
                    len,
                    source,
                })?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.blocking(|d| {
            d.file.sync_data().map_err(|source| StorageError::Io {
                op: "flush",
                offset: 0,
                len: d.size,
                source,
            })
        })
        .await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.disk.check_range("trim", offset, len)?;
        self.blocking(move |d| trim_blocking(d, offset, len)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.disk.check_range("write_zeroes", offset, len)?;
        self.blocking(move |d| write_zeroes_blocking(d, offset, len, may_trim))
            .await
    }
}

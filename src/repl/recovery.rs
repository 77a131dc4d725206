//! Split-brain recovery files.
//!
//! A node that loses a split-brain resolution is overwritten by the winner's data. Before any
//! block is overwritten, its current contents are appended to a recovery file beside the
//! node's metadata, so nothing the losing side wrote is beyond an operator's reach.
//! `twinbd recovery FILE` lists a file and `--apply PATH` writes its blocks back into a disk
//! or image (typically a copy of the device, to inspect or merge the lost changes).
//!
//! ```text
//! file header (64 bytes): magic "TWINBDRC" | version u32 = 1 | header crc32c u32 (over the
//!   header with this field zero) | device size u64 | created ms u64 | resource (16 bytes,
//!   NUL padded) | node (16 bytes, NUL padded)
//! record: magic u32 "TBRR" | crc32c u32 (over offset, len and data) | offset u64 | len u32 |
//!   data (len bytes)
//! ```
//! All integers little-endian. A torn last record (a crash while appending) is reported and
//! ignored; every earlier record is intact.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::bitmap::Bitmap;

const MAGIC: &[u8; 8] = b"TWINBDRC";
const RECORD_MAGIC: u32 = 0x5242_5254; // "TBRR"
const HEADER_LEN: usize = 64;
const RECORD_HEADER_LEN: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("recovery file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("recovery file {path}: {reason}")]
    Bad { path: PathBuf, reason: String },
}

/// Appends the blocks a resolution is about to overwrite.
pub struct RecoveryWriter {
    path: PathBuf,
    file: File,
    /// Chunks already saved (each is saved once, before its first overwrite).
    saved: Bitmap,
    records: u64,
}

fn name16(s: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = s.len().min(16);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b
}

impl RecoveryWriter {
    /// Creates `<dir>/<resource>-<node>-splitbrain-<ms>.recovery`.
    pub fn create(
        dir: &Path,
        resource: &str,
        node: &str,
        size: u64,
        granularity: u32,
    ) -> Result<RecoveryWriter, RecoveryError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let path = dir.join(format!("{resource}-{node}-splitbrain-{now}.recovery"));
        let io = |source| RecoveryError::Io {
            path: path.clone(),
            source,
        };
        // The directory may not exist yet (the default one, on a node with internal metadata).
        // The file holds a copy of disk data: readable by its owner only, like the disk.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let mut file = OpenOptions::new()
            .mode(0o600)
            .create_new(true)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(io)?;
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[16..24].copy_from_slice(&size.to_le_bytes());
        h[24..32].copy_from_slice(&now.to_le_bytes());
        h[32..48].copy_from_slice(&name16(resource));
        h[48..64].copy_from_slice(&name16(node));
        let crc = crc32c::crc32c(&h);
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        file.write_all(&h).map_err(io)?;
        file.sync_all().map_err(io)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(RecoveryWriter {
            saved: Bitmap::new(size, granularity),
            path,
            file,
            records: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// The chunk-aligned ranges within `[offset, offset+len)` not saved yet; marks them saved.
    pub fn claim(&mut self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let g = u64::from(self.saved.granularity());
        let size = self.saved.device_size();
        let start = offset / g * g;
        let end = offset
            .saturating_add(len)
            .div_ceil(g)
            .saturating_mul(g)
            .min(size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = start;
        while at < end {
            let n = g.min(end - at);
            if !self.saved.is_dirty(at, n) {
                self.saved.set_range(at, n);
                match out.last_mut() {
                    Some((o, l)) if *o + *l == at => *l += n,
                    _ => out.push((at, n)),
                }
            }
            at += n;
        }
        out
    }

    /// Appends one block's old contents and makes it durable.
    pub fn append(&mut self, offset: u64, data: &[u8]) -> Result<(), RecoveryError> {
        let mut rec = Vec::with_capacity(RECORD_HEADER_LEN + data.len());
        rec.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        rec.extend_from_slice(&[0u8; 4]);
        rec.extend_from_slice(&offset.to_le_bytes());
        rec.extend_from_slice(&(data.len() as u32).to_le_bytes());
        rec.extend_from_slice(data);
        let crc = crc32c::crc32c(&rec[8..]);
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        let io = |source| RecoveryError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.seek(SeekFrom::End(0)).map_err(io)?;
        self.file.write_all(&rec).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.records += 1;
        Ok(())
    }
}

/// One saved block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What a recovery file holds.
#[derive(Debug)]
pub struct Contents {
    pub size: u64,
    pub created_ms: u64,
    pub resource: String,
    pub node: String,
    pub records: Vec<Record>,
    /// Set when the file ends in a torn record (a crash while saving); it is ignored.
    pub torn_tail: bool,
}

fn str16(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches('\0')
        .to_string()
}

/// Reads and checks a recovery file.
pub fn read(path: &Path) -> Result<Contents, RecoveryError> {
    let bad = |reason: String| RecoveryError::Bad {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = File::open(path).map_err(|source| RecoveryError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut all = Vec::new();
    f.read_to_end(&mut all)
        .map_err(|source| RecoveryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if all.len() < HEADER_LEN || &all[0..8] != MAGIC {
        return Err(bad("not a twinbd recovery file".into()));
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&all[..HEADER_LEN]);
    let stored = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    h[12..16].fill(0);
    if crc32c::crc32c(&h) != stored {
        return Err(bad("header checksum mismatch".into()));
    }
    let u64at = |b: &[u8], at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    };
    let size = u64at(&all, 16);
    let mut c = Contents {
        size,
        created_ms: u64at(&all, 24),
        resource: str16(&all[32..48]),
        node: str16(&all[48..64]),
        records: Vec::new(),
        torn_tail: false,
    };
    let mut at = HEADER_LEN;
    while at < all.len() {
        let rest = &all[at..];
        if rest.len() < RECORD_HEADER_LEN {
            c.torn_tail = true;
            break;
        }
        let magic = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let offset = u64at(rest, 8);
        let len = u32::from_le_bytes([rest[16], rest[17], rest[18], rest[19]]) as usize;
        if magic != RECORD_MAGIC {
            return Err(bad(format!("bad record magic at byte {at}")));
        }
        if rest.len() < RECORD_HEADER_LEN + len {
            c.torn_tail = true;
            break;
        }
        if crc32c::crc32c(&rest[8..RECORD_HEADER_LEN + len]) != crc {
            if at + RECORD_HEADER_LEN + len == all.len() {
                c.torn_tail = true;
                break;
            }
            return Err(bad(format!("record at byte {at} fails its checksum")));
        }
        if offset.checked_add(len as u64).is_none_or(|e| e > size) {
            return Err(bad(format!("record at byte {at} lies beyond the device")));
        }
        c.records.push(Record {
            offset,
            data: rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len].to_vec(),
        });
        at += RECORD_HEADER_LEN + len;
    }
    Ok(c)
}

/// Writes every saved block back into `target` (a disk, or an image file of the device).
pub fn apply(c: &Contents, target: &Path) -> Result<u64, RecoveryError> {
    let f = OpenOptions::new()
        .write(true)
        .open(target)
        .map_err(|source| RecoveryError::Io {
            path: target.to_path_buf(),
            source,
        })?;
    let mut bytes = 0;
    for r in &c.records {
        f.write_all_at(&r.data, r.offset)
            .map_err(|source| RecoveryError::Io {
                path: target.to_path_buf(),
                source,
            })?;
        bytes += r.data.len() as u64;
    }
    f.sync_all().map_err(|source| RecoveryError::Io {
        path: target.to_path_buf(),
        source,
    })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_each_block_once_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w =
            RecoveryWriter::create(dir.path(), "r0", "beta", 1 << 20, 4096).expect("create");
        assert_eq!(w.claim(100, 5000), vec![(0, 8192)]);
        assert_eq!(w.claim(4096, 8192), vec![(8192, 4096)]);
        assert!(w.claim(0, 12288).is_empty());
        w.append(0, &[1u8; 8192]).expect("append");
        w.append(8192, &[2u8; 4096]).expect("append");
        let path = w.path().to_path_buf();
        drop(w);
        let c = read(&path).expect("read");
        assert_eq!(
            (c.resource.as_str(), c.node.as_str(), c.size),
            ("r0", "beta", 1 << 20)
        );
        assert_eq!(c.records.len(), 2);
        assert_eq!(
            c.records[1],
            Record {
                offset: 8192,
                data: vec![2u8; 4096]
            }
        );
        assert!(!c.torn_tail);

        // A torn tail is detected and ignored; earlier records survive.
        let mut raw = std::fs::read(&path).expect("raw");
        raw.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        raw.extend_from_slice(&[0u8; 9]);
        std::fs::write(&path, &raw).expect("write");
        let c = read(&path).expect("read torn");
        assert!(c.torn_tail);
        assert_eq!(c.records.len(), 2);

        // A flipped bit in an earlier record is an error, not silently applied.
        let mut bad = raw.clone();
        bad[HEADER_LEN + RECORD_HEADER_LEN + 5] ^= 1;
        std::fs::write(&path, &bad).expect("write");
        assert!(read(&path).is_err());

        // Apply writes the blocks back.
        std::fs::write(&path, &raw).expect("write");
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 1 << 20]).expect("img");
        let c = read(&path).expect("read");
        assert_eq!(apply(&c, &img).expect("apply"), 12288);
        let back = std::fs::read(&img).expect("img");
        assert!(back[..8192].iter().all(|&b| b == 1));
        assert!(back[8192..12288].iter().all(|&b| b == 2));
    }
}

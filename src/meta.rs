//! On-disk metadata of one node's backing disk and its crash-safe store.
//!
//! # Metadata area
//!
//! All offsets are relative to the start of the *metadata area*; every
//! integer is little endian.
//!
//! ```text
//!   0      4096   superblock slot A
//!   4096   4096   superblock slot B
//!   8192   N*4096 bitmap pages 0..N (N = Superblock::bitmap_pages())
//! ```
//!
//! Superblock updates alternate between the two slots: an update is written
//! in full to the slot that is *not* active, made durable, and only then
//! becomes the active one. Each slot carries a sequence number and a CRC32C,
//! so on open the valid slot with the highest sequence number wins, and an
//! update torn by a crash (its slot fails the CRC) simply never committed.
//! `create` writes identical contents to both slots (A with seq 1, B with
//! seq 2), so a fresh area always has two valid slots.
//!
//! # Where the area lives
//!
//! * [`MetaLocation::External`]: a file (or block device) of its own; the area
//!   starts at offset 0 and the whole data disk is exported.
//! * [`MetaLocation::Internal`]: at the end of the data disk. See
//!   [`internal_layout`]:
//!
//! ```text
//!   0 .. data_size                 exported data (4 KiB aligned size)
//!   data_size .. +area_len         metadata area (meta_offset == data_size)
//!   .. (unused padding, < a few pages)
//!   L .. L+4096                    locator, L = disk_size rounded down to
//!                                  4 KiB, minus 4096
//! ```
//!
//! The locator, written once at create time, records where the area starts,
//! because that depends on the granularity chosen at create time. If it is
//! damaged, open falls back to probing every supported granularity.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use rand::Rng;

use crate::bitmap::{
    self, Bitmap, BitmapError, MAX_GRANULARITY, MIN_GRANULARITY, PAGE_HEADER_SIZE, WORDS_PER_PAGE,
};

/// Magic at the start of each superblock slot.
pub const MAGIC: [u8; 8] = *b"TWINBDMD";
/// Magic at the start of the internal-metadata locator block.
pub const LOCATOR_MAGIC: [u8; 8] = *b"TWINBDLO";
/// Metadata format version written and understood by this build.
///
/// The magic, version and CRC fields (offsets 0, 8, 12) and the CRC rule are
/// fixed for all format versions, so a slot is always checksummed before its
/// version is looked at.
pub const FORMAT_VERSION: u32 = 1;
/// Size of one superblock slot.
pub const SLOT_SIZE: usize = 4096;
/// Offset of the first bitmap page relative to the area start.
pub const BITMAP_OFFSET: u64 = 2 * SLOT_SIZE as u64;
/// Size of one bitmap page.
pub const PAGE_SIZE: u64 = bitmap::PAGE_SIZE as u64;
/// Size of the locator block used by internal metadata.
pub const LOCATOR_SIZE: u64 = 4096;
/// Maximum length in bytes of a resource or node name.
pub const MAX_NAME_LEN: usize = 63;

/// Number of bitmap pages written per IO request.
const PAGES_PER_IO: usize = 256;

/// Superblock field offsets (see the layout on [`Superblock`]).
mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const CRC: usize = 12;
    pub const SEQ: usize = 16;
    pub const NODE_ID: usize = 24;
    pub const PEER_NODE_ID: usize = 32;
    pub const DATA_SIZE: usize = 40;
    pub const GRANULARITY: usize = 48;
    pub const FLAGS: usize = 52;
    pub const DISK_STATE: usize = 56;
    pub const GEN_CURRENT: usize = 64;
    pub const GEN_BITMAP: usize = 72;
    pub const GEN_HISTORY: usize = 80;
    pub const BITMAP_OFFSET: usize = 96;
    pub const BITMAP_PAGES: usize = 104;
    pub const PROMOTED_AT: usize = 112;
    pub const ACTIVITY_COUNT: usize = 256;
    pub const ACTIVITY: usize = 264;
    pub const RESOURCE: usize = 128;
    pub const NODE: usize = 192;
}

/// Where a node keeps its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// A dedicated file or block device holding only metadata.
    External(PathBuf),
    /// At the end of the data disk itself; the exported size shrinks.
    Internal {
        /// The data disk (regular file or block device).
        disk: PathBuf,
    },
}

impl MetaLocation {
    /// The file that holds the metadata area.
    pub fn path(&self) -> &Path {
        match self {
            MetaLocation::External(p) => p,
            MetaLocation::Internal { disk } => disk,
        }
    }
}

/// Formats a path for error messages.
fn show(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        "device".to_string()
    } else {
        path.display().to_string()
    }
}

/// Errors of the metadata store. Every variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// An IO system call failed.
    #[error("{}: {op} failed: {source}", show(.path))]
    Io {
        /// File the operation was on.
        path: PathBuf,
        /// What was being done, e.g. "write superblock".
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The location holds no twinbd metadata at all.
    #[error("{}: no twinbd metadata found ({detail}); create the metadata first", show(.path))]
    NoMetadata {
        /// File that was examined.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// Metadata is present but unusable.
    #[error("{}: twinbd metadata is corrupt: {reason}", show(.path))]
    Corrupt {
        /// File that was examined.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// `create` found something it would overwrite.
    #[error("{}: {found}; refusing to overwrite it (use --force to create new metadata anyway)", show(.path))]
    Exists {
        /// File that was examined.
        path: PathBuf,
        /// What is there.
        found: String,
    },
    /// The metadata belongs to something else than expected.
    #[error("{}: metadata belongs to {field} {found:?}, but {expected:?} was expected", show(.path))]
    Mismatch {
        /// File that was examined.
        path: PathBuf,
        /// Which identity field differs ("resource", "node").
        field: &'static str,
        /// Value the caller expected.
        expected: String,
        /// Value found in the metadata.
        found: String,
    },
    /// The device cannot hold the metadata (and some data).
    #[error("{}: {size} bytes is too small, at least {needed} bytes are needed", show(.path))]
    TooSmall {
        /// File that was examined (empty if unknown).
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The minimum size required.
        needed: u64,
    },
    /// A resource or node name cannot be stored.
    #[error("invalid {field} name {name:?}: {reason}")]
    InvalidName {
        /// "resource" or "node".
        field: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Unsupported bitmap granularity.
    #[error("invalid bitmap granularity {0}: must be a power of two between {MIN_GRANULARITY} and {MAX_GRANULARITY}")]
    InvalidGranularity(u32),
    /// A request that the metadata cannot satisfy (e.g. changing the size).
    #[error("{}: {reason}", show(.path))]
    Invalid {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> MetaError + 'a {
    move |source| MetaError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Why a superblock slot or locator block was rejected (pure decoding, no path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer is not one block long.
    #[error("block is {0} bytes long, expected 4096")]
    BadLength(usize),
    /// The magic does not match: this is not twinbd metadata.
    #[error("bad magic (no twinbd metadata)")]
    BadMagic,
    /// The checksum does not match: torn write or corruption.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc {
        /// CRC stored in the block.
        stored: u32,
        /// CRC computed over the block.
        computed: u32,
    },
    /// Written by a newer (or unknown) format version.
    #[error(
        "unsupported metadata format version {0} (this build supports version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    /// The checksum is fine but a field holds an impossible value.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        field,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// Small value types
// ---------------------------------------------------------------------------

/// A resource or node name: 1..=63 bytes of UTF-8 without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name(String);

impl Name {
    /// Validates `name`; `field` ("resource" / "node") is used in the error.
    pub fn new(field: &'static str, name: &str) -> Result<Name, MetaError> {
        match name_problem(name) {
            Some(reason) => Err(MetaError::InvalidName {
                field,
                name: name.to_string(),
                reason,
            }),
            None => Ok(Name(name.to_string())),
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why `name` is not a valid [`Name`], if it is not.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 63 bytes")
    } else if name.chars().any(char::is_control) {
        Some("it contains control characters")
    } else {
        None
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// State of the local data image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DiskState {
    /// Not a usable image (fresh, or a resync target in progress).
    Inconsistent = 0,
    /// A consistent image known to be older than the peer's.
    Outdated = 1,
    /// A consistent, current image.
    UpToDate = 2,
}

impl DiskState {
    /// Decodes the on-disk byte.
    pub fn from_u8(v: u8) -> Option<DiskState> {
        match v {
            0 => Some(DiskState::Inconsistent),
            1 => Some(DiskState::Outdated),
            2 => Some(DiskState::UpToDate),
            _ => None,
        }
    }
}

impl fmt::Display for DiskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskState::Inconsistent => "inconsistent",
            DiskState::Outdated => "outdated",
            DiskState::UpToDate => "up-to-date",
        })
    }
}

/// Superblock flag bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u32);

impl Flags {
    /// The node was primary when this superblock was written; set on promote
    /// and cleared on a clean demote (still set after a crash as primary).
    pub const WAS_PRIMARY: Flags = Flags(1);
    /// The peer needs a full resync (the bitmap is not sufficient).
    pub const PEER_OUT_OF_SYNC_FULL: Flags = Flags(1 << 1);
    /// The daemon shut down cleanly after writing this superblock.
    pub const CLEAN_SHUTDOWN: Flags = Flags(1 << 2);
    const KNOWN: u32 = 0b111;

    /// No flags set.
    pub const fn empty() -> Flags {
        Flags(0)
    }

    /// Raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Flags from raw bits; `None` if an unknown bit is set.
    pub const fn from_bits(bits: u32) -> Option<Flags> {
        if bits & !Self::KNOWN == 0 {
            Some(Flags(bits))
        } else {
            None
        }
    }

    /// True if all bits of `other` are set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets or clears the bits of `other`.
    pub fn set(&mut self, other: Flags, on: bool) {
        if on {
            self.0 |= other.0;
        } else {
            self.0 &= !other.0;
        }
    }

    /// Sets the bits of `other`.
    pub fn insert(&mut self, other: Flags) {
        self.set(other, true);
    }

    /// Clears the bits of `other`.
    pub fn remove(&mut self, other: Flags) {
        self.set(other, false);
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// Data generation identifiers (0 = none).
///
/// A generation identifier names one lineage of the data image:
///
/// * `current` — the generation of the local data now. It is replaced by a
///   fresh random value (see [`Superblock::new_current_generation`]) whenever
///   the data starts to diverge from what the peer may hold, e.g. when a
///   primary begins writing without a connected peer. 0 means "no data yet".
/// * `bitmap` — while the dirty bitmap tracks changes not yet on the peer, the
///   generation the peer was at when tracking began (0 if the bitmap is
///   unused). Changes since that generation are all in the bitmap.
/// * `history` — the previous `current` values, newest first.
///
/// When two nodes meet, equal `current` means identical data; a node whose
/// `bitmap` equals the other's `current` is ahead by exactly its bitmap (a
/// bitmap-based resync suffices); a node whose `current` appears in the other's
/// `history` is older; no relation means a full resync (or a split brain to
/// resolve).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Generations {
    /// Generation of the local data now.
    pub current: u64,
    /// Peer generation from which the bitmap tracks changes.
    pub bitmap: u64,
    /// Earlier current generations, newest first.
    pub history: [u64; 2],
}

// ---------------------------------------------------------------------------
// Superblock
// ---------------------------------------------------------------------------

/// The node's metadata superblock.
///
/// On-disk slot (4096 bytes, little endian):
///
/// ```text
/// off  size  field
///   0     8  magic "TWINBDMD"
///   8     4  format version (u32) = 1
///  12     4  crc32c (u32) of the 4096-byte slot with this field zeroed
///  16     8  seq (u64), incremented by every update
///  24     8  node_id (u64, random at create)
///  32     8  peer_node_id (u64, 0 = unknown)
///  40     8  data_size (u64, bytes exported)
///  48     4  granularity (u32, bytes per bitmap bit)
///  52     4  flags (u32: bit0 WAS_PRIMARY, bit1 PEER_OUT_OF_SYNC_FULL,
///            bit2 CLEAN_SHUTDOWN; other bits must be 0)
///  56     1  disk_state (u8: 0 Inconsistent, 1 Outdated, 2 UpToDate)
///  57     7  reserved, 0
///  64     8  generation current (u64)
///  72     8  generation bitmap (u64)
///  80    16  generation history[0], history[1] (u64 each)
///  96     8  bitmap offset relative to the area start (u64) = 8192
/// 104     8  bitmap page count (u64)
/// 112     8  promoted_at (u64, ms since the Unix epoch of the last promotion; 0 = never)
/// 120     8  reserved, 0
/// 128    64  resource name: length (u8, 1..=63) + 63 bytes, NUL padded
/// 192    64  node name: same encoding
/// 256     4  activity log: number of extents (u32, at most ACTIVITY_MAX)
/// 260     4  reserved, 0
/// 264  8*n  activity log: extent numbers (u64 each; extent = ACTIVITY_EXTENT bytes)
///  ...       reserved for future fields, 0 (covered by the crc)
/// ```
///
/// Reserved bytes are written as zero and ignored when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Resource this disk belongs to.
    pub resource: Name,
    /// Name of this node.
    pub node: Name,
    /// Random identifier of this node's disk, chosen at create time.
    pub node_id: u64,
    /// `node_id` of the peer last connected to (0 = none yet).
    pub peer_node_id: u64,
    /// Size of the exported device in bytes. Fixed at create time.
    pub data_size: u64,
    /// Bytes of device per bitmap bit. Fixed at create time.
    pub granularity: u32,
    /// State of the local data.
    pub disk_state: DiskState,
    /// Flag bits.
    pub flags: Flags,
    /// Data generation identifiers.
    pub generations: Generations,
    /// When this node was last promoted (ms since the Unix epoch; 0 = never). Decides which
    /// primary is the younger one after a split brain.
    pub promoted_at_ms: u64,
    /// The activity log: extents (of [`ACTIVITY_EXTENT`] bytes) that may hold writes the
    /// peer has not confirmed. After a crash they are marked out of sync.
    pub activity: Vec<u64>,
}

/// Size of an activity-log extent.
pub const ACTIVITY_EXTENT: u64 = 4 << 20;
/// Most extents the activity log holds (what fits in a superblock slot).
pub const ACTIVITY_MAX: usize = (SLOT_SIZE - off::ACTIVITY) / 8;

impl Superblock {
    /// A fresh superblock: inconsistent, no generations, no peer.
    pub fn new(
        resource: Name,
        node: Name,
        node_id: u64,
        data_size: u64,
        granularity: u32,
    ) -> Superblock {
        Superblock {
            resource,
            node,
            node_id,
            peer_node_id: 0,
            data_size,
            granularity,
            disk_state: DiskState::Inconsistent,
            flags: Flags::empty(),
            generations: Generations::default(),
            promoted_at_ms: 0,
            activity: Vec::new(),
        }
    }

    /// Number of bitmap pages following the superblock slots.
    pub fn bitmap_pages(&self) -> u64 {
        bitmap::pages_for(self.data_size, self.granularity)
    }

    /// Total size of the metadata area (slots plus bitmap pages).
    pub fn area_len(&self) -> u64 {
        area_len(self.data_size, self.granularity)
    }

    /// Starts a new data generation: `history[1] = history[0]`,
    /// `history[0] = current`, and `current` becomes a fresh random non-zero
    /// value distinct from all other identifiers. If `current` is 0 (no data
    /// yet) there is nothing to remember and `history` is left alone.
    /// See [`Generations`] for how the identifiers are compared.
    pub fn new_current_generation(&mut self, rng: &mut impl Rng) {
        let g = &mut self.generations;
        if g.current != 0 {
            g.history = [g.current, g.history[0]];
        }
        g.current = loop {
            let v: u64 = rng.gen();
            if v != 0 && v != g.current && v != g.bitmap && !g.history.contains(&v) {
                break v;
            }
        };
    }

    /// Encodes the superblock into a slot with sequence number `seq`.
    pub fn encode(&self, seq: u64) -> [u8; SLOT_SIZE] {
        let mut b = [0u8; SLOT_SIZE];
        b[off::MAGIC..off::MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut b, off::VERSION, FORMAT_VERSION);
        put_u64(&mut b, off::SEQ, seq);
        put_u64(&mut b, off::NODE_ID, self.node_id);
        put_u64(&mut b, off::PEER_NODE_ID, self.peer_node_id);
        put_u64(&mut b, off::DATA_SIZE, self.data_size);
        put_u32(&mut b, off::GRANULARITY, self.granularity);
        put_u32(&mut b, off::FLAGS, self.flags.bits());
        b[off::DISK_STATE] = self.disk_state as u8;
        let g = &self.generations;
        put_u64(&mut b, off::GEN_CURRENT, g.current);
        put_u64(&mut b, off::GEN_BITMAP, g.bitmap);
        put_u64(&mut b, off::GEN_HISTORY, g.history[0]);
        put_u64(&mut b, off::GEN_HISTORY + 8, g.history[1]);
        put_u64(&mut b, off::BITMAP_OFFSET, BITMAP_OFFSET);
        put_u64(&mut b, off::BITMAP_PAGES, self.bitmap_pages());
        put_u64(&mut b, off::PROMOTED_AT, self.promoted_at_ms);
        let n = self.activity.len().min(ACTIVITY_MAX);
        put_u32(&mut b, off::ACTIVITY_COUNT, n as u32);
        for (i, e) in self.activity.iter().take(n).enumerate() {
            put_u64(&mut b, off::ACTIVITY + 8 * i, *e);
        }
        put_name(&mut b, off::RESOURCE, &self.resource);
        put_name(&mut b, off::NODE, &self.node);
        let crc = block_crc(&b);
        put_u32(&mut b, off::CRC, crc);
        b
    }

    /// Decodes and validates a slot, returning the superblock and its
    /// sequence number.
    pub fn decode(b: &[u8]) -> Result<(Superblock, u64), DecodeError> {
        check_block(b, &MAGIC)?;
        let granularity = get_u32(b, off::GRANULARITY);
        if !bitmap::valid_granularity(granularity) {
            return Err(invalid(
                "granularity",
                format!("{granularity} is not a supported bitmap granularity"),
            ));
        }
        let data_size = get_u64(b, off::DATA_SIZE);
        if data_size == 0 {
            return Err(invalid("data size", "is zero"));
        }
        let flags = get_u32(b, off::FLAGS);
        let flags = Flags::from_bits(flags)
            .ok_or_else(|| invalid("flags", format!("unknown bits in {flags:#x}")))?;
        let ds = b[off::DISK_STATE];
        let disk_state =
            DiskState::from_u8(ds).ok_or_else(|| invalid("disk state", format!("{ds}")))?;
        let bm_off = get_u64(b, off::BITMAP_OFFSET);
        if bm_off != BITMAP_OFFSET {
            return Err(invalid(
                "bitmap offset",
                format!("{bm_off}, expected {BITMAP_OFFSET}"),
            ));
        }
        let pages = get_u64(b, off::BITMAP_PAGES);
        let expect = bitmap::pages_for(data_size, granularity);
        if expect > u64::from(u32::MAX) {
            return Err(invalid(
                "data size",
                format!("{data_size} bytes need more than 2^32 bitmap pages"),
            ));
        }
        if pages != expect {
            return Err(invalid(
                "bitmap page count",
                format!(
                    "{pages}, but {data_size} bytes at granularity {granularity} need {expect}"
                ),
            ));
        }
        let sb = Superblock {
            resource: get_name(b, off::RESOURCE, "resource")?,
            node: get_name(b, off::NODE, "node")?,
            node_id: get_u64(b, off::NODE_ID),
            peer_node_id: get_u64(b, off::PEER_NODE_ID),
            data_size,
            granularity,
            disk_state,
            flags,
            generations: Generations {
                current: get_u64(b, off::GEN_CURRENT),
                bitmap: get_u64(b, off::GEN_BITMAP),
                history: [
                    get_u64(b, off::GEN_HISTORY),
                    get_u64(b, off::GEN_HISTORY + 8),
                ],
            },
            promoted_at_ms: get_u64(b, off::PROMOTED_AT),
            activity: {
                let n = get_u32(b, off::ACTIVITY_COUNT) as usize;
                if n > ACTIVITY_MAX {
                    return Err(invalid("activity log", format!("{n} extents")));
                }
                (0..n).map(|i| get_u64(b, off::ACTIVITY + 8 * i)).collect()
            },
        };
        Ok((sb, get_u64(b, off::SEQ)))
    }
}

/// Size of a metadata area for `data_size` bytes at `granularity`.
fn area_len(data_size: u64, granularity: u32) -> u64 {
    BITMAP_OFFSET
        .saturating_add(bitmap::pages_for(data_size, granularity).saturating_mul(PAGE_SIZE))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn put_name(b: &mut [u8], at: usize, name: &Name) {
    let bytes = name.as_str().as_bytes();
    // Name guarantees len <= MAX_NAME_LEN.
    b[at] = bytes.len() as u8;
    b[at + 1..at + 1 + bytes.len()].copy_from_slice(bytes);
}

fn get_name(b: &[u8], at: usize, field: &'static str) -> Result<Name, DecodeError> {
    let len = usize::from(b[at]);
    if len > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!("name length {len} exceeds {MAX_NAME_LEN}"),
        ));
    }
    let s = std::str::from_utf8(&b[at + 1..at + 1 + len])
        .map_err(|_| invalid(field, "name is not valid UTF-8"))?;
    match name_problem(s) {
        Some(why) => Err(invalid(field, format!("name {s:?}: {why}"))),
        None => Ok(Name(s.to_string())),
    }
}

/// CRC32C of a 4096-byte block with the crc field (bytes 12..16) taken as 0.
fn block_crc(b: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&b[..off::CRC]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &b[off::CRC + 4..])
}

/// Checks length, magic, CRC and version of a slot or locator block.
fn check_block(b: &[u8], magic: &[u8; 8]) -> Result<(), DecodeError> {
    if b.len() != SLOT_SIZE {
        return Err(DecodeError::BadLength(b.len()));
    }
    if b[..8] != magic[..] {
        return Err(DecodeError::BadMagic);
    }
    let stored = get_u32(b, off::CRC);
    let computed = block_crc(b);
    if stored != computed {
        return Err(DecodeError::BadCrc { stored, computed });
    }
    match get_u32(b, off::VERSION) {
        FORMAT_VERSION => Ok(()),
        v => Err(DecodeError::UnsupportedVersion(v)),
    }
}

// ---------------------------------------------------------------------------
// Locator (internal metadata only)
// ---------------------------------------------------------------------------

/// Locator block at the end of a disk with internal metadata.
///
/// ```text
/// off  size  field
///   0     8  magic "TWINBDLO"
///   8     4  format version (u32) = 1
///  12     4  crc32c (u32) of the 4096-byte block with this field zeroed
///  16     8  area offset (u64, absolute, = data size)
///  24     8  data size (u64)
///  32     4  granularity (u32)
///  36  4060  reserved, 0
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Locator {
    area_offset: u64,
    data_size: u64,
    granularity: u32,
}

impl Locator {
    fn encode(&self) -> [u8; SLOT_SIZE] {
        let mut b = [0u8; SLOT_SIZE];
        b[..8].copy_from_slice(&LOCATOR_MAGIC);
        put_u32(&mut b, off::VERSION, FORMAT_VERSION);
        put_u64(&mut b, 16, self.area_offset);
        put_u64(&mut b, 24, self.data_size);
        put_u32(&mut b, 32, self.granularity);
        let crc = block_crc(&b);
        put_u32(&mut b, off::CRC, crc);
        b
    }

    fn decode(b: &[u8]) -> Result<Locator, DecodeError> {
        check_block(b, &LOCATOR_MAGIC)?;
        Ok(Locator {
            area_offset: get_u64(b, 16),
            data_size: get_u64(b, 24),
            granularity: get_u32(b, 32),
        })
    }
}

/// Offset of the locator block on a disk of `disk_size` bytes.
fn locator_offset(disk_size: u64) -> Option<u64> {
    (disk_size / PAGE_SIZE * PAGE_SIZE).checked_sub(LOCATOR_SIZE)
}

/// Computes the layout of internal metadata on a disk of `disk_size` bytes:
/// returns `(data_size, meta_offset)` where `data_size` is the largest
/// multiple of 4 KiB such that the data, the metadata area (starting at
/// `meta_offset == data_size`) and the locator block all fit.
pub fn internal_layout(disk_size: u64, granularity: u32) -> Result<(u64, u64), MetaError> {
    if !bitmap::valid_granularity(granularity) {
        return Err(MetaError::InvalidGranularity(granularity));
    }
    let too_small = || MetaError::TooSmall {
        path: PathBuf::new(),
        size: disk_size,
        needed: PAGE_SIZE + area_len(PAGE_SIZE, granularity) + LOCATOR_SIZE,
    };
    let budget = locator_offset(disk_size).ok_or_else(too_small)?;
    let fits = |s: u64| {
        s.checked_add(area_len(s, granularity))
            .is_some_and(|end| end <= budget)
    };
    // area_len is monotonic in the data size, so this starting point fits and
    // the true maximum is at most a few pages above it.
    let mut size = budget.saturating_sub(area_len(budget, granularity)) / PAGE_SIZE * PAGE_SIZE;
    while fits(size + PAGE_SIZE) {
        size += PAGE_SIZE;
    }
    if size == 0 || !fits(size) {
        return Err(too_small());
    }
    Ok((size, size))
}

// ---------------------------------------------------------------------------
// Bitmap pages
// ---------------------------------------------------------------------------

/// Encodes bitmap page `index`.
///
/// ```text
/// off  size  field
///   0     4  crc32c (u32) of (page index as u32 LE ++ payload)
///   4     4  page index (u32)
///   8  4088  payload: 511 u64 words; chunk n is bit (n % 64) of word
///            (n / 64) % 511 of page n / 32704. Unused words/bits are 0.
/// ```
fn encode_page(index: usize, words: &[u64], out: &mut [u8]) {
    out.fill(0);
    for (i, w) in words.iter().take(WORDS_PER_PAGE).enumerate() {
        let at = PAGE_HEADER_SIZE + i * 8;
        out[at..at + 8].copy_from_slice(&w.to_le_bytes());
    }
    let idx = (index as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&idx), &out[PAGE_HEADER_SIZE..]);
    put_u32(out, 0, crc);
    out[4..8].copy_from_slice(&idx);
}

/// Decodes bitmap page `index`, or says why it cannot be trusted.
fn decode_page(index: usize, b: &[u8]) -> Result<[u64; WORDS_PER_PAGE], String> {
    let idx = (index as u32).to_le_bytes();
    let stored = get_u32(b, 0);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&idx), &b[PAGE_HEADER_SIZE..]);
    if b[4..8] != idx {
        return Err(format!(
            "page index {} stored, {index} expected",
            get_u32(b, 4)
        ));
    }
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let mut words = [0u64; WORDS_PER_PAGE];
    for (i, w) in words.iter_mut().enumerate() {
        *w = get_u64(b, PAGE_HEADER_SIZE + i * 8);
    }
    Ok(words)
}

// ---------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------

/// Parameters of [`MetaStore::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateParams {
    /// Resource name (1..=63 bytes).
    pub resource: String,
    /// This node's name (1..=63 bytes).
    pub node: String,
    /// Exported size: for external metadata the data disk's size. Ignored for
    /// internal metadata, where it is computed by [`internal_layout`].
    pub data_size: u64,
    /// Bitmap granularity in bytes (power of two, 512..=64 MiB).
    pub granularity: u32,
}

/// Things an open found and worked around; the daemon should log them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Human-readable warnings.
    pub warnings: Vec<String>,
}

/// Metadata of one node's disk, loaded in memory and kept in sync with disk.
pub struct MetaStore {
    location: MetaLocation,
    file: File,
    area_offset: u64,
    /// Locator to (re)write at the next superblock update (internal only).
    locator_repair: Option<(u64, Locator)>,
    sb: Superblock,
    seq: u64,
    active_slot: usize,
    bitmap: Bitmap,
    /// Pages whose in-memory contents may differ from disk.
    pending: Vec<bool>,
}

impl fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaStore")
            .field("location", &self.location)
            .field("area_offset", &self.area_offset)
            .field("seq", &self.seq)
            .field("active_slot", &self.active_slot)
            .field("superblock", &self.sb)
            .field("bitmap", &self.bitmap)
            .finish_non_exhaustive()
    }
}

fn slot_name(slot: usize) -> char {
    if slot == 0 {
        'A'
    } else {
        'B'
    }
}

fn open_rw(path: &Path, create: bool) -> Result<File, MetaError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(io_err(path, "open"))
}

fn file_size(file: &File, path: &Path) -> Result<u64, MetaError> {
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(io_err(path, "determine size"))
}

/// Reads `buf.len()` bytes at `at`; bytes past the end of the file read as 0.
fn read_padded(
    file: &File,
    path: &Path,
    at: u64,
    size: u64,
    buf: &mut [u8],
) -> Result<(), MetaError> {
    buf.fill(0);
    let avail = size.saturating_sub(at).min(buf.len() as u64) as usize;
    file.read_exact_at(&mut buf[..avail], at)
        .map_err(io_err(path, "read metadata"))
}

/// A decoded slot: the superblock and its sequence number.
type SlotResult = Result<(Superblock, u64), DecodeError>;

/// The chosen superblock slot.
struct Chosen {
    sb: Superblock,
    seq: u64,
    slot: usize,
}

/// Picks the valid slot with the highest seq, adding a warning if the other
/// slot is unusable. If both are invalid, returns both errors.
fn choose_slot(
    slots: [SlotResult; 2],
    warnings: &mut Vec<String>,
) -> Result<Chosen, [DecodeError; 2]> {
    let mut fallback = |bad: usize, e: &DecodeError, seq: u64| {
        warnings.push(format!(
            "superblock slot {} is unusable ({e}); using slot {} (sequence {seq}). \
             The last metadata update was probably interrupted and never committed; \
             slot {} will be rewritten by the next update",
            slot_name(bad),
            slot_name(1 - bad),
            slot_name(bad),
        ));
    };
    let [a, b] = slots;
    match (a, b) {
        (Ok((sa, qa)), Ok((sb, qb))) => {
            if qa == qb {
                warnings.push(format!(
                    "both superblock slots carry sequence number {qa}; using slot A"
                ));
            }
            Ok(if qb > qa {
                Chosen {
                    sb,
                    seq: qb,
                    slot: 1,
                }
            } else {
                Chosen {
                    sb: sa,
                    seq: qa,
                    slot: 0,
                }
            })
        }
        (Ok((sb, seq)), Err(e)) => {
            fallback(1, &e, seq);
            Ok(Chosen { sb, seq, slot: 0 })
        }
        (Err(e), Ok((sb, seq))) => {
            fallback(0, &e, seq);
            Ok(Chosen { sb, seq, slot: 1 })
        }
        (Err(a), Err(b)) => Err([a, b]),
    }
}

/// Reads and decodes both slots of the area at `area_offset`.
fn read_slots(
    file: &File,
    path: &Path,
    area_offset: u64,
    size: u64,
) -> Result<[SlotResult; 2], MetaError> {
    let mut buf = vec![0u8; 2 * SLOT_SIZE];
    read_padded(file, path, area_offset, size, &mut buf)?;
    Ok(decode_slots(&buf))
}

/// Decodes the two slots at the start of `buf` (8192 bytes).
fn decode_slots(buf: &[u8]) -> [SlotResult; 2] {
    let (a, b) = buf.split_at(SLOT_SIZE.min(buf.len()));
    [Superblock::decode(a), Superblock::decode(b)]
}

/// Describes existing metadata found by `create`, if any slot has our magic.
fn describe_existing(slots: &[SlotResult; 2]) -> Option<String> {
    if let Some((sb, _)) = slots.iter().flatten().next() {
        return Some(format!(
            "valid twinbd metadata is present (resource {:?}, node {:?})",
            sb.resource.as_str(),
            sb.node.as_str()
        ));
    }
    if slots
        .iter()
        .any(|s| !matches!(s, Err(DecodeError::BadMagic)))
    {
        let why: Vec<String> = slots
            .iter()
            .zip(['A', 'B'])
            .filter_map(|(s, n)| s.as_ref().err().map(|e| format!("slot {n}: {e}")))
            .collect();
        return Some(format!(
            "damaged twinbd metadata is present ({})",
            why.join("; ")
        ));
    }
    None
}

impl MetaStore {
    /// Creates fresh metadata at `loc`.
    ///
    /// Refuses, unless `force`, if the location already holds twinbd metadata
    /// (valid or damaged), or — for external metadata — if its first 8 KiB
    /// hold any other non-zero data. External metadata files are created if
    /// missing and sized to the area; block devices must be large enough.
    ///
    /// The area is written so that a crash leaves either no valid metadata or
    /// the complete new one: the old slots (and locator) are invalidated
    /// first, then the bitmap pages (all clean) and both slots (identical
    /// contents, seq 1 in A and seq 2 in B) are written and synced, and for
    /// internal metadata the locator is written last. The new superblock is
    /// `Inconsistent` with no generations and a random `node_id`.
    pub fn create(
        loc: &MetaLocation,
        params: CreateParams,
        force: bool,
    ) -> Result<MetaStore, MetaError> {
        let resource = Name::new("resource", &params.resource)?;
        let node = Name::new("node", &params.node)?;
        let g = params.granularity;
        if !bitmap::valid_granularity(g) {
            return Err(MetaError::InvalidGranularity(g));
        }
        let path = loc.path();
        let refuse = |found: String| -> Result<(), MetaError> {
            if force {
                Ok(())
            } else {
                Err(MetaError::Exists {
                    path: path.to_path_buf(),
                    found,
                })
            }
        };

        let (file, created, bitmap, area_offset, locator) = match loc {
            MetaLocation::External(_) => {
                let bitmap = new_bitmap(path, params.data_size, g)?;
                let existed = path.exists();
                let file = open_rw(path, true)?;
                let size = file_size(&file, path)?;
                if existed && size > 0 {
                    let mut head = vec![0u8; 2 * SLOT_SIZE];
                    read_padded(&file, path, 0, size, &mut head)?;
                    if let Some(found) = describe_existing(&decode_slots(&head)) {
                        refuse(found)?;
                    } else if head.iter().any(|&x| x != 0) {
                        refuse("the file is not empty and holds no twinbd metadata".into())?;
                    }
                }
                let need = area_len(params.data_size, g);
                let is_blk = file
                    .metadata()
                    .map_err(io_err(path, "stat"))?
                    .file_type()
                    .is_block_device();
                if is_blk {
                    if size < need {
                        return Err(MetaError::TooSmall {
                            path: path.to_path_buf(),
                            size,
                            needed: need,
                        });
                    }
                } else {
                    file.set_len(need)
                        .map_err(io_err(path, "resize metadata file"))?;
                }
                (file, !existed, bitmap, 0, None)
            }
            MetaLocation::Internal { disk } => {
                let file = open_rw(disk, false)?;
                let size = file_size(&file, disk)?;
                let (data_size, meta_offset) =
                    internal_layout(size, g).map_err(|e| with_path(e, disk))?;
                let bitmap = new_bitmap(disk, data_size, g)?;
                let loc_off = locator_offset(size).unwrap_or(0);
                let mut lb = vec![0u8; SLOT_SIZE];
                read_padded(&file, disk, loc_off, size, &mut lb)?;
                if let Ok(l) = Locator::decode(&lb) {
                    let slots = read_slots(&file, disk, l.area_offset, size)?;
                    refuse(describe_existing(&slots).unwrap_or_else(|| {
                        "a twinbd metadata locator is present at the end of the disk".into()
                    }))?;
                } else if lb[..8] == LOCATOR_MAGIC {
                    refuse(
                        "a damaged twinbd metadata locator is present at the end of the disk"
                            .into(),
                    )?;
                }
                let slots = read_slots(&file, disk, meta_offset, size)?;
                if let Some(found) = describe_existing(&slots) {
                    refuse(found)?;
                }
                let l = Locator {
                    area_offset: meta_offset,
                    data_size,
                    granularity: g,
                };
                (file, false, bitmap, meta_offset, Some((loc_off, l)))
            }
        };

        let mut rng = rand::thread_rng();
        let node_id = loop {
            let v: u64 = rng.gen();
            if v != 0 {
                break v;
            }
        };
        let sb = Superblock::new(resource, node, node_id, bitmap.device_size(), g);
        let n = bitmap.num_pages();
        let mut store = MetaStore {
            location: loc.clone(),
            file,
            area_offset,
            locator_repair: None,
            sb,
            seq: 2,
            active_slot: 1,
            bitmap,
            pending: vec![true; n],
        };

        // 1. Invalidate whatever was there, so a crash cannot mix old and new.
        let zero = [0u8; 2 * SLOT_SIZE];
        store.write_at(area_offset, &zero, "invalidate old superblocks")?;
        if let Some((loc_off, _)) = locator {
            store.write_at(loc_off, &zero[..SLOT_SIZE], "invalidate old locator")?;
        }
        store.sync("fdatasync")?;
        // 2. Bitmap pages, then both slots.
        store.write_pages(0..n)?;
        let a = store.sb.encode(1);
        let b = store.sb.encode(2);
        store.write_at(area_offset, &a, "write superblock slot A")?;
        store.write_at(
            area_offset + SLOT_SIZE as u64,
            &b,
            "write superblock slot B",
        )?;
        store.file.sync_all().map_err(io_err(path, "fsync"))?;
        store.pending.fill(false);
        // 3. The locator commits internal metadata.
        if let Some((loc_off, l)) = locator {
            store.write_at(loc_off, &l.encode(), "write metadata locator")?;
            store.sync("fdatasync locator")?;
        }
        if created {
            sync_parent_dir(path)?;
        }
        Ok(store)
    }

    /// Opens existing metadata at `loc`.
    ///
    /// Problems that were worked around (an unusable superblock slot, damaged
    /// bitmap pages read as all dirty, a damaged locator) are returned in the
    /// report. Nothing is written by `open`; repairs happen on the next
    /// [`update`](Self::update) / [`flush_bitmap`](Self::flush_bitmap).
    pub fn open(loc: &MetaLocation) -> Result<(MetaStore, OpenReport), MetaError> {
        let path = loc.path();
        let file = open_rw(path, false)?;
        let size = file_size(&file, path)?;
        let mut warnings = Vec::new();
        let mut locator_repair = None;

        let (chosen, area_offset, area_limit) = match loc {
            MetaLocation::External(_) => {
                if size == 0 {
                    return Err(MetaError::NoMetadata {
                        path: path.to_path_buf(),
                        detail: "the file is empty".into(),
                    });
                }
                let slots = read_slots(&file, path, 0, size)?;
                let chosen =
                    choose_slot(slots, &mut warnings).map_err(|e| slots_err(path, e, ""))?;
                (chosen, 0, size)
            }
            MetaLocation::Internal { .. } => {
                let found = find_internal(&file, path, size, &mut warnings)?;
                locator_repair = found.repair;
                (found.chosen, found.area_offset, found.limit)
            }
        };
        let sb = chosen.sb;
        let area_end = area_offset.saturating_add(sb.area_len());
        if area_end > area_limit {
            return Err(MetaError::Corrupt {
                path: path.to_path_buf(),
                reason: format!(
                    "the metadata area needs bytes {area_offset}..{area_end} but only {area_limit} are available (truncated file or shrunk device?)"
                ),
            });
        }
        let mut bitmap =
            Bitmap::try_new(sb.data_size, sb.granularity).map_err(|e| bitmap_err(e, path))?;
        let n = bitmap.num_pages();
        let mut pending = vec![false; n];
        let mut bad = 0usize;
        let mut buf = vec![0u8; PAGES_PER_IO * bitmap::PAGE_SIZE];
        for first in (0..n).step_by(PAGES_PER_IO) {
            let count = PAGES_PER_IO.min(n - first);
            let chunk = &mut buf[..count * bitmap::PAGE_SIZE];
            let at = area_offset + BITMAP_OFFSET + first as u64 * PAGE_SIZE;
            file.read_exact_at(chunk, at)
                .map_err(io_err(path, "read bitmap"))?;
            for (i, page) in chunk.chunks_exact(bitmap::PAGE_SIZE).enumerate() {
                let idx = first + i;
                match decode_page(idx, page) {
                    Ok(words) => bitmap.load_page_words(idx, &words),
                    Err(why) => {
                        if bad < 8 {
                            let (o, l) = bitmap.page_byte_range(idx);
                            warnings.push(format!(
                                "bitmap page {idx} is damaged ({why}); bytes {o}..{} are treated as out of sync",
                                o + l
                            ));
                        }
                        bitmap.set_page_all(idx);
                        pending[idx] = true;
                        bad += 1;
                    }
                }
            }
        }
        if bad > 8 {
            warnings.push(format!(
                "{} bitmap pages in total are damaged; their ranges are treated as out of sync",
                bad
            ));
        }
        let store = MetaStore {
            location: loc.clone(),
            file,
            area_offset,
            locator_repair,
            sb,
            seq: chosen.seq,
            active_slot: chosen.slot,
            bitmap,
            pending,
        };
        Ok((store, OpenReport { warnings }))
    }

    /// The current (last committed) superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Applies `f` to a copy of the superblock and commits it: the copy is
    /// written with the next sequence number to the inactive slot and synced,
    /// and only then becomes the active superblock. On error nothing changes
    /// in memory and the previous superblock stays the committed one.
    ///
    /// `data_size` and `granularity` are fixed at create time; changing them
    /// is refused.
    pub fn update(&mut self, f: impl FnOnce(&mut Superblock)) -> Result<(), MetaError> {
        let mut next = self.sb.clone();
        f(&mut next);
        let path = self.location.path();
        for (field, changed) in [
            ("data size", next.data_size != self.sb.data_size),
            (
                "bitmap granularity",
                next.granularity != self.sb.granularity,
            ),
        ] {
            if changed {
                return Err(MetaError::Invalid {
                    path: path.to_path_buf(),
                    reason: format!("the {field} is fixed when the metadata is created and cannot be changed by an update"),
                });
            }
        }
        let seq = self.seq.checked_add(1).ok_or_else(|| MetaError::Corrupt {
            path: path.to_path_buf(),
            reason: "superblock sequence number exhausted".into(),
        })?;
        if let Some((loc_off, l)) = self.locator_repair {
            self.write_at(loc_off, &l.encode(), "rewrite metadata locator")?;
            self.sync("fdatasync locator")?;
            self.locator_repair = None;
        }
        let slot = 1 - self.active_slot;
        let at = self.area_offset + (slot * SLOT_SIZE) as u64;
        self.write_at(at, &next.encode(seq), "write superblock")?;
        self.sync("fdatasync superblock")?;
        self.sb = next;
        self.seq = seq;
        self.active_slot = slot;
        Ok(())
    }

    /// Verifies that the metadata belongs to `resource` and `node`.
    pub fn check_identity(&self, resource: &str, node: &str) -> Result<(), MetaError> {
        for (field, found, expected) in [
            ("resource", &self.sb.resource, resource),
            ("node", &self.sb.node, node),
        ] {
            if found.as_str() != expected {
                return Err(MetaError::Mismatch {
                    path: self.location.path().to_path_buf(),
                    field,
                    expected: expected.to_string(),
                    found: found.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The in-memory dirty bitmap.
    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    /// Mutable access to the bitmap. Changes made this way are not tracked
    /// per page, so every page is written by the next
    /// [`flush_bitmap`](Self::flush_bitmap); prefer [`set_dirty`](Self::set_dirty)
    /// and the `clear_clean*` methods.
    pub fn bitmap_mut(&mut self) -> &mut Bitmap {
        self.pending.fill(true);
        &mut self.bitmap
    }

    /// Marks a byte range dirty and makes that durable before returning:
    /// writes the touched pages that differ from disk, then fdatasync. No IO
    /// happens if those pages are already on disk as they are.
    pub fn set_dirty(&mut self, offset: u64, len: u64) -> Result<(), MetaError> {
        let changed = self.bitmap.set_range(offset, len);
        self.mark_pending(changed);
        self.persist(self.bitmap.pages_for_range(offset, len))
    }

    /// Marks every chunk touched by a byte range clean (see
    /// [`Bitmap::clear_range`]) and writes the touched pages durably.
    pub fn clear_clean(&mut self, offset: u64, len: u64) -> Result<(), MetaError> {
        let changed = self.bitmap.clear_range(offset, len);
        self.mark_pending(changed);
        self.persist(self.bitmap.pages_for_range(offset, len))
    }

    /// Marks a byte range dirty in memory only; the pages are written by the next
    /// [`flush_bitmap`](Self::flush_bitmap). Lets a caller batch many ranges into one
    /// durable write: the ranges are durable only once that flush returns.
    pub fn set_dirty_lazy(&mut self, offset: u64, len: u64) {
        let changed = self.bitmap.set_range(offset, len);
        self.mark_pending(changed);
    }

    /// Like [`clear_clean`](Self::clear_clean) but only in memory; the pages
    /// are written by the next [`flush_bitmap`](Self::flush_bitmap). Safe to
    /// defer: if the node crashes first, the range is merely resynced again.
    pub fn clear_clean_lazy(&mut self, offset: u64, len: u64) {
        let changed = self.bitmap.clear_range(offset, len);
        self.mark_pending(changed);
    }

    /// Writes every bitmap page changed since it was last written, then
    /// fdatasync. No IO if nothing changed.
    pub fn flush_bitmap(&mut self) -> Result<(), MetaError> {
        self.persist(0..self.pending.len())
    }

    /// True if some bitmap changes are not yet on disk.
    pub fn has_unflushed(&self) -> bool {
        self.pending.iter().any(|&p| p)
    }

    /// Size of the exported device in bytes.
    pub fn data_size(&self) -> u64 {
        self.sb.data_size
    }

    /// Where the metadata lives.
    pub fn location(&self) -> &MetaLocation {
        &self.location
    }

    /// Absolute offset of the metadata area within its file.
    pub fn area_offset(&self) -> u64 {
        self.area_offset
    }

    /// Sequence number of the active superblock.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Active superblock slot: 0 = A, 1 = B.
    pub fn active_slot(&self) -> usize {
        self.active_slot
    }

    fn mark_pending(&mut self, pages: Range<usize>) {
        for p in &mut self.pending[pages] {
            *p = true;
        }
    }

    /// Writes the pending pages within `pages` (coalesced), then fdatasync.
    /// On error they stay pending, so a later call retries them.
    fn persist(&mut self, pages: Range<usize>) -> Result<(), MetaError> {
        let end = pages.end.min(self.pending.len());
        let mut p = pages.start;
        let mut wrote = false;
        while p < end {
            if !self.pending[p] {
                p += 1;
                continue;
            }
            let run_start = p;
            while p < end && self.pending[p] {
                p += 1;
            }
            self.write_pages(run_start..p)?;
            wrote = true;
        }
        if wrote {
            self.sync("fdatasync bitmap")?;
            for flag in &mut self.pending[pages.start..end] {
                *flag = false;
            }
        }
        Ok(())
    }

    /// Encodes and writes bitmap pages `pages` (no sync).
    fn write_pages(&self, pages: Range<usize>) -> Result<(), MetaError> {
        let mut buf = vec![0u8; PAGES_PER_IO.min(pages.len()) * bitmap::PAGE_SIZE];
        let mut first = pages.start;
        while first < pages.end {
            let count = PAGES_PER_IO.min(pages.end - first);
            let chunk = &mut buf[..count * bitmap::PAGE_SIZE];
            for (i, out) in chunk.chunks_exact_mut(bitmap::PAGE_SIZE).enumerate() {
                encode_page(first + i, self.bitmap.page_words(first + i), out);
            }
            let at = self.area_offset + BITMAP_OFFSET + first as u64 * PAGE_SIZE;
            self.write_at(at, chunk, "write bitmap")?;
            first += count;
        }
        Ok(())
    }

    fn write_at(&self, at: u64, data: &[u8], op: &'static str) -> Result<(), MetaError> {
        self.file
            .write_all_at(data, at)
            .map_err(io_err(self.location.path(), op))
    }

    fn sync(&self, op: &'static str) -> Result<(), MetaError> {
        self.file
            .sync_data()
            .map_err(io_err(self.location.path(), op))
    }
}

/// Internal metadata as located by [`find_internal`].
struct Found {
    chosen: Chosen,
    area_offset: u64,
    /// Offset of the locator: the end of the space the area may use.
    limit: u64,
    /// Locator to rewrite (after it was found damaged).
    repair: Option<(u64, Locator)>,
}

/// Locates internal metadata: through the locator, or by probing every
/// granularity if the locator is unusable.
fn find_internal(
    file: &File,
    path: &Path,
    size: u64,
    warnings: &mut Vec<String>,
) -> Result<Found, MetaError> {
    let corrupt = |reason: String| MetaError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let Some(loc_off) = locator_offset(size) else {
        return Err(MetaError::NoMetadata {
            path: path.to_path_buf(),
            detail: format!("the disk is only {size} bytes"),
        });
    };
    let mut lb = vec![0u8; SLOT_SIZE];
    read_padded(file, path, loc_off, size, &mut lb)?;
    let loc_err = match Locator::decode(&lb) {
        Ok(l) => {
            let expect = internal_layout(size, l.granularity).ok();
            if expect != Some((l.data_size, l.area_offset)) {
                return Err(corrupt(format!(
                    "the locator places {} data bytes and the metadata at offset {} (granularity {}), which does not match a disk of {size} bytes (was the disk resized?)",
                    l.data_size, l.area_offset, l.granularity
                )));
            }
            let slots = read_slots(file, path, l.area_offset, size)?;
            let chosen = choose_slot(slots, warnings)
                .map_err(|e| slots_err(path, e, &format!(" at offset {}", l.area_offset)))?;
            check_geometry(&chosen.sb, &l).map_err(corrupt)?;
            return Ok(Found {
                chosen,
                area_offset: l.area_offset,
                limit: loc_off,
                repair: None,
            });
        }
        Err(e) => e,
    };

    // Probe every supported granularity for a matching area.
    let mut found = Vec::new();
    let mut damaged = Vec::new();
    let mut g = MIN_GRANULARITY;
    while g <= MAX_GRANULARITY {
        if let Ok((data_size, area_offset)) = internal_layout(size, g) {
            let slots = read_slots(file, path, area_offset, size)?;
            let l = Locator {
                area_offset,
                data_size,
                granularity: g,
            };
            let mut w = Vec::new();
            match choose_slot(slots, &mut w) {
                Ok(chosen) if check_geometry(&chosen.sb, &l).is_ok() => {
                    found.push((chosen, l, w));
                }
                Ok(_) => {}
                Err([a, b]) => {
                    if a != DecodeError::BadMagic || b != DecodeError::BadMagic {
                        damaged.push(format!("at offset {area_offset}: slot A: {a}; slot B: {b}"));
                    }
                }
            }
        }
        g <<= 1;
    }
    let n = found.len();
    match found.pop() {
        None if loc_err == DecodeError::BadMagic && damaged.is_empty() => {
            Err(MetaError::NoMetadata {
                path: path.to_path_buf(),
                detail: "no locator at the end of the disk and no superblock at any expected position; if the disk was resized, the metadata is no longer at its end".into(),
            })
        }
        None => Err(corrupt(format!(
            "the locator at offset {loc_off} is unusable ({loc_err}) and no usable superblock was found{}{}",
            if damaged.is_empty() { "" } else { ": " },
            damaged.join(", ")
        ))),
        Some((chosen, l, w)) if n == 1 => {
            warnings.push(format!(
                "the metadata locator at offset {loc_off} is unusable ({loc_err}); found the metadata at offset {} by probing; the locator will be rewritten by the next update",
                l.area_offset
            ));
            warnings.extend(w);
            Ok(Found {
                chosen,
                area_offset: l.area_offset,
                limit: loc_off,
                repair: Some((loc_off, l)),
            })
        }
        Some(_) => Err(corrupt(format!(
            "the locator at offset {loc_off} is unusable ({loc_err}) and {n} candidate metadata areas were found; recreate the metadata"
        ))),
    }
}

/// Checks that a superblock agrees with the locator that led to it.
fn check_geometry(sb: &Superblock, l: &Locator) -> Result<(), String> {
    if sb.data_size != l.data_size || sb.granularity != l.granularity {
        return Err(format!(
            "the superblock says {} data bytes at granularity {}, the locator {} at granularity {}",
            sb.data_size, sb.granularity, l.data_size, l.granularity
        ));
    }
    Ok(())
}

/// Builds the error for "neither slot is usable".
fn slots_err(path: &Path, [a, b]: [DecodeError; 2], where_: &str) -> MetaError {
    if a == DecodeError::BadMagic && b == DecodeError::BadMagic {
        return MetaError::NoMetadata {
            path: path.to_path_buf(),
            detail: format!("bad magic in both superblock slots{where_}"),
        };
    }
    MetaError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("no usable superblock{where_}: slot A: {a}; slot B: {b}"),
    }
}

/// Allocates the (clean) bitmap for new metadata, checking its size.
fn new_bitmap(path: &Path, data_size: u64, g: u32) -> Result<Bitmap, MetaError> {
    let invalid = |reason: String| MetaError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if data_size == 0 {
        return Err(invalid(
            "the data size to create metadata for is zero".into(),
        ));
    }
    if bitmap::pages_for(data_size, g) > u64::from(u32::MAX) {
        return Err(invalid(format!(
            "{data_size} bytes at granularity {g} need too large a bitmap; choose a coarser granularity"
        )));
    }
    Bitmap::try_new(data_size, g).map_err(|e| bitmap_err(e, path))
}

fn bitmap_err(e: BitmapError, path: &Path) -> MetaError {
    MetaError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Fills in the path of a path-less error from [`internal_layout`].
fn with_path(e: MetaError, path: &Path) -> MetaError {
    match e {
        MetaError::TooSmall { size, needed, .. } => MetaError::TooSmall {
            path: path.to_path_buf(),
            size,
            needed,
        },
        other => other,
    }
}

/// fsyncs the directory containing `path`, making a new file's entry durable.
fn sync_parent_dir(path: &Path) -> Result<(), MetaError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::BITS_PER_PAGE;
    use rand::SeedableRng;
    use std::io::Write;

    fn params(data_size: u64, granularity: u32) -> CreateParams {
        CreateParams {
            resource: "r0".into(),
            node: "alpha".into(),
            data_size,
            granularity,
        }
    }

    fn ext(dir: &tempfile::TempDir) -> MetaLocation {
        MetaLocation::External(dir.path().join("r0.meta"))
    }

    fn sample() -> Superblock {
        let mut sb = Superblock::new(
            Name::new("resource", "data-store").unwrap(),
            Name::new("node", "node-b.example").unwrap(),
            0x1122_3344_5566_7788,
            10 << 30,
            65536,
        );
        sb.peer_node_id = 99;
        sb.disk_state = DiskState::Outdated;
        sb.flags = Flags::WAS_PRIMARY | Flags::CLEAN_SHUTDOWN;
        sb.generations = Generations {
            current: 5,
            bitmap: 6,
            history: [7, 8],
        };
        sb
    }

    /// Recomputes the crc of a slot after a deliberate field change.
    fn reseal(b: &mut [u8; SLOT_SIZE]) {
        let crc = block_crc(b);
        put_u32(b, off::CRC, crc);
    }

    fn patch(path: &Path, at: u64, data: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(data, at).unwrap();
    }

    fn read(path: &Path, at: u64, len: usize) -> Vec<u8> {
        let f = File::open(path).unwrap();
        let mut v = vec![0; len];
        f.read_exact_at(&mut v, at).unwrap();
        v
    }

    #[test]
    fn superblock_round_trip() {
        let sb = sample();
        let b = sb.encode(42);
        assert_eq!(&b[..8], b"TWINBDMD");
        assert_eq!(get_u32(&b, 8), FORMAT_VERSION);
        assert_eq!(get_u64(&b, off::BITMAP_OFFSET), 8192);
        assert_eq!(get_u64(&b, off::BITMAP_PAGES), sb.bitmap_pages());
        assert_eq!(Superblock::decode(&b), Ok((sb, 42)));
        assert_eq!(
            Superblock::decode(&b[..100]),
            Err(DecodeError::BadLength(100))
        );
    }

    #[test]
    fn any_flipped_bit_rejects_the_slot() {
        let b = sample().encode(3);
        for byte in 0..SLOT_SIZE {
            for bit in 0..8 {
                let mut c = b;
                c[byte] ^= 1 << bit;
                let err = Superblock::decode(&c).unwrap_err();
                if byte < 8 {
                    assert_eq!(err, DecodeError::BadMagic, "byte {byte} bit {bit}");
                } else {
                    assert!(
                        matches!(err, DecodeError::BadCrc { .. }),
                        "byte {byte} bit {bit}: {err:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn invalid_fields_with_valid_crc() {
        let sb = sample();
        let cases: [(usize, &[u8], &str); 6] = [
            (off::VERSION, &2u32.to_le_bytes(), "version 2"),
            (off::FLAGS, &8u32.to_le_bytes(), "flags"),
            (off::DISK_STATE, &[9], "disk state"),
            (off::GRANULARITY, &1000u32.to_le_bytes(), "granularity"),
            (off::BITMAP_PAGES, &1u64.to_le_bytes(), "bitmap page count"),
            (off::RESOURCE, &[64], "resource"),
        ];
        for (at, bytes, what) in cases {
            let mut b = sb.encode(1);
            b[at..at + bytes.len()].copy_from_slice(bytes);
            reseal(&mut b);
            let err = Superblock::decode(&b).unwrap_err().to_string();
            assert!(err.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(Name::new("node", &"x".repeat(63)).is_ok());
        for bad in ["", "a\0b", "tab\there", &"x".repeat(64)] {
            let e = Name::new("node", bad).unwrap_err();
            assert!(
                matches!(e, MetaError::InvalidName { field: "node", .. }),
                "{e}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let mut p = params(1 << 20, 4096);
        p.resource = "r".repeat(64);
        let e = MetaStore::create(&ext(&dir), p, false).unwrap_err();
        assert!(e.to_string().contains("longer than 63 bytes"), "{e}");
    }

    #[test]
    fn generations() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut sb = sample();
        sb.generations = Generations::default();
        sb.new_current_generation(&mut rng);
        let c1 = sb.generations.current;
        assert_ne!(c1, 0);
        assert_eq!(sb.generations.history, [0, 0]);
        sb.new_current_generation(&mut rng);
        let c2 = sb.generations.current;
        assert!(c2 != 0 && c2 != c1);
        assert_eq!(sb.generations.history, [c1, 0]);
        sb.new_current_generation(&mut rng);
        assert_eq!(sb.generations.history, [c2, c1]);
    }

    #[test]
    fn create_and_update_alternate_slots_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ext(&dir);
        let mut st = MetaStore::create(&loc, params(1 << 30, 4096), false).unwrap();
        assert_eq!((st.seq(), st.active_slot()), (2, 1));
        assert_eq!(st.superblock().disk_state, DiskState::Inconsistent);
        assert_eq!(st.superblock().generations, Generations::default());
        assert_ne!(st.superblock().node_id, 0);
        assert_eq!(st.data_size(), 1 << 30);
        let len = std::fs::metadata(loc.path()).unwrap().len();
        assert_eq!(len, st.superblock().area_len());

        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        st.update(|sb| {
            sb.disk_state = DiskState::UpToDate;
            sb.new_current_generation(&mut rng);
        })
        .unwrap();
        assert_eq!((st.seq(), st.active_slot()), (3, 0));
        st.update(|sb| sb.flags.insert(Flags::WAS_PRIMARY)).unwrap();
        assert_eq!((st.seq(), st.active_slot()), (4, 1));
        let expect = st.superblock().clone();
        drop(st);

        let (st, report) = MetaStore::open(&loc).unwrap();
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        assert_eq!(st.superblock(), &expect);
        assert_eq!((st.seq(), st.active_slot()), (4, 1));
        assert_eq!(st.location(), &loc);
    }

    #[test]
    fn update_refuses_geometry_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = MetaStore::create(&ext(&dir), params(1 << 20, 4096), false).unwrap();
        let e = st.update(|sb| sb.data_size += 4096).unwrap_err();
        assert!(e.to_string().contains("data size is fixed"), "{e}");
        assert!(st.update(|sb| sb.granularity = 8192).is_err());
        assert_eq!(st.seq(), 2);
    }

    /// Simulates a crash while slot B was being written: only its first
    /// `tear` bytes are new, the rest is the old slot B (or zeros).
    fn torn_update(tear: usize, rest_zero: bool) {
        let dir = tempfile::tempdir().unwrap();
        let loc = ext(&dir);
        let mut st = MetaStore::create(&loc, params(1 << 24, 4096), false).unwrap();
        st.update(|sb| sb.disk_state = DiskState::UpToDate).unwrap();
        assert_eq!(st.active_slot(), 0);
        let committed = st.superblock().clone();

        let mut next = committed.clone();
        next.peer_node_id = 1234;
        next.generations.history = [77, 78];
        let img = next.encode(st.seq() + 1);
        drop(st);
        let old = read(loc.path(), 4096, SLOT_SIZE);
        let differ = |i: &usize| old[*i] != img[*i];
        let last_diff = (0..SLOT_SIZE).rev().find(differ).unwrap();
        patch(loc.path(), 4096, &img[..tear]);
        if rest_zero {
            patch(loc.path(), 4096 + tear as u64, &vec![0u8; SLOT_SIZE - tear]);
        }

        let (mut st, report) = MetaStore::open(&loc).unwrap();
        if tear > last_diff && !rest_zero {
            // Every byte that differs made it: the write actually completed.
            assert_eq!(st.superblock(), &next);
            assert!(report.warnings.is_empty(), "{:?}", report.warnings);
            return;
        }
        assert_eq!(st.superblock(), &committed, "tear {tear}");
        assert_eq!((st.seq(), st.active_slot()), (3, 0));
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        let w = &report.warnings[0];
        assert!(w.contains("slot B") && w.contains("never committed"), "{w}");

        // The next update overwrites the torn slot; afterwards all is clean.
        st.update(|sb| sb.peer_node_id = 5).unwrap();
        drop(st);
        let (st, report) = MetaStore::open(&loc).unwrap();
        assert!(report.warnings.is_empty());
        assert_eq!((st.seq(), st.superblock().peer_node_id), (4, 5));
    }

    #[test]
    fn torn_update_falls_back_to_previous_slot() {
        for tear in [16, 40, 60, 85] {
            torn_update(tear, false);
            torn_update(tear, true);
        }
        // Fields end below byte 256; past that a tear cannot be told from a
        // completed write, which is then rightly committed.
        torn_update(2048, false);
    }

    #[test]
    fn both_slots_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ext(&dir);
        drop(MetaStore::create(&loc, params(1 << 20, 4096), false).unwrap());
        patch(loc.path(), 100, &[0xFF]);
        patch(loc.path(), 4096 + 8, &[7]);
        let e = MetaStore::open(&loc).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, MetaError::Corrupt { .. }), "{msg}");
        assert!(msg.contains(&loc.path().display().to_string()), "{msg}");
        assert!(
            msg.contains("slot A: checksum mismatch") && msg.contains("slot B: checksum mismatch"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_magic_means_no_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ext(&dir);
        let mut f = File::create(loc.path()).unwrap();
        f.write_all(&[0x42; 65536]).unwrap();
        drop(f);
        let msg = MetaStore::open(&loc).unwrap_err().to_string();
        assert!(msg.contains("no twinbd metadata"), "{msg}");
        assert!(msg.contains(&loc.path().display().to_string()), "{msg}");

        File::create(loc.path()).unwrap();
        let e = MetaStore::open(&loc).unwrap_err();
        assert!(matches!(e, MetaError::NoMetadata { .. }), "{e}");

        let e = MetaStore::open(&MetaLocation::External(dir.path().join("missing"))).unwrap_err();
        assert!(matches!(e, MetaError::Io { op: "open", .. }), "{e}");
    }

    #[test]
    fn truncated_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ext(&dir);
        drop(MetaStore::create(&loc, params(1 << 30, 4096), false).unwrap());
        let f = OpenOptions::new().write(true).open(loc.path()).unwrap();
        f.set_len(8192 + 4096).unwrap();
        let msg = MetaStore::open(&loc).unwrap_err().to_string();
        assert!(msg.contains("truncated"), "{msg}");
    }

    #[test]
    fn damaged_bitmap_page_reads_as_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ext(&dir);
        let page_bytes = BITS_PER_PAGE * 512;
        let size = 3 * page_bytes + 1000;
        let mut st = MetaStore::create(&loc, params(size, 512), false).unwrap();
        assert_eq!(st.bitmap().num_pages(), 4);
        st.set_dirty(0, 512).unwrap();
        st.set_dirty(2 * page_bytes + 4096, 10).unwrap();
        assert!(!st.has_unflushed());
        drop(st);
        // Reopen without flush: set_dirty was durable on its own.
        let (st, report) = MetaStore::open(&loc).unwrap();
        assert!(report.warnings.is_empty());
        assert_eq!(st.bitmap().count_dirty(), 2);
        drop(st);

        patch(loc.path(), BITMAP_OFFSET + PAGE_SIZE + 1000, &[1]);
        let (mut st, report) = MetaStore::open(&loc).unwrap();
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(
            report.warnings[0].contains("bitmap page 1"),
            "{:?}",
            report.warnings
        );
        let runs: Vec<_> = st.bitmap().iter_dirty_runs().collect();
        assert_eq!(
            runs,
            vec![
                (0, 512),
                (page_bytes, page_bytes),
                (2 * page_bytes + 4096, 512)
            ]
        );
        assert!(st.has_unflushed());
        st.flush_bitmap().unwrap();
        drop(st);
        let (st, report) = MetaStore::open(&loc).unwrap();
        assert!(report.warnings.is_empty());
        assert_eq!(st.bitmap().iter_dirty_runs().collect::<Vec<_>>(), runs);

        // A page stored under the wrong index is not trusted either.
        let page0 = read(loc.path(), BITMAP_OFFSET, 4096);
        patch(loc.path(), BITMAP_OFFSET + 3 * PAGE_SIZE, &page0);
        let (st, report) = MetaStore::open(&loc).unwrap();
        assert!(
            report.warnings[0].contains("bitmap page 3"),
            "{:?}",
            report.warnings
        );
        assert!(st.bitmap().is_dirty(3 * page_bytes + 999, 1));
    }

    #[test]
    fn lazy_clear_needs_flush() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ext(&dir);
        let mut st = MetaStore::create(&loc, params(1 << 24, 4096), false).unwrap();
        st.set_dirty(0, 1 << 24).unwrap();
        st.clear_clean(0, 4096).unwrap();
        st.clear_clean_lazy(4096, 4096);
        assert!(st.has_unflushed());
        drop(st);
        let (mut st, _) = MetaStore::open(&loc).unwrap();
        assert_eq!(st.bitmap().dirty_bytes(), (1 << 24) - 4096);
        st.clear_clean_lazy(4096, 8192);
        st.flush_bitmap().unwrap();
        assert!(!st.has_unflushed());
        st.bitmap_mut().clear_all();
        assert!(st.has_unflushed());
        drop(st);
        let (st, _) = MetaStore::open(&loc).unwrap();
        assert_eq!(st.bitmap().dirty_bytes(), (1 << 24) - 3 * 4096);
    }

    #[test]
    fn create_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ext(&dir);
        let first = MetaStore::create(&loc, params(1 << 20, 4096), false).unwrap();
        let id = first.superblock().node_id;
        drop(first);
        let e = MetaStore::create(&loc, params(1 << 20, 4096), false).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, MetaError::Exists { .. }), "{msg}");
        assert!(
            msg.contains("--force") && msg.contains("valid twinbd metadata"),
            "{msg}"
        );
        // Damaged metadata is protected too.
        patch(loc.path(), 100, &[0xEE]);
        patch(loc.path(), 4096 + 100, &[0xEE]);
        let msg = MetaStore::create(&loc, params(1 << 20, 4096), false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("damaged twinbd metadata"), "{msg}");

        let st = MetaStore::create(&loc, params(2 << 20, 8192), true).unwrap();
        assert_ne!(st.superblock().node_id, id);
        drop(st);
        let (st, report) = MetaStore::open(&loc).unwrap();
        assert!(report.warnings.is_empty());
        assert_eq!(
            (st.data_size(), st.superblock().granularity),
            (2 << 20, 8192)
        );

        // A non-empty file that is not metadata is refused; zeros are fine.
        let other = MetaLocation::External(dir.path().join("other"));
        std::fs::write(other.path(), b"precious").unwrap();
        let msg = MetaStore::create(&other, params(1 << 20, 4096), false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not empty"), "{msg}");
        std::fs::write(other.path(), [0u8; 100]).unwrap();
        MetaStore::create(&other, params(1 << 20, 4096), false).unwrap();
    }

    #[test]
    fn create_validates_params() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ext(&dir);
        assert!(matches!(
            MetaStore::create(&loc, params(1 << 20, 3000), false),
            Err(MetaError::InvalidGranularity(3000))
        ));
        assert!(matches!(
            MetaStore::create(&loc, params(0, 4096), false),
            Err(MetaError::Invalid { .. })
        ));
        let e = MetaStore::create(&loc, params(1 << 62, 512), false).unwrap_err();
        assert!(e.to_string().contains("coarser granularity"), "{e}");
        assert!(!loc.path().exists(), "no file left behind");
    }

    #[test]
    fn identity_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ext(&dir);
        let st = MetaStore::create(&loc, params(1 << 20, 4096), false).unwrap();
        st.check_identity("r0", "alpha").unwrap();
        let e = st.check_identity("r1", "alpha").unwrap_err();
        assert!(
            matches!(&e, MetaError::Mismatch { field: "resource", found, .. } if found == "r0"),
            "{e}"
        );
        let msg = st.check_identity("r0", "beta").unwrap_err().to_string();
        assert!(
            msg.contains("node \"alpha\"") && msg.contains("\"beta\""),
            "{msg}"
        );
        assert!(msg.contains(&loc.path().display().to_string()), "{msg}");
    }

    #[test]
    fn internal_layout_is_maximal() {
        for disk in [
            64 << 20,
            (1u64 << 40) + 12345,
            1 << 50,
            3 * 4096 + 8192 + 4096,
        ] {
            for g in [512, 4096, 65536, MAX_GRANULARITY] {
                let Ok((data, off)) = internal_layout(disk, g) else {
                    continue;
                };
                assert_eq!(data, off);
                assert_eq!(data % 4096, 0);
                let end = |d: u64| d + area_len(d, g) + LOCATOR_SIZE;
                assert!(end(data) <= disk, "disk {disk} g {g}");
                assert!(
                    end(data + 4096) > disk / 4096 * 4096,
                    "not maximal: {disk} {g}"
                );
            }
        }
        let e = internal_layout(16384, 4096).unwrap_err();
        assert!(matches!(e, MetaError::TooSmall { size: 16384, .. }), "{e}");
        assert!(internal_layout(20480, 4096).is_ok());
        assert!(matches!(
            internal_layout(1 << 30, 100),
            Err(MetaError::InvalidGranularity(100))
        ));
    }

    fn sparse_disk(dir: &tempfile::TempDir, size: u64) -> PathBuf {
        let p = dir.path().join("disk.img");
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    #[test]
    fn internal_metadata_lives_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let disk_size = (64 << 20) + 100;
        let disk = sparse_disk(&dir, disk_size);
        let (data_size, meta_off) = internal_layout(disk_size, 4096).unwrap();
        // Mark the data region; create must not touch it.
        let pattern = vec![0x5A; 4096];
        for at in [0, data_size / 2, data_size - 4096] {
            patch(&disk, at, &pattern);
        }
        let loc = MetaLocation::Internal { disk: disk.clone() };
        let st = MetaStore::create(&loc, params(0, 4096), false).unwrap();
        assert_eq!((st.data_size(), st.area_offset()), (data_size, meta_off));
        let area = st.superblock().area_len();
        assert!(data_size + area + LOCATOR_SIZE <= disk_size);
        drop(st);
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), disk_size);
        for at in [0, data_size / 2, data_size - 4096] {
            assert_eq!(read(&disk, at, 4096), pattern, "data at {at} changed");
        }
        assert_eq!(read(&disk, meta_off, 8), b"TWINBDMD");
        assert_eq!(read(&disk, meta_off + 4096, 8), b"TWINBDMD");
        let loc_off = disk_size / 4096 * 4096 - 4096;
        assert_eq!(read(&disk, loc_off, 8), b"TWINBDLO");

        let (mut st, report) = MetaStore::open(&loc).unwrap();
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        assert_eq!(st.data_size(), data_size);
        st.set_dirty(data_size - 1, 1).unwrap();
        st.update(|sb| sb.disk_state = DiskState::UpToDate).unwrap();
        drop(st);
        assert_eq!(read(&disk, data_size - 4096, 4096), pattern);

        let e = MetaStore::create(&loc, params(0, 4096), false).unwrap_err();
        assert!(matches!(e, MetaError::Exists { .. }), "{e}");
    }

    #[test]
    fn internal_damaged_locator_is_probed_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let disk_size = 64 << 20;
        let disk = sparse_disk(&dir, disk_size);
        let loc = MetaLocation::Internal { disk: disk.clone() };
        drop(MetaStore::create(&loc, params(0, 16384), false).unwrap());
        let loc_off = disk_size - 4096;
        patch(&disk, loc_off + 20, &[0xAA]);

        let (mut st, report) = MetaStore::open(&loc).unwrap();
        assert_eq!(st.superblock().granularity, 16384);
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(
            report.warnings[0].contains("locator"),
            "{:?}",
            report.warnings
        );
        st.update(|sb| sb.peer_node_id = 3).unwrap();
        drop(st);
        let (st, report) = MetaStore::open(&loc).unwrap();
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        let area = st.area_offset();
        drop(st);

        // Both slots damaged: corrupt, not "no metadata"; also when the
        // locator is gone as well.
        patch(&disk, area + 50, &[0xAA]);
        patch(&disk, area + 4096 + 50, &[0xAA]);
        let msg = MetaStore::open(&loc).unwrap_err().to_string();
        assert!(
            msg.contains("corrupt") && msg.contains(&format!("at offset {area}")),
            "{msg}"
        );
        patch(&disk, loc_off, &[0u8; 4096]);
        let msg = MetaStore::open(&loc).unwrap_err().to_string();
        assert!(
            msg.contains("no usable superblock") && msg.contains("slot B: checksum"),
            "{msg}"
        );

        // Nothing at all: a clear "no metadata" error.
        let blank = MetaLocation::Internal {
            disk: sparse_disk(&dir, 32 << 20),
        };
        let msg = MetaStore::open(&blank).unwrap_err().to_string();
        assert!(msg.contains("no twinbd metadata"), "{msg}");
    }

    #[test]
    fn internal_too_small_names_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = sparse_disk(&dir, 8192);
        let loc = MetaLocation::Internal { disk: disk.clone() };
        let e = MetaStore::create(&loc, params(0, 4096), false).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, MetaError::TooSmall { .. }), "{msg}");
        assert!(msg.contains(&disk.display().to_string()), "{msg}");
    }
}

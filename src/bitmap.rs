//! In-memory dirty-region bitmap.
//!
//! One bit stands for one *chunk* of `granularity` bytes of the exported
//! device; a set bit means "this chunk may differ from the peer and must be
//! resynchronised". The last chunk may be shorter than `granularity` when the
//! device size is not a multiple of it; byte counts reported by this module are
//! capped at the device size accordingly.
//!
//! Bits are kept in `u64` words: chunk `n` is bit `n % 64` of word `n / 64`.
//! Words are grouped into on-disk pages of [`WORDS_PER_PAGE`] words each (see
//! `crate::meta` for the page format), so every mutating operation reports the
//! range of page indices it changed, letting the metadata store write back only
//! those pages.
//!
//! Invariant: bits past `num_bits()` in the last word are always zero.

use std::fmt;
use std::ops::Range;

/// Smallest supported bitmap granularity in bytes.
pub const MIN_GRANULARITY: u32 = 512;
/// Largest supported bitmap granularity in bytes (64 MiB).
pub const MAX_GRANULARITY: u32 = 1 << 26;
/// Granularity used when the operator does not choose one.
pub const DEFAULT_GRANULARITY: u32 = 4096;

/// Size of one on-disk bitmap page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of header at the start of each on-disk bitmap page.
pub const PAGE_HEADER_SIZE: usize = 8;
/// Bytes of bitmap payload in each on-disk page.
pub const PAGE_PAYLOAD_SIZE: usize = PAGE_SIZE - PAGE_HEADER_SIZE;
/// Bitmap words stored in one on-disk page (4088 / 8 = 511).
pub const WORDS_PER_PAGE: usize = PAGE_PAYLOAD_SIZE / 8;
/// Chunks (bits) covered by one on-disk page.
pub const BITS_PER_PAGE: u64 = (WORDS_PER_PAGE * 64) as u64;

/// Why a bitmap could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The granularity is not a power of two in the supported range.
    #[error(
        "invalid bitmap granularity {0}: must be a power of two between {MIN_GRANULARITY} and {MAX_GRANULARITY}"
    )]
    InvalidGranularity(u32),
    /// The bitmap for this device size does not fit in memory.
    #[error("a dirty bitmap for {device_size} bytes at granularity {granularity} needs {words} words, more than can be allocated (at most 2^32 words, 1 PiB at 4 KiB per bit)")]
    TooLarge {
        /// Device size in bytes.
        device_size: u64,
        /// Granularity in bytes.
        granularity: u32,
        /// Number of u64 words required.
        words: u64,
    },
}

/// Returns true if `granularity` is acceptable for a [`Bitmap`].
pub fn valid_granularity(granularity: u32) -> bool {
    granularity.is_power_of_two() && (MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
}

/// Number of chunks (bits) needed to cover `device_size` bytes.
///
/// `granularity` must be valid (see [`valid_granularity`]); the result for an
/// invalid one is meaningless but does not panic unless it is zero.
pub fn bits_for(device_size: u64, granularity: u32) -> u64 {
    device_size.div_ceil(u64::from(granularity.max(1)))
}

/// Number of on-disk pages needed for a bitmap of `device_size` bytes.
pub fn pages_for(device_size: u64, granularity: u32) -> u64 {
    bits_for(device_size, granularity).div_ceil(BITS_PER_PAGE)
}

/// Dirty-region bitmap; see the module documentation.
#[derive(Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    num_bits: u64,
    device_size: u64,
    granularity: u32,
    shift: u32,
}

#[derive(Clone, Copy)]
enum Op {
    Set,
    Clear,
}

impl Bitmap {
    /// Creates an all-clean bitmap for a device of `device_size` bytes.
    ///
    /// # Panics
    /// If `granularity` is invalid or the bitmap cannot be allocated; use
    /// [`Bitmap::try_new`] for values that come from outside the program.
    pub fn new(device_size: u64, granularity: u32) -> Bitmap {
        match Bitmap::try_new(device_size, granularity) {
            Ok(b) => b,
            Err(e) => panic!("Bitmap::new: {e}"),
        }
    }

    /// Creates an all-clean bitmap, reporting invalid parameters or allocation
    /// failure as an error instead of panicking.
    pub fn try_new(device_size: u64, granularity: u32) -> Result<Bitmap, BitmapError> {
        const MAX_WORDS: u64 = 1 << 32;
        if !valid_granularity(granularity) {
            return Err(BitmapError::InvalidGranularity(granularity));
        }
        let num_bits = bits_for(device_size, granularity);
        let nwords = num_bits.div_ceil(64);
        let too_large = || BitmapError::TooLarge {
            device_size,
            granularity,
            words: nwords,
        };
        // Beyond this the allocation below might "succeed" by overcommit and fail later;
        // 2^32 words (32 GiB of bitmap) cover 1 PiB at the default 4 KiB granularity.
        if nwords > MAX_WORDS {
            return Err(too_large());
        }
        let n = usize::try_from(nwords).map_err(|_| too_large())?;
        let mut words = Vec::new();
        words.try_reserve_exact(n).map_err(|_| too_large())?;
        words.resize(n, 0);
        Ok(Bitmap {
            words,
            num_bits,
            device_size,
            granularity,
            shift: granularity.trailing_zeros(),
        })
    }

    /// Bytes of device covered by one bit.
    pub fn granularity(&self) -> u32 {
        self.granularity
    }

    /// Size in bytes of the device this bitmap describes.
    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    /// Number of chunks (bits).
    pub fn num_bits(&self) -> u64 {
        self.num_bits
    }

    /// Number of on-disk pages holding this bitmap.
    pub fn num_pages(&self) -> usize {
        self.words.len().div_ceil(WORDS_PER_PAGE)
    }

    /// Chunk index range `[first, end)` touched by a byte range, clipped to the
    /// device; `None` if the range is empty or entirely past the end.
    fn chunk_span(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.device_size {
            return None;
        }
        let end_byte = offset.saturating_add(len).min(self.device_size);
        Some((offset >> self.shift, ((end_byte - 1) >> self.shift) + 1))
    }

    /// On-disk pages whose bits a byte range touches (empty if none).
    pub fn pages_for_range(&self, offset: u64, len: u64) -> Range<usize> {
        match self.chunk_span(offset, len) {
            Some((first, end)) => page_of_bit(first)..page_of_bit(end - 1) + 1,
            None => 0..0,
        }
    }

    /// Widens a byte range to whole chunks, clipped to the device size.
    /// Returns `(offset, len)`; `len` is 0 if the range touches no chunk.
    pub fn align_range(&self, offset: u64, len: u64) -> (u64, u64) {
        match self.chunk_span(offset, len) {
            Some((first, end)) => {
                let start = first << self.shift;
                (start, self.chunk_end_byte(end) - start)
            }
            None => (offset.min(self.device_size), 0),
        }
    }

    /// Byte offset where chunk `end` starts, capped at the device size.
    fn chunk_end_byte(&self, end: u64) -> u64 {
        end.checked_shl(self.shift)
            .map_or(self.device_size, |b| b.min(self.device_size))
    }

    fn apply(&mut self, offset: u64, len: u64, op: Op) -> Range<usize> {
        let Some((first, end)) = self.chunk_span(offset, len) else {
            return 0..0;
        };
        let first_word = (first / 64) as usize;
        let last_word = ((end - 1) / 64) as usize;
        let mut changed: Option<(usize, usize)> = None;
        for w in first_word..=last_word {
            let lo = if w == first_word { first % 64 } else { 0 };
            let hi = if w == last_word {
                (end - 1) % 64 + 1
            } else {
                64
            };
            let mask = bit_mask(lo as u32, hi as u32);
            let old = self.words[w];
            let new = match op {
                Op::Set => old | mask,
                Op::Clear => old & !mask,
            };
            if new != old {
                self.words[w] = new;
                let page = w / WORDS_PER_PAGE;
                changed = Some(changed.map_or((page, page), |(a, _)| (a, page)));
            }
        }
        changed.map_or(0..0, |(a, b)| a..b + 1)
    }

    /// Marks every chunk touched by `[offset, offset + len)` dirty.
    ///
    /// Parts of the range past the device end are ignored. Returns the range of
    /// on-disk page indices whose contents actually changed (empty if every bit
    /// was already set), so that only those pages need writing back.
    pub fn set_range(&mut self, offset: u64, len: u64) -> Range<usize> {
        self.apply(offset, len, Op::Set)
    }

    /// Marks every chunk touched by `[offset, offset + len)` clean — including
    /// chunks only partially covered by the range.
    ///
    /// Callers must therefore only clear ranges whose touched chunks they have
    /// synchronised completely (use [`Bitmap::align_range`] to widen a range
    /// before syncing it). Returns the range of changed page indices.
    pub fn clear_range(&mut self, offset: u64, len: u64) -> Range<usize> {
        self.apply(offset, len, Op::Clear)
    }

    /// Returns true if any chunk touched by the byte range is dirty.
    pub fn is_dirty(&self, offset: u64, len: u64) -> bool {
        match self.chunk_span(offset, len) {
            Some((first, end)) => self.find_from(first, true) < end,
            None => false,
        }
    }

    /// Returns true if every chunk touched by the byte range is dirty (an empty range is).
    pub fn is_all_dirty(&self, offset: u64, len: u64) -> bool {
        match self.chunk_span(offset, len) {
            Some((first, end)) => self.find_from(first, false) >= end,
            None => true,
        }
    }

    /// Is chunk `bit` dirty? Out-of-range indices read as clean.
    pub fn bit(&self, bit: u64) -> bool {
        bit < self.num_bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Number of dirty chunks.
    pub fn count_dirty(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Number of dirty bytes: dirty chunks times granularity, with the last
    /// (possibly partial) chunk counted only up to the device size.
    pub fn dirty_bytes(&self) -> u64 {
        let full = self.count_dirty() << self.shift;
        if self.num_bits > 0 && self.bit(self.num_bits - 1) {
            let overhang = (self.num_bits << self.shift) - self.device_size;
            full - overhang
        } else {
            full
        }
    }

    /// Marks the whole device dirty. Returns the range of all pages.
    pub fn set_all(&mut self) -> Range<usize> {
        self.words.fill(!0);
        self.mask_tail();
        0..self.num_pages()
    }

    /// Marks the whole device clean. Returns the range of all pages.
    pub fn clear_all(&mut self) -> Range<usize> {
        self.words.fill(0);
        0..self.num_pages()
    }

    /// Zeroes the bits past `num_bits` in the last word (the invariant).
    fn mask_tail(&mut self) {
        let rem = self.num_bits % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= bit_mask(0, rem as u32);
            }
        }
    }

    /// Index of the first bit `>= from` that is set (`want_set`) or clear;
    /// `num_bits()` if there is none.
    fn find_from(&self, from: u64, want_set: bool) -> u64 {
        if from >= self.num_bits {
            return self.num_bits;
        }
        let load = |w: usize| {
            if want_set {
                self.words[w]
            } else {
                !self.words[w]
            }
        };
        let mut w = (from / 64) as usize;
        let mut word = load(w) & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let bit = w as u64 * 64 + u64::from(word.trailing_zeros());
                return bit.min(self.num_bits);
            }
            w += 1;
            if w >= self.words.len() {
                return self.num_bits;
            }
            word = load(w);
        }
    }

    /// Iterates over maximal runs of dirty bytes as `(offset, len)` pairs in
    /// ascending order; the last run is capped at the device size.
    pub fn iter_dirty_runs(&self) -> DirtyRuns<'_> {
        DirtyRuns {
            bitmap: self,
            next: 0,
        }
    }

    /// The words stored in on-disk page `page` (the last page may hold fewer
    /// than [`WORDS_PER_PAGE`]; an out-of-range page yields an empty slice).
    pub fn page_words(&self, page: usize) -> &[u64] {
        let start = page.saturating_mul(WORDS_PER_PAGE).min(self.words.len());
        let end = start.saturating_add(WORDS_PER_PAGE).min(self.words.len());
        &self.words[start..end]
    }

    /// Replaces the words of page `page` with `words` (extra input words are
    /// ignored, missing ones read as zero; bits past the device end are
    /// dropped). Out-of-range pages are ignored.
    pub fn load_page_words(&mut self, page: usize, words: &[u64]) {
        let start = page.saturating_mul(WORDS_PER_PAGE).min(self.words.len());
        let end = start.saturating_add(WORDS_PER_PAGE).min(self.words.len());
        for (i, dst) in self.words[start..end].iter_mut().enumerate() {
            *dst = words.get(i).copied().unwrap_or(0);
        }
        self.mask_tail();
    }

    /// Marks every chunk covered by page `page` dirty.
    pub fn set_page_all(&mut self, page: usize) {
        let start = page.saturating_mul(WORDS_PER_PAGE).min(self.words.len());
        let end = start.saturating_add(WORDS_PER_PAGE).min(self.words.len());
        self.words[start..end].fill(!0);
        self.mask_tail();
    }

    /// Byte range `(offset, len)` of the device covered by page `page`,
    /// capped at the device size.
    pub fn page_byte_range(&self, page: usize) -> (u64, u64) {
        let first = (page as u64).saturating_mul(BITS_PER_PAGE);
        let end = first.saturating_add(BITS_PER_PAGE);
        let start = self.chunk_end_byte(first);
        (start, self.chunk_end_byte(end) - start)
    }
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bitmap")
            .field("device_size", &self.device_size)
            .field("granularity", &self.granularity)
            .field("num_bits", &self.num_bits)
            .field("dirty_bits", &self.count_dirty())
            .finish()
    }
}

/// Iterator returned by [`Bitmap::iter_dirty_runs`].
pub struct DirtyRuns<'a> {
    bitmap: &'a Bitmap,
    next: u64,
}

impl Iterator for DirtyRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let bm = self.bitmap;
        let start = bm.find_from(self.next, true);
        if start >= bm.num_bits {
            self.next = bm.num_bits;
            return None;
        }
        let end = bm.find_from(start, false);
        self.next = end;
        let off = start << bm.shift;
        Some((off, bm.chunk_end_byte(end) - off))
    }
}

/// Runs of set bits in `words`, whose first word is word number `first_word` of a bitmap:
/// `(first bit, bits)` in order, each as long as it can be (runs crossing a word boundary
/// are one run). Used to turn a peer's bitmap words into ranges.
pub fn word_runs(first_word: u64, words: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, &word) in words.iter().enumerate() {
        let base = (first_word + i as u64) * 64;
        let mut pos = 0u32;
        while pos < 64 {
            let rest = word >> pos;
            if rest == 0 {
                break;
            }
            let skip = rest.trailing_zeros();
            let len = (rest >> skip).trailing_ones();
            let start = base + u64::from(pos + skip);
            match runs.last_mut() {
                Some((s, n)) if *s + *n == start => *n += u64::from(len),
                _ => runs.push((start, u64::from(len))),
            }
            pos += skip + len;
        }
    }
    runs
}

/// Splits byte ranges (in order, disjoint) into pieces of at most `max` bytes, in order; a
/// piece never spans two ranges. `max` of 0 is taken as 1.
pub fn split_runs(
    runs: impl IntoIterator<Item = (u64, u64)>,
    max: u64,
) -> impl Iterator<Item = (u64, u64)> {
    let max = max.max(1);
    runs.into_iter().flat_map(move |(off, len)| {
        let end = off.saturating_add(len);
        let mut at = off;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let piece = (end - at).min(max);
            let r = (at, piece);
            at += piece;
            Some(r)
        })
    })
}

/// Page index holding chunk `bit`.
fn page_of_bit(bit: u64) -> usize {
    (bit / BITS_PER_PAGE) as usize
}

/// Mask with bits `lo..hi` set (`hi <= 64`, `lo <= hi`).
fn bit_mask(lo: u32, hi: u32) -> u64 {
    let width = hi - lo;
    if width >= 64 {
        !0
    } else {
        ((1u64 << width) - 1) << lo
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Naive model: one bool per chunk.
    struct Model {
        bits: Vec<bool>,
        size: u64,
        gran: u64,
    }

    impl Model {
        fn new(size: u64, gran: u32) -> Model {
            let n = bits_for(size, gran) as usize;
            Model {
                bits: vec![false; n],
                size,
                gran: u64::from(gran),
            }
        }
        fn span(&self, off: u64, len: u64) -> Range<usize> {
            if len == 0 || off >= self.size {
                return 0..0;
            }
            let end = (off + len).min(self.size);
            (off / self.gran) as usize..((end - 1) / self.gran + 1) as usize
        }
        fn apply(&mut self, off: u64, len: u64, v: bool) {
            for i in self.span(off, len) {
                self.bits[i] = v;
            }
        }
        fn runs(&self) -> Vec<(u64, u64)> {
            let mut out = Vec::new();
            let mut i = 0;
            while i < self.bits.len() {
                if self.bits[i] {
                    let s = i;
                    while i < self.bits.len() && self.bits[i] {
                        i += 1;
                    }
                    let a = s as u64 * self.gran;
                    let b = (i as u64 * self.gran).min(self.size);
                    out.push((a, b - a));
                } else {
                    i += 1;
                }
            }
            out
        }
        fn dirty_bytes(&self) -> u64 {
            self.runs().iter().map(|r| r.1).sum()
        }
    }

    #[test]
    fn basic_set_clear() {
        let mut b = Bitmap::new(10 * 4096 + 100, 4096);
        assert_eq!(b.num_bits(), 11);
        assert_eq!(b.num_pages(), 1);
        assert!(!b.is_dirty(0, u64::MAX));
        assert_eq!(b.set_range(4095, 2), 0..1);
        assert_eq!(b.count_dirty(), 2);
        assert_eq!(b.iter_dirty_runs().collect::<Vec<_>>(), vec![(0, 8192)]);
        // Already set: nothing changes, no page to write.
        assert_eq!(b.set_range(0, 10), 0..0);
        b.set_range(10 * 4096, 1);
        assert_eq!(b.dirty_bytes(), 8192 + 100);
        assert_eq!(
            b.iter_dirty_runs().collect::<Vec<_>>(),
            vec![(0, 8192), (40960, 100)]
        );
        assert_eq!(b.clear_range(4096, 1), 0..1);
        assert!(b.is_dirty(0, 1) && !b.is_dirty(4096, 4096));
        // Past the end is ignored.
        assert_eq!(b.set_range(1 << 40, 4096), 0..0);
        assert_eq!(b.set_all(), 0..1);
        assert_eq!(b.count_dirty(), 11);
        assert_eq!(b.dirty_bytes(), b.device_size());
        b.clear_all();
        assert_eq!(b.count_dirty(), 0);
        assert_eq!(b.iter_dirty_runs().next(), None);
    }

    #[test]
    fn empty_device_and_bad_granularity() {
        let mut b = Bitmap::new(0, 512);
        assert_eq!(b.num_bits(), 0);
        assert_eq!(b.num_pages(), 0);
        assert_eq!(b.set_all(), 0..0);
        assert_eq!(b.dirty_bytes(), 0);
        assert!(matches!(
            Bitmap::try_new(1, 1000),
            Err(BitmapError::InvalidGranularity(1000))
        ));
        assert!(Bitmap::try_new(1, 256).is_err());
        assert!(matches!(
            Bitmap::try_new(u64::MAX, 512),
            Err(BitmapError::TooLarge { .. })
        ));
    }

    #[test]
    fn page_boundaries() {
        let gran = 512u32;
        let size = BITS_PER_PAGE * 3 * 512 + 7;
        let mut b = Bitmap::new(size, gran);
        assert_eq!(b.num_pages(), 4);
        let page_bytes = BITS_PER_PAGE * 512;
        assert_eq!(b.pages_for_range(page_bytes - 1, 2), 0..2);
        assert_eq!(b.set_range(page_bytes - 1, 2), 0..2);
        assert_eq!(b.set_range(0, size), 0..4);
        assert_eq!(b.page_byte_range(3), (3 * page_bytes, 7));
        assert_eq!(b.page_byte_range(1), (page_bytes, page_bytes));
        assert_eq!(b.page_words(3).len(), 1);
        b.clear_all();
        b.set_page_all(3);
        assert_eq!(
            b.iter_dirty_runs().collect::<Vec<_>>(),
            vec![(3 * page_bytes, 7)]
        );
        b.load_page_words(3, &[!0, !0]);
        assert_eq!(b.count_dirty(), 1, "tail bits must be masked");
        assert_eq!(b.align_range(513, 2), (512, 512));
        assert_eq!(b.align_range(size - 1, 100), (size - 7, 7));
        assert_eq!(b.align_range(size, 100), (size, 0));
    }

    /// Random device size (odd sizes, spanning up to several on-disk pages),
    /// granularity, and a list of (set?, offset, len) operations mixing short
    /// and long ranges.
    fn arb_case() -> impl Strategy<Value = (u64, u32, Vec<(bool, u64, u64)>)> {
        let size = prop_oneof![1u64..100_000, 1u64..(40 << 20)];
        (size, 9u32..14).prop_flat_map(|(size, shift)| {
            let gran = 1u32 << shift;
            let len = prop_oneof![0..3 * u64::from(gran), 0..size / 2 + 5000];
            let op = (any::<bool>(), 0..size + 2 * u64::from(gran), len);
            (Just(size), Just(gran), prop::collection::vec(op, 0..24))
        })
    }

    proptest! {
        #[test]
        fn matches_model((size, gran, ops) in arb_case()) {
            let mut b = Bitmap::new(size, gran);
            let mut m = Model::new(size, gran);
            prop_assert_eq!(b.num_bits() as usize, m.bits.len());
            for (set, off, len) in ops {
                let before = b.clone();
                let pages = if set { b.set_range(off, len) } else { b.clear_range(off, len) };
                m.apply(off, len, set);
                // The reported page range is exactly the span of changed pages.
                let changed: Vec<usize> = (0..b.num_pages())
                    .filter(|&p| b.page_words(p) != before.page_words(p))
                    .collect();
                match (changed.first(), changed.last()) {
                    (Some(&a), Some(&z)) => prop_assert_eq!(pages, a..z + 1),
                    _ => prop_assert!(pages.is_empty()),
                }
                prop_assert_eq!(b.is_dirty(off, len), m.span(off, len).any(|i| m.bits[i]));
            }
            for (i, &v) in m.bits.iter().enumerate() {
                prop_assert_eq!(b.bit(i as u64), v);
            }
            prop_assert_eq!(b.count_dirty(), m.bits.iter().filter(|&&v| v).count() as u64);
            prop_assert_eq!(b.iter_dirty_runs().collect::<Vec<_>>(), m.runs());
            prop_assert_eq!(b.dirty_bytes(), m.dirty_bytes());
            b.set_all();
            prop_assert_eq!(b.dirty_bytes(), size);
            prop_assert_eq!(b.iter_dirty_runs().collect::<Vec<_>>(), vec![(0, size)]);
        }

        #[test]
        fn page_roundtrip((size, gran, ops) in arb_case()) {
            let mut b = Bitmap::new(size, gran);
            for (set, off, len) in ops {
                if set { b.set_range(off, len); } else { b.clear_range(off, len); }
            }
            let mut c = Bitmap::new(size, gran);
            for p in 0..b.num_pages() {
                c.load_page_words(p, b.page_words(p));
            }
            prop_assert_eq!(b, c);
        }
    }

    /// Bits of `words` (first word `first_word`) as a sorted list of bit numbers.
    fn set_bits(first_word: u64, words: &[u64]) -> Vec<u64> {
        let mut v = Vec::new();
        for (i, w) in words.iter().enumerate() {
            for b in 0..64 {
                if w & (1u64 << b) != 0 {
                    v.push((first_word + i as u64) * 64 + b);
                }
            }
        }
        v
    }

    fn arb_words() -> impl Strategy<Value = Vec<u64>> {
        let word = prop_oneof![
            Just(0u64),
            Just(!0u64),
            any::<u64>(),
            0u64..16,
            (0u32..64).prop_map(|s| !0u64 << s)
        ];
        prop::collection::vec(word, 0..12)
    }

    /// Disjoint byte ranges in order, with gaps (possibly none) between them.
    fn arb_runs() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0u64..5000, 1u64..20_000), 0..12).prop_map(|v| {
            let mut at = 0;
            v.into_iter()
                .map(|(gap, len)| {
                    let r = (at + gap, len);
                    at += gap + len;
                    r
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn word_runs_are_the_set_bits_as_maximal_runs(first in 0u64..1000, words in arb_words()) {
            let runs = word_runs(first, &words);
            let mut expanded = Vec::new();
            for (i, &(start, n)) in runs.iter().enumerate() {
                prop_assert!(n > 0);
                if i > 0 {
                    let (ps, pn) = runs[i - 1];
                    // In order, disjoint and not touching: each run is as long as it can be.
                    prop_assert!(ps + pn < start);
                }
                expanded.extend(start..start + n);
            }
            prop_assert_eq!(expanded, set_bits(first, &words));
        }

        #[test]
        fn word_runs_mark_the_same_bits_as_the_words(
            (size, gran) in (1u64..(8 << 20), 9u32..14).prop_map(|(s, g)| (s, 1u32 << g)),
            first in 0u64..4,
            words in arb_words(),
        ) {
            // Setting each run's byte range gives the bitmap the words describe (bits past
            // the device's end do not exist).
            let mut b = Bitmap::new(size, gran);
            let g = u64::from(gran);
            for (bit, n) in word_runs(first, &words) {
                b.set_range(bit * g, n * g);
            }
            let want: Vec<u64> = set_bits(first, &words)
                .into_iter()
                .filter(|&bit| bit < b.num_bits())
                .collect();
            let got: Vec<u64> = (0..b.num_bits()).filter(|&bit| b.bit(bit)).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn split_runs_cover_each_range_exactly(runs in arb_runs(), max in 0u64..70_000) {
            let pieces: Vec<(u64, u64)> = split_runs(runs.clone(), max).collect();
            let cap = max.max(1);
            let mut it = pieces.iter().peekable();
            for &(off, len) in &runs {
                // The pieces of one range: contiguous, in order, none longer than `max`,
                // all full-size but the last.
                let mut at = off;
                while at < off + len {
                    let &(p_off, p_len) = it.next().expect("a piece for every byte");
                    prop_assert_eq!(p_off, at);
                    prop_assert!(p_len > 0 && p_len <= cap);
                    prop_assert!(p_off + p_len <= off + len, "piece crosses its range");
                    if p_off + p_len < off + len {
                        prop_assert_eq!(p_len, cap);
                    }
                    at += p_len;
                }
            }
            prop_assert!(it.next().is_none(), "no piece outside the ranges");
        }
    }
}

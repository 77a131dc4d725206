//! Ranges of the disk that are in the page cache, for replies sent without a copy through
//! user memory (spliced from the disk file straight to the client's socket).
//!
//! A read served that way never blocks on the disk only if every page of it is cached, so a
//! range qualifies only when `cachestat(2)` (Linux 6.5+) counts all its pages as cached at the
//! moment of the check. A page evicted between the check and the send is read in by the send
//! itself: a rare, bounded stall of one task, never a wrong byte. On a kernel without
//! `cachestat` no range qualifies and every read takes the ordinary path.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `cachestat` has the same number on every architecture (it came after the unification).
const SYS_CACHESTAT: libc::c_long = 451;

/// Turned off for the process the first time the kernel says it has no `cachestat`.
static CACHESTAT_WORKS: AtomicBool = AtomicBool::new(true);

/// `len` bytes of a disk file at `offset`, every page of which was in the page cache when
/// the range was made.
#[derive(Debug, Clone)]
pub struct FileRange {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: usize,
}

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|p| *p > 0).unwrap_or(4096)
}

/// Whether every page of `[offset, offset+len)` of `file` is in the page cache now.
pub fn resident(file: &File, offset: u64, len: usize) -> bool {
    cached_pages(file, offset, len).is_some_and(|(cached, pages)| cached >= pages)
}

/// Whether no page of `[offset, offset+len)` of `file` is in the page cache now (`false`
/// when the kernel cannot say).
pub fn none_cached(file: &File, offset: u64, len: usize) -> bool {
    cached_pages(file, offset, len).is_some_and(|(cached, _)| cached == 0)
}

/// How many pages of the range are cached, and how many pages it spans; `None` if the
/// kernel cannot say or the range is empty or overflows.
fn cached_pages(file: &File, offset: u64, len: usize) -> Option<(u64, u64)> {
    if len == 0 || !CACHESTAT_WORKS.load(Ordering::Relaxed) {
        return None;
    }
    let end = offset.checked_add(len as u64)?;
    let page = page_size();
    let first = offset / page;
    let last = end.div_ceil(page);
    let range = CachestatRange {
        off: first * page,
        len: (last - first) * page,
    };
    let mut st = Cachestat::default();
    // SAFETY: cachestat reads one range and writes one struct through pointers valid for the
    // call; both have the kernel's layout (five and two u64 fields, repr(C)).
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut st as *mut Cachestat,
            0u32,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) {
            CACHESTAT_WORKS.store(false, Ordering::Relaxed);
            tracing::info!(error = %e, "cachestat unavailable: large reads are copied through memory");
        }
        return None;
    }
    Some((st.nr_cache, last - first))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn written_pages_are_resident_and_a_hole_past_them_is_not() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 64 * 1024]).unwrap();
        f.set_len(1 << 20).unwrap();
        assert!(resident(&f, 0, 64 * 1024));
        assert!(resident(&f, 100, 5000));
        // Never read nor written: not in the cache.
        assert!(!resident(&f, 512 * 1024, 64 * 1024));
        // A range that straddles cached and uncached pages is not resident as a whole.
        assert!(!resident(&f, 60 * 1024, 8 * 1024));
        assert!(!resident(&f, 0, 0));
        assert!(!resident(&f, u64::MAX - 10, 100));
        assert!(none_cached(&f, 512 * 1024, 64 * 1024));
        assert!(!none_cached(&f, 60 * 1024, 8 * 1024));
        assert!(!none_cached(&f, 0, 4096));
        assert!(!none_cached(&f, 0, 0));
    }
}

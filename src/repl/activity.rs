//! The activity log: which extents of the device may hold writes the peer has not confirmed.
//!
//! While the peer is attached, writes are not marked in the bitmap (that would cost a
//! metadata write per write). If the primary crashes then, the writes in flight at that
//! instant may be on one disk only. The activity log closes that gap: before a replicated
//! write is sent, its 4 MiB extent must be in the log, which is persisted in the metadata
//! superblock. A write to an extent already in the log costs nothing; a write to a new extent
//! costs one superblock update (a 4 KiB write and `fdatasync`), which also evicts the least
//! recently used idle extents when the log is full. An extent is idle when no write to it is
//! waiting for the peer.
//!
//! While the peer is away (or not yet replicating), a write must be marked out of sync
//! before it is answered. It holds its extent in the log too, and its bits are set in the
//! in-memory bitmap only: an extent leaves the log only after a bitmap flush, so at every
//! instant each block written without the peer is in a persisted extent or in the persisted
//! bitmap. A disconnected primary thus pays one metadata write per new extent, not per write.
//!
//! After a crash, every extent in the log is marked out of sync, so the resync after the
//! reconnect covers the writes in flight at the crash: bounded by the log's size
//! (`[sync] al_extents` × 4 MiB, at most `ACTIVITY_MAX`), never the whole device, never
//! skipped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::meta::{MetaStore, ACTIVITY_EXTENT, ACTIVITY_MAX};

#[derive(Default)]
struct Entry {
    in_flight: u32,
    last_use: u64,
}

#[derive(Default)]
struct Inner {
    /// The persisted set, with use counts.
    active: HashMap<u64, Entry>,
    /// Extents that writes wait for, not yet in the log.
    wanted: std::collections::HashSet<u64>,
    tick: u64,
}

pub struct ActivityLog {
    meta: Arc<Mutex<MetaStore>>,
    inner: Mutex<Inner>,
    /// One transaction at a time.
    commit: tokio::sync::Mutex<()>,
    /// Signalled when an extent becomes idle (a full log may be able to evict it).
    idle: Notify,
    capacity: usize,
    /// Transactions written since start (for statistics and benchmarks).
    pub transactions: std::sync::atomic::AtomicU64,
}

/// Holds a write's extents in the log until the peer has confirmed it (or it was marked out
/// of sync). Dropping it makes the extents evictable.
pub struct Hold {
    log: Arc<ActivityLog>,
    extents: std::ops::RangeInclusive<u64>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut g = lock(&self.log.inner);
        let mut freed = false;
        for e in self.extents.clone() {
            if let Some(en) = g.active.get_mut(&e) {
                en.in_flight = en.in_flight.saturating_sub(1);
                freed |= en.in_flight == 0;
            }
        }
        drop(g);
        if freed {
            self.log.idle.notify_waiters();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn extents(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    let first = offset / ACTIVITY_EXTENT;
    let last = offset.saturating_add(len.max(1) - 1) / ACTIVITY_EXTENT;
    first..=last
}

impl ActivityLog {
    /// Loads the persisted set (normally empty: it is cleared at start-up after recovery).
    /// `capacity` (at most `ACTIVITY_MAX`) is how many extents the log holds.
    pub fn new(meta: Arc<Mutex<MetaStore>>, capacity: usize) -> Arc<ActivityLog> {
        let active = lock(&meta)
            .superblock()
            .activity
            .iter()
            .map(|e| (*e, Entry::default()))
            .collect();
        Arc::new(ActivityLog {
            meta,
            inner: Mutex::new(Inner {
                active,
                wanted: Default::default(),
                tick: 0,
            }),
            commit: tokio::sync::Mutex::new(()),
            idle: Notify::new(),
            capacity: capacity.clamp(1, ACTIVITY_MAX),
            transactions: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The longest piece, in bytes, an operation may hold at once: half the log, so a piece
    /// always fits once other writes' extents go idle. Longer trims and zero-writes (up to
    /// 4 GiB from one NBD request) are held a piece at a time.
    pub fn piece_bytes(&self) -> u64 {
        (self.capacity / 2).max(1) as u64 * ACTIVITY_EXTENT
    }

    /// Whether `[offset, offset+len)` spans no more than a piece (`piece_bytes`) of extents.
    pub fn fits_at_once(&self, offset: u64, len: u64) -> bool {
        let range = extents(offset, len);
        range.end() - range.start() < (self.capacity / 2).max(1) as u64
    }

    /// Extents in the log now.
    pub fn len(&self) -> usize {
        lock(&self.inner).active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the extents of `[offset, offset+len)` into use, adding them to the persisted log
    /// first if they are not in it.
    ///
    /// One transaction at a time; the extents wanted by every write waiting meanwhile join the
    /// next one together (as many as fit), so writes moving to new extents in parallel cost
    /// one metadata write per batch rather than one each. An extent chosen for eviction leaves
    /// the in-memory set before the new set is written, so no write can take it while the
    /// persisted log is being rewritten without it: a held extent is always in the persisted
    /// log.
    pub async fn hold(self: &Arc<Self>, offset: u64, len: u64) -> Result<Hold, String> {
        let range = extents(offset, len);
        let span = range.end() - range.start() + 1;
        if span > self.capacity as u64 {
            // It could never fit: waiting would hang the write (callers split long ones).
            return Err(format!(
                "{len} bytes at {offset} span {span} extents, more than the activity log's {}",
                self.capacity
            ));
        }
        if self.try_hold(&range) {
            return Ok(self.hold_of(range));
        }
        loop {
            self.want(&range);
            let _tx = self.commit.lock().await;
            if self.try_hold(&range) {
                break;
            }
            let idle = self.idle.notified();
            let Some((new_set, added, evicts)) = self.next_set(&range) else {
                // Every extent is busy: wait for one to become idle.
                drop(_tx);
                idle.await;
                continue;
            };
            let m = Arc::clone(&self.meta);
            let persisted = new_set.clone();
            tokio::task::spawn_blocking(move || {
                let mut store = lock(&m);
                if evicts {
                    // Writes made without the peer mark their blocks in memory only, covered
                    // by the log: an extent leaves it only once those bits are on disk.
                    store
                        .flush_bitmap()
                        .map_err(|e| format!("cannot write the bitmap: {e}"))?;
                }
                store
                    .update(|sb| sb.activity = persisted)
                    .map_err(|e| format!("cannot write the activity log: {e}"))
            })
            .await
            .map_err(|e| e.to_string())??;
            self.transactions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            {
                let mut g = lock(&self.inner);
                for e in added {
                    g.wanted.remove(&e);
                    g.active.entry(e).or_default();
                }
            }
            if self.try_hold(&range) {
                break;
            }
        }
        Ok(self.hold_of(range))
    }

    fn hold_of(self: &Arc<Self>, extents: std::ops::RangeInclusive<u64>) -> Hold {
        Hold {
            log: Arc::clone(self),
            extents,
        }
    }

    /// Records that a write waits for these extents.
    fn want(&self, range: &std::ops::RangeInclusive<u64>) {
        let mut g = lock(&self.inner);
        for e in range.clone() {
            if !g.active.contains_key(&e) {
                g.wanted.insert(e);
            }
        }
    }

    /// The set the next transaction writes: everything in the log that stays, `range`'s
    /// missing extents, and as many other wanted extents as fit. Evicted extents (least
    /// recently used idle ones) leave the in-memory set now. Returns the set, the extents it
    /// adds and whether it evicts any, or `None` if `range` cannot fit until an extent
    /// becomes idle.
    fn next_set(
        &self,
        range: &std::ops::RangeInclusive<u64>,
    ) -> Option<(Vec<u64>, Vec<u64>, bool)> {
        let mut g = lock(&self.inner);
        let mine: Vec<u64> = range
            .clone()
            .filter(|e| !g.active.contains_key(e))
            .collect();
        let mut idle_list: Vec<(u64, u64)> = g
            .active
            .iter()
            .filter(|(e, en)| en.in_flight == 0 && !range.contains(e))
            .map(|(e, en)| (en.last_use, *e))
            .collect();
        idle_list.sort_unstable();
        let free = self.capacity.saturating_sub(g.active.len()) + idle_list.len();
        if free < mine.len() {
            return None;
        }
        let mut added = mine;
        let mut others: Vec<u64> = g
            .wanted
            .iter()
            .copied()
            .filter(|e| !g.active.contains_key(e) && !range.contains(e))
            .collect();
        others.sort_unstable();
        others.truncate(free - added.len());
        added.extend(others);
        let excess = (g.active.len() + added.len()).saturating_sub(self.capacity);
        for (_, e) in idle_list.iter().take(excess) {
            g.active.remove(e);
        }
        let mut set: Vec<u64> = g.active.keys().copied().collect();
        set.extend(added.iter().copied());
        Some((set, added, excess > 0))
    }

    /// Takes the extents if all are already in the log.
    fn try_hold(&self, range: &std::ops::RangeInclusive<u64>) -> bool {
        let mut g = lock(&self.inner);
        if !range.clone().all(|e| g.active.contains_key(&e)) {
            return false;
        }
        g.tick += 1;
        let tick = g.tick;
        for e in range.clone() {
            if let Some(en) = g.active.get_mut(&e) {
                en.in_flight += 1;
                en.last_use = tick;
            }
        }
        true
    }
}

/// Crash recovery at start-up: marks every extent left in the log out of sync (when the node
/// did not shut down cleanly), then empties the log. Returns the bytes marked.
pub fn recover(store: &mut MetaStore, clean: bool) -> Result<u64, crate::meta::MetaError> {
    let list = store.superblock().activity.clone();
    let size = store.data_size();
    let mut marked = 0;
    if !clean {
        for e in &list {
            let off = e.saturating_mul(ACTIVITY_EXTENT);
            if off >= size {
                continue;
            }
            let len = ACTIVITY_EXTENT.min(size - off);
            store.set_dirty_lazy(off, len);
            marked += len;
        }
        store.flush_bitmap()?;
    }
    if !list.is_empty() {
        store.update(|sb| sb.activity.clear())?;
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{CreateParams, MetaLocation};

    fn store(dir: &std::path::Path) -> Arc<Mutex<MetaStore>> {
        let loc = MetaLocation::External(dir.join("m"));
        let s = MetaStore::create(
            &loc,
            CreateParams {
                resource: "r0".into(),
                node: "alpha".into(),
                data_size: 4 << 30,
                granularity: 4096,
            },
            false,
        )
        .expect("create");
        Arc::new(Mutex::new(s))
    }

    #[tokio::test]
    async fn holds_persist_extents_and_recovery_marks_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = store(dir.path());
        let log = ActivityLog::new(Arc::clone(&m), ACTIVITY_MAX);
        let h1 = log.hold(0, 4096).await.expect("hold");
        let h2 = log.hold(ACTIVITY_EXTENT - 1, 2).await.expect("hold across");
        assert_eq!(log.len(), 2);
        assert_eq!(
            log.transactions.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        // Already in the log: no transaction.
        let h3 = log.hold(100, 1).await.expect("hold");
        assert_eq!(
            log.transactions.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        let mut persisted = lock(&m).superblock().activity.clone();
        persisted.sort_unstable();
        assert_eq!(persisted, vec![0, 1]);
        drop((h1, h2, h3));
        // A crash now: both extents are marked, the log emptied.
        let mut s = lock(&m);
        let marked = recover(&mut s, false).expect("recover");
        assert_eq!(marked, 2 * ACTIVITY_EXTENT);
        assert_eq!(s.bitmap().dirty_bytes(), 2 * ACTIVITY_EXTENT);
        assert!(s.superblock().activity.is_empty());
    }

    #[tokio::test]
    async fn a_full_log_evicts_idle_extents_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = store(dir.path());
        let log = ActivityLog::new(Arc::clone(&m), ACTIVITY_MAX);
        let busy = log.hold(0, 1).await.expect("hold");
        for e in 1..ACTIVITY_MAX as u64 {
            drop(log.hold(e * ACTIVITY_EXTENT, 1).await.expect("hold"));
        }
        assert_eq!(log.len(), ACTIVITY_MAX);
        // One more: the least recently used idle extent (1) leaves, the busy one (0) stays.
        let _h = log
            .hold(ACTIVITY_MAX as u64 * ACTIVITY_EXTENT, 1)
            .await
            .expect("hold");
        let set = lock(&m).superblock().activity.clone();
        assert_eq!(set.len(), ACTIVITY_MAX);
        assert!(set.contains(&0));
        assert!(!set.contains(&1));
        drop(busy);
    }

    /// Bits set in memory under a held extent reach the disk before the extent leaves the
    /// log, and adding an extent to a log with room writes no bitmap.
    #[tokio::test]
    async fn an_extent_leaves_the_log_only_after_a_bitmap_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = store(dir.path());
        let log = ActivityLog::new(Arc::clone(&m), 2);
        let h = log.hold(0, 4096).await.expect("hold");
        lock(&m).set_dirty_lazy(0, 4096);
        drop(h);
        let h = log.hold(ACTIVITY_EXTENT, 4096).await.expect("hold");
        lock(&m).set_dirty_lazy(ACTIVITY_EXTENT, 4096);
        drop(h);
        assert!(lock(&m).has_unflushed(), "no eviction yet: the bits wait");
        let _h = log.hold(2 * ACTIVITY_EXTENT, 1).await.expect("hold");
        let s = lock(&m);
        assert!(!s.superblock().activity.contains(&0), "extent 0 evicted");
        assert!(!s.has_unflushed(), "the eviction flushed the bitmap first");
        drop(s);
        // What is on disk now: reopen the metadata and look.
        let loc = MetaLocation::External(dir.path().join("m"));
        let (reopened, _) = MetaStore::open(&loc).expect("reopen");
        assert!(reopened.bitmap().is_all_dirty(0, 4096));
        assert!(reopened.bitmap().is_all_dirty(ACTIVITY_EXTENT, 4096));
    }

    /// A log of one extent: a write to a second extent waits until the first is idle, then
    /// takes its place in one transaction.
    #[tokio::test]
    async fn a_small_log_waits_for_an_idle_extent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = store(dir.path());
        let log = ActivityLog::new(Arc::clone(&m), 1);
        let first = log.hold(0, 1).await.expect("hold");
        let second = {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.hold(ACTIVITY_EXTENT, 1).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the only slot is busy");
        drop(first);
        let _h = tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("the second hold goes through once the first is idle")
            .expect("task")
            .expect("hold");
        assert_eq!(lock(&m).superblock().activity, vec![1]);
        assert_eq!(
            log.transactions.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    /// Under concurrent holds on a log much smaller than the extents in use, every extent is
    /// in the persisted log for as long as a write holds it (an extent being evicted must not
    /// be handed out while the new set, without it, is written).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_extent_is_always_persisted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = store(dir.path());
        let log = ActivityLog::new(Arc::clone(&m), 4);
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let log = Arc::clone(&log);
            let m = Arc::clone(&m);
            tasks.push(tokio::spawn(async move {
                let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..300 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let e = x % 12;
                    let h = log.hold(e * ACTIVITY_EXTENT, 1).await.expect("hold");
                    let persisted = lock(&m).superblock().activity.contains(&e);
                    assert!(persisted, "extent {e} held but not in the persisted log");
                    tokio::task::yield_now().await;
                    let persisted = lock(&m).superblock().activity.contains(&e);
                    assert!(
                        persisted,
                        "extent {e} held but evicted from the persisted log"
                    );
                    drop(h);
                }
            }));
        }
        for t in tasks {
            t.await.expect("no task failed");
        }
        let tx = log.transactions.load(std::sync::atomic::Ordering::Relaxed);
        assert!(tx > 0);
    }
}

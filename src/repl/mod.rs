//! Replication: the peer link's life, replicated writes, dirty tracking and resync.
//!
//! [`Replicator`] owns everything that involves the peer. [`ReplicatedDisk`] is the storage
//! backend the NBD export serves from: it writes locally and, while a peer is attached,
//! streams every write to it and waits for the acknowledgement the protocol asks for
//! (A: sent, B: received, C: written). While no peer is attached, every write is first marked
//! in the persistent bitmap, so a returning peer copies only what changed.
//!
//! The link runs as three tasks per connection pair: the data loop (receives and applies
//! writes and resync data, in arrival order for overlapping ranges), the meta loop
//! (acknowledgements, heartbeats, state) and the pinger; a watchdog ends the link when nothing
//! has arrived for `timeout_ms`. A resync runs as a fourth task on the sync source.

pub mod activity;
pub mod conflict;
pub mod decide;
pub mod recovery;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::bitmap::Bitmap;
use crate::config::{AfterSplitBrain, Protocol};
use crate::meta::{DiskState, MetaStore, Superblock};
use crate::peer::link::{
    self, Conn, FrameReader, FrameWriter, LinkParams, SharedFrameWriter, QUEUE_FRAME_MAX,
};
use crate::peer::wire::{Channel, Msg, PeerState, STATE_DISCARD_MY_DATA};
use crate::status::{Connection, DiskStatus, ResyncStatus, Role};
use crate::storage::{Backend, Disk, IoBuf, StorageError};
use conflict::Conflicts;
use decide::{Decision, Side};

/// Largest resync chunk.
const RESYNC_CHUNK: u64 = 1 << 20;
/// Resync bytes sent but not yet acknowledged.
const RESYNC_WINDOW: u64 = 32 << 20;
/// Resync chunks read ahead of the one being sent.
const RESYNC_READ_AHEAD: usize = 16;
/// Requests the peer applies at once before it stops reading more.
const APPLY_MAX_IN_FLIGHT: usize = 1024;
/// How often the primary asks its peer to flush what it confirmed since the last flush: what
/// a lost link marks for a resync beyond the writes in flight (`Peer::unstable`).
const SETTLE_EVERY: Duration = Duration::from_secs(30);
/// What a link remembers of one flush epoch's confirmations: the exact ranges while there
/// are at most `UNSTABLE_RANGES` (a client that flushes often costs a short list per flush),
/// then the `UNSTABLE_CHUNK`s they touch (a lost link then marks whole chunks; a device of
/// 1 TiB needs 2 MiB per such epoch).
const UNSTABLE_RANGES: usize = 4096;
const UNSTABLE_CHUNK: u32 = 64 * 1024;
/// How long a node ending the link on purpose waits for the peer's last flush.
const SETTLE_AT_BYE: Duration = Duration::from_secs(2);
/// Bytes of data the peer holds in requests being applied (written, read or verified)
/// before it stops reading more.
const APPLY_MAX_BYTES: usize = 256 << 20;

/// Counts a request's data as being applied until it is dropped (done or abandoned). It
/// holds the replicator for the request's future, which reaches it through this guard.
struct Applying(Arc<Replicator>, usize);

impl std::ops::Deref for Applying {
    type Target = Replicator;
    fn deref(&self) -> &Replicator {
        &self.0
    }
}

impl Applying {
    fn new(r: &Arc<Replicator>, bytes: usize) -> Applying {
        r.applying.fetch_add(bytes, Ordering::Relaxed);
        Applying(Arc::clone(r), bytes)
    }
}

impl Drop for Applying {
    fn drop(&mut self) {
        self.0.applying.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// Replication settings from the resource file.
#[derive(Debug, Clone)]
pub struct ReplSettings {
    pub protocol: Protocol,
    pub interval: Duration,
    pub timeout: Duration,
    /// A request the peer leaves unanswered this long drops the link.
    pub ack_timeout: Duration,
    pub rate_bytes_per_s: Option<u64>,
    /// Activity log size in extents.
    pub al_extents: usize,
    pub auto_promote: bool,
    pub after_split_brain: AfterSplitBrain,
    /// Where split-brain recovery files go (beside the metadata).
    pub recovery_dir: std::path::PathBuf,
    pub link: LinkParams,
}

/// The disk byte a node sends in its state while it has no working disk.
pub const DISK_DISKLESS: u8 = 3;

/// Whether this node's disk still works. A disk that returns an IO error is detached and the
/// node goes on without it: a primary reads and writes through its peer, a secondary stops
/// applying and tells its primary, which marks everything for a full resync.
pub struct DiskHealth {
    /// 0 working, 1 failed (detaching), 2 diskless.
    state: std::sync::atomic::AtomicU8,
    events: mpsc::UnboundedSender<ReplEvent>,
}

impl DiskHealth {
    pub fn new(events: mpsc::UnboundedSender<ReplEvent>) -> Arc<DiskHealth> {
        Arc::new(DiskHealth {
            state: std::sync::atomic::AtomicU8::new(0),
            events,
        })
    }

    pub fn diskless(&self) -> bool {
        self.state.load(Ordering::SeqCst) != 0
    }

    /// `Some(Failed | Diskless)` once the disk has failed.
    pub fn status(&self) -> Option<DiskStatus> {
        match self.state.load(Ordering::SeqCst) {
            1 => Some(DiskStatus::Failed),
            2 => Some(DiskStatus::Diskless),
            _ => None,
        }
    }

    /// The disk is detached.
    pub fn set_diskless(&self) {
        self.state.store(2, Ordering::SeqCst);
    }

    /// Looks at the error of a local operation: a device error fails the disk (once).
    /// Returns whether it was one.
    pub fn check(&self, e: &StorageError) -> bool {
        if !matches!(
            e,
            StorageError::Io { .. } | StorageError::ShortTransfer { .. }
        ) {
            return false;
        }
        if self
            .state
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            tracing::error!(error = %e, "disk failure: detaching the disk");
            let _ = self.events.send(ReplEvent::DiskFailed {
                error: e.to_string(),
            });
        }
        true
    }
}

fn eio(op: &'static str, offset: u64, len: u64, why: &str) -> StorageError {
    StorageError::Io {
        op,
        offset,
        len,
        source: std::io::Error::other(why.to_string()),
    }
}

/// What the replicator tells the node.
#[derive(Debug)]
pub enum ReplEvent {
    /// The local disk failed and is being detached.
    DiskFailed { error: String },
    /// The link to the peer is gone. `standby_of_primary`: this node was an up-to-date
    /// secondary of a connected primary (the case for automatic failover); `silent` is how
    /// long nothing had been heard from the peer when the link ended.
    PeerLost {
        standby_of_primary: bool,
        silent: Duration,
        reason: String,
    },
    /// A split brain was detected; `resolution` says what happens to it.
    SplitBrain { resolution: String },
    /// This node lost a split-brain resolution while primary: it must become secondary
    /// (disconnecting its clients) before it can take the winner's data.
    DemoteForResolution {
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Blocks a resolution overwrote were saved here first.
    RecoverySaved {
        path: std::path::PathBuf,
        records: u64,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn meta_err(op: &'static str, offset: u64, len: u64, e: String) -> StorageError {
    StorageError::Io {
        op,
        offset,
        len,
        source: std::io::Error::other(e),
    }
}

/// Moves the data generation on when a primary starts writing without its peer: the old
/// generation becomes the bitmap's reference (what the peer still has).
fn start_tracking(sb: &mut Superblock) {
    if sb.generations.bitmap == 0 && sb.generations.current != 0 {
        let old = sb.generations.current;
        sb.new_current_generation(&mut rand::thread_rng());
        sb.generations.bitmap = old;
    }
}

/// Sorts ranges and merges those that overlap or touch.
fn coalesce(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (o, l) in ranges {
        match out.last_mut() {
            Some((lo, ll)) if o <= *lo + *ll => *ll = (*ll).max(o + l - *lo),
            _ => out.push((o, l)),
        }
    }
    out
}

/// Sync source, at the end of a pass: ends the resync if nothing is marked out of sync, and
/// returns the generation to hand the target; `None` if another pass is needed.
///
/// The check and the reset of the bitmap generation happen under one lock of the metadata
/// (the caller's): a write of this primary that took the unreplicated path (it started before
/// replication did) either marked its range before, and is copied by another pass, or marks
/// it after, when the bitmap generation is already 0: then `DirtyMarker::mark_held` finds
/// this node not tracking and moves the data generation on durably, so that this node stays
/// the sync source for that write after a crash.
fn finish_source(s: &mut MetaStore) -> Result<Option<u64>, crate::meta::MetaError> {
    if s.bitmap().dirty_bytes() != 0 {
        return Ok(None);
    }
    s.flush_bitmap()?;
    s.update(|sb| sb.generations.bitmap = 0)?;
    Ok(Some(s.superblock().generations.current))
}

/// Sync target: records a finished resync, the data now being the source's generation
/// `current`.
fn finish_target(s: &mut MetaStore, current: u64) -> Result<(), crate::meta::MetaError> {
    s.bitmap_mut().clear_all();
    s.flush_bitmap()?;
    s.update(|sb| {
        let g = &mut sb.generations;
        if g.current != 0 && g.current != current {
            g.history = [g.current, g.history[0]];
        }
        g.current = current;
        g.bitmap = 0;
        sb.disk_state = DiskState::UpToDate;
    })
}

/// A request to the bitmap writer: a range, and where to report that it is durable.
type MarkRequest = (u64, u64, oneshot::Sender<Result<(), String>>);
/// Work the peer applies concurrently with reading the next frames.
/// Its output is the acknowledgement to send on the meta connection, if any: the data loop
/// sends every acknowledgement ready at one moment in a single write.
type ApplyFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<Msg>, String>> + Send>>;

/// Marks ranges out of sync in the persistent bitmap, batching concurrent requests into one
/// durable write (group commit). A node without its disk marks nothing: its peer holds all
/// it acknowledged, its own disk needs a full copy anyway, and a mark would move its
/// generation on, making its peer look behind (`evaluate_diskless`).
#[derive(Clone)]
pub struct DirtyMarker {
    meta: Arc<Mutex<MetaStore>>,
    primary: Arc<AtomicBool>,
    health: Arc<DiskHealth>,
    tx: mpsc::UnboundedSender<MarkRequest>,
    /// Signalled after every durable mark: a link that is up must copy what was marked.
    marked: Arc<Notify>,
}

impl DirtyMarker {
    fn spawn(
        meta: Arc<Mutex<MetaStore>>,
        primary: Arc<AtomicBool>,
        health: Arc<DiskHealth>,
    ) -> DirtyMarker {
        let marked = Arc::new(Notify::new());
        let kick = Arc::clone(&marked);
        let (tx, mut rx) = mpsc::unbounded_channel::<MarkRequest>();
        let m = Arc::clone(&meta);
        let p = Arc::clone(&primary);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let ranges: Vec<(u64, u64)> = batch.iter().map(|(o, l, _)| (*o, *l)).collect();
                let m = Arc::clone(&m);
                let primary = p.load(Ordering::SeqCst);
                let res = tokio::task::spawn_blocking(move || {
                    let mut store = lock(&m);
                    if primary && store.superblock().generations.bitmap == 0 {
                        store.update(start_tracking).map_err(|e| e.to_string())?;
                    }
                    for (o, l) in ranges {
                        store.set_dirty_lazy(o, l);
                    }
                    store.flush_bitmap().map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                kick.notify_one();
                for (_, _, done) in batch {
                    let _ = done.send(res.clone());
                }
            }
        });
        DirtyMarker {
            meta,
            primary,
            health,
            tx,
            marked,
        }
    }

    /// Whether the bitmap already tracks what this node writes without its peer: always on a
    /// secondary; on a primary once its data generation has moved on (the bitmap generation
    /// is set), or before it has any.
    fn tracking(&self, m: &MetaStore) -> bool {
        !self.primary.load(Ordering::SeqCst)
            || m.superblock().generations.bitmap != 0
            || m.superblock().generations.current == 0
    }

    /// Marks `[offset, offset+len)` out of sync for a write whose extents the caller holds in
    /// the activity log: in memory only, since an extent leaves the log only after a bitmap
    /// flush. The first such write of a primary that lost its peer goes through [`Self::mark`],
    /// which moves the data generation on durably first.
    pub async fn mark_held(&self, offset: u64, len: u64) -> Result<(), String> {
        if self.health.diskless() {
            return Ok(());
        }
        {
            let mut m = lock(&self.meta);
            if self.tracking(&m) {
                if !m.bitmap().is_all_dirty(offset, len) {
                    m.set_dirty_lazy(offset, len);
                    drop(m);
                    self.marked.notify_one();
                }
                return Ok(());
            }
        }
        self.mark(offset, len).await
    }

    /// Returns once `[offset, offset+len)` is marked out of sync on disk.
    pub async fn mark(&self, offset: u64, len: u64) -> Result<(), String> {
        if self.health.diskless() {
            return Ok(());
        }
        {
            let m = lock(&self.meta);
            if self.tracking(&m) && m.bitmap().is_all_dirty(offset, len) {
                return Ok(());
            }
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((offset, len, tx))
            .map_err(|_| "bitmap writer stopped".to_string())?;
        rx.await.map_err(|_| "bitmap writer stopped".to_string())?
    }
}

struct PendingWrite {
    offset: u64,
    len: u64,
    /// Keeps the write's extents in the activity log until the peer confirms it, or until
    /// its range is marked out of sync once the link is lost.
    hold: activity::Hold,
    /// Fires at the acknowledgement the write waits for: Received under protocol B, else
    /// Written; `None` under protocol A, or once fired.
    ack: Option<oneshot::Sender<u32>>,
    /// Whether `ack` fires at Received (protocol B).
    on_received: bool,
    /// When the write was registered, for `ack_timeout`.
    since: Instant,
}

#[derive(Default)]
struct PeerInner {
    dead: bool,
    writes: HashMap<u64, PendingWrite>,
    /// Flushes and settles sent: id → (when, the epoch they cover, who waits).
    flushes: HashMap<u64, (Instant, u64, Option<oneshot::Sender<u32>>)>,
    /// What the peer has confirmed (writes, trims, zero-writes: `Written`; resync chunks:
    /// `ResyncAck`) but no flush of its disk has covered yet, per epoch, oldest first. The
    /// peer confirms once the data is in its page cache: should it crash before writing it
    /// back, this is what it lost, so a lost link marks it out of sync with the writes it
    /// never confirmed (`Peer::kill`).
    unstable: VecDeque<(u64, Confirmed)>,
    /// Counts the flushes sent: a confirmation received before flush number `e` was sent
    /// carries an epoch of at most `e`, and that flush's success makes it stable.
    epoch: u64,
    /// Resync chunks sent and not yet acknowledged: offset → (length, when, window permit).
    resync: HashMap<u64, (u64, Instant, OwnedSemaphorePermit)>,
    verifies: HashMap<u64, (Instant, oneshot::Sender<Vec<u32>>)>,
    reads: HashMap<u64, (Instant, oneshot::Sender<(u32, IoBuf)>)>,
}

/// One established link.
struct Peer {
    data: SharedFrameWriter,
    /// Wakes the task that writes the frames queued on `data`.
    data_kick: Notify,
    meta: tokio::sync::Mutex<FrameWriter>,
    inner: Mutex<PeerInner>,
    next_id: AtomicU64,
    /// Application writes go to the peer (it is in sync, or our sync target).
    replicating: AtomicBool,
    closed: watch::Sender<bool>,
    started: Instant,
    last_rx_ms: AtomicU64,
    state: Mutex<Option<PeerState>>,
    /// The state this node sent when the link came up: both nodes decide on the pair of
    /// first states, so they reach the same decision.
    sent: Mutex<Option<PeerState>>,
    decision: Mutex<Option<Decision>>,
    decided: Notify,
    bitmap_done: Notify,
    bitmap_received: AtomicBool,
    resync_window: Arc<Semaphore>,
    name: String,
    /// The peer's node id (from its hello).
    id: u64,
    /// The peer ended the link on purpose (shutdown, disconnect): not a death.
    said_bye: AtomicBool,
    /// Size of the replicated device.
    device_size: u64,
    /// Batches of acknowledgements this node sent on the link (`send_meta_batch`).
    confirmations: AtomicU64,
}

impl Peer {
    fn touch(&self) {
        self.last_rx_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = self.last_rx_ms.load(Ordering::Relaxed);
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }

    fn is_dead(&self) -> bool {
        lock(&self.inner).dead
    }

    /// How long the oldest request still waiting for the peer's answer (a write, trim or
    /// zero-write, flush, read, verify or resync chunk) has waited.
    fn oldest_unanswered(&self) -> Option<Duration> {
        let g = lock(&self.inner);
        let writes = g.writes.values().map(|w| w.since);
        let flushes = g.flushes.values().map(|f| f.0);
        let reads = g.reads.values().map(|r| r.0);
        let verifies = g.verifies.values().map(|v| v.0);
        let resync = g.resync.values().map(|r| r.1);
        writes
            .chain(flushes)
            .chain(reads)
            .chain(verifies)
            .chain(resync)
            .min()
            .map(|t| t.elapsed())
    }

    async fn send_data(&self, msg: &Msg) -> Result<(), String> {
        self.data
            .send(msg)
            .await
            .map_err(|e| format!("sending {} to the peer: {e}", msg.name()))
    }

    /// Queues a data frame behind the others waiting; the link's sender task writes them
    /// together once the tasks running now have queued theirs. Returns the frame's sequence
    /// number, for [`Peer::data_written`].
    fn queue_data(&self, msg: &Msg) -> u64 {
        let (first, seq) = self.data.enqueue(msg);
        if first {
            self.data_kick.notify_one();
        }
        seq
    }

    /// Waits until the queued frame `seq` is on the socket, or the link is gone.
    async fn data_written(&self, seq: u64) {
        let mut closed = self.closed.subscribe();
        tokio::select! {
            biased;
            _ = self.data.written(seq) => {}
            _ = closed.wait_for(|c| *c) => {}
        }
    }

    /// Tells the peer the link ends on purpose, on both connections: whichever of its loops
    /// sees the connection close first has read the goodbye before it.
    async fn say_bye(&self, reason: &str) {
        self.say_bye_flushed(reason, None::<std::future::Ready<bool>>)
            .await;
    }

    /// [`Self::say_bye`], first running `flush` (of this node's disk): if it succeeds and no
    /// confirmation left meanwhile, the goodbye says that everything this node confirmed is
    /// durable, and the peer has nothing to mark. (A confirmation leaves only after its data
    /// reached the page cache, so those sent before the flush began are covered by it.) The
    /// meta connection stays free during the flush: pings go on, and the peer does not take
    /// a slow flush for a dead node.
    async fn say_bye_flushed(
        &self,
        reason: &str,
        flush: Option<impl std::future::Future<Output = bool>>,
    ) {
        let limit = Duration::from_millis(500);
        let before = self.confirmations.load(Ordering::SeqCst);
        let flushed = match flush {
            _ if before == 0 => true,
            Some(f) => tokio::time::timeout(SETTLE_AT_BYE, f)
                .await
                .unwrap_or(false),
            None => false,
        };
        let _ = tokio::time::timeout(limit, async {
            let mut w = self.meta.lock().await;
            let stable = flushed && self.confirmations.load(Ordering::SeqCst) == before;
            let bye = Msg::Bye {
                reason: reason.to_string(),
                stable,
            };
            w.send(&bye).await
        })
        .await;
        let bye = Msg::Bye {
            reason: reason.to_string(),
            stable: false,
        };
        let _ = tokio::time::timeout(limit, self.send_data(&bye)).await;
    }

    /// Sends the acknowledgements of applied frames (`Written`, `ResyncAck`, ...), counted
    /// in `confirmations` before they leave.
    async fn send_meta_batch(&self, msgs: &[Msg]) -> Result<(), String> {
        let mut w = self.meta.lock().await;
        self.confirmations.fetch_add(1, Ordering::SeqCst);
        w.send_batch(msgs)
            .await
            .map_err(|e| format!("sending acknowledgements to the peer: {e}"))
    }

    async fn send_meta(&self, msg: &Msg) -> Result<(), String> {
        self.meta
            .lock()
            .await
            .send(msg)
            .await
            .map_err(|e| format!("sending {} to the peer: {e}", msg.name()))
    }

    /// Records that the peer confirmed `[offset, offset+len)`: stable once a flush sent
    /// after this covers it.
    fn confirmed(&self, g: &mut PeerInner, offset: u64, len: u64) {
        let epoch = g.epoch;
        if g.unstable.back().is_none_or(|(e, _)| *e != epoch) {
            g.unstable.push_back((epoch, Confirmed::Ranges(Vec::new())));
        }
        if let Some((_, c)) = g.unstable.back_mut() {
            c.add(self.device_size, offset, len);
        }
    }

    /// Registers a flush or settle of the peer's disk; `None` if the link is already dead.
    /// Its success makes stable what the peer confirmed before it was sent.
    fn start_flush(&self, waiter: Option<oneshot::Sender<u32>>) -> Option<u64> {
        let mut g = lock(&self.inner);
        if g.dead {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let covers = g.epoch;
        g.epoch += 1;
        g.flushes.insert(id, (Instant::now(), covers, waiter));
        Some(id)
    }

    /// Asks the peer to flush its disk and waits for the answer: a Flush (`barrier`: it
    /// waits for every earlier write there) or a Settle (what the peer confirmed so far).
    async fn flush_disk(&self, barrier: bool) -> Result<(), FlushError> {
        let (tx, rx) = oneshot::channel();
        let id = self.start_flush(Some(tx)).ok_or(FlushError::Lost)?;
        let msg = if barrier {
            Msg::Flush { id }
        } else {
            Msg::Settle { id }
        };
        self.send_data(&msg).await.map_err(FlushError::Send)?;
        match rx.await {
            Ok(0) => Ok(()),
            Ok(errno) => Err(FlushError::Failed(errno)),
            Err(_) => Err(FlushError::Lost),
        }
    }

    /// The peer's answer to a flush or settle.
    fn flushed(&self, id: u64, errno: u32) {
        let mut g = lock(&self.inner);
        let Some((_, covers, waiter)) = g.flushes.remove(&id) else {
            return;
        };
        if errno == 0 {
            while g.unstable.front().is_some_and(|u| u.0 <= covers) {
                g.unstable.pop_front();
            }
        }
        drop(g);
        if let Some(tx) = waiter {
            let _ = tx.send(errno);
        }
    }

    /// Whether the peer confirmed something no flush covers yet; with `idle`, only if no
    /// flush is on its way either.
    fn has_unstable(&self, idle: bool) -> bool {
        let g = lock(&self.inner);
        !g.dead && !g.unstable.is_empty() && (!idle || g.flushes.is_empty())
    }

    /// Registers a replicated write; `None` if the link is already dead.
    fn start_write(
        &self,
        offset: u64,
        len: u64,
        protocol: Protocol,
        hold: activity::Hold,
    ) -> Option<(u64, Option<oneshot::Receiver<u32>>)> {
        let mut g = lock(&self.inner);
        if g.dead {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (ack, rx) = match protocol {
            Protocol::A => (None, None),
            Protocol::B | Protocol::C => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
        };
        g.writes.insert(
            id,
            PendingWrite {
                offset,
                len,
                hold,
                ack,
                on_received: protocol == Protocol::B,
                since: Instant::now(),
            },
        );
        Some((id, rx))
    }

    /// Marks the link dead; returns what must now be marked out of sync: every write the
    /// peer never confirmed, with its activity log hold (released once the mark is on disk),
    /// and everything the peer confirmed that no flush of its disk has covered.
    fn kill(&self) -> Vec<(u64, u64, Option<activity::Hold>)> {
        let mut g = lock(&self.inner);
        g.dead = true;
        self.replicating.store(false, Ordering::SeqCst);
        let mut orphans = Vec::new();
        // A waiting submitter sees its sender dropped and marks the range itself too; its
        // hold stays with the marking task until the mark is on disk either way.
        for (_, w) in g.writes.drain() {
            orphans.push((w.offset, w.len, Some(w.hold)));
        }
        for (_, c) in g.unstable.drain(..) {
            orphans.extend(c.ranges().into_iter().map(|(o, l)| (o, l, None)));
        }
        g.flushes.clear();
        g.resync.clear();
        g.verifies.clear();
        g.reads.clear();
        drop(g);
        self.closed.send_replace(true);
        self.bitmap_done.notify_waiters();
        self.decided.notify_waiters();
        orphans
    }
}

/// The confirmations of one flush epoch (`PeerInner::unstable`).
enum Confirmed {
    Ranges(Vec<(u64, u64)>),
    Chunks(Bitmap),
}

impl Confirmed {
    fn add(&mut self, device_size: u64, offset: u64, len: u64) {
        match self {
            Confirmed::Ranges(v) if v.len() < UNSTABLE_RANGES => v.push((offset, len)),
            Confirmed::Ranges(v) => {
                let mut chunks = Bitmap::new(device_size, UNSTABLE_CHUNK);
                for (o, l) in v.drain(..) {
                    chunks.set_range(o, l);
                }
                chunks.set_range(offset, len);
                *self = Confirmed::Chunks(chunks);
            }
            Confirmed::Chunks(chunks) => {
                chunks.set_range(offset, len);
            }
        }
    }

    fn ranges(self) -> Vec<(u64, u64)> {
        match self {
            Confirmed::Ranges(v) => v,
            Confirmed::Chunks(chunks) => chunks.iter_dirty_runs().collect(),
        }
    }
}

/// Why a flush of the peer's disk did not happen.
#[derive(Debug, thiserror::Error)]
enum FlushError {
    #[error("no peer is replicating")]
    NoPeer,
    #[error("the link to the peer was lost")]
    Lost,
    /// Sending the request failed (the link is to be dropped).
    #[error("{0}")]
    Send(String),
    #[error("the peer could not flush its disk (errno {0})")]
    Failed(u32),
}

/// What a resync has sent so far, for its rate limit and its periodic bitmap flush.
struct Pace {
    started: Instant,
    sent: u64,
    last_flush: Instant,
}

#[derive(Debug, Clone, Default)]
struct Progress {
    done: u64,
    total: u64,
    started: Option<Instant>,
}

impl Progress {
    /// Counts `len` more bytes copied. A pass that copies what was marked during the first
    /// one can go past the first estimate: the total grows with it.
    fn copied(&mut self, len: u64) {
        self.done += len;
        self.total = self.total.max(self.done);
    }
}

struct View {
    connection: Connection,
    resync: Option<Progress>,
    last_error: Option<String>,
}

/// The outcome of an online verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub checked_bytes: u64,
    pub differing_blocks: u64,
    pub differing_bytes: u64,
    pub seconds: f64,
}

/// What the node reads for its status.
#[derive(Debug, Clone)]
pub struct ReplStatus {
    pub connection: Connection,
    pub peer_role: Role,
    pub peer_disk: DiskStatus,
    pub resync: Option<ResyncStatus>,
    pub replicated_writes: u64,
    pub resynced_bytes: u64,
    pub activity_log_writes: u64,
    pub last_error: Option<String>,
}

/// Replication of one node's disk to its peer.
pub struct Replicator {
    set: ReplSettings,
    disk: Arc<Disk>,
    meta: Arc<Mutex<MetaStore>>,
    size: u64,
    conflicts: Arc<Conflicts>,
    peer: Mutex<Option<Arc<Peer>>>,
    marker: DirtyMarker,
    activity: Arc<activity::ActivityLog>,
    health: Arc<DiskHealth>,
    primary: Arc<AtomicBool>,
    enabled: watch::Sender<bool>,
    view: Mutex<View>,
    replicated: AtomicU64,
    resynced: AtomicU64,
    /// Bytes of data in requests being applied here (`APPLY_MAX_BYTES`).
    applying: std::sync::atomic::AtomicUsize,
    changed: Arc<Notify>,
    events: mpsc::UnboundedSender<ReplEvent>,
    /// Marking of the writes a dead link left unconfirmed; the next link waits for it.
    orphan_marks: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Lost links whose unconfirmed ranges are being marked (incremented before the link is
    /// killed), and how many of those markings are done (they finish in order).
    marks_started: AtomicU64,
    marks_done: watch::Sender<u64>,
    /// A resync is running on this node (as source).
    resyncing: AtomicBool,
    /// Set by `connect --discard-my-data`: this node gives up its data in a split brain.
    discard_my_data: AtomicBool,
    /// Open while this node, having lost a split brain, saves what the resync overwrites.
    recovery: Mutex<Option<recovery::RecoveryWriter>>,
    /// Incoming authenticated connections (acceptor side).
    incoming: tokio::sync::Mutex<mpsc::Receiver<Conn>>,
    incoming_tx: mpsc::Sender<Conn>,
}

impl Replicator {
    /// Creates the replicator; `start` binds the listener and runs the link.
    pub fn new(
        set: ReplSettings,
        disk: Arc<Disk>,
        meta: Arc<Mutex<MetaStore>>,
        changed: Arc<Notify>,
        events: mpsc::UnboundedSender<ReplEvent>,
        health: Arc<DiskHealth>,
    ) -> Arc<Replicator> {
        let size = lock(&meta).data_size();
        let primary = Arc::new(AtomicBool::new(false));
        let marker =
            DirtyMarker::spawn(Arc::clone(&meta), Arc::clone(&primary), Arc::clone(&health));
        let (incoming_tx, incoming) = mpsc::channel(16);
        let activity = activity::ActivityLog::new(Arc::clone(&meta), set.al_extents);
        Arc::new(Replicator {
            set,
            disk,
            meta,
            size,
            conflicts: Conflicts::new(),
            peer: Mutex::new(None),
            marker,
            activity,
            health,
            primary,
            enabled: watch::Sender::new(true),
            view: Mutex::new(View {
                connection: Connection::Connecting,
                resync: None,
                last_error: None,
            }),
            replicated: AtomicU64::new(0),
            resynced: AtomicU64::new(0),
            applying: std::sync::atomic::AtomicUsize::new(0),
            changed,
            events,
            orphan_marks: Mutex::new(None),
            marks_started: AtomicU64::new(0),
            marks_done: watch::Sender::new(0),
            resyncing: AtomicBool::new(false),
            discard_my_data: AtomicBool::new(false),
            recovery: Mutex::new(None),
            incoming: tokio::sync::Mutex::new(incoming),
            incoming_tx,
        })
    }

    /// Binds the replication listener and starts the link manager.
    pub async fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.set.link.listen).await?;
        tokio::spawn(Arc::clone(self).accept_loop(listener));
        tokio::spawn(Arc::clone(self).link_loop());
        Ok(())
    }

    pub fn conflicts(&self) -> &Arc<Conflicts> {
        &self.conflicts
    }

    fn set_connection(&self, c: Connection) {
        let mut v = lock(&self.view);
        if v.connection != c {
            tracing::info!(peer = %self.set.link.peer, "connection: {:?} -> {:?}", v.connection, c);
            v.connection = c;
            drop(v);
            self.changed.notify_one();
        }
    }

    fn set_error(&self, e: Option<String>) {
        lock(&self.view).last_error = e;
    }

    fn current_peer(&self) -> Option<Arc<Peer>> {
        lock(&self.peer).clone()
    }

    /// Flushes the replicating peer's disk (a Flush: it waits for every earlier write there);
    /// `Err` says why it did not happen.
    async fn flush_peer(&self) -> Result<(), FlushError> {
        let p = self.replicating_peer().await.ok_or(FlushError::NoPeer)?;
        let res = p.flush_disk(true).await;
        if let Err(FlushError::Send(e)) = &res {
            self.drop_link(&p, e);
        }
        res
    }

    /// The peer application writes must go to, if any. While a new link has not decided yet
    /// what to sync (a round trip), writes wait for the decision rather than racing it.
    async fn replicating_peer(&self) -> Option<Arc<Peer>> {
        let p = self.current_peer()?;
        loop {
            let decided = p.decided.notified();
            if p.is_dead() {
                return None;
            }
            if lock(&p.decision).is_some() {
                break;
            }
            if tokio::time::timeout(self.set.timeout, decided)
                .await
                .is_err()
            {
                break;
            }
        }
        p.replicating.load(Ordering::SeqCst).then_some(p)
    }

    /// The peer's role, if connected and known.
    pub fn peer_role(&self) -> Option<Role> {
        let p = self.current_peer()?;
        let st = *lock(&p.state);
        st.map(|s| {
            if s.primary {
                Role::Primary
            } else {
                Role::Secondary
            }
        })
    }

    /// True when connected and the peer holds the same data (no resync pending).
    pub fn in_sync(&self) -> bool {
        self.current_peer()
            .is_some_and(|p| *lock(&p.decision) == Some(Decision::InSync))
    }

    pub fn status(&self) -> ReplStatus {
        let v = lock(&self.view);
        let peer = self.current_peer();
        let pst = peer.as_ref().and_then(|p| *lock(&p.state));
        let (peer_role, peer_disk) = match pst {
            Some(s) => (
                if s.primary {
                    Role::Primary
                } else {
                    Role::Secondary
                },
                match DiskState::from_u8(s.disk) {
                    Some(DiskState::UpToDate) => DiskStatus::UpToDate,
                    Some(DiskState::Outdated) => DiskStatus::Outdated,
                    Some(DiskState::Inconsistent) => DiskStatus::Inconsistent,
                    None if s.disk == DISK_DISKLESS => DiskStatus::Diskless,
                    None => DiskStatus::Unknown,
                },
            ),
            None => (Role::Unknown, DiskStatus::Unknown),
        };
        let resync = v.resync.as_ref().map(|p| {
            let secs = p.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            ResyncStatus {
                done_bytes: p.done,
                total_bytes: p.total,
                rate_bytes_per_s: if secs > 0.0 {
                    (p.done as f64 / secs) as u64
                } else {
                    0
                },
            }
        });
        ReplStatus {
            connection: v.connection,
            peer_role,
            peer_disk,
            resync,
            replicated_writes: self.replicated.load(Ordering::Relaxed),
            resynced_bytes: self.resynced.load(Ordering::Relaxed),
            activity_log_writes: self.activity.transactions.load(Ordering::Relaxed),
            last_error: v.last_error.clone(),
        }
    }

    /// The local state as sent to the peer.
    fn local_state(&self) -> PeerState {
        let m = lock(&self.meta);
        let sb = m.superblock();
        PeerState {
            primary: self.primary.load(Ordering::SeqCst),
            disk: if self.health.diskless() {
                DISK_DISKLESS
            } else {
                sb.disk_state as u8
            },
            current: sb.generations.current,
            bitmap: sb.generations.bitmap,
            history: sb.generations.history,
            dirty_bytes: m.bitmap().dirty_bytes(),
            flags: if self.discard_my_data.load(Ordering::SeqCst) {
                STATE_DISCARD_MY_DATA
            } else {
                0
            },
            promoted_at_ms: sb.promoted_at_ms,
        }
    }

    fn side_of(s: &PeerState, id: u64) -> Side {
        Side {
            primary: s.primary,
            disk: DiskState::from_u8(s.disk).unwrap_or(DiskState::Inconsistent),
            current: s.current,
            bitmap: s.bitmap,
            history: s.history,
            dirty_bytes: s.dirty_bytes,
            id,
        }
    }

    /// Called by the node after a role change (the metadata already records it).
    pub async fn role_changed(self: &Arc<Self>, primary: bool) {
        self.primary.store(primary, Ordering::SeqCst);
        if let Some(p) = self.current_peer() {
            let st = self.local_state();
            if p.send_meta(&Msg::State(st)).await.is_err() {
                return;
            }
            // Two fresh nodes wait for a promotion; now there may be something to sync.
            if matches!(*lock(&p.decision), Some(Decision::NoData)) {
                let peer_state = *lock(&p.state);
                if let Some(ps) = peer_state {
                    self.evaluate(&p, ps).await;
                }
            }
        }
    }

    /// `connect --discard-my-data`: in the split brain the next link finds, this node is the
    /// one that gives up its changes (they are saved to a recovery file first). The request
    /// holds for the next sync decision only: one that finds no split brain (or cannot settle
    /// it) clears it; one that settles it against this node keeps it until the resync is
    /// done, so an interrupted resolution resumes the same way.
    pub fn discard_my_data(&self) {
        self.discard_my_data.store(true, Ordering::SeqCst);
    }

    /// True while connected to the peer.
    pub fn connected(&self) -> bool {
        self.current_peer().is_some()
    }

    /// Enables or disables the link (`connect` / `disconnect`).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.send_replace(on);
        if !on {
            if let Some(p) = self.current_peer() {
                self.drop_link(&p, "disconnected by the operator");
            }
        }
    }

    /// `disconnect`: tells the peer it is on purpose (so its standby does not fail over),
    /// then drops the link and keeps it down.
    pub async fn disconnect(&self) {
        self.enabled.send_replace(false);
        if let Some(p) = self.current_peer() {
            Self::settle_before_bye(&p).await;
            p.say_bye_flushed("disconnected by the operator", Some(self.flush_for_bye()))
                .await;
            self.drop_link(&p, "disconnected by the operator");
        }
    }

    pub fn enabled(&self) -> bool {
        *self.enabled.borrow()
    }

    /// Says goodbye to the peer (clean shutdown).
    pub async fn shutdown(&self) {
        self.enabled.send_replace(false);
        if let Some(p) = self.current_peer() {
            Self::settle_before_bye(&p).await;
            p.say_bye_flushed("node shutting down", Some(self.flush_for_bye()))
                .await;
            self.drop_link(&p, "node shutting down");
        }
        // The metadata is marked clean after this: every mark the link's end calls for first.
        self.unconfirmed_marked().await;
    }

    fn drop_link(&self, p: &Arc<Peer>, why: &str) {
        // One caller kills the link: the check, the count and the kill happen under the lock
        // of the marking chain, so two callers cannot both kill it nor publish out of order.
        let mut chain = lock(&self.orphan_marks);
        if p.is_dead() {
            return;
        }
        tracing::warn!(peer = %p.name, "peer link lost: {why}");
        // An operator's `disconnect` is not the primary's death: no failover for it.
        let standby_of_primary = self.enabled()
            && !p.said_bye.load(Ordering::SeqCst)
            && !self.primary.load(Ordering::SeqCst)
            && (*lock(&p.state)).is_some_and(|s| s.primary)
            && *lock(&p.decision) == Some(Decision::InSync);
        let silent = p.silent_for();
        // Counted before the kill: a flush that sees the link die waits for these marks.
        let seq = self.marks_started.fetch_add(1, Ordering::SeqCst) + 1;
        let orphans = p.kill();
        let _ = self.events.send(ReplEvent::PeerLost {
            standby_of_primary,
            silent,
            reason: why.to_string(),
        });
        {
            let mut cur = lock(&self.peer);
            if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, p)) {
                *cur = None;
            }
        }
        lock(&self.view).resync = None;
        self.set_error(Some(why.to_string()));
        // Marked in the order links died; an activity log hold is released only once its
        // range is marked on disk, so a crash meanwhile still finds it in the log.
        let me = self.marker.clone();
        let before = chain.take();
        let done = self.marks_done.clone();
        let task = tokio::spawn(async move {
            if let Some(t) = before {
                let _ = t.await;
            }
            let mut holds = Vec::new();
            let mut ranges = Vec::with_capacity(orphans.len());
            for (o, l, hold) in orphans {
                ranges.push((o, l));
                holds.extend(hold);
            }
            let marks = coalesce(ranges).into_iter().map(|(o, l)| {
                let me = &me;
                async move {
                    if let Err(e) = me.mark(o, l).await {
                        tracing::error!(error = %e, "cannot mark unconfirmed writes out of sync");
                    }
                }
            });
            futures_util::future::join_all(marks).await;
            drop(holds);
            done.send_modify(|d| *d = (*d).max(seq));
        });
        *chain = Some(task);
        drop(chain);
        self.changed.notify_one();
    }

    /// Flushes this node's disk for a goodbye; true if it worked.
    async fn flush_for_bye(&self) -> bool {
        !self.health.diskless() && self.local(self.disk.flush()).await.is_ok()
    }

    /// Returns once the ranges of every link lost so far that the peer did not confirm, or
    /// confirmed without a flush since, are marked out of sync on disk.
    async fn unconfirmed_marked(&self) {
        let target = self.marks_started.load(Ordering::SeqCst);
        let mut rx = self.marks_done.subscribe();
        let _ = rx.wait_for(|d| *d >= target).await;
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (s, addr): (tokio::net::TcpStream, SocketAddr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "replication accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !self.enabled() {
                // The link is down on purpose here: no handshake, the dialer retries later.
                drop(s);
                continue;
            }
            if self.set.link.dials() {
                // This node dials its peer and never needs to accept: a connection here is
                // not the peer's, and gets no handshake.
                tracing::debug!(%addr, "closed a connection to the dialing side of the link");
                drop(s);
                continue;
            }
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                match link::accept(s, &me.set.link).await {
                    Ok(conn) => {
                        // The link loop takes connections as they come; one it has no room
                        // for is dropped, and the dialer tries again.
                        if me.incoming_tx.try_send(conn).is_err() {
                            tracing::warn!(%addr, "dropped an authenticated peer connection: too many waiting");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "refused a peer connection");
                        me.set_error(Some(e.to_string()));
                    }
                }
            });
        }
    }

    /// Establishes links, runs them, and re-establishes them with backoff while enabled.
    async fn link_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(50);
        let mut last_logged = String::new();
        let mut enabled = self.enabled.subscribe();
        loop {
            if !*enabled.borrow_and_update() {
                if lock(&self.view).connection != Connection::SplitBrain {
                    self.set_connection(Connection::Standalone);
                }
                if enabled.changed().await.is_err() {
                    return;
                }
                continue;
            }
            self.set_connection(Connection::Connecting);
            // Writes the last link left unconfirmed must be in the bitmap before a new link
            // decides what to copy.
            let pending = lock(&self.orphan_marks).take();
            if let Some(task) = pending {
                let _ = task.await;
            }
            let attempt = tokio::select! {
                r = self.establish() => r,
                _ = enabled.changed() => continue,
            };
            match attempt {
                Ok((data, meta)) => {
                    backoff = Duration::from_millis(50);
                    last_logged.clear();
                    self.set_error(None);
                    let why = self.run_link(data, meta).await;
                    tracing::info!(peer = %self.set.link.peer, "link ended: {why}");
                }
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last_logged {
                        tracing::warn!(peer = %self.set.link.peer, error = %msg, "cannot connect to the peer; retrying");
                        last_logged = msg.clone();
                    }
                    self.set_error(Some(msg));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = enabled.changed() => {}
                    }
                    // Retry at least every heartbeat interval: after a short network cut the
                    // link must come back well before a standby's failover deadline.
                    let cap = self.set.interval.max(Duration::from_millis(50));
                    backoff = (backoff * 2).min(cap);
                }
            }
        }
    }

    /// One link: both connections, authenticated, of the same session.
    async fn establish(&self) -> Result<(Conn, Conn), link::LinkError> {
        if self.set.link.dials() {
            let session: u64 = rand::random();
            let data = link::dial(&self.set.link, Channel::Data, session).await?;
            let meta = link::dial(&self.set.link, Channel::Meta, session).await?;
            Ok((data, meta))
        } else {
            let mut rx = self.incoming.lock().await;
            // Connections queued while this node was not accepting links are stale.
            while rx.try_recv().is_ok() {}
            let mut waiting: HashMap<u64, Conn> = HashMap::new();
            loop {
                let Some(c) = rx.recv().await else {
                    return Err(link::LinkError::Closed);
                };
                if let Some(other) = waiting.remove(&c.session) {
                    if other.channel != c.channel {
                        let (data, meta) = if c.channel == Channel::Data {
                            (c, other)
                        } else {
                            (other, c)
                        };
                        return Ok((data, meta));
                    }
                }
                // Keep only the newest session's half-link.
                waiting.retain(|s, _| *s == c.session);
                waiting.insert(c.session, c);
            }
        }
    }

    /// Runs an established link until it fails; returns why it ended.
    async fn run_link(self: &Arc<Self>, data: Conn, meta: Conn) -> String {
        let (closed_tx, _) = watch::channel(false);
        let peer = Arc::new(Peer {
            data: SharedFrameWriter::new(data.writer),
            data_kick: Notify::new(),
            meta: tokio::sync::Mutex::new(meta.writer),
            inner: Mutex::new(PeerInner::default()),
            next_id: AtomicU64::new(1),
            replicating: AtomicBool::new(false),
            closed: closed_tx,
            started: Instant::now(),
            last_rx_ms: AtomicU64::new(0),
            state: Mutex::new(None),
            sent: Mutex::new(None),
            decision: Mutex::new(None),
            decided: Notify::new(),
            bitmap_done: Notify::new(),
            bitmap_received: AtomicBool::new(false),
            resync_window: Arc::new(Semaphore::new((RESYNC_WINDOW >> 10) as usize)),
            name: self.set.link.peer.clone(),
            id: data.peer.node_id,
            said_bye: AtomicBool::new(false),
            device_size: self.size,
            confirmations: AtomicU64::new(0),
        });
        peer.touch();
        *lock(&self.peer) = Some(Arc::clone(&peer));
        tracing::info!(peer = %peer.name, session = data.session, "peer link up");
        self.set_connection(Connection::Connected);

        // Our state goes out before anything is read: whatever the peer decides on reading
        // it, it has ours too (both must see a split brain, for one).
        let first = self.local_state();
        *lock(&peer.sent) = Some(first);
        let sent = peer.send_meta(&Msg::State(first)).await;
        let mut tasks = tokio::task::JoinSet::new();
        {
            let me = Arc::clone(self);
            let p = Arc::clone(&peer);
            let r = data.reader;
            tasks.spawn(async move { me.data_loop(p, r).await });
        }
        {
            let me = Arc::clone(self);
            let p = Arc::clone(&peer);
            let r = meta.reader;
            tasks.spawn(async move { me.meta_loop(p, r).await });
        }
        {
            let me = Arc::clone(self);
            let p = Arc::clone(&peer);
            tasks.spawn(async move { me.heartbeat(p).await });
        }
        {
            let p = Arc::clone(&peer);
            tasks.spawn(async move { Self::data_sender(p).await });
        }
        {
            let me = Arc::clone(self);
            let p = Arc::clone(&peer);
            tasks.spawn(async move { me.copy_late_marks(p).await });
        }
        {
            let p = Arc::clone(&peer);
            tasks.spawn(async move { Self::settle_peer(p).await });
        }
        let why = match sent {
            Err(e) => e,
            Ok(()) => {
                let mut closed = peer.closed.subscribe();
                tokio::select! {
                    r = tasks.join_next() => match r {
                        Some(Ok(Err(e))) => e,
                        Some(Ok(Ok(()))) => "link closed".into(),
                        Some(Err(e)) => format!("link task failed: {e}"),
                        None => "link closed".into(),
                    },
                    _ = closed.wait_for(|c| *c) => lock(&self.view).last_error.clone().unwrap_or_else(|| "link closed".into()),
                }
            }
        };
        self.drop_link(&peer, &why);
        tasks.abort_all();
        // Writers may still hold the sockets: shut them down so the peer notices at once.
        peer.data.shutdown().await;
        peer.meta.lock().await.shutdown().await;
        why
    }

    /// Writes the data frames queued by replicated writes. Woken by the first frame queued
    /// after a write; everything queued by then leaves in one call. A wake-up from a runtime
    /// thread runs this task on that thread as soon as the waking task yields, so batching
    /// adds no hand-off between threads.
    async fn data_sender(peer: Arc<Peer>) -> Result<(), String> {
        loop {
            peer.data_kick.notified().await;
            peer.data
                .flush()
                .await
                .map_err(|e| format!("sending writes to the peer: {e}"))?;
        }
    }

    /// Ranges marked out of sync while the link is up and in sync (a write that raced the
    /// link's coming up, a write the peer failed) are copied at once, not at the next
    /// reconnect. Only the primary copies; it is the one whose writes get marked.
    async fn copy_late_marks(self: Arc<Self>, peer: Arc<Peer>) -> Result<(), String> {
        let mut closed = peer.closed.subscribe();
        loop {
            tokio::select! {
                _ = self.marker.marked.notified() => {}
                _ = peer.decided.notified() => {}
                _ = closed.wait_for(|c| *c) => return Ok(()),
            }
            self.start_catch_up(&peer);
        }
    }

    fn start_catch_up(self: &Arc<Self>, peer: &Arc<Peer>) {
        let in_sync = *lock(&peer.decision) == Some(Decision::InSync);
        let dirty = lock(&self.meta).bitmap().dirty_bytes() > 0;
        if !in_sync
            || !dirty
            || !self.primary.load(Ordering::SeqCst)
            || peer.is_dead()
            || self.resyncing.load(Ordering::SeqCst)
        {
            return;
        }
        tracing::info!(peer = %peer.name, "regions were marked out of sync while connected: resyncing them");
        *lock(&peer.decision) = Some(Decision::Source { full: false });
        self.set_connection(Connection::SyncSource);
        let (me, p) = (Arc::clone(self), Arc::clone(peer));
        tokio::spawn(async move {
            if let Err(e) = me.resync_source_inner(&p, false, false).await {
                me.drop_link(&p, &format!("resync failed: {e}"));
            }
        });
    }

    /// Every `SETTLE_EVERY`, asks the peer to flush what it has confirmed since the last
    /// flush, so that a lost link marks at most that much for a resync (`Peer::kill`).
    async fn settle_peer(peer: Arc<Peer>) -> Result<(), String> {
        let mut closed = peer.closed.subscribe();
        let mut tick = tokio::time::interval(SETTLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = closed.wait_for(|c| *c) => return Ok(()),
            }
            if peer.has_unstable(true) {
                if let Some(id) = peer.start_flush(None) {
                    peer.send_data(&Msg::Settle { id }).await?;
                }
            }
        }
    }

    /// Asks the peer to flush everything it has confirmed, and waits for its answer.
    async fn settle(peer: &Peer) -> Result<(), String> {
        peer.flush_disk(false).await.map_err(|e| e.to_string())
    }

    /// [`Self::settle`], briefly, if there is anything to settle: a link ended on purpose
    /// then leaves nothing to resync.
    async fn settle_before_bye(peer: &Peer) {
        if peer.has_unstable(false) {
            let _ = tokio::time::timeout(SETTLE_AT_BYE, Self::settle(peer)).await;
        }
    }

    /// Pings every `interval`, and ends the link the moment `timeout` has passed without any
    /// frame from the peer (the deadline is tracked exactly, not at ping ticks).
    async fn heartbeat(self: Arc<Self>, peer: Arc<Peer>) -> Result<(), String> {
        let mut tick = tokio::time::interval(self.set.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nonce = 0u64;
        loop {
            let silent = peer.silent_for();
            if silent > self.set.timeout {
                return Err(format!(
                    "no frame from the peer for {} ms (timeout {} ms): peer lost",
                    silent.as_millis(),
                    self.set.timeout.as_millis()
                ));
            }
            if let Some(age) = peer
                .oldest_unanswered()
                .filter(|a| *a > self.set.ack_timeout)
            {
                // The peer answers pings but not its requests: its disk (or its data side) is
                // stuck. Dropping the link marks what it did not confirm and frees the
                // writers; the goodbye tells a standby its primary lives (no failover).
                let why = format!(
                    "the peer has not answered a request for {} ms (ack timeout {} ms): dropping the link",
                    age.as_millis(),
                    self.set.ack_timeout.as_millis()
                );
                peer.say_bye(&why).await;
                return Err(why);
            }
            let deadline = self.set.timeout - silent + Duration::from_millis(1);
            tokio::select! {
                _ = tick.tick() => {
                    nonce += 1;
                    // A ping stuck behind a full socket must not stall the watchdog.
                    let ping = Msg::Ping { nonce };
                    match tokio::time::timeout(self.set.timeout, peer.send_meta(&ping)).await {
                        Ok(r) => r?,
                        Err(_) => return Err("peer is not reading: heartbeat send timed out".into()),
                    }
                }
                _ = tokio::time::sleep(deadline) => {}
            }
        }
    }

    async fn meta_loop(self: Arc<Self>, peer: Arc<Peer>, mut r: FrameReader) -> Result<(), String> {
        loop {
            let msg = r.recv().await.map_err(|e| e.to_string())?;
            peer.touch();
            match msg {
                Msg::Ping { nonce } => peer.send_meta(&Msg::Pong { nonce }).await?,
                Msg::Pong { .. } => {}
                Msg::Received { id } => {
                    let mut g = lock(&peer.inner);
                    if let Some(tx) = g
                        .writes
                        .get_mut(&id)
                        .filter(|w| w.on_received)
                        .and_then(|w| w.ack.take())
                    {
                        let _ = tx.send(0);
                    }
                }
                Msg::Written { id, errno } => {
                    let w = {
                        let mut g = lock(&peer.inner);
                        let w = g.writes.remove(&id);
                        if let Some(w) = w.as_ref().filter(|_| errno == 0) {
                            peer.confirmed(&mut g, w.offset, w.len);
                        }
                        w
                    };
                    // A write the peer failed is marked here, while its activity log hold is
                    // still in `w` (dropped at the end of this arm), then its submitter, if it
                    // waits, gets the error.
                    if let Some(w) = w.as_ref().filter(|_| errno != 0) {
                        self.marker.mark(w.offset, w.len).await?;
                    }
                    match w {
                        Some(PendingWrite { ack: Some(tx), .. }) => {
                            let _ = tx.send(errno);
                        }
                        Some(_) if errno != 0 => {}
                        Some(_) => {
                            self.replicated.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {}
                    }
                }
                Msg::Flushed { id, errno } => peer.flushed(id, errno),
                Msg::ResyncAck { offset, len, errno } => {
                    self.resync_acked(&peer, offset, len, errno)?
                }
                Msg::State(st) => {
                    *lock(&peer.state) = Some(st);
                    {
                        let mut v = lock(&self.view);
                        if v.connection == Connection::SyncTarget {
                            if let Some(p) = v.resync.as_mut() {
                                // The source's marks include ours once merged (`resync_source`).
                                p.total = p.total.max(st.dirty_bytes);
                            }
                        }
                    }
                    self.evaluate(&peer, st).await;
                    self.changed.notify_one();
                }
                Msg::VerifyReply { id, crcs } => {
                    if let Some((_, tx)) = lock(&peer.inner).verifies.remove(&id) {
                        let _ = tx.send(crcs);
                    }
                }
                Msg::Bye { reason, stable } => {
                    peer.said_bye.store(true, Ordering::SeqCst);
                    if stable {
                        // Every confirmation came before the goodbye on this connection.
                        lock(&peer.inner).unstable.clear();
                    }
                    return Err(format!("peer said goodbye: {reason}"));
                }
                other => {
                    return Err(format!(
                        "unexpected {} on the meta connection",
                        other.name()
                    ))
                }
            }
        }
    }

    /// Decides, once per link (and again while there is no data on either side), what to do
    /// with the peer; afterwards keeps a secondary's generation equal to its primary's.
    async fn evaluate(self: &Arc<Self>, peer: &Arc<Peer>, st: PeerState) {
        if self.evaluate_diskless(peer, &st).await {
            return;
        }
        let current = *lock(&peer.decision);
        match current {
            Some(Decision::NoData) | None => {}
            Some(Decision::InSync) => {
                self.follow_generation(&st).await;
                return;
            }
            Some(_) => return,
        }
        // The first decision is made on the states both nodes sent when the link came up;
        // after a promotion of one of two data-less nodes, on the states sent since.
        let me = match current {
            None => (*lock(&peer.sent)).unwrap_or_else(|| self.local_state()),
            Some(_) => self.local_state(),
        };
        let node_id = lock(&self.meta).superblock().node_id;
        let mut d = decide::decide(&Self::side_of(&me, node_id), &Self::side_of(&st, peer.id));
        if d == Decision::SplitBrain {
            let loser = self.split_brain_loser(&me, &st, node_id, peer.id);
            let resolution = match loser {
                None => format!(
                    "not resolved (after_split_brain = {}): both nodes keep their data; run `twinbd connect --discard-my-data` on the node whose changes are to be dropped, and `twinbd connect` on the other",
                    self.set.after_split_brain
                ),
                Some(true) => format!(
                    "this node ({}) discards its changes and resyncs from {}; the blocks it loses are saved to a recovery file first",
                    self.set.link.me, peer.name
                ),
                Some(false) => format!(
                    "{} discards its changes and resyncs from this node ({})",
                    peer.name, self.set.link.me
                ),
            };
            tracing::error!(peer = %peer.name, "split brain detected: both nodes changed the data while apart; {resolution}");
            let _ = self.events.send(ReplEvent::SplitBrain { resolution });
            match loser {
                Some(true) => {
                    // Demoting may wait for NBD clients: not on the meta loop, which must keep
                    // reading heartbeats meanwhile.
                    *lock(&peer.decision) = Some(Decision::Target { full: false });
                    peer.decided.notify_waiters();
                    self.set_connection(Connection::SyncTarget);
                    let (me, p) = (Arc::clone(self), Arc::clone(peer));
                    tokio::spawn(async move {
                        let res = match me.prepare_to_lose(&p).await {
                            Ok(()) => me.start_target(&p, false).await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = res {
                            me.drop_link(&p, &e);
                        }
                    });
                    return;
                }
                Some(false) => d = Decision::Source { full: false },
                None => {}
            }
        }
        // `--discard-my-data` is for the next decision only: this one did not need it (no
        // split brain, or one it could not settle), so it must not settle a later one.
        if me.flags & STATE_DISCARD_MY_DATA != 0
            && self.discard_my_data.swap(false, Ordering::SeqCst)
        {
            tracing::info!(peer = %peer.name, "the request to discard this node's data was not used (sync decision: {d:?}); it is cleared");
        }
        *lock(&peer.decision) = Some(d);
        tracing::info!(peer = %peer.name, "sync decision: {d:?}");
        if d == Decision::InSync {
            peer.replicating.store(true, Ordering::SeqCst);
        }
        peer.decided.notify_waiters();
        match d {
            Decision::InSync => {
                peer.replicating.store(true, Ordering::SeqCst);
                self.set_connection(Connection::Connected);
                self.follow_generation(&st).await;
            }
            Decision::NoData => self.set_connection(Connection::Connected),
            Decision::Source { full } => {
                self.set_connection(Connection::SyncSource);
                let me = Arc::clone(self);
                let p = Arc::clone(peer);
                tokio::spawn(async move {
                    if let Err(e) = me.resync_source(&p, full).await {
                        tracing::warn!("resync stopped: {e}");
                        me.drop_link(&p, &format!("resync failed: {e}"));
                    }
                });
            }
            Decision::Target { full } => {
                self.set_connection(Connection::SyncTarget);
                if let Err(e) = self.start_target(peer, full).await {
                    self.drop_link(peer, &e);
                }
            }
            Decision::SplitBrain => {
                self.set_error(Some("split brain detected".into()));
                self.set_connection(Connection::SplitBrain);
                self.enabled.send_replace(false);
                self.drop_link(peer, "split brain detected");
            }
            Decision::Unrelated | Decision::PrimaryBehind | Decision::PeerPrimaryBehind => {
                let why = match d {
                    Decision::Unrelated => "the nodes' data are unrelated (no common generation)",
                    Decision::PrimaryBehind => "this node is primary but the peer holds newer data",
                    _ => "the peer is primary but this node holds newer data",
                };
                tracing::error!(peer = %peer.name, "refusing to sync: {why}");
                self.set_error(Some(why.into()));
                self.enabled.send_replace(false);
                self.drop_link(peer, why);
            }
        }
    }

    /// Handles a link where either node has no disk; returns true if it did.
    async fn evaluate_diskless(self: &Arc<Self>, peer: &Arc<Peer>, st: &PeerState) -> bool {
        let peer_diskless = st.disk == DISK_DISKLESS;
        let me_diskless = self.health.diskless();
        if !peer_diskless && !me_diskless {
            return false;
        }
        let before = *lock(&peer.decision);
        if peer_diskless {
            // Nothing can be written there: stop sending, and since its disk is gone (or will
            // come back with unknown contents), everything must be copied when it returns.
            peer.replicating.store(false, Ordering::SeqCst);
            if before != Some(Decision::NoData) && !me_diskless {
                tracing::warn!(peer = %peer.name, "the peer's disk failed: marking the whole device for a full resync");
                let m = Arc::clone(&self.meta);
                let primary = self.primary.load(Ordering::SeqCst);
                let res = tokio::task::spawn_blocking(move || {
                    let mut s = lock(&m);
                    if primary && s.superblock().generations.bitmap == 0 {
                        s.update(start_tracking)?;
                    }
                    s.bitmap_mut().set_all();
                    s.flush_bitmap()
                })
                .await;
                if !matches!(res, Ok(Ok(()))) {
                    tracing::error!("cannot mark the device for a full resync");
                }
            }
            *lock(&peer.decision) = Some(Decision::NoData);
        } else if st.disk == DiskState::UpToDate as u8 {
            // This node has no disk; the peer's is up to date by its own account, but it holds
            // what this node acknowledged only if the two did not part since (a write this node
            // took alone moved its generation on, `start_tracking`). A secondary may also face
            // a newer peer; a primary facing one is in a split brain.
            let mine = lock(&self.meta).superblock().generations;
            let newer_peer = st.bitmap == mine.current || st.history.contains(&mine.current);
            let primary = self.primary.load(Ordering::SeqCst);
            if st.current != mine.current && (primary || !newer_peer) {
                let why = if newer_peer {
                    "this node is primary without its disk and the peer holds newer data (split brain)"
                } else {
                    "this node has no disk and the peer lacks writes it acknowledged: they were on the failed disk only"
                };
                tracing::error!(peer = %peer.name, current = mine.current, peer_current = st.current, "refusing the peer's data: {why}");
                *lock(&peer.decision) = Some(Decision::NoData);
                peer.replicating.store(false, Ordering::SeqCst);
                peer.decided.notify_waiters();
                self.set_error(Some(why.into()));
                self.enabled.send_replace(false);
                self.drop_link(peer, why);
                return true;
            }
            // Everything goes through the peer.
            *lock(&peer.decision) = Some(Decision::InSync);
            peer.replicating.store(true, Ordering::SeqCst);
        } else {
            *lock(&peer.decision) = Some(Decision::NoData);
            peer.replicating.store(false, Ordering::SeqCst);
        }
        lock(&self.view).resync = None;
        // A node without a disk, or facing one, has no split brain to settle: a request to
        // discard this node's data is used up by this decision too.
        if self.discard_my_data.swap(false, Ordering::SeqCst) {
            tracing::info!(peer = %peer.name, "the request to discard this node's data was not used (a disk is detached); it is cleared");
        }
        peer.decided.notify_waiters();
        self.set_connection(Connection::Connected);
        self.changed.notify_one();
        true
    }

    /// The local disk was detached: tell the peer.
    pub async fn local_disk_failed(&self) {
        if let Some(p) = self.current_peer() {
            let _ = p.send_meta(&Msg::State(self.local_state())).await;
        }
    }

    /// A diskless primary reads through its peer.
    pub async fn read_from_peer(&self, offset: u64, len: usize) -> Result<IoBuf, StorageError> {
        let fail = |why: &str| eio("read", offset, len as u64, why);
        let p = self
            .replicating_peer()
            .await
            .ok_or_else(|| fail("the local disk failed and no peer holds the data"))?;
        let id = p.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut g = lock(&p.inner);
            if g.dead {
                return Err(fail("the local disk failed and the peer link is down"));
            }
            g.reads.insert(id, (Instant::now(), tx));
        }
        p.send_data(&Msg::ReadRequest {
            id,
            offset,
            len: len as u32,
        })
        .await
        .map_err(|e| fail(&e))?;
        match rx.await {
            Ok((0, data)) if data.len() == len => Ok(data),
            Ok((errno, _)) => Err(fail(&format!("the peer failed the read (errno {errno})"))),
            Err(_) => Err(fail("the peer link went down during the read")),
        }
    }

    /// Who gives up its changes in a split brain: `Some(true)` this node, `Some(false)` the
    /// peer, `None` nobody (left to an operator). Both nodes compute it from the same states.
    fn split_brain_loser(
        &self,
        me: &PeerState,
        peer: &PeerState,
        my_id: u64,
        peer_id: u64,
    ) -> Option<bool> {
        let mine = me.flags & STATE_DISCARD_MY_DATA != 0;
        let theirs = peer.flags & STATE_DISCARD_MY_DATA != 0;
        match (mine, theirs) {
            (true, false) => return Some(true),
            (false, true) => return Some(false),
            (true, true) => return None,
            (false, false) => {}
        }
        let younger = || match me.promoted_at_ms.cmp(&peer.promoted_at_ms) {
            std::cmp::Ordering::Greater => Some(true),
            std::cmp::Ordering::Less => Some(false),
            std::cmp::Ordering::Equal => (my_id != peer_id).then_some(my_id < peer_id),
        };
        match self.set.after_split_brain {
            AfterSplitBrain::Disconnect => None,
            AfterSplitBrain::DiscardYoungerPrimary => younger(),
            AfterSplitBrain::DiscardLeastChanges => match me.dirty_bytes.cmp(&peer.dirty_bytes) {
                std::cmp::Ordering::Less => Some(true),
                std::cmp::Ordering::Greater => Some(false),
                std::cmp::Ordering::Equal => younger(),
            },
        }
    }

    /// The losing side of a split brain: stop being primary, and open the recovery file that
    /// will hold every block the resync overwrites.
    async fn prepare_to_lose(self: &Arc<Self>, peer: &Arc<Peer>) -> Result<(), String> {
        if self.primary.load(Ordering::SeqCst) {
            let (tx, rx) = oneshot::channel();
            self.events
                .send(ReplEvent::DemoteForResolution { done: tx })
                .map_err(|_| "node is shutting down".to_string())?;
            rx.await
                .map_err(|_| "node is shutting down".to_string())?
                .map_err(|e| format!("cannot demote to resolve the split brain: {e}"))?;
        }
        let (size, granularity) = {
            let m = lock(&self.meta);
            (m.data_size(), m.bitmap().granularity())
        };
        let w = recovery::RecoveryWriter::create(
            &self.set.recovery_dir,
            &self.set.link.resource,
            &self.set.link.me,
            size,
            granularity,
        )
        .map_err(|e| e.to_string())?;
        tracing::warn!(peer = %peer.name, file = %w.path().display(), "saving every block the resync overwrites");
        *lock(&self.recovery) = Some(w);
        Ok(())
    }

    /// Before a split-brain resync overwrites `[offset, offset+len)`, saves what is there.
    async fn save_before_overwrite(&self, offset: u64, len: u64) -> Result<(), String> {
        let ranges = match lock(&self.recovery).as_mut() {
            Some(w) => w.claim(offset, len),
            None => return Ok(()),
        };
        // A trim or zero-write may cover gigabytes: read and save them a MiB at a time.
        for (o, l) in ranges
            .into_iter()
            .flat_map(|(o, l)| pieces(o, l, SAVE_PIECE))
        {
            let old = self
                .disk
                .read(o, l as usize)
                .await
                .map_err(|e| e.to_string())?;
            let mut g = lock(&self.recovery);
            if let Some(w) = g.as_mut() {
                w.append(o, &old).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// A secondary in sync adopts its primary's generation (a promotion while connected).
    async fn follow_generation(self: &Arc<Self>, st: &PeerState) {
        if self.primary.load(Ordering::SeqCst) || !st.primary {
            return;
        }
        let mine = lock(&self.meta).superblock().generations.current;
        if mine == st.current {
            return;
        }
        let (current, m) = (st.current, Arc::clone(&self.meta));
        let res = tokio::task::spawn_blocking(move || {
            lock(&m).update(|sb| {
                let g = &mut sb.generations;
                if g.current != 0 {
                    g.history = [g.current, g.history[0]];
                }
                g.current = current;
                g.bitmap = 0;
                sb.disk_state = DiskState::UpToDate;
            })
        })
        .await;
        if !matches!(res, Ok(Ok(()))) {
            tracing::error!("cannot record the primary's new generation");
        }
    }

    /// Whether the data loop may take another frame: fewer than `APPLY_MAX_IN_FLIGHT` requests
    /// and `APPLY_MAX_BYTES` of data being applied (one may always be, however large).
    fn may_apply(&self, in_flight: usize) -> bool {
        in_flight == 0
            || (in_flight < APPLY_MAX_IN_FLIGHT
                && self.applying.load(Ordering::Relaxed) < APPLY_MAX_BYTES)
    }

    async fn data_loop(self: Arc<Self>, peer: Arc<Peer>, mut r: FrameReader) -> Result<(), String> {
        let mut inflight: FuturesUnordered<ApplyFuture> = FuturesUnordered::new();
        let mut acks: Vec<Msg> = Vec::new();
        loop {
            tokio::select! {
                biased;
                Some(res) = inflight.next(), if !inflight.is_empty() => acks.extend(res?),
                msg = r.recv(), if self.may_apply(inflight.len()) => {
                    let msg = match msg {
                        Ok(msg) => msg,
                        Err(link::LinkError::Closed) => {
                            Self::let_meta_finish(&peer).await;
                            return Err(link::LinkError::Closed.to_string());
                        }
                        Err(e) => return Err(e.to_string()),
                    };
                    peer.touch();
                    if let Some(fut) = self.apply(&peer, msg).await? {
                        inflight.push(fut);
                    }
                }
            }
            // Apply every frame already read and collect every acknowledgement ready, so
            // the frames the primary sent together are answered together.
            loop {
                let mut progress = false;
                while self.may_apply(inflight.len()) {
                    let Some(msg) = r.try_recv().map_err(|e| e.to_string())? else {
                        break;
                    };
                    progress = true;
                    if let Some(fut) = self.apply(&peer, msg).await? {
                        inflight.push(fut);
                    }
                }
                while let Some(Some(res)) = futures_util::FutureExt::now_or_never(inflight.next()) {
                    progress = true;
                    acks.extend(res?);
                }
                if !progress {
                    break;
                }
            }
            if !acks.is_empty() {
                peer.send_meta_batch(&acks).await?;
                acks.clear();
            }
        }
    }

    /// The peer ended the data connection (a goodbye, or a close): what it sent on the meta
    /// connection before (its state, when it ends the link on seeing ours, as after a split
    /// brain) is read and acted on before the link is torn down. The meta loop ends the link
    /// when it reaches the same goodbye or close; this waits for that, briefly.
    async fn let_meta_finish(peer: &Peer) {
        let mut closed = peer.closed.subscribe();
        let _ = tokio::time::timeout(Duration::from_millis(300), closed.wait_for(|c| *c)).await;
    }

    /// Runs a local disk operation unless the disk is detached; a device error detaches it.
    async fn local<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        if self.health.diskless() {
            return Err(eio("write", 0, 0, "disk detached"));
        }
        let res = op.await;
        if let Err(e) = &res {
            self.health.check(e);
        }
        res
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<(), String> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(format!(
                "peer sent {what} of {len} bytes at {offset}, beyond the device ({} bytes)",
                self.size
            )),
        }
    }

    /// Handles one data-connection message; long work is returned as a future so the next
    /// frames are read meanwhile. Tickets are taken here, in arrival order.
    async fn apply(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        msg: Msg,
    ) -> Result<Option<ApplyFuture>, String> {
        let writable = || {
            if self.primary.load(Ordering::SeqCst) {
                Err("peer sent a write while this node is primary".to_string())
            } else {
                Ok(())
            }
        };
        match msg {
            Msg::Write {
                id,
                offset,
                fua,
                data,
            } => {
                writable()?;
                self.check_range("a write", offset, data.len() as u64)?;
                if self.set.protocol == Protocol::B {
                    peer.send_meta(&Msg::Received { id }).await?;
                }
                let mut t = self.conflicts.register(offset, data.len() as u64);
                let me = Applying::new(self, data.len());
                Ok(Some(Box::pin(async move {
                    t.wait().await;
                    me.save_before_overwrite(offset, data.len() as u64).await?;
                    let res = me.local(me.disk.write(offset, data, fua)).await;
                    drop(t);
                    let errno = match res {
                        Ok(()) => 0,
                        Err(e) => {
                            tracing::error!(error = %e, "replicated write failed on this node");
                            e.errno() as u32
                        }
                    };
                    Ok(Some(Msg::Written { id, errno }))
                })))
            }
            Msg::Trim { id, offset, len }
            | Msg::Zeroes {
                id, offset, len, ..
            } => {
                writable()?;
                self.check_range("a trim", offset, len)?;
                let zero = match msg {
                    Msg::Zeroes { may_trim, .. } => Some(may_trim),
                    _ => None,
                };
                let mut t = self.conflicts.register(offset, len);
                let me = Arc::clone(self);
                Ok(Some(Box::pin(async move {
                    t.wait().await;
                    me.save_before_overwrite(offset, len).await?;
                    let res = match zero {
                        Some(may_trim) => {
                            me.local(me.disk.write_zeroes(offset, len, may_trim)).await
                        }
                        None => me.local(me.disk.trim(offset, len)).await,
                    };
                    drop(t);
                    let errno = res.map_or_else(|e| e.errno() as u32, |_| 0);
                    Ok(Some(Msg::Written { id, errno }))
                })))
            }
            Msg::Flush { id } => {
                let mut t = self.conflicts.barrier();
                let me = Arc::clone(self);
                Ok(Some(Box::pin(async move {
                    t.wait().await;
                    let res = me.local(me.disk.flush()).await;
                    drop(t);
                    let errno = res.map_or_else(|e| e.errno() as u32, |_| 0);
                    Ok(Some(Msg::Flushed { id, errno }))
                })))
            }
            Msg::Settle { id } => {
                // Covers what this node has already confirmed (its `Written` and `ResyncAck`
                // went out after the data reached the page cache): no ticket, nothing waits.
                let me = Arc::clone(self);
                Ok(Some(Box::pin(async move {
                    let res = me.local(me.disk.flush()).await;
                    let errno = res.map_or_else(|e| e.errno() as u32, |_| 0);
                    Ok(Some(Msg::Flushed { id, errno }))
                })))
            }
            Msg::ResyncData { offset, data } => {
                writable()?;
                self.expect_resync_target(peer, "resync data")?;
                let len = data.len() as u64;
                self.check_range("resync data", offset, len)?;
                let mut t = self.conflicts.register(offset, len);
                let me = Applying::new(self, data.len());
                Ok(Some(Box::pin(async move {
                    t.wait().await;
                    me.save_before_overwrite(offset, len).await?;
                    let res = me.local(me.disk.write_bulk(offset, data)).await;
                    drop(t);
                    let errno = res.map_or_else(|e| e.errno() as u32, |_| 0);
                    if errno == 0 {
                        me.resynced.fetch_add(len, Ordering::Relaxed);
                        if let Some(pr) = lock(&me.view).resync.as_mut() {
                            pr.copied(len);
                        }
                    }
                    Ok(Some(Msg::ResyncAck { offset, len, errno }))
                })))
            }
            Msg::BitmapChunk { first_word, words } => {
                self.expect_resync_source(peer, "a bitmap")?;
                self.merge_bitmap(first_word, &words)?;
                Ok(None)
            }
            Msg::BitmapDone => {
                self.expect_resync_source(peer, "a bitmap")?;
                peer.bitmap_received.store(true, Ordering::SeqCst);
                peer.bitmap_done.notify_waiters();
                Ok(None)
            }
            Msg::ResyncDone { current } => {
                writable()?;
                self.expect_resync_target(peer, "the end of a resync")?;
                let mut t = self.conflicts.barrier();
                let (me, p) = (Arc::clone(self), Arc::clone(peer));
                Ok(Some(Box::pin(async move {
                    t.wait().await;
                    let res = me.end_target(&p, current).await;
                    drop(t);
                    res.map(|()| None)
                })))
            }
            Msg::ReadRequest { id, offset, len } => {
                self.check_range("a read request", offset, u64::from(len))?;
                if len > crate::nbd::server::MAX_PAYLOAD {
                    return Err(format!("peer asked to read {len} bytes at once"));
                }
                let mut t = self.conflicts.register(offset, u64::from(len));
                let (me, p) = (Applying::new(self, len as usize), Arc::clone(peer));
                Ok(Some(Box::pin(async move {
                    t.wait().await;
                    let res = if me.health.diskless() {
                        Err(eio("read", offset, u64::from(len), "disk detached"))
                    } else {
                        me.disk.read(offset, len as usize).await
                    };
                    drop(t);
                    let reply = match res {
                        Ok(data) => Msg::ReadReply { id, errno: 0, data },
                        Err(e) => {
                            me.health.check(&e);
                            Msg::ReadReply {
                                id,
                                errno: e.errno() as u32,
                                data: IoBuf::default(),
                            }
                        }
                    };
                    p.send_data(&reply).await.map(|()| None)
                })))
            }
            Msg::ReadReply { id, errno, data } => {
                if let Some((_, tx)) = lock(&peer.inner).reads.remove(&id) {
                    let _ = tx.send((errno, data));
                }
                Ok(None)
            }
            Msg::VerifyRequest { id, offset, len } => {
                self.check_range("a verify request", offset, u64::from(len))?;
                if u64::from(len) > RESYNC_CHUNK {
                    return Err(format!("peer asked to verify {len} bytes at once"));
                }
                let mut t = self.conflicts.register(offset, u64::from(len));
                let me = Applying::new(self, len as usize);
                Ok(Some(Box::pin(async move {
                    t.wait().await;
                    let data = me.disk.read(offset, len as usize).await;
                    drop(t);
                    // A read error is the verify's failure, not the link's, nor the whole
                    // disk's (one bad sector found by a verify): the reply carries no
                    // checksums, which fails the verify on the primary.
                    let crcs = match data {
                        Ok(data) => me.chunk_crcs(&data),
                        Err(e) => {
                            tracing::error!(error = %e, "verify: cannot read this node's disk");
                            Vec::new()
                        }
                    };
                    Ok(Some(Msg::VerifyReply { id, crcs }))
                })))
            }
            Msg::Bye { reason, .. } => {
                peer.said_bye.store(true, Ordering::SeqCst);
                Self::let_meta_finish(peer).await;
                Err(format!("peer said goodbye: {reason}"))
            }
            other => Err(format!(
                "unexpected {} on the data connection",
                other.name()
            )),
        }
    }

    /// ORs the peer's bitmap words into ours (in memory; flushed before the resync starts).
    /// Words beyond our bitmap end the link.
    fn merge_bitmap(&self, first_word: u64, words: &[u64]) -> Result<(), String> {
        let mut m = lock(&self.meta);
        let g = u64::from(m.bitmap().granularity());
        let ours = m.bitmap().num_bits().div_ceil(64);
        if first_word
            .checked_add(words.len() as u64)
            .is_none_or(|end| end > ours)
        {
            return Err(format!(
                "peer sent bitmap words {first_word}..+{} beyond this node's {ours}",
                words.len()
            ));
        }
        for (bit, n) in crate::bitmap::word_runs(first_word, words) {
            m.set_dirty_lazy(bit * g, n * g);
        }
        Ok(())
    }

    /// A message only a sync source waiting for its target's bitmap takes. The target sends
    /// it once it has decided, which this node may not have yet: the two connections are not
    /// ordered against each other, so an undecided link takes it too, as does one of two
    /// nodes without data, which decides again once one is promoted (`role_changed`).
    fn expect_resync_source(&self, peer: &Peer, what: &str) -> Result<(), String> {
        match *lock(&peer.decision) {
            None | Some(Decision::NoData | Decision::Source { .. })
                if !peer.bitmap_received.load(Ordering::SeqCst) =>
            {
                Ok(())
            }
            other => Err(format!(
                "peer sent {what} while this node waits for none (sync decision {other:?})"
            )),
        }
    }

    /// A message only the target of a resync takes: one decided when the link came up, or a
    /// node in sync whose source copies what was marked since (a catch-up).
    fn expect_resync_target(&self, peer: &Peer, what: &str) -> Result<(), String> {
        match *lock(&peer.decision) {
            Some(Decision::Target { .. } | Decision::InSync) => Ok(()),
            other => Err(format!(
                "peer sent {what} to a node that is not its sync target (sync decision {other:?})"
            )),
        }
    }

    /// Sync target: record that the disk is inconsistent, then send our bitmap to the source.
    async fn start_target(self: &Arc<Self>, peer: &Arc<Peer>, full: bool) -> Result<(), String> {
        let m = Arc::clone(&self.meta);
        tokio::task::spawn_blocking(move || {
            lock(&m).update(|sb| sb.disk_state = DiskState::Inconsistent)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot mark the disk inconsistent: {e}"))?;
        self.changed.notify_one();
        // What the source has marked, and at least what we have: the source copies both,
        // and tells the exact total (its State) once it has merged our bitmap.
        let theirs = (*lock(&peer.state)).map_or(0, |s| s.dirty_bytes);
        let mine = lock(&self.meta).bitmap().dirty_bytes();
        lock(&self.view).resync = Some(Progress {
            done: 0,
            total: if full { self.size } else { theirs.max(mine) },
            started: Some(Instant::now()),
        });
        if full && !self.health.diskless() {
            // Every block is about to be written: allocate them all at once (a file-backed
            // disk), rather than one write at a time. In the background: it only allocates
            // (data is kept), so resync writes may start beside it.
            let disk = Arc::clone(&self.disk);
            tokio::task::spawn_blocking(move || match disk.preallocate_blocking() {
                Ok(true) => tracing::debug!("disk preallocated for the full resync"),
                Ok(false) => {}
                Err(e) => tracing::warn!("cannot preallocate the disk for the full resync: {e}"),
            });
        }
        if !full {
            let chunks: Vec<(u64, Vec<u64>)> = {
                let m = lock(&self.meta);
                let bm = m.bitmap();
                (0..bm.num_pages())
                    .filter_map(|p| {
                        let w = bm.page_words(p);
                        w.iter()
                            .any(|x| *x != 0)
                            .then(|| ((p * crate::bitmap::WORDS_PER_PAGE) as u64, w.to_vec()))
                    })
                    .collect()
            };
            for (first_word, words) in chunks {
                peer.send_data(&Msg::BitmapChunk { first_word, words })
                    .await?;
            }
        }
        peer.send_data(&Msg::BitmapDone).await
    }

    /// Sync target: every resync write is on disk; adopt the source's generation.
    async fn end_target(self: &Arc<Self>, peer: &Arc<Peer>, current: u64) -> Result<(), String> {
        self.disk.flush().await.map_err(|e| e.to_string())?;
        let m = Arc::clone(&self.meta);
        tokio::task::spawn_blocking(move || finish_target(&mut lock(&m), current))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot record the finished resync: {e}"))?;
        lock(&self.view).resync = None;
        *lock(&peer.decision) = Some(Decision::InSync);
        self.discard_my_data.store(false, Ordering::SeqCst);
        if let Some(w) = lock(&self.recovery).take() {
            tracing::warn!(file = %w.path().display(), records = w.records(), "split brain resolved; the overwritten blocks are in the recovery file");
            let _ = self.events.send(ReplEvent::RecoverySaved {
                path: w.path().to_path_buf(),
                records: w.records(),
            });
        }
        self.set_connection(Connection::Connected);
        tracing::info!(peer = %peer.name, "resync finished: this node is up to date");
        peer.send_meta(&Msg::State(self.local_state())).await
    }

    fn resync_acked(
        &self,
        peer: &Arc<Peer>,
        offset: u64,
        len: u64,
        errno: u32,
    ) -> Result<(), String> {
        // Only a chunk this node sent, as long as it sent it, is acknowledged. The clear
        // happens under the link's lock: once the link is dead nothing is cleared, so the
        // marks its death makes (of this chunk, and of a newer write over it) stay. The
        // metadata is locked first (the order everywhere: metadata, then link), so no
        // writer waits on the link's lock while this waits for a bitmap flush.
        let mut m = lock(&self.meta);
        let mut g = lock(&peer.inner);
        if g.dead {
            return Ok(());
        }
        let entry = g.resync.remove(&offset);
        match &entry {
            Some((sent, _, _)) if *sent == len => {}
            Some((sent, _, _)) => {
                return Err(format!(
                    "peer acknowledged {len} bytes of resync data at {offset}, {sent} were sent"
                ))
            }
            None => {
                return Err(format!(
                    "peer acknowledged resync data at {offset} (+{len}) that was not sent"
                ))
            }
        }
        drop(entry);
        if errno != 0 {
            return Err(format!(
                "peer failed to write resync data at {offset} (+{len}): errno {errno}"
            ));
        }
        // In the peer's page cache: stable once a flush of its disk covers it.
        peer.confirmed(&mut g, offset, len);
        m.clear_clean_lazy(offset, len);
        drop(g);
        drop(m);
        self.resynced.fetch_add(len, Ordering::Relaxed);
        if let Some(p) = lock(&self.view).resync.as_mut() {
            p.copied(len);
        }
        Ok(())
    }

    /// Sync source: copies every out-of-sync region to the peer, then hands it our generation.
    async fn resync_source(self: &Arc<Self>, peer: &Arc<Peer>, full: bool) -> Result<(), String> {
        self.resync_source_inner(peer, full, true).await
    }

    fn chunk_crcs(&self, data: &[u8]) -> Vec<u32> {
        let g = lock(&self.meta).bitmap().granularity() as usize;
        data.chunks(g).map(crc32c::crc32c).collect()
    }

    /// Online verify, run on the primary: compares the CRC32C of every bitmap chunk with the
    /// peer's, marks the chunks that differ out of sync and resyncs them from this node.
    /// Each range is held (application writes to it wait) from before the request is sent
    /// until both sides have read it, so writes in flight never show up as differences.
    pub async fn verify(self: &Arc<Self>) -> Result<VerifyReport, String> {
        if !self.primary.load(Ordering::SeqCst) {
            return Err(format!(
                "verify runs on the primary (this node, {}, is secondary)",
                self.set.link.me
            ));
        }
        if self.health.diskless() {
            return Err(
                "this node's disk is detached: there is nothing of its own to verify".into(),
            );
        }
        let peer = self.current_peer().ok_or("not connected to the peer")?;
        if *lock(&peer.decision) != Some(Decision::InSync) {
            return Err("the peer is not in sync (a resync is pending or running)".into());
        }
        let g = u64::from(lock(&self.meta).bitmap().granularity());
        let started = Instant::now();
        let mut report = VerifyReport::default();
        // What verify marks is resynced once it is done, not piecemeal meanwhile.
        *lock(&peer.decision) = Some(Decision::Source { full: false });
        let scanned: Result<(), String> = async {
            let mut pending = FuturesUnordered::new();
            let mut offset = 0u64;
            loop {
                while pending.len() < 8 && offset < self.size {
                    let off = offset;
                    let len = (self.size - off).min(RESYNC_CHUNK);
                    offset += len;
                    let (me, p) = (Arc::clone(self), Arc::clone(&peer));
                    pending.push(async move {
                        let mut t = me.conflicts.register(off, len);
                        t.wait().await;
                        let id = p.next_id.fetch_add(1, Ordering::Relaxed);
                        let (tx, rx) = oneshot::channel();
                        {
                            let mut gi = lock(&p.inner);
                            if gi.dead {
                                return Err("link lost during verify".to_string());
                            }
                            gi.verifies.insert(id, (Instant::now(), tx));
                        }
                        p.send_data(&Msg::VerifyRequest {
                            id,
                            offset: off,
                            len: len as u32,
                        })
                        .await?;
                        let local = me
                            .disk
                            .read(off, len as usize)
                            .await
                            .map_err(|e| e.to_string())?;
                        let mine = me.chunk_crcs(&local);
                        let theirs = rx
                            .await
                            .map_err(|_| "link lost during verify".to_string())?;
                        drop(t);
                        if theirs.is_empty() && !mine.is_empty() {
                            return Err(format!(
                                "the peer could not read [{off}, +{len}) to verify it (see its log)"
                            ));
                        }
                        if theirs.len() != mine.len() {
                            return Err(
                                "peer answered verify with the wrong number of checksums".into()
                            );
                        }
                        let diff: Vec<u64> = mine
                            .iter()
                            .zip(&theirs)
                            .enumerate()
                            .filter(|(_, (a, b))| a != b)
                            .map(|(i, _)| off + i as u64 * g)
                            .collect();
                        Ok::<(u64, Vec<u64>), String>((len, diff))
                    });
                }
                let Some(res) = pending.next().await else {
                    break;
                };
                let (len, diff) = res?;
                report.checked_bytes += len;
                for block in diff {
                    let l = g.min(self.size - block);
                    self.marker.mark(block, l).await?;
                    report.differing_blocks += 1;
                    report.differing_bytes += l;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = scanned {
            if *lock(&peer.decision) == Some(Decision::Source { full: false }) {
                *lock(&peer.decision) = Some(Decision::InSync);
            }
            return Err(e);
        }
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            checked = report.checked_bytes,
            differing_blocks = report.differing_blocks,
            "online verify finished"
        );
        if report.differing_blocks == 0 {
            *lock(&peer.decision) = Some(Decision::InSync);
        } else {
            self.set_connection(Connection::SyncSource);
            let (me, p) = (Arc::clone(self), Arc::clone(&peer));
            tokio::spawn(async move {
                if let Err(e) = me.resync_source_inner(&p, false, false).await {
                    me.drop_link(&p, &format!("resync after verify failed: {e}"));
                }
            });
        }
        Ok(report)
    }

    /// One pass of a resync source: sends every region marked out of sync now, each chunk
    /// read and sent under a range ticket, at the rate `[sync]` allows, then waits until the
    /// target has acknowledged all of them (each acknowledgement clears its bits).
    async fn resync_pass(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        pace: &mut Pace,
    ) -> Result<(), String> {
        let runs: Vec<(u64, u64)> = lock(&self.meta).bitmap().iter_dirty_runs().collect();
        if runs.is_empty() {
            return Ok(());
        }
        // Chunks are read ahead of the one being sent: with direct reads there is no kernel
        // readahead, and reading and sending one chunk at a time left the disk idle while
        // the network worked and the reverse. Each chunk takes its room in the window, then
        // its range ticket, before its read; it holds the ticket until it has been sent and
        // the room until the peer acknowledges it. The loop waits for room or for the rate
        // limit only with nothing read ahead: otherwise it sends what it has, so that no
        // ticket is held longer than a read and a send (application writes to the range
        // wait for it).
        let mut chunks = crate::bitmap::split_runs(runs, RESYNC_CHUNK).peekable();
        let mut reads = futures_util::stream::FuturesOrdered::new();
        loop {
            while reads.len() < RESYNC_READ_AHEAD {
                let Some(&(off, len)) = chunks.peek() else {
                    break;
                };
                if let Some(rate) = self.set.rate_bytes_per_s {
                    let due = Duration::from_secs_f64(pace.sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(pace.started.elapsed()) {
                        if !reads.is_empty() {
                            break;
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
                let kib = len.div_ceil(1024) as u32;
                let permit = match Arc::clone(&peer.resync_window).try_acquire_many_owned(kib) {
                    Ok(p) => p,
                    Err(tokio::sync::TryAcquireError::NoPermits) if !reads.is_empty() => break,
                    Err(_) => Self::resync_window(peer, kib).await?,
                };
                if peer.is_dead() {
                    return Err("link lost during the resync".into());
                }
                chunks.next();
                // Tickets are taken in chunk order and waited for inside the read: an
                // application write overlapping this chunk and the one before it waits for
                // that one's ticket, released once it has been sent, so the loop must not
                // wait for this ticket itself.
                let mut t = self.conflicts.register(off, len);
                let disk = Arc::clone(&self.disk);
                reads.push_back(async move {
                    t.wait().await;
                    let data = disk
                        .read_bulk(off, len as usize)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((off, len, permit, t, data))
                });
                pace.sent += len;
            }
            let Some(read) = reads.next().await else {
                break;
            };
            let (off, len, permit, t, data) = read?;
            lock(&peer.inner)
                .resync
                .insert(off, (len, Instant::now(), permit));
            peer.send_data(&Msg::ResyncData { offset: off, data })
                .await?;
            drop(t);
            if pace.last_flush.elapsed() > Duration::from_secs(1) {
                pace.last_flush = Instant::now();
                let m = Arc::clone(&self.meta);
                let _ = tokio::task::spawn_blocking(move || lock(&m).flush_bitmap()).await;
            }
        }
        // Wait for every acknowledgement: all permits back.
        Self::resync_window(peer, (RESYNC_WINDOW >> 10) as u32)
            .await
            .map(drop)
    }

    /// Room for `kib` KiB of resync data in flight to the peer (the window fills as chunks are
    /// sent and empties as they are acknowledged); an error if the link is lost meanwhile.
    async fn resync_window(peer: &Peer, kib: u32) -> Result<OwnedSemaphorePermit, String> {
        let permit = Arc::clone(&peer.resync_window)
            .acquire_many_owned(kib)
            .await
            .map_err(|_| "resync window closed".to_string())?;
        if peer.is_dead() {
            return Err("link lost during the resync".into());
        }
        Ok(permit)
    }

    async fn resync_source_inner(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        full: bool,
        wait_for_bitmap: bool,
    ) -> Result<(), String> {
        if self.resyncing.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let done = Done(&self.resyncing);
        // The target first sends the regions it knows differ; they join ours.
        loop {
            let notified = peer.bitmap_done.notified();
            if !wait_for_bitmap || peer.bitmap_received.load(Ordering::SeqCst) {
                break;
            }
            if peer.is_dead() {
                return Err("link lost before the resync started".into());
            }
            notified.await;
        }
        // From here on the target applies our writes; those made while waiting for its bitmap
        // were marked and are part of this resync.
        peer.replicating.store(true, Ordering::SeqCst);
        let m = Arc::clone(&self.meta);
        tokio::task::spawn_blocking(move || {
            let mut s = lock(&m);
            if full {
                s.bitmap_mut().set_all();
            }
            s.flush_bitmap()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;

        let total = lock(&self.meta).bitmap().dirty_bytes();
        lock(&self.view).resync = Some(Progress {
            done: 0,
            total,
            started: Some(Instant::now()),
        });
        self.changed.notify_one();
        tracing::info!(peer = %peer.name, total, full, "resync started");
        // The target knows only its own marks and our count from before the merge; our state
        // now carries the total it is about to receive. (A catch-up exchanges no bitmap, and
        // its target, in sync, follows our generation on a State: it gets none.)
        if wait_for_bitmap {
            peer.send_meta(&Msg::State(self.local_state())).await?;
        }
        let mut pace = Pace {
            started: Instant::now(),
            sent: 0,
            last_flush: Instant::now(),
        };
        let mut passes = 0;
        let current = loop {
            passes += 1;
            self.resync_pass(peer, &mut pace).await?;
            // What the target acknowledged is in its page cache: the resync is done only once
            // its disk holds it (else a crash of the target could lose it after all).
            Self::settle(peer).await?;
            // Finish only if nothing is marked (see `finish_source`).
            let m = Arc::clone(&self.meta);
            let finished = tokio::task::spawn_blocking(move || finish_source(&mut lock(&m)))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if let Some(current) = finished {
                break current;
            }
            if passes >= 3 {
                return Err("regions stayed out of sync after three passes".into());
            }
        };
        peer.send_data(&Msg::ResyncDone { current }).await?;
        lock(&self.view).resync = None;
        *lock(&peer.decision) = Some(Decision::InSync);
        self.set_connection(Connection::Connected);
        let (sent, secs) = (pace.sent, pace.started.elapsed().as_secs_f64());
        tracing::info!(
            peer = %peer.name,
            bytes = sent,
            seconds = format_args!("{secs:.2}"),
            mb_per_s = format_args!("{:.1}", sent as f64 / secs.max(1e-9) / 1e6),
            "resync finished"
        );
        // A range marked while this resync was finishing found it still running and was left
        // for later: look again now that it is over.
        drop(done);
        self.marker.marked.notify_one();
        Ok(())
    }
}

/// The largest piece of a replicated zero-write (a multiple of the activity log's extent): a
/// disk that writes zeroes at 10 MB/s still finishes one in a few seconds.
const RANGE_PIECE: u64 = 64 << 20;
/// The largest piece of a replicated trim: a discard costs far less than writing zeroes, and
/// each piece costs an activity-log transaction when its extents are new.
const TRIM_PIECE: u64 = 256 << 20;

/// The largest record of a split-brain recovery file: what the resync overwrites is read and
/// saved in pieces this large.
const SAVE_PIECE: u64 = 1 << 20;

/// `[offset, offset+len)` cut at multiples of `piece`: with a multiple of the activity log's
/// extent, each part spans at most `piece / ACTIVITY_EXTENT` extents. One part for a range
/// within one piece; none for an empty range.
fn pieces(offset: u64, len: u64, piece: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    let piece = piece.max(1);
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next = (at / piece)
            .saturating_add(1)
            .saturating_mul(piece)
            .min(end);
        let part = (at, next - at);
        at = next;
        Some(part)
    })
}

/// The storage the export serves: the local disk, replicated to the peer when one is attached.
pub struct ReplicatedDisk {
    disk: Arc<Disk>,
    repl: Option<Arc<Replicator>>,
    health: Arc<DiskHealth>,
}

impl ReplicatedDisk {
    pub fn new(
        disk: Arc<Disk>,
        repl: Option<Arc<Replicator>>,
        health: Arc<DiskHealth>,
    ) -> ReplicatedDisk {
        ReplicatedDisk { disk, repl, health }
    }

    /// Runs a local operation; a device error detaches the disk (and is returned) when a
    /// peer is configured, which can serve without it. A node without a peer has no other
    /// copy: it passes the error to the client and keeps its disk, like a plain disk would.
    async fn local<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        let res = op.await;
        if let (Err(e), Some(_)) = (&res, &self.repl) {
            self.health.check(e);
        }
        res
    }

    /// One write the activity log can hold at once, replicated.
    async fn write_piece(
        &self,
        r: &Arc<Replicator>,
        offset: u64,
        data: IoBuf,
        fua: bool,
    ) -> Result<(), StorageError> {
        let len = data.len() as u64;
        self.replicate(
            r,
            offset,
            len,
            data,
            |id, data| Msg::Write {
                id,
                offset,
                fua,
                data,
            },
            |m| match m {
                Msg::Write { data, .. } => data,
                _ => unreachable!("framed as a write just above"),
            },
            |data| self.disk.write(offset, data, fua),
        )
        .await
    }

    /// The peer's answer to an operation registered under protocol C (which every operation
    /// of a node without its disk is): its errno, `None` if the link went down first or the
    /// operation waits for no Written.
    async fn peer_result(rx: Option<oneshot::Receiver<u32>>) -> Option<u32> {
        rx?.await.ok()
    }

    /// Waits for the protocol's acknowledgement of a replicated operation; on any failure the
    /// range is marked out of sync before the operation is answered.
    async fn confirm(
        &self,
        r: &Replicator,
        rx: Option<oneshot::Receiver<u32>>,
        offset: u64,
        len: u64,
    ) -> Result<(), StorageError> {
        let Some(rx) = rx else {
            return Ok(());
        };
        match rx.await {
            Ok(0) => {
                r.replicated.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            _ => {
                // Kept by this disk and marked for the peer, unless the disk was detached
                // while the write waited: then no copy counts.
                if self.health.diskless() {
                    return Err(eio(
                        "write",
                        offset,
                        len,
                        "the local disk failed and the peer did not confirm the write",
                    ));
                }
                r.marker
                    .mark(offset, len)
                    .await
                    .map_err(|e| meta_err("mark out of sync", offset, len, e))?;
                Ok(())
            }
        }
    }

    /// The replicated path of every modifying operation. `payload` is what both the frame
    /// and the local operation need (a write's data); `frame` builds the message around it
    /// and `unframe` takes it back once the message is sent, for `local` to use.
    #[allow(clippy::too_many_arguments)]
    async fn replicate<T, F>(
        &self,
        r: &Arc<Replicator>,
        offset: u64,
        len: u64,
        payload: T,
        frame: impl FnOnce(u64, T) -> Msg,
        unframe: impl FnOnce(Msg) -> T,
        local: impl FnOnce(T) -> F,
    ) -> Result<(), StorageError>
    where
        F: std::future::Future<Output = Result<(), StorageError>>,
    {
        let mut ticket = r.conflicts.register(offset, len);
        ticket.wait().await;
        let diskless = self.health.diskless();
        // Without a local copy the peer's disk is the only one: whatever the protocol, the
        // operation is answered once the peer has written it.
        let protocol = if diskless {
            Protocol::C
        } else {
            r.set.protocol
        };
        let mut wait = None;
        let mut payload = Some(payload);
        if let Some(p) = r.replicating_peer().await {
            let hold = r
                .activity
                .hold(offset, len)
                .await
                .map_err(|e| meta_err("activity log", offset, len, e))?;
            if let Some((id, rx)) = p.start_write(offset, len, protocol, hold) {
                if let Some(data) = payload.take() {
                    let m = frame(id, data);
                    // Protocol A answers once the frame is sent, so it sends at once; so do
                    // large payloads, which are not worth a copy.
                    if protocol != Protocol::A && m.data().len() <= QUEUE_FRAME_MAX {
                        let seq = p.queue_data(&m);
                        // The local write waits until the batch is on its way, so the peer
                        // applies it while this node writes, instead of after.
                        p.data_written(seq).await;
                    } else if let Err(e) = p.send_data(&m).await {
                        r.drop_link(&p, &e);
                    }
                    payload = Some(unframe(m));
                }
                wait = Some(rx);
            }
        }
        if diskless {
            // No local copy: the operation exists only if the peer confirms it.
            drop(ticket);
            let Some(rx) = wait else {
                return Err(eio(
                    "write",
                    offset,
                    len,
                    "the local disk failed and no peer holds the data",
                ));
            };
            return match Self::peer_result(rx).await {
                Some(0) => Ok(()),
                _ => Err(eio(
                    "write",
                    offset,
                    len,
                    "the local disk failed and the peer did not confirm the write",
                )),
            };
        }
        // Not sent to the peer: marked out of sync before it reaches the disk, held in the
        // activity log meanwhile (see `activity`).
        let _hold = match wait {
            Some(_) => None,
            None => {
                let hold = r
                    .activity
                    .hold(offset, len)
                    .await
                    .map_err(|e| meta_err("activity log", offset, len, e))?;
                r.marker
                    .mark_held(offset, len)
                    .await
                    .map_err(|e| meta_err("mark out of sync", offset, len, e))?;
                Some(hold)
            }
        };
        let Some(payload) = payload else {
            unreachable!("the payload is always handed back")
        };
        let res = self.local(local(payload)).await;
        drop(ticket);
        // The disk failed, in this operation or in another one meanwhile: its copy no longer
        // counts. If the peer has the write, it is not lost: under C, once it has written it;
        // under B, once it has received it (what B promises). Under A nothing says the frame
        // arrived, so the write fails.
        let detached = !diskless && self.health.diskless();
        if let Err(e) = res.and_then(|()| {
            if detached {
                Err(eio(
                    "write",
                    offset,
                    len,
                    "the local disk failed while this write was in flight",
                ))
            } else {
                Ok(())
            }
        }) {
            return match wait {
                Some(rx) if self.health.diskless() => match Self::peer_result(rx).await {
                    Some(0) => Ok(()),
                    _ => Err(e),
                },
                _ => Err(e),
            };
        }
        match wait {
            Some(rx) => self.confirm(r, rx, offset, len).await,
            None => Ok(()),
        }
    }
}

impl Backend for ReplicatedDisk {
    fn engine(&self) -> &'static str {
        self.disk.engine()
    }

    fn size(&self) -> u64 {
        self.disk.size()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<IoBuf, StorageError> {
        if !self.health.diskless() {
            match self.local(self.disk.read(offset, len)).await {
                Ok(data) => return Ok(data),
                Err(e) if !self.health.diskless() => return Err(e),
                Err(_) => {}
            }
        }
        match &self.repl {
            Some(r) => r.read_from_peer(offset, len).await,
            None => Err(eio(
                "read",
                offset,
                len as u64,
                "the disk failed and there is no peer",
            )),
        }
    }

    fn cached_range(&self, offset: u64, len: usize) -> Option<crate::storage::FileRange> {
        // A node whose disk failed reads through its peer.
        if self.health.diskless() {
            return None;
        }
        self.disk.cached_range(offset, len)
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), StorageError> {
        let Some(r) = &self.repl else {
            return self.disk.write(offset, data, fua).await;
        };
        let len = data.len() as u64;
        if r.activity.fits_at_once(offset, len) {
            return self.write_piece(r, offset, data, fua).await;
        }
        // Only with an activity log under 18 extents: the write is replicated in pieces.
        for (o, l) in pieces(offset, len, r.activity.piece_bytes()) {
            let start = (o - offset) as usize;
            let part = IoBuf::from(&data[start..start + l as usize]);
            self.write_piece(r, o, part, fua).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), StorageError> {
        let local = if self.health.diskless() {
            Err(eio("flush", 0, 0, "the local disk failed"))
        } else {
            self.local(self.disk.flush()).await
        };
        let diskless = self.health.diskless();
        if !diskless {
            local?;
        }
        let Some(r) = &self.repl else {
            return if diskless {
                Err(eio(
                    "flush",
                    0,
                    0,
                    "the local disk failed and there is no peer",
                ))
            } else {
                Ok(())
            };
        };
        match r.flush_peer().await {
            Ok(()) => Ok(()),
            // Without a local disk (or with one detached while the flush waited) the peer's
            // flush is the only one.
            Err(why) if diskless || self.health.diskless() => Err(eio(
                "flush",
                0,
                0,
                &format!("the local disk failed and {why}"),
            )),
            // The local flush is what was promised; what the peer confirmed and never
            // flushed may be gone with the link, so the flush succeeds once those ranges are
            // marked on disk for the next resync.
            Err(_) => {
                r.unconfirmed_marked().await;
                Ok(())
            }
        }
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        let Some(r) = &self.repl else {
            return self.disk.trim(offset, len).await;
        };
        // A trim may cover 4 GiB, more than the activity log holds: a piece at a time, small
        // enough for a slow disk to finish well within the ack timeout.
        for (offset, len) in pieces(offset, len, r.activity.piece_bytes().min(TRIM_PIECE)) {
            self.replicate(
                r,
                offset,
                len,
                (),
                |id, ()| Msg::Trim { id, offset, len },
                drop,
                |()| self.disk.trim(offset, len),
            )
            .await?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> Result<(), StorageError> {
        let Some(r) = &self.repl else {
            return self.disk.write_zeroes(offset, len, may_trim).await;
        };
        // Up to 4 GiB from one request, more than the activity log holds: a piece at a time,
        // small enough for a slow disk to finish well within the ack timeout.
        for (offset, len) in pieces(offset, len, r.activity.piece_bytes().min(RANGE_PIECE)) {
            self.replicate(
                r,
                offset,
                len,
                (),
                |id, ()| Msg::Zeroes {
                    id,
                    offset,
                    len,
                    may_trim,
                },
                drop,
                |()| self.disk.write_zeroes(offset, len, may_trim),
            )
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

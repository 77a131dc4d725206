//! Fault campaign: a replicated pair under a verifying NBD workload, with faults injected at
//! random, and two checks after every fault and recovery.
//!
//! # The workload
//!
//! Worker threads write through NBD to whichever node serves (the primary), one request at a
//! time each. Every 4 KiB block written carries a header: a magic, the block's own device
//! offset, a sequence number (unique per write, increasing), the writing worker, and a
//! CRC32C over the rest of the block; the rest is filler derived from offset and sequence.
//! A write covers 1 to 8 consecutive blocks. The device is split into 64 KiB stripes and
//! every stripe belongs to one worker, so the writes to one block are issued one after the
//! other: per block, the order of issue is the order of the writes.
//!
//! The model records, per write, which node it was sent to and how it ended:
//! **acknowledged** (the NBD reply said success), or **unknown** (an error reply, or the
//! connection died before the reply: the write may or may not have reached a disk).
//!
//! # The rule for what a block may hold
//!
//! Let A be the newest acknowledged write of a block. The block must hold A, or one of the
//! writes issued after A whose outcome is unknown (a write in flight at a crash may have
//! reached a disk). A write issued before A — acknowledged or not — must never show up
//! again, nor may anything without a valid header for that very offset. Without any
//! acknowledged write since the last check, the block must hold what the last check saw
//! there, or one of the unknown writes since. After every check, what was read becomes the
//! reference for the next one (a version once read back may not disappear later).
//!
//! A write that breaks this rule is **lost**. The one exception is a split brain: when both
//! nodes were primary, the resolution (`after_split_brain = "discard-younger-primary"`) drops
//! the loser's changes by design and saves the blocks it overwrites in a recovery file. The
//! writes the loser acknowledged in that cycle are counted as **discarded by split-brain
//! resolution**, not lost, and each of them is checked against the recovery file: `twinbd
//! recovery FILE` must list its blocks, and the file applied to an empty image must hold
//! the loser's newest version of each (its newest discarded write, or an unknown write sent
//! to it afterwards). A discarded write missing from the recovery file counts as lost.
//!
//! # A cycle
//!
//! Every cycle starts from a healthy pair (one primary, connected, in sync). The load runs a
//! moment, then one fault is injected: kill -9 of the primary (the standby promotes itself
//! after the heartbeat timeout; the failover time is measured from the kill to the first
//! write answered by the new primary; the killed node is restarted), kill -9 of the primary
//! restarted at once, kill -9 of the secondary, a plain restart (SIGTERM, start) of either
//! node, a link cut (both connections closed), a partition (connections closed and refused
//! for a while), a silent partition (both directions, one direction, or only the meta
//! connection that carries heartbeats and acknowledgements), a flipped bit in a replicated
//! write, or a disk failure (the node restarts with `disk_faults` in its own resource file,
//! runs diskless once its disk failed, and is restarted later without faults: a full
//! resync). Silences mostly last less than `timeout_ms` (nothing should happen); one in four
//! lasts longer, which makes the standby take over while the old primary lives on: a split
//! brain, resolved on reconnection.
//!
//! The campaign then tends the pair as an operator would: the workload follows the newest
//! primary, and if no node is primary a while after the nodes reconnect (a restart faster
//! than the failover), it promotes the node that was primary last if its disk is up to date,
//! else the other. Once the pair is healthy again the workload pauses, the export is
//! flushed, and (1) every block is read back through the primary's export and checked by the
//! rule above, (2) both nodes being connected, in sync, with nothing out of sync and no
//! resync running, the two disk files are compared 4 KiB block by 4 KiB block: the count of
//! divergent blocks must be 0.
//!
//! By default (plain `cargo test`) a short run of 12 faults. `CAMPAIGN_FAULTS=N` runs N;
//! `CAMPAIGN_SEED=S` replays a schedule (the seed is printed at the start and the end).
//!
//! A second test crashes the connected primary under load again and again (kill -9, restart,
//! resync, promote it again) on a 1 GiB device written only in 64 MiB of hot regions, and
//! checks that each resync copies no more than the active set (the activity log's 4 MiB
//! extents of the hot regions), never the whole device. `CRASH_RUNS=N` (default 3).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// The two tests measure timing on a small machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BLOCK: u64 = 4096;
/// Blocks per stripe; a stripe belongs to one worker.
const STRIPE_BLOCKS: usize = 16;
/// Most blocks one write covers.
const MAX_WRITE_BLOCKS: usize = 8;
const MAGIC: &[u8; 8] = b"TWBDCAMP";
const NAMES: [&str; 2] = ["alpha", "beta"];
const HEARTBEAT: (u64, u64) = (100, 500);
/// Deadline for a pair to become healthy again after a fault.
const SETTLE_LIMIT: Duration = Duration::from_secs(90);
/// With no primary for this long while the nodes are linked, the campaign promotes one.
const MANUAL_PROMOTE_AFTER: Duration = Duration::from_millis(2000);

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ------------------------------------------------------------------------------------------
// Randomness
// ------------------------------------------------------------------------------------------

struct Rng(SplitMix);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(SplitMix::new(seed))
    }

    fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.u64() % n
    }

    /// Uniform in `[lo, hi]`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.between(lo, hi))
    }
}

// ------------------------------------------------------------------------------------------
// Block format
// ------------------------------------------------------------------------------------------

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Never written (all zeroes): "version 0".
    Zero,
    /// A valid block of this offset, written by the write with this sequence number.
    Version(u64),
    /// Anything else.
    Bad(&'static str),
}

impl Content {
    fn seq(self) -> Option<u64> {
        match self {
            Content::Zero => Some(0),
            Content::Version(s) => Some(s),
            Content::Bad(_) => None,
        }
    }
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Zero => write!(f, "zeroes (never written)"),
            Content::Version(s) => write!(f, "write #{s}"),
            Content::Bad(why) => write!(f, "garbage ({why})"),
        }
    }
}

/// One 4 KiB block of write `seq` at device `offset`: magic, offset, seq, worker, CRC32C of
/// everything else, filler.
fn fill_block(buf: &mut [u8], offset: u64, seq: u64, worker: u32) {
    debug_assert_eq!(buf.len(), BLOCK as usize);
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&offset.to_le_bytes());
    buf[16..24].copy_from_slice(&seq.to_le_bytes());
    buf[24..28].copy_from_slice(&worker.to_le_bytes());
    SplitMix::new(offset ^ seq.rotate_left(29) ^ 0x6361_6d70_6169_676e).fill(&mut buf[32..]);
    let crc = block_crc(buf);
    buf[28..32].copy_from_slice(&crc.to_le_bytes());
}

fn block_crc(buf: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&buf[0..28]), &buf[32..])
}

fn decode_block(buf: &[u8], offset: u64) -> Content {
    if buf.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    if &buf[0..8] != MAGIC {
        return Content::Bad("no block header");
    }
    if u32::from_le_bytes(buf[28..32].try_into().expect("4 bytes")) != block_crc(buf) {
        return Content::Bad("checksum mismatch");
    }
    if u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")) != offset {
        return Content::Bad("a block written for another offset");
    }
    Content::Version(u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes")))
}

// ------------------------------------------------------------------------------------------
// The model: what was written, and what each block may hold
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// Sent, no reply yet.
    Pending,
    /// The NBD reply said success, at this moment.
    Acked(Instant),
    /// An error reply, or the connection died: may or may not be on a disk.
    Unknown,
    /// Acknowledged by the loser of a split brain, whose changes the resolution dropped.
    Discarded,
}

#[derive(Debug, Clone)]
struct WriteRec {
    /// First tracked block, number of blocks.
    first: usize,
    blocks: usize,
    /// The node it was sent to.
    node: usize,
    outcome: Outcome,
}

/// The tracked part of the device: regions (offset, length), multiples of a stripe.
#[derive(Debug, Clone)]
struct Layout {
    regions: Vec<(u64, u64)>,
    blocks: usize,
}

impl Layout {
    fn new(regions: Vec<(u64, u64)>) -> Layout {
        let stripe = STRIPE_BLOCKS as u64 * BLOCK;
        for &(o, l) in &regions {
            assert!(
                o % stripe == 0 && l % stripe == 0 && l > 0,
                "bad region {o}+{l}"
            );
        }
        let blocks = regions.iter().map(|(_, l)| (l / BLOCK) as usize).sum();
        Layout { regions, blocks }
    }

    /// Device offset of tracked block `i`.
    fn offset(&self, mut i: usize) -> u64 {
        for &(o, l) in &self.regions {
            let n = (l / BLOCK) as usize;
            if i < n {
                return o + i as u64 * BLOCK;
            }
            i -= n;
        }
        panic!("block {i} beyond the layout")
    }

    fn stripes(&self) -> usize {
        self.blocks / STRIPE_BLOCKS
    }
}

/// A block that does not hold what the rule allows.
#[derive(Debug, Clone)]
struct BadBlock {
    offset: u64,
    found: Content,
    /// The newest acknowledged write (None: the reference of the last check).
    expected: Option<u64>,
    allowed: Vec<u64>,
    /// Node that acknowledged the expected write.
    acked_by: Option<usize>,
}

#[derive(Default, Debug, Clone, Copy)]
struct Totals {
    issued: u64,
    acked: u64,
    unknown: u64,
    discarded: u64,
    discarded_verified: u64,
    lost: u64,
}

struct Model {
    layout: Layout,
    /// Per block: the version read back at the last check (0: zeroes).
    base: Vec<u64>,
    /// Per block: the writes since the last check, in order of issue.
    since: Vec<Vec<u64>>,
    writes: HashMap<u64, WriteRec>,
    totals: Totals,
    /// First acknowledgement by each node since `arm_first_ack`.
    first_ack: [Option<Instant>; 2],
}

impl Model {
    fn new(layout: Layout) -> Model {
        let n = layout.blocks;
        Model {
            layout,
            base: vec![0; n],
            since: vec![Vec::new(); n],
            writes: HashMap::new(),
            totals: Totals::default(),
            first_ack: [None; 2],
        }
    }

    fn issue(&mut self, seq: u64, first: usize, blocks: usize, node: usize) {
        for b in first..first + blocks {
            self.since[b].push(seq);
        }
        self.writes.insert(
            seq,
            WriteRec {
                first,
                blocks,
                node,
                outcome: Outcome::Pending,
            },
        );
        self.totals.issued += 1;
    }

    fn finish(&mut self, seq: u64, acked: bool) {
        let now = Instant::now();
        let w = self.writes.get_mut(&seq).expect("issued write");
        if acked {
            w.outcome = Outcome::Acked(now);
            self.totals.acked += 1;
            let slot = &mut self.first_ack[w.node];
            if slot.is_none() {
                *slot = Some(now);
            }
        } else {
            w.outcome = Outcome::Unknown;
            self.totals.unknown += 1;
        }
    }

    fn outcome(&self, seq: u64) -> Outcome {
        self.writes[&seq].outcome
    }

    /// The newest acknowledged write of block `b` (index in `since[b]`).
    fn newest_acked(&self, b: usize) -> Option<usize> {
        self.since[b]
            .iter()
            .rposition(|s| matches!(self.outcome(*s), Outcome::Acked(_)))
    }

    /// What block `b` may hold, and the write that must not be lost (None: the reference).
    fn allowed(&self, b: usize) -> (Vec<u64>, Option<u64>) {
        let since = &self.since[b];
        let (mut allowed, expected, from) = match self.newest_acked(b) {
            Some(k) => (vec![since[k]], Some(since[k]), k + 1),
            None => (vec![self.base[b]], None, 0),
        };
        allowed.extend(
            since[from..]
                .iter()
                .filter(|s| matches!(self.outcome(**s), Outcome::Unknown | Outcome::Pending)),
        );
        (allowed, expected)
    }

    /// Checks every block against what was read; returns the bad ones and what was seen.
    fn check(&self, read: &[u8]) -> (Vec<BadBlock>, Vec<u64>) {
        let mut bad = Vec::new();
        let mut seen = vec![0; self.layout.blocks];
        for (b, slot) in seen.iter_mut().enumerate() {
            let offset = self.layout.offset(b);
            let at = b * BLOCK as usize;
            let found = decode_block(&read[at..at + BLOCK as usize], offset);
            let (allowed, expected) = self.allowed(b);
            match found.seq() {
                Some(s) if allowed.contains(&s) => *slot = s,
                _ => bad.push(BadBlock {
                    offset,
                    found,
                    expected,
                    acked_by: expected.map(|s| self.writes[&s].node),
                    allowed,
                }),
            }
        }
        (bad, seen)
    }

    /// After a successful check: what was read is the new reference.
    fn checkpoint(&mut self, seen: Vec<u64>) {
        self.base = seen;
        for s in &mut self.since {
            s.clear();
        }
        self.writes.clear();
    }

    /// The writes `loser` acknowledged from `from` on are dropped by a split-brain
    /// resolution. Returns their sequence numbers.
    fn discard(&mut self, loser: usize, from: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        for (seq, w) in self.writes.iter_mut() {
            if w.node == loser && matches!(w.outcome, Outcome::Acked(t) if t >= from) {
                w.outcome = Outcome::Discarded;
                out.push(*seq);
            }
        }
        self.totals.acked -= out.len() as u64;
        self.totals.discarded += out.len() as u64;
        out.sort_unstable();
        out
    }

    /// Writes of a cycle whose first acknowledgement by `node` came after `t`.
    fn first_ack_after(&self, node: usize, t: Instant) -> Option<Instant> {
        self.first_ack[node].filter(|a| *a >= t)
    }
}

// ------------------------------------------------------------------------------------------
// The workload
// ------------------------------------------------------------------------------------------

const NO_NODE: usize = usize::MAX;

struct Shared {
    addrs: [SocketAddr; 2],
    workers: usize,
    stop: AtomicBool,
    pause: AtomicBool,
    parked: AtomicUsize,
    /// The node the workload should use first (NO_NODE: whichever answers).
    preferred: AtomicUsize,
    /// Bumped to make every worker reconnect (to the preferred node).
    epoch: AtomicU64,
    seq: AtomicU64,
    model: Mutex<Model>,
}

impl Shared {
    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Worker threads writing until dropped (stop, then join: cleanup on panic too).
struct Workload {
    shared: Arc<Shared>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// One connection to a node's export: `Some` if the node serves (is primary).
fn connect(addr: SocketAddr) -> Option<RawNbd> {
    match RawNbd::connect(addr, RESOURCE) {
        Ok(Ok(c)) => {
            let _ = c.s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = c.s.set_write_timeout(Some(Duration::from_secs(10)));
            Some(c)
        }
        _ => None,
    }
}

fn worker(sh: Arc<Shared>, id: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut conn: Option<(usize, u64, RawNbd)> = None;
    let stripes = sh.model().layout.stripes();
    let mine = (stripes + sh.workers - 1 - id) / sh.workers;
    let hot = (mine / 8).max(1);
    let mut buf = vec![0u8; MAX_WRITE_BLOCKS * BLOCK as usize];
    while !sh.stop.load(Ordering::SeqCst) {
        if sh.pause.load(Ordering::SeqCst) {
            sh.parked.fetch_add(1, Ordering::SeqCst);
            while sh.pause.load(Ordering::SeqCst) && !sh.stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(5));
            }
            sh.parked.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let epoch = sh.epoch.load(Ordering::SeqCst);
        if conn.as_ref().is_some_and(|(_, e, _)| *e != epoch) {
            conn = None;
        }
        if conn.is_none() {
            let order = match sh.preferred.load(Ordering::SeqCst) {
                1 => [1, 0],
                _ => [0, 1],
            };
            conn = order
                .into_iter()
                .find_map(|n| connect(sh.addrs[n]).map(|c| (n, epoch, c)));
            if conn.is_none() {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        let (node, _, c) = conn.as_mut().expect("connected");
        let node = *node;
        // A stripe of this worker (mostly among its first eighth: overwrites happen), then
        // a run of blocks inside it.
        let i = if rng.chance(0.7) {
            rng.below(hot as u64)
        } else {
            rng.below(mine as u64)
        } as usize;
        let stripe = id + i * sh.workers;
        let blocks = rng.between(1, MAX_WRITE_BLOCKS as u64) as usize;
        let first =
            stripe * STRIPE_BLOCKS + rng.below((STRIPE_BLOCKS - blocks + 1) as u64) as usize;
        let seq = sh.seq.fetch_add(1, Ordering::SeqCst);
        let offset = {
            let mut m = sh.model();
            let offset = m.layout.offset(first);
            m.issue(seq, first, blocks, node);
            offset
        };
        let data = &mut buf[..blocks * BLOCK as usize];
        for (j, chunk) in data.chunks_mut(BLOCK as usize).enumerate() {
            fill_block(chunk, offset + j as u64 * BLOCK, seq, id as u32);
        }
        let res = c.write(offset, data);
        let acked = matches!(res, Ok(0));
        sh.model().finish(seq, acked);
        if !acked {
            // An error reply (a node that lost its role or its data) or a dead connection:
            // look for the serving node again.
            conn = None;
        }
    }
}

impl Workload {
    fn start(addrs: [SocketAddr; 2], layout: Layout, workers: usize, seed: u64) -> Workload {
        let shared = Arc::new(Shared {
            addrs,
            workers,
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            preferred: AtomicUsize::new(NO_NODE),
            epoch: AtomicU64::new(0),
            seq: AtomicU64::new(1),
            model: Mutex::new(Model::new(layout)),
        });
        let threads = (0..workers)
            .map(|id| {
                let sh = Arc::clone(&shared);
                let s = seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                thread::Builder::new()
                    .name(format!("workload-{id}"))
                    .spawn(move || worker(sh, id, s))
                    .expect("spawn worker")
            })
            .collect();
        Workload { shared, threads }
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.shared.model()
    }

    /// Fails the test if a worker died (a panic in it: the server broke the protocol).
    fn check(&mut self) {
        if let Some(i) = self.threads.iter().position(|t| t.is_finished()) {
            let t = self.threads.remove(i);
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
            panic!("workload thread {i} ended on its own");
        }
    }

    /// Stops every worker between two writes; returns once all are parked.
    fn pause(&mut self) {
        self.shared.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.shared.parked.load(Ordering::SeqCst) < self.threads.len() {
            self.check();
            assert!(
                Instant::now() < deadline,
                "the workload did not pause within 30s (a write stuck?)"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn resume(&self) {
        self.shared.pause.store(false, Ordering::SeqCst);
    }

    /// Makes `node` the one the workers use first; with `move_now` they reconnect at once.
    fn prefer(&self, node: usize, move_now: bool) {
        let old = self.shared.preferred.swap(node, Ordering::SeqCst);
        if move_now && old != node {
            self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Starts looking for the first acknowledgement by `node` from now on.
    fn arm_first_ack(&self, node: usize) {
        self.model().first_ack[node] = None;
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------------------------------
// Status helpers
// ------------------------------------------------------------------------------------------

fn primary(st: &Value) -> bool {
    st["role"] == "primary"
}

fn brief(st: &Value) -> String {
    format!(
        "{} {} {} peer {}/{} oos {} resync {}",
        st["role"].as_str().unwrap_or("?"),
        st["disk"].as_str().unwrap_or("?"),
        st["connection"].as_str().unwrap_or("?"),
        st["peer"]["role"].as_str().unwrap_or("?"),
        st["peer"]["disk"].as_str().unwrap_or("?"),
        st["out_of_sync_bytes"],
        st["resync"],
    )
}

/// Reads the tracked regions through the export of the node at `addr`.
fn read_layout(addr: SocketAddr, layout: &Layout) -> Result<Vec<u8>, String> {
    let mut c = match RawNbd::connect(addr, RESOURCE) {
        Ok(Ok(c)) => c,
        Ok(Err((code, msg))) => return Err(format!("export refused ({code:#x}): {msg}")),
        Err(e) => return Err(format!("NBD handshake: {e}")),
    };
    let mut out = Vec::with_capacity(layout.blocks * BLOCK as usize);
    for &(o, l) in &layout.regions {
        let mut at = o;
        while at < o + l {
            let n = (o + l - at).min(MIB);
            match c.read(at, n as u32) {
                Ok(Ok(d)) => out.extend_from_slice(&d),
                Ok(Err(e)) => return Err(format!("read of {n} bytes at {at}: NBD error {e}")),
                Err(e) => return Err(format!("read of {n} bytes at {at}: {e}")),
            }
            at += n;
        }
    }
    c.disconnect();
    Ok(out)
}

/// Flushes the export of the node at `addr` from a fresh connection.
fn flush(addr: SocketAddr) -> Result<(), String> {
    let mut c = match RawNbd::connect(addr, RESOURCE) {
        Ok(Ok(c)) => c,
        Ok(Err((code, msg))) => return Err(format!("export refused ({code:#x}): {msg}")),
        Err(e) => return Err(format!("NBD handshake: {e}")),
    };
    match c.flush() {
        Ok(0) => {
            c.disconnect();
            Ok(())
        }
        Ok(e) => Err(format!("flush: NBD error {e}")),
        Err(e) => Err(format!("flush: {e}")),
    }
}

/// Number of 4 KiB blocks in which two files differ over `regions`, and the first few runs.
fn divergent(a: &Path, b: &Path, regions: &[(u64, u64)]) -> (u64, Vec<(u64, u64)>) {
    let mut runs = Vec::new();
    for &(o, l) in regions {
        let mut at = o;
        while at < o + l {
            let n = (o + l - at).min(4 * MIB) as usize;
            let (x, y) = (read_at(a, at, n), read_at(b, at, n));
            for (i, (p, q)) in x
                .chunks(BLOCK as usize)
                .zip(y.chunks(BLOCK as usize))
                .enumerate()
            {
                if p != q {
                    let off = at + i as u64 * BLOCK;
                    match runs.last_mut() {
                        Some((ro, rl)) if *ro + *rl == off => *rl += BLOCK,
                        _ => runs.push((off, BLOCK)),
                    }
                }
            }
            at += n as u64;
        }
    }
    let total = runs.iter().map(|(_, l)| l / BLOCK).sum();
    (total, runs)
}

/// A wall-clock moment as the daemons' log lines begin: `YYYY-MM-DDTHH:MM:SS.mmm` (UTC).
fn utc_stamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The lines of a node's logs that tell what happened (warnings, errors, roles, links), the
/// last `max` of them, only those stamped at or after `since` if given.
fn log_digest(node: &PairNode, max: usize, since: Option<&str>) -> String {
    let log = node.log();
    let keep: Vec<&str> = log
        .lines()
        .filter(|l| since.is_none_or(|s| l.get(..s.len()).is_some_and(|p| p >= s)))
        .filter(|l| {
            let l = l.to_lowercase();
            [
                "warn",
                "error",
                "promot",
                "demot",
                "split",
                "link",
                "resync",
                "daemon log",
                "diskless",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .collect();
    let skip = keep.len().saturating_sub(max);
    keep[skip..].join("\n")
}

/// `*.recovery` files in a directory.
fn recovery_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "recovery"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `twinbd recovery FILE`: the (offset, length) of every saved record.
fn recovery_listing(file: &Path) -> Vec<(u64, u64)> {
    let out = run(Command::new(TWINBD).arg("recovery").arg(file), CMD_TIMEOUT).ok();
    out.stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// The campaign
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillPrimary,
    KillPrimaryQuick,
    KillSecondary,
    Restart,
    Cut,
    Partition,
    Blackhole,
    OneWay,
    MetaSilence,
    Corrupt,
    DiskError,
}

const FAULTS: [Fault; 11] = [
    Fault::KillPrimary,
    Fault::KillPrimaryQuick,
    Fault::KillSecondary,
    Fault::Restart,
    Fault::Cut,
    Fault::Partition,
    Fault::Blackhole,
    Fault::OneWay,
    Fault::MetaSilence,
    Fault::Corrupt,
    Fault::DiskError,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "kill -9 primary (failover)",
            Fault::KillPrimaryQuick => "kill -9 primary, instant restart",
            Fault::KillSecondary => "kill -9 secondary",
            Fault::Restart => "restart (SIGTERM + start)",
            Fault::Cut => "link cut (connections closed)",
            Fault::Partition => "partition (cut + refused)",
            Fault::Blackhole => "silent link, both directions",
            Fault::OneWay => "silent link, one direction",
            Fault::MetaSilence => "heartbeat loss (meta connection silent)",
            Fault::Corrupt => "frame corruption (bit flip)",
            Fault::DiskError => "disk errors (node goes diskless)",
        }
    }
}

/// Per fault kind: how often, how many silences outlasted the heartbeat timeout, and how
/// many split brains followed.
#[derive(Default, Clone, Copy)]
struct KindStats {
    n: u64,
    long: u64,
    split_brains: u64,
}

#[derive(Default)]
struct Stats {
    cycles: u64,
    faults: BTreeMap<Fault, KindStats>,
    failovers: Vec<Duration>,
    settle: Vec<Duration>,
    manual_promotions: u64,
    split_brains: u64,
    /// Split brains after a fault that did not outlast the heartbeat timeout.
    short_splits: u64,
    long_silences: u64,
    disk_failures: u64,
    disk_faults_untriggered: u64,
    corruptions: u64,
    divergent: u64,
    verified_blocks: u64,
}

fn median_worst(v: &[Duration]) -> Option<(Duration, Duration)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort();
    Some((s[s.len() / 2], s[s.len() - 1]))
}

struct Campaign {
    // Dropped in this order: the workload stops before the daemons do.
    load: Workload,
    pair: Pair,
    rng: Rng,
    seed: u64,
    faults_planned: u64,
    stats: Stats,
    /// The node that was primary last (whose promotion is the oldest still standing).
    last_primary: usize,
    cycle: u64,
    fault: Option<Fault>,
    fault_at: Instant,
    started: Instant,
    /// Recovery files seen so far, per node.
    known_recovery: [Vec<PathBuf>; 2],
    size: u64,
    /// This cycle's silence outlasts the heartbeat timeout.
    long_now: bool,
    /// When this cycle's fault began, as the daemons' logs write it.
    fault_wall: String,
}

impl Campaign {
    fn node(&self, i: usize) -> &PairNode {
        if i == 0 {
            &self.pair.alpha
        } else {
            &self.pair.beta
        }
    }

    fn node_mut(&mut self, i: usize) -> &mut PairNode {
        if i == 0 {
            &mut self.pair.alpha
        } else {
            &mut self.pair.beta
        }
    }

    /// Both nodes' `status --json`; a node whose daemon is not running shows as "down".
    fn statuses(&self) -> [Value; 2] {
        [0, 1].map(|n| {
            let node = self.node(n);
            if node.running() {
                node.status()
            } else {
                serde_json::json!({
                    "role": "down", "disk": "unknown", "connection": "down",
                    "peer": {"role": "unknown", "disk": "unknown"},
                    "out_of_sync_bytes": null, "resync": null
                })
            }
        })
    }

    fn where_(&self) -> String {
        format!(
            "seed {:#x}, cycle {}/{}, fault {}",
            self.seed,
            self.cycle,
            self.faults_planned,
            self.fault.map_or("none", Fault::name)
        )
    }

    /// Writes both resource files: failover settings, and `disk_faults` for one node.
    fn write_configs(&self, disk_faults: Option<(usize, &str)>) {
        let mut extras = PairExtras {
            sections:
                "[failover]\nauto_promote = true\nafter_split_brain = \"discard-younger-primary\"\n"
                    .to_string(),
            ..PairExtras::default()
        };
        if let Some((node, spec)) = disk_faults {
            let line = format!("disk_faults = \"{spec}\"\n");
            if node == 0 {
                extras.alpha_node = line;
            } else {
                extras.beta_node = line;
            }
        }
        self.pair.write_configs_with(&extras);
    }

    /// Watches the pair as an operator would until `done` holds or `limit` passes: the
    /// workload follows the newest primary; with no primary for a while although the nodes
    /// are linked, the node that was primary last (or else the other) is promoted.
    fn tend(
        &mut self,
        limit: Duration,
        done: impl Fn(&[Value; 2]) -> bool,
    ) -> Result<[Value; 2], [Value; 2]> {
        let deadline = Instant::now() + limit;
        let mut none_since: Option<Instant> = None;
        let mut last_try: Option<Instant> = None;
        loop {
            self.load.check();
            let sts = self.statuses();
            let prim: Vec<usize> = (0..2).filter(|&i| primary(&sts[i])).collect();
            match prim.as_slice() {
                [p] => {
                    none_since = None;
                    self.last_primary = *p;
                    self.load.prefer(*p, false);
                }
                [_, _] => {
                    // Both primary: the standby took over while the old primary lives. The
                    // clients follow the new primary (as a moved service address would).
                    none_since = None;
                    self.load.prefer(1 - self.last_primary, true);
                }
                _ => {
                    let since = *none_since.get_or_insert_with(Instant::now);
                    let retry = last_try.is_none_or(|t| t.elapsed() > Duration::from_secs(1));
                    if since.elapsed() >= MANUAL_PROMOTE_AFTER
                        && retry
                        && linked(&sts[0])
                        && linked(&sts[1])
                    {
                        last_try = Some(Instant::now());
                        let order = [self.last_primary, 1 - self.last_primary];
                        if let Some(&n) = order.iter().find(|&&n| sts[n]["disk"] == "up_to_date") {
                            let out = self.node(n).promote(false);
                            eprintln!(
                                "    no primary for {:.1} s: promoting {} by hand: {}",
                                since.elapsed().as_secs_f64(),
                                NAMES[n],
                                if out.success() {
                                    "done".to_string()
                                } else {
                                    out.all().trim().to_string()
                                }
                            );
                            if out.success() {
                                self.stats.manual_promotions += 1;
                                self.last_primary = n;
                            }
                        }
                    }
                }
            }
            if done(&sts) {
                return Ok(sts);
            }
            if Instant::now() >= deadline {
                return Err(sts);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Tends the pair until it is healthy: one primary, in sync. Fails the test otherwise.
    fn settle(&mut self, what: &str) -> usize {
        match self.tend(SETTLE_LIMIT, |s| {
            (primary(&s[0]) != primary(&s[1])) && settled(&s[0]) && settled(&s[1])
        }) {
            Ok(sts) => {
                let p = if primary(&sts[0]) { 0 } else { 1 };
                self.last_primary = p;
                self.load.prefer(p, false);
                p
            }
            Err(sts) => self.fail(&format!(
                "HANG: the pair did not become healthy within {SETTLE_LIMIT:?} {what}\n  alpha: {}\n  beta:  {}\n  alpha status: {}\n  beta status:  {}",
                brief(&sts[0]),
                brief(&sts[1]),
                sts[0],
                sts[1]
            )),
        }
    }

    fn fail(&mut self, msg: &str) -> ! {
        let digest = format!(
            "----- alpha (digest) -----\n{}\n----- beta (digest) -----\n{}",
            log_digest(&self.pair.alpha, 60, None),
            log_digest(&self.pair.beta, 60, None)
        );
        let summary = self.summary();
        announce(&summary);
        panic!(
            "fault campaign failed ({}):\n{msg}\n{digest}",
            self.where_()
        );
    }

    /// Lets the load run for `d` while tending the pair (following a new primary).
    fn watch(&mut self, d: Duration) {
        let end = Instant::now() + d;
        let _ = self.tend(d, |_| Instant::now() >= end);
    }

    fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.load.check();
            thread::sleep(
                Duration::from_millis(20).min(end.saturating_duration_since(Instant::now())),
            );
        }
    }

    /// How long a silence lasts: mostly under the heartbeat timeout (nothing should happen),
    /// one in four well over it (the standby takes over: a split brain follows).
    fn silence(&mut self) -> Duration {
        if self.rng.chance(0.25) {
            self.stats.long_silences += 1;
            self.long_now = true;
            self.rng.millis(HEARTBEAT.1 + 300, HEARTBEAT.1 * 3)
        } else {
            self.rng.millis(50, HEARTBEAT.1 - 150)
        }
    }

    /// One fault; returns a short description.
    fn inject(&mut self, fault: Fault, p: usize) -> String {
        let s = 1 - p;
        match fault {
            Fault::KillPrimary => {
                self.load.arm_first_ack(s);
                let t0 = Instant::now();
                self.node_mut(p).kill();
                // The standby must take over by itself.
                let deadline = t0 + Duration::from_secs(15);
                loop {
                    self.load.check();
                    if primary(&self.node(s).status()) {
                        break;
                    }
                    if Instant::now() >= deadline {
                        let st = self.node(s).status();
                        self.fail(&format!(
                            "HANG: {} did not take over within 15 s of the primary's death: {}",
                            NAMES[s],
                            brief(&st)
                        ));
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                self.last_primary = s;
                self.load.prefer(s, false);
                let answered = loop {
                    self.load.check();
                    if let Some(t) = self.load.model().first_ack_after(s, t0) {
                        break t;
                    }
                    if Instant::now() >= deadline {
                        self.fail(&format!(
                            "HANG: {} is primary but answered no write within 15 s of the kill",
                            NAMES[s]
                        ));
                    }
                    thread::sleep(Duration::from_millis(5));
                };
                let fo = answered - t0;
                self.stats.failovers.push(fo);
                let down = self.rng.millis(0, 1000);
                thread::sleep(down);
                self.node_mut(p).start();
                format!(
                    "killed {}; {} answered a write after {:.0} ms; restarted after {:.1} s",
                    NAMES[p],
                    NAMES[s],
                    ms(fo),
                    (down + fo).as_secs_f64()
                )
            }
            Fault::KillPrimaryQuick => {
                self.node_mut(p).kill();
                self.node_mut(p).start();
                format!("killed {} and restarted it at once", NAMES[p])
            }
            Fault::KillSecondary => {
                self.node_mut(s).kill();
                let down = self.rng.millis(0, 2000);
                self.watch(down);
                self.node_mut(s).start();
                format!(
                    "killed {}; restarted after {:.1} s",
                    NAMES[s],
                    down.as_secs_f64()
                )
            }
            Fault::Restart => {
                let n = self.rng.below(2) as usize;
                self.node_mut(n).stop(Duration::from_secs(30));
                let down = self.rng.millis(0, 1000);
                self.watch(down);
                self.node_mut(n).start();
                format!(
                    "stopped {} ({}); started after {:.1} s",
                    NAMES[n],
                    if n == p { "primary" } else { "secondary" },
                    down.as_secs_f64()
                )
            }
            Fault::Cut => {
                self.pair.proxy().cut();
                "both connections closed".into()
            }
            Fault::Partition => {
                let d = self.silence();
                self.pair.proxy().set_refuse(true);
                self.pair.proxy().cut();
                self.watch(d);
                self.pair.proxy().set_refuse(false);
                format!("cut and refused for {} ms", d.as_millis())
            }
            Fault::Blackhole => {
                let d = self.silence();
                self.pair.proxy().set_blackhole(true);
                self.watch(d);
                self.pair.proxy().set_blackhole(false);
                format!("silent both ways for {} ms", d.as_millis())
            }
            Fault::OneWay => {
                let d = self.silence();
                let to_beta = self.rng.chance(0.5);
                let proxy = self.pair.proxy();
                if to_beta {
                    proxy.set_blackhole_to_target(true);
                } else {
                    proxy.set_blackhole_to_dialer(true);
                }
                self.watch(d);
                let proxy = self.pair.proxy();
                proxy.set_blackhole_to_target(false);
                proxy.set_blackhole_to_dialer(false);
                format!(
                    "silent {} for {} ms",
                    if to_beta {
                        "alpha -> beta"
                    } else {
                        "beta -> alpha"
                    },
                    d.as_millis()
                )
            }
            Fault::MetaSilence => {
                let d = self.silence();
                self.pair.proxy().set_blackhole_meta(true);
                self.watch(d);
                self.pair.proxy().set_blackhole_meta(false);
                format!("meta connection silent for {} ms", d.as_millis())
            }
            Fault::Corrupt => {
                let before = self.pair.proxy().corruptions().len();
                // Writes from alpha cross the proxy forwards, writes from beta backwards.
                if p == 0 {
                    self.pair.proxy().corrupt_next_write(BLOCK, false);
                } else {
                    self.pair.proxy().corrupt_next_write_back(BLOCK);
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while self.pair.proxy().corruptions().len() == before && Instant::now() < deadline {
                    self.run_for(Duration::from_millis(10));
                }
                self.pair.proxy().disarm_corruption();
                match self.pair.proxy().corruptions().get(before) {
                    Some(c) => {
                        self.stats.corruptions += 1;
                        format!(
                            "flipped bit {:#04x} of byte {} in a {}-byte write at {} from {}",
                            c.mask, c.byte_in_data, c.data_len, c.write_offset, NAMES[p]
                        )
                    }
                    None => "no write crossed the link within 10 s: nothing corrupted".into(),
                }
            }
            Fault::DiskError => self.disk_error(p),
        }
    }

    /// Restarts a node with a failing disk, lets it run diskless, restarts it without.
    fn disk_error(&mut self, p: usize) -> String {
        let f = self.rng.below(2) as usize;
        let spec = if self.rng.chance(0.5) {
            format!("after={},ops=write", self.rng.between(20, 400))
        } else {
            // A stripe of the hot part of the device, which the workload writes often.
            let hot = (self.size / 8 / (STRIPE_BLOCKS as u64 * BLOCK)).max(1);
            let at = self.rng.below(hot) * STRIPE_BLOCKS as u64 * BLOCK;
            format!("ranges={at}+{},ops=write", STRIPE_BLOCKS as u64 * BLOCK)
        };
        self.write_configs(Some((f, &spec)));
        self.node_mut(f).stop(Duration::from_secs(30));
        self.node_mut(f).start();
        self.write_configs(None);
        let failed = self.tend(Duration::from_secs(20), |s| {
            matches!(s[f]["disk"].as_str(), Some("diskless" | "failed"))
        });
        let what = match failed {
            Ok(sts) => {
                self.stats.disk_failures += 1;
                let role = sts[f]["role"].as_str().unwrap_or("?").to_string();
                // Serve a while with the disk gone.
                let d = self.rng.millis(200, 1000);
                self.run_for(d);
                format!(
                    "{} (the {}) restarted with disk_faults \"{spec}\": went diskless as {role}, served {} ms so, restarted without faults",
                    NAMES[f],
                    if f == p { "primary" } else { "secondary" },
                    d.as_millis()
                )
            }
            Err(_) => {
                self.stats.disk_faults_untriggered += 1;
                format!(
                    "{} restarted with disk_faults \"{spec}\": no disk error within 20 s; restarted without faults",
                    NAMES[f]
                )
            }
        };
        self.node_mut(f).stop(Duration::from_secs(30));
        self.node_mut(f).start();
        what
    }

    /// New recovery files, per node.
    fn new_recovery_files(&mut self) -> Vec<(usize, PathBuf)> {
        let mut out = Vec::new();
        for n in 0..2 {
            let dir = self.node(n).path("");
            for f in recovery_files(&dir) {
                if !self.known_recovery[n].contains(&f) {
                    self.known_recovery[n].push(f.clone());
                    out.push((n, f));
                }
            }
        }
        out
    }

    /// A split brain was resolved against `loser`: its writes acknowledged in this cycle are
    /// dropped by design; each must be in its recovery file(s). Returns those that are not.
    fn account_split_brain(&mut self, loser: usize, files: &[PathBuf]) -> Vec<String> {
        self.stats.split_brains += 1;
        let from = self.fault_at;
        let discarded = self.load.model().discard(loser, from);
        let mut listed: Vec<(u64, u64)> = Vec::new();
        let image = self
            .pair
            .path(&format!("recovery-check-{}.img", self.cycle));
        fs::File::create(&image)
            .and_then(|f| f.set_len(self.size))
            .expect("create recovery check image");
        for f in files {
            listed.extend(recovery_listing(f));
            run(
                Command::new(TWINBD)
                    .arg("recovery")
                    .arg(f)
                    .arg("--apply")
                    .arg(&image),
                CMD_TIMEOUT,
            )
            .ok();
        }
        let covered = |o: u64| listed.iter().any(|&(a, l)| a <= o && o + BLOCK <= a + l);
        let mut missing = Vec::new();
        let mut verified = 0;
        {
            let m = self.load.model();
            for seq in &discarded {
                let w = &m.writes[seq];
                let mut ok = true;
                for b in w.first..w.first + w.blocks {
                    let offset = m.layout.offset(b);
                    // The loser's newest version of the block: its newest discarded write, or
                    // an unknown write sent to it later.
                    let since = &m.since[b];
                    let newest = since
                        .iter()
                        .rposition(|s| m.writes[s].outcome == Outcome::Discarded)
                        .expect("a discarded write of this block");
                    let mut allowed = vec![since[newest]];
                    allowed.extend(since[newest + 1..].iter().filter(|s| {
                        let w = &m.writes[*s];
                        w.node == loser && matches!(w.outcome, Outcome::Unknown | Outcome::Pending)
                    }));
                    let saved = decode_block(&read_at(&image, offset, BLOCK as usize), offset);
                    if !covered(offset) || !saved.seq().is_some_and(|s| allowed.contains(&s)) {
                        ok = false;
                        missing.push(format!(
                            "write #{seq} at {offset} acknowledged by {} (discarded): {} in the recovery file, which holds {saved} (allowed: {allowed:?})",
                            NAMES[loser],
                            if covered(offset) { "listed" } else { "NOT listed" }
                        ));
                    }
                }
                if ok {
                    verified += 1;
                }
            }
        }
        let _ = fs::remove_file(&image);
        let mut m = self.load.model();
        m.totals.discarded_verified += verified;
        m.totals.lost += (discarded.len() as u64) - verified;
        missing
    }

    /// Pauses the load, flushes, and runs both checks. Fails the test on a lost write or a
    /// divergent block.
    fn check(&mut self, p: usize) -> (String, u64) {
        self.load.pause();
        if let Err(e) = flush(self.node(p).nbd) {
            self.fail(&format!("flush through {}'s export failed: {e}", NAMES[p]));
        }
        let p = self.settle("after the flush");
        let mut problems = Vec::new();
        let mut discarded_here = 0;
        let files = self.new_recovery_files();
        for loser in 0..2 {
            let mine: Vec<PathBuf> = files
                .iter()
                .filter(|(n, _)| *n == loser)
                .map(|(_, f)| f.clone())
                .collect();
            if mine.is_empty() {
                continue;
            }
            let before = self.load.model().totals.discarded;
            problems.extend(self.account_split_brain(loser, &mine));
            discarded_here += self.load.model().totals.discarded - before;
        }
        let layout = self.load.model().layout.clone();
        let data = match read_layout(self.node(p).nbd, &layout) {
            Ok(d) => d,
            Err(e) => self.fail(&format!("reading back through {}'s export: {e}", NAMES[p])),
        };
        let (bad, seen) = self.load.model().check(&data);
        let lost_seqs: std::collections::BTreeSet<u64> =
            bad.iter().filter_map(|b| b.expected).collect();
        let lost =
            lost_seqs.len() as u64 + bad.iter().filter(|b| b.expected.is_none()).count() as u64;
        self.load.model().totals.lost += lost;
        for b in bad.iter().take(20) {
            problems.push(format!(
                "block at {}: holds {}; expected {} (acknowledged by {}); allowed {:?}",
                b.offset,
                b.found,
                b.expected.map_or(
                    "the version seen at the last check".to_string(),
                    |s| format!("write #{s}")
                ),
                b.acked_by.map_or("-", |n| NAMES[n]),
                b.allowed
            ));
        }
        let (div, runs) = divergent(
            &self.pair.alpha.disk,
            &self.pair.beta.disk,
            &[(0, self.size)],
        );
        self.stats.divergent += div;
        if div > 0 {
            let shown: Vec<String> = runs
                .iter()
                .take(16)
                .map(|(o, l)| format!("[{o}, +{l})"))
                .collect();
            problems.push(format!(
                "DIVERGENCE: {div} block(s) of 4 KiB differ between the disks after convergence: {}",
                shown.join(", ")
            ));
        }
        if !problems.is_empty() {
            self.fail(&format!(
                "{} acknowledged write(s) lost, {div} divergent block(s) (primary {}):\n  {}",
                self.load.model().totals.lost,
                NAMES[p],
                problems.join("\n  ")
            ));
        }
        self.stats.verified_blocks += layout.blocks as u64;
        self.load.model().checkpoint(seen);
        self.load.resume();
        let splits = files.len() as u64;
        let extra = if splits > 0 {
            format!(
                "; SPLIT BRAIN resolved ({splits}): {discarded_here} write(s) of the loser discarded, all found in its recovery file"
            )
        } else {
            String::new()
        };
        (extra, splits)
    }

    fn summary(&self) -> String {
        let t = self.load.model().totals;
        let mut s = String::new();
        s.push_str(&format!(
            "fault campaign: seed {:#x}, {} cycle(s) in {:.1} s ({} MiB devices, heartbeat {}/{} ms, protocol C, auto_promote, discard-younger-primary, {} writers)\n",
            self.seed,
            self.stats.cycles,
            self.started.elapsed().as_secs_f64(),
            self.size / MIB,
            HEARTBEAT.0,
            HEARTBEAT.1,
            self.load.threads.len()
        ));
        s.push_str("  faults by kind (count; silences longer than timeout_ms; split brains that followed):\n");
        for (f, k) in &self.stats.faults {
            s.push_str(&format!(
                "    {:<42} {:>4}  {:>3}  {:>3}\n",
                f.name(),
                k.n,
                k.long,
                k.split_brains
            ));
        }
        s.push_str(&format!(
            "  silences longer than timeout_ms: {}; split brains resolved: {}; disk failures: {} (not triggered: {}); corrupted frames: {}; promotions by hand: {}\n",
            self.stats.long_silences,
            self.stats.split_brains,
            self.stats.disk_failures,
            self.stats.disk_faults_untriggered,
            self.stats.corruptions,
            self.stats.manual_promotions
        ));
        s.push_str(&format!(
            "  split brains after a fault that did not outlast timeout_ms: {}\n",
            self.stats.short_splits
        ));
        s.push_str(&format!(
            "  writes issued: {}; acknowledged: {}; unknown outcome (error or connection lost): {}\n",
            t.issued, t.acked, t.unknown
        ));
        s.push_str(&format!("  writes lost: {}\n", t.lost));
        s.push_str(&format!(
            "  discarded by split-brain resolution (saved to recovery file): {} (found in the recovery file: {})\n",
            t.discarded, t.discarded_verified
        ));
        s.push_str(&format!(
            "  divergent blocks after convergence: {} (blocks read back and checked: {})\n",
            self.stats.divergent, self.stats.verified_blocks
        ));
        match median_worst(&self.stats.failovers) {
            Some((m, w)) => s.push_str(&format!(
                "  failover (kill -9 of the primary to the first write answered by the new primary): {} runs, median {:.0} ms, worst {:.0} ms\n",
                self.stats.failovers.len(),
                ms(m),
                ms(w)
            )),
            None => s.push_str("  failover: no kill of the primary in this run\n"),
        }
        if let Some((m, w)) = median_worst(&self.stats.settle) {
            s.push_str(&format!(
                "  from the fault to a healthy pair (one primary, in sync): median {:.1} s, worst {:.1} s\n",
                m.as_secs_f64(),
                w.as_secs_f64()
            ));
        }
        s
    }
}

#[test]
fn fault_campaign() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let faults = env_u64("CAMPAIGN_FAULTS").unwrap_or(12);
    let seed = env_u64("CAMPAIGN_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    announce(&format!(
        "fault campaign: seed {seed:#x}, {faults} faults (replay: CAMPAIGN_SEED={seed:#x} CAMPAIGN_FAULTS={faults})"
    ));
    let size = 64 * MIB;
    let pair = Pair::new(PairOpts {
        disk_size: size,
        heartbeat_ms: Some(HEARTBEAT),
        proxy: true,
        ..PairOpts::default()
    });
    let mut pair = pair;
    let extras = PairExtras {
        sections:
            "[failover]\nauto_promote = true\nafter_split_brain = \"discard-younger-primary\"\n"
                .to_string(),
        ..PairExtras::default()
    };
    pair.write_configs_with(&extras);
    pair.alpha.create_md();
    pair.beta.create_md();
    pair.alpha.start();
    pair.beta.start();
    pair.alpha.promote(true).ok();
    pair.wait_in_sync("the initial full sync", Duration::from_secs(120));

    let addrs = [pair.alpha.nbd, pair.beta.nbd];
    let load = Workload::start(addrs, Layout::new(vec![(0, size)]), 4, seed);
    load.prefer(0, false);
    let mut c = Campaign {
        pair,
        load,
        rng: Rng::new(seed),
        seed,
        faults_planned: faults,
        stats: Stats::default(),
        last_primary: 0,
        cycle: 0,
        fault: None,
        fault_at: Instant::now(),
        started: Instant::now(),
        known_recovery: [Vec::new(), Vec::new()],
        size,
        long_now: false,
        fault_wall: String::new(),
    };
    let mut schedule: Vec<Fault> = Vec::new();
    for i in 0..faults {
        if schedule.is_empty() {
            // Every kind once per round, in a random order.
            schedule = FAULTS.to_vec();
            for j in (1..schedule.len()).rev() {
                let k = c.rng.below(j as u64 + 1) as usize;
                schedule.swap(j, k);
            }
        }
        let fault = schedule.pop().expect("a fault");
        c.cycle = i + 1;
        c.fault = None;
        let p = c.settle("before the fault");
        let warm = c.rng.millis(200, 800);
        c.run_for(warm);
        c.fault = Some(fault);
        c.long_now = false;
        c.fault_at = Instant::now();
        c.fault_wall = utc_stamp(std::time::SystemTime::now());
        let t = Instant::now();
        let what = c.inject(fault, p);
        let p = c.settle("after the fault");
        c.stats.settle.push(t.elapsed());
        let after = c.rng.millis(100, 400);
        c.run_for(after);
        let (extra, splits) = c.check(p);
        let k = c.stats.faults.entry(fault).or_default();
        k.n += 1;
        k.long += u64::from(c.long_now);
        k.split_brains += splits;
        c.stats.cycles += 1;
        if splits > 0 && !c.long_now {
            // Worth a look: no silence outlasted timeout_ms, yet both nodes became primary.
            c.stats.short_splits += 1;
            eprintln!(
                "NOTE cycle {}: a split brain after {} ({what}), which did not outlast timeout_ms; the daemons' logs since the fault ({}):\n--- alpha ---\n{}\n--- beta ---\n{}",
                c.cycle,
                fault.name(),
                c.fault_wall,
                log_digest(&c.pair.alpha, 25, Some(&c.fault_wall)),
                log_digest(&c.pair.beta, 25, Some(&c.fault_wall)),
            );
        }
        let acked = c.load.model().totals.acked;
        eprintln!(
            "cycle {}/{}: {}: {what}; healthy again, primary {}, {:.1} s{extra}; acknowledged so far {acked}",
            c.cycle,
            faults,
            fault.name(),
            NAMES[p],
            t.elapsed().as_secs_f64()
        );
    }
    c.fault = None;
    c.load.pause();
    let summary = c.summary();
    announce(&summary);
    let t = c.load.model().totals;
    assert_eq!(t.lost, 0, "acknowledged writes were lost ({})", c.where_());
    assert_eq!(
        c.stats.divergent,
        0,
        "the disks diverged after convergence ({})",
        c.where_()
    );
    assert!(t.acked > 0, "the workload wrote nothing");
}

// ------------------------------------------------------------------------------------------
// Crash of the connected primary: the resync stays within the active set
// ------------------------------------------------------------------------------------------

#[test]
fn crash_of_connected_primary_resyncs_only_the_active_set() {
    crash_runs(false);
}

/// The same crashes with the secondary down: every write is then made without the peer and
/// marked out of sync in memory only, covered by a 4-extent activity log that the 16 hot
/// extents keep evicting from (each eviction flushes the bitmap first). Nothing acknowledged
/// may be lost and the resync must leave no divergent block.
#[test]
fn crash_of_disconnected_primary_loses_nothing() {
    crash_runs(true);
}

/// What the disk files of both nodes hold at the blocks a read-back found wrong, to tell a
/// lost write (the disk lacks it) from a wrong reply (the disk has it).
fn on_disk(pair: &Pair, bad: &[BadBlock]) -> Vec<(u64, Option<Content>, Option<Content>)> {
    use std::os::unix::fs::FileExt;
    let read = |path: &Path, offset: u64| {
        let mut buf = vec![0u8; BLOCK as usize];
        fs::File::open(path)
            .and_then(|f| f.read_exact_at(&mut buf, offset))
            .ok()
            .map(|()| decode_block(&buf, offset))
    };
    bad.iter()
        .map(|b| {
            (
                b.offset,
                read(&pair.alpha.disk, b.offset),
                read(&pair.beta.disk, b.offset),
            )
        })
        .collect()
}

/// Kills the primary with `kill -9` under a write load, `CRASH_RUNS` times (3 by default),
/// restarts it and checks every acknowledged write and the resync's size. With
/// `disconnected`, the secondary is down during each load period and starts again with the
/// primary.
fn crash_runs(disconnected: bool) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let runs = env_u64("CRASH_RUNS").unwrap_or(3);
    let seed = env_u64("CRASH_SEED").unwrap_or(0x6372_6173_6821);
    let size = 1024 * MIB;
    let what = if disconnected {
        "disconnected"
    } else {
        "connected"
    };
    // Four hot regions of 16 MiB, aligned to the activity log's 4 MiB extents.
    let hot: Vec<(u64, u64)> = [8, 296, 600, 1000]
        .iter()
        .map(|&m| (m * MIB, 16 * MIB))
        .collect();
    let extent = 4 * MIB;
    let bound: u64 = hot
        .iter()
        .map(|&(o, l)| (o + l).div_ceil(extent) * extent - o / extent * extent)
        .sum();
    let t0 = Instant::now();
    let mut pair = Pair::up(PairOpts {
        disk_size: size,
        heartbeat_ms: Some(HEARTBEAT),
        al_extents: disconnected.then_some(4),
        ..PairOpts::default()
    });
    let initial = t0.elapsed();
    let addrs = [pair.alpha.nbd, pair.beta.nbd];
    let mut load = Workload::start(addrs, Layout::new(hot.clone()), 4, seed);
    load.prefer(0, false);
    let mut rng = Rng::new(seed);
    let mut copied_per_run = Vec::new();
    let mut acked_last = 0;
    let mut lines = Vec::new();
    for run_no in 1..=runs {
        if disconnected {
            pair.beta.kill();
        }
        let busy = rng.millis(300, 1200);
        let end = Instant::now() + busy;
        while Instant::now() < end {
            load.check();
            thread::sleep(Duration::from_millis(20));
        }
        // A restarted node counts from zero.
        let b0 = if disconnected {
            0
        } else {
            num(&pair.beta.status(), "stats.resynced_bytes_total")
        };
        let acked_now = load.model().totals.acked;
        let acked_run = acked_now - acked_last;
        acked_last = acked_now;
        pair.alpha.kill();
        load.pause();
        pair.alpha.start();
        if disconnected {
            pair.beta.start();
        }
        let (a, b) = pair.wait_in_sync(
            &format!("crash run {run_no}: resync after the restart"),
            Duration::from_secs(120),
        );
        let from_beta = num(&b, "stats.resynced_bytes_total") - b0;
        let from_alpha = num(&a, "stats.resynced_bytes_total");
        let copied = from_beta.max(from_alpha);
        copied_per_run.push(copied);
        let out = pair.alpha.promote(false);
        assert!(
            out.success(),
            "crash run {run_no}: promoting the restarted, up-to-date alpha failed: {out}"
        );
        // Every acknowledged write is there, and the hot regions are identical.
        let data = read_layout(pair.alpha.nbd, &load.model().layout.clone())
            .unwrap_or_else(|e| panic!("crash run {run_no}: reading back: {e}"));
        let (bad, seen) = load.model().check(&data);
        assert!(
            bad.is_empty(),
            "crash run {run_no} (seed {seed:#x}): {} block(s) lost acknowledged writes: {:?}; \
             the same blocks in the disk files (alpha, beta): {:?}",
            bad.len(),
            &bad[..bad.len().min(10)],
            on_disk(&pair, &bad[..bad.len().min(10)])
        );
        let (div, runs_) = divergent(&pair.alpha.disk, &pair.beta.disk, &hot);
        assert_eq!(
            div, 0,
            "crash run {run_no}: the hot regions differ after the resync in {} runs, the first: {:?}",
            runs_.len(),
            &runs_[..runs_.len().min(20)]
        );
        load.model().checkpoint(seen);
        let line = format!(
            "crash run {run_no}/{runs}: {} writes acknowledged{}, then kill -9 of alpha; the resync copied {} KiB ({:.2} % of the device)",
            acked_run,
            if disconnected { " with beta down" } else { "" },
            copied / 1024,
            copied as f64 * 100.0 / size as f64
        );
        eprintln!("{line}");
        lines.push(line);
        load.resume();
    }
    load.pause();
    let total_acked = load.model().totals.acked;
    drop(load);
    let (div, runs_) = divergent(&pair.alpha.disk, &pair.beta.disk, &[(0, size)]);
    let largest = copied_per_run.iter().copied().max().unwrap_or(0);
    let mut sorted = copied_per_run.clone();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    announce(&format!(
        "crash of the {what} primary: {runs} run(s), 1 GiB device, writes confined to {} MiB in {} hot regions (active-set bound {} MiB), initial full sync {:.1} s\n  writes acknowledged: {total_acked}; lost: 0; divergent blocks over the whole device at the end: {div}\n  resync per crash: median {} KiB, largest {} KiB = {:.2} % of the device (bound {:.2} %)",
        hot.iter().map(|(_, l)| l).sum::<u64>() / MIB,
        hot.len(),
        bound / MIB,
        initial.as_secs_f64(),
        median / 1024,
        largest / 1024,
        largest as f64 * 100.0 / size as f64,
        bound as f64 * 100.0 / size as f64,
    ));
    assert_eq!(div, 0, "the disks differ: {runs_:?}");
    for (i, c) in copied_per_run.iter().enumerate() {
        assert!(
            *c <= bound,
            "crash run {}: the resync copied {c} bytes, more than the active set ({bound} bytes); the device is {size}",
            i + 1
        );
    }
    drop(pair);
}

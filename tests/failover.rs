//! Hot-standby tests: automatic failover when the primary dies under load, a filesystem that
//! survives it, split brains under each `after_split_brain` policy, manual switchover and the
//! refusals that guard it, online verify, handlers and their environment, disk failures, and
//! an operator's `disconnect` (which must keep the link down and trigger no failover).
//!
//! Two real `twinbd` daemons ("alpha" and "beta") run on loopback, driven through the CLI and
//! written to through NBD: a raw client in this file, nbdinfo, and ext4 on a loop device over
//! nbdfuse. The checks are on what an operator sees (`status --json`, `events`, the daemons'
//! logs, handler output, recovery files) and on the backing disk files.
//!
//! Every wait has a deadline. Dropping a pair stops its daemons and dropping a block stack
//! undoes its mounts and loop devices, also when a test panics. The failover timing test runs
//! alone; the others share the machine, each with its own pair, ports and directory. A missing
//! tool skips a test with a `SKIPPED:` line, except under `CI=true`, where it fails.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

// ------------------------------------------------------------------------------------------
// Shared helpers
// ------------------------------------------------------------------------------------------

/// The test that measures failover time takes this exclusively; all others share it.
static TIMING: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    TIMING.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    TIMING.write().unwrap_or_else(|p| p.into_inner())
}

/// Bitmap granularity and verify block size.
const BLOCK: u64 = 4096;
const KIB: u64 = 1024;
/// Heartbeat (interval, timeout) in ms for the tests that are not about the defaults.
const QUICK_HEARTBEAT: (u64, u64) = (100, 500);

/// Options for a pair of `size` bytes with the quick heartbeat.
fn quick(size: u64) -> PairOpts {
    PairOpts {
        disk_size: size,
        heartbeat_ms: Some(QUICK_HEARTBEAT),
        ..PairOpts::default()
    }
}

/// `len` deterministic random bytes.
fn random(len: u64, seed: u64) -> Vec<u8> {
    SplitMix::new(seed).bytes(len as usize)
}

/// A TOML basic string holding `s`.
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A handler command that appends one line,
/// `EVENT RESOURCE NODE ROLE PEER`, to `DIR/handlers-NODE.log` (NODE from the environment).
fn record_handler(dir: &Path) -> String {
    format!(
        "echo \"$TWINBD_EVENT $TWINBD_RESOURCE $TWINBD_NODE $TWINBD_ROLE $TWINBD_PEER\" >> \"{}/handlers-$TWINBD_NODE.log\"",
        dir.to_string_lossy().trim_end_matches('/')
    )
}

/// The file [`record_handler`] writes for `node`.
fn handler_log(pair: &Pair, node: &str) -> PathBuf {
    pair.path(&format!("handlers-{node}.log"))
}

fn failover_section(auto_promote: bool, policy: &str) -> String {
    format!("[failover]\nauto_promote = {auto_promote}\nafter_split_brain = \"{policy}\"\n")
}

fn handlers_section(entries: &[(&str, String)]) -> String {
    let mut s = String::from("[handlers]\n");
    for (k, cmd) in entries {
        s.push_str(&format!("{k} = {}\n", toml_str(cmd)));
    }
    s
}

/// The lines of a handler log once it has at least `n` (a handler runs in the background).
fn wait_lines(path: &Path, n: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} line(s), expected at least {n} within {timeout:?}: {lines:?}",
            path.display(),
            lines.len()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A raw NBD client on `node`'s export (the test fails if the node refuses).
fn client(node: &PairNode) -> RawNbd {
    match RawNbd::connect(node.nbd, RESOURCE) {
        Ok(Ok(c)) => c,
        Ok(Err((code, msg))) => {
            panic!("{}: NBD handshake refused ({code:#x}): {msg}", node.name)
        }
        Err(e) => panic!("{}: NBD handshake failed: {e}", node.name),
    }
}

/// Writes each `(offset, data)` through `node`'s export, then flushes; every reply must be
/// a success.
fn write_blocks(node: &PairNode, writes: &[(u64, Vec<u8>)]) {
    let mut c = client(node);
    for (off, data) in writes {
        let e = c
            .write(*off, data)
            .unwrap_or_else(|e| panic!("{}: write at {off}: {e}", node.name));
        assert_eq!(
            e,
            0,
            "{}: write of {} bytes at {off} answered with error {e}",
            node.name,
            data.len()
        );
    }
    let e = c
        .flush()
        .unwrap_or_else(|e| panic!("{}: flush: {e}", node.name));
    assert_eq!(e, 0, "{}: flush answered with error {e}", node.name);
    c.disconnect();
}

/// Reads `[offset, offset+len)` through a client, a MiB per request.
fn read_range(c: &mut RawNbd, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(MIB);
        let data = c
            .read(at, n as u32)
            .unwrap_or_else(|e| panic!("read of {n} bytes at {at}: {e}"))
            .unwrap_or_else(|e| panic!("read of {n} bytes at {at}: NBD error {e}"));
        out.extend_from_slice(&data);
        at += n;
    }
    out
}

/// Asserts that `c` reads from its export what `model` holds in every range of `ranges`.
fn assert_export_matches(c: &mut RawNbd, what: &str, model: &Model, ranges: &[(u64, u64)]) {
    for &(o, l) in ranges {
        assert_same_bytes(
            &format!("{what} at [{o}, +{l})"),
            &read_range(c, o, l),
            &model.bytes(o, l),
        );
    }
}

/// Flushes `node`'s export from a fresh client.
fn flush_export(node: &PairNode) {
    let mut c = client(node);
    let e = c
        .flush()
        .unwrap_or_else(|e| panic!("{}: flush: {e}", node.name));
    assert_eq!(e, 0, "{}: flush answered with error {e}", node.name);
    c.disconnect();
}

/// Asserts `node` refuses NBD clients because it is secondary, both to the raw client and
/// to nbdinfo (when installed); returns the raw client's refusal message.
fn assert_refuses_as_secondary(node: &PairNode, when: &str) -> String {
    let msg = match RawNbd::connect(node.nbd, RESOURCE) {
        Ok(Ok(c)) => {
            c.disconnect();
            panic!("{when}: {} (secondary) served its export", node.name)
        }
        Ok(Err((code, msg))) => {
            assert!(
                code & REP_ERR_BIT != 0,
                "{when}: refusal type {code:#x} is not an error"
            );
            msg
        }
        Err(e) => panic!(
            "{when}: {}: handshake failed instead of a refusal: {e}",
            node.name
        ),
    };
    assert!(
        msg.contains("secondary"),
        "{when}: {}'s refusal does not say it is secondary: {msg:?}",
        node.name
    );
    if tool_path("nbdinfo").is_some() {
        // libnbd shows the server's message in its debug output.
        let out = run(
            tool("nbdinfo").arg(node.uri()).env("LIBNBD_DEBUG", "1"),
            CMD_TIMEOUT,
        )
        .failed();
        assert!(
            out.stderr.contains("secondary"),
            "{when}: nbdinfo's failure does not say {} is secondary: {out}",
            node.name
        );
    }
    msg
}

/// What a disk (or an export) should hold: writes applied in order over zeros.
#[derive(Debug, Clone, Default)]
struct Model(Vec<(u64, Vec<u8>)>);

impl Model {
    fn apply(&mut self, writes: &[(u64, Vec<u8>)]) {
        self.0.extend(writes.iter().cloned());
    }

    fn bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        for (o, d) in &self.0 {
            let (s, e) = ((*o).max(offset), (o + d.len() as u64).min(offset + len));
            if s < e {
                out[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - o) as usize..(e - o) as usize]);
            }
        }
        out
    }
}

/// The ranges `(offset, len)` of some writes.
fn ranges(writes: &[(u64, Vec<u8>)]) -> Vec<(u64, u64)> {
    writes.iter().map(|(o, d)| (*o, d.len() as u64)).collect()
}

/// Asserts `file` holds what `model` says in each of `ranges`.
fn assert_file_matches(what: &str, file: &Path, model: &Model, ranges: &[(u64, u64)]) {
    for &(o, l) in ranges {
        assert_same_bytes(
            &format!("{what}: {} at [{o}, +{l})", file.display()),
            &read_at(file, o, l as usize),
            &model.bytes(o, l),
        );
    }
}

/// `twinbd events` for one node, its lines collected in a file.
struct EventLog {
    _cmd: Background,
    out: PathBuf,
}

impl EventLog {
    fn start(pair: &Pair, node: &PairNode) -> EventLog {
        let prefix = pair.path(&format!("events-{}", node.name));
        let mut cmd = Command::new(TWINBD);
        cmd.args(["events", "-c"])
            .arg(&node.config)
            .args(["-n", node.name])
            .env("NO_COLOR", "1");
        let ev = EventLog {
            _cmd: Background::spawn(&mut cmd, &prefix),
            out: prefix.with_extension("out"),
        };
        ev.wait_for("the first events line", Duration::from_secs(10), |_| true);
        ev
    }

    fn lines(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        // Only complete lines: the last one may still be being written.
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("events line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if let Some(v) = lines.iter().find(|v| cond(v)) {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no events line showing {what} within {timeout:?}; lines:\n{}",
                fs::read_to_string(&self.out).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits for every thread to finish (within `limit` in all) and returns their results; a
/// panic in a thread is raised here.
fn join_within<T>(handles: Vec<thread::JoinHandle<T>>, limit: Duration, what: &str) -> Vec<T> {
    let deadline = Instant::now() + limit;
    handles
        .into_iter()
        .map(|h| {
            while !h.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "{what}: still running after {limit:?}"
                );
                thread::sleep(Duration::from_millis(10));
            }
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// 1. The primary is killed under load: the standby takes over in time, with every
//    acknowledged write, and the old primary rejoins with a partial resync
// ------------------------------------------------------------------------------------------

const BLOCK_MAGIC: &[u8; 8] = b"TWBDFOV1";

/// A 4 KiB block that names itself: magic, device offset, sequence number and writer, then
/// bytes derived from those, then a CRC32C of everything before it.
fn encode_block(offset: u64, seq: u64, writer: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    b[0..8].copy_from_slice(BLOCK_MAGIC);
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..32].copy_from_slice(&writer.to_le_bytes());
    SplitMix::new(offset.rotate_left(29) ^ seq.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ writer)
        .fill(&mut b[32..BLOCK as usize - 4]);
    let crc = crc32c::crc32c(&b[..BLOCK as usize - 4]);
    b[BLOCK as usize - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Zero,
    Block { offset: u64, seq: u64, writer: u64 },
    Garbage(String),
}

fn decode_block(b: &[u8]) -> Decoded {
    if b.iter().all(|x| *x == 0) {
        return Decoded::Zero;
    }
    let le = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
    if &b[0..8] != BLOCK_MAGIC {
        return Decoded::Garbage(format!("no block magic: {:02x?}", &b[0..16]));
    }
    let n = BLOCK as usize - 4;
    let stored = u32::from_le_bytes(b[n..].try_into().expect("4 bytes"));
    let crc = crc32c::crc32c(&b[..n]);
    if stored != crc {
        return Decoded::Garbage(format!(
            "torn or corrupted: crc {crc:08x}, stored {stored:08x} (offset field {}, seq {})",
            le(8..16),
            le(16..24)
        ));
    }
    Decoded::Block {
        offset: le(8..16),
        seq: le(16..24),
        writer: le(24..32),
    }
}

/// What one writer sent and had acknowledged.
#[derive(Debug, Default)]
struct WriterLog {
    /// offset -> newest sequence number whose write was answered without error.
    acked: HashMap<u64, u64>,
    /// offset -> newest sequence number sent (acknowledged or not).
    sent: HashMap<u64, u64>,
    writes_acked: u64,
    /// Why the writer stopped.
    end: String,
    /// The writer stopped because its connection failed (not because of an NBD error).
    connection_lost: bool,
}

/// From `t0` on, keeps trying `node`'s export until a write is answered; returns how long
/// after `t0` that was and how often the node refused (as a secondary) before.
fn first_write_answered(
    node: &PairNode,
    offset: u64,
    t0: Instant,
    limit: Duration,
) -> (Duration, u32) {
    let data = random(BLOCK, 0xfa11);
    let mut refusals = 0;
    let mut last = String::from("nothing tried yet");
    loop {
        assert!(
            t0.elapsed() < limit,
            "{}: no write answered within {limit:?} of the kill ({refusals} refusals; last: {last})",
            node.name
        );
        match RawNbd::connect(node.nbd, RESOURCE) {
            Ok(Ok(mut c)) => match c.write(offset, &data) {
                Ok(0) => {
                    let t = t0.elapsed();
                    c.disconnect();
                    return (t, refusals);
                }
                Ok(e) => last = format!("write answered with NBD error {e}"),
                Err(e) => last = format!("write failed: {e}"),
            },
            Ok(Err((_, msg))) => {
                assert!(
                    msg.contains("secondary"),
                    "{}: refused for another reason than being secondary: {msg}",
                    node.name
                );
                refusals += 1;
                last = msg;
            }
            Err(e) => last = format!("handshake failed: {e}"),
        }
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn kill9_primary_under_load_auto_failover() {
    let _g = exclusive();
    let size = 256 * MIB;
    // The defaults: interval 200 ms, timeout 1000 ms.
    let timeout_ms = 1000;
    let mut pair = Pair::up_with(
        PairOpts {
            disk_size: size,
            ..PairOpts::default()
        },
        |_| PairExtras {
            sections: failover_section(true, "disconnect"),
            ..PairExtras::default()
        },
    );
    // The load stays within 16 MiB (four 4 MiB activity-log extents) of the 256 MiB device.
    let region_blocks = 16 * MIB / BLOCK;
    let writers = 8u64;
    let stop = Arc::new(AtomicBool::new(false));
    // The writers stop when the test ends, also by a panic.
    let _stop_writers = StopOnDrop(Arc::clone(&stop));
    let acked = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..writers)
        .map(|id| {
            let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
            let node_nbd = pair.alpha.nbd;
            let name = pair.alpha.name;
            thread::Builder::new()
                .name(format!("writer-{id}"))
                .spawn(move || {
                    let mut c = match RawNbd::connect(node_nbd, RESOURCE) {
                        Ok(Ok(c)) => c,
                        other => panic!("{name}: writer {id} could not connect: {:?}", other.err()),
                    };
                    writer_on(&mut c, id, writers, region_blocks, &stop, &acked)
                })
                .expect("spawn writer")
        })
        .collect();
    let started = Instant::now();
    wait_until(
        "the writers' first 1000 acknowledged writes",
        Duration::from_secs(30),
        || acked.load(Ordering::SeqCst) >= 1000,
    );
    // Let the load run a little longer, so the kill lands in the middle of it.
    thread::sleep(Duration::from_millis(300));
    let before_kill = acked.load(Ordering::SeqCst);
    assert!(
        handles.iter().all(|h| !h.is_finished()),
        "a writer stopped before the kill"
    );

    let t0 = Instant::now();
    let load_time = t0 - started;
    pair.alpha.kill();
    let probe_offset = 200 * MIB;
    let (failover, refusals) =
        first_write_answered(&pair.beta, probe_offset, t0, Duration::from_secs(15));
    let logs = join_within(
        handles,
        Duration::from_secs(30),
        "the writers after the kill",
    );
    stop.store(true, Ordering::SeqCst);
    let total_acked: u64 = logs.iter().map(|l| l.writes_acked).sum();
    eprintln!(
        "failover: beta answered a write {} ms after alpha's SIGKILL (timeout_ms {timeout_ms}; {refusals} refusals as secondary before); \
         {total_acked} writes acknowledged by alpha in {:.1} s, {before_kill} of them before the kill was decided",
        failover.as_millis(),
        load_time.as_secs_f64(),
    );
    for (id, l) in logs.iter().enumerate() {
        assert!(
            l.connection_lost,
            "writer {id} did not end with the lost connection: {}",
            l.end
        );
    }
    let limit = Duration::from_millis(timeout_ms + 500);
    assert!(
        failover <= limit,
        "beta took {} ms from alpha's death to its first answered write; at most {} ms allowed",
        failover.as_millis(),
        limit.as_millis()
    );
    let b = pair.beta.status();
    assert_eq!(b["role"], "primary", "{b:#}");
    wait_log_line(&pair.beta, &["automatic failover"], Duration::from_secs(5));

    // Every acknowledged write is on beta, in its newest acknowledged version (or the newer
    // one that was in flight at the kill), whole.
    let mut acked_seq: HashMap<u64, (u64, u64)> = HashMap::new(); // offset -> (writer, seq)
    let mut sent_seq: HashMap<u64, (u64, u64)> = HashMap::new();
    for (id, l) in logs.iter().enumerate() {
        for (o, s) in &l.acked {
            acked_seq.insert(*o, (id as u64, *s));
        }
        for (o, s) in &l.sent {
            sent_seq.insert(*o, (id as u64, *s));
        }
    }
    let mut c = client(&pair.beta);
    let data = read_range(&mut c, 0, region_blocks * BLOCK);
    c.disconnect();
    let mut problems = Vec::new();
    let mut newer_than_acked = 0;
    for (i, b) in data.chunks(BLOCK as usize).enumerate() {
        let off = i as u64 * BLOCK;
        let acked = acked_seq.get(&off).copied();
        let sent = sent_seq.get(&off).copied();
        match (decode_block(b), acked, sent) {
            (Decoded::Zero, None, _) => {}
            (Decoded::Zero, Some((_, s)), _) => problems.push(format!(
                "block at {off}: zeros, but seq {s} was acknowledged"
            )),
            (Decoded::Garbage(why), _, _) => problems.push(format!("block at {off}: {why}")),
            (
                Decoded::Block {
                    offset,
                    seq,
                    writer,
                },
                acked,
                sent,
            ) => {
                let Some((owner, newest_sent)) = sent else {
                    problems.push(format!(
                        "block at {off}: holds seq {seq} but was never written"
                    ));
                    continue;
                };
                if offset != off || writer != owner {
                    problems.push(format!(
                        "block at {off}: holds the block of offset {offset}, writer {writer}"
                    ));
                } else if seq > newest_sent {
                    problems.push(format!(
                        "block at {off}: seq {seq}, but only up to {newest_sent} was sent"
                    ));
                } else if let Some((_, a)) = acked {
                    if seq < a {
                        problems.push(format!(
                            "block at {off}: seq {seq}, older than the acknowledged seq {a}"
                        ));
                    } else if seq > a {
                        newer_than_acked += 1;
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} written blocks on beta are wrong after the failover (showing 20):\n{}",
        problems.len(),
        sent_seq.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "after the failover beta holds all {} acknowledged blocks; {newer_than_acked} hold the newer write that was in flight at the kill",
        acked_seq.len()
    );

    // Beta, now primary alone, changes more.
    let post = vec![
        (100 * MIB, random(MIB, 0x7001)),
        (150 * MIB + 8 * KIB, random(64 * KIB, 0x7002)),
    ];
    write_blocks(&pair.beta, &post);
    let resynced_before = num(&pair.beta.status(), "stats.resynced_bytes_total");

    // Alpha restarts: secondary, and only the changed regions plus its activity-log extents
    // travel back.
    pair.alpha.start();
    let a = pair.alpha.status();
    assert_eq!(
        a["role"], "secondary",
        "a node always starts secondary: {a:#}"
    );
    assert_refuses_as_secondary(&pair.alpha, "alpha restarted after its crash");
    let (a, b) = pair.wait_in_sync("alpha rejoined after the crash", Duration::from_secs(60));
    assert_eq!(a["role"], "secondary", "{a:#}");
    assert_eq!(b["role"], "primary", "{b:#}");
    let copied = num(&b, "stats.resynced_bytes_total") - resynced_before;
    let changed: u64 = post.iter().map(|(_, d)| d.len() as u64).sum::<u64>() + BLOCK;
    let marked = alpha_crash_marks(&pair.alpha);
    eprintln!(
        "rejoin resync: {copied} bytes ({:.1} MiB, {:.1}% of the {} MiB device); beta changed {changed} bytes alone; alpha's log: {marked}",
        copied as f64 / MIB as f64,
        copied as f64 * 100.0 / size as f64,
        size / MIB
    );
    assert!(
        copied < size / 2,
        "the resync after alpha's return copied {copied} of {size} bytes: not a partial resync"
    );
    assert!(
        copied >= changed,
        "the resync copied {copied} bytes, less than the {changed} bytes beta changed alone"
    );
    flush_export(&pair.beta);
    pair.assert_disks_identical("after alpha's resync");
    let mut model = Model::default();
    model.apply(&post);
    model.apply(&[(probe_offset, random(BLOCK, 0xfa11))]);
    let mut r = ranges(&post);
    r.push((probe_offset, BLOCK));
    assert_file_matches(
        "alpha's disk after the resync",
        &pair.alpha.disk,
        &model,
        &r,
    );
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One writer on its own connection: its own blocks (`block % writers == id` among the first
/// `region_blocks` blocks), one write at a time, random blocks, increasing sequence numbers.
fn writer_on(
    c: &mut RawNbd,
    id: u64,
    writers: u64,
    region_blocks: u64,
    stop: &AtomicBool,
    acked_total: &AtomicU64,
) -> WriterLog {
    let mut log = WriterLog::default();
    let mut rng = SplitMix::new(0x5eed_0000 + id);
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let block = rng.next_u64() % (region_blocks / writers) * writers + id;
        let off = block * BLOCK;
        seq += 1;
        log.sent.insert(off, seq);
        match c.write(off, &encode_block(off, seq, id)) {
            Ok(0) => {
                log.acked.insert(off, seq);
                log.writes_acked += 1;
                acked_total.fetch_add(1, Ordering::SeqCst);
            }
            Ok(e) => {
                log.end = format!("write at {off} answered with NBD error {e}");
                return log;
            }
            Err(e) => {
                log.end = format!("connection ended: {e}");
                log.connection_lost = true;
                return log;
            }
        }
    }
    log.end = "stopped".into();
    log
}

/// The line in which a restarted node reports what its crash recovery marked.
fn alpha_crash_marks(node: &PairNode) -> String {
    node.log()
        .lines()
        .find(|l| l.contains("unclean shutdown"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| "no unclean-shutdown line".into())
}

// ------------------------------------------------------------------------------------------
// 2. ext4 survives the failover
// ------------------------------------------------------------------------------------------

/// Files written on alpha's filesystem: (path, length, seed of the content).
const FS_FILES: &[(&str, u64, u64)] = &[
    ("notes.txt", 700, 21),
    ("data/one.bin", 5 * MIB, 22),
    ("data/two.bin", 3 * MIB + 4095, 23),
    ("data/deep/er/three.bin", MIB + 1, 24),
    ("four.bin", 2 * MIB - 17, 25),
];

fn fsync_path(p: &Path) {
    fs::File::open(p)
        .and_then(|f| f.sync_all())
        .unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()));
}

/// Writes [`FS_FILES`] under `root`, each fsynced with its directories; returns each file's
/// (path, length, crc32c).
fn write_fs_files(root: &Path) -> Vec<(String, u64, u32)> {
    let mut sums = Vec::new();
    for &(name, len, seed) in FS_FILES {
        let path = root.join(name);
        let dir = path.parent().expect("parent directory");
        fs::create_dir_all(dir).expect("create directories");
        let data = random(len, seed);
        let mut f = fs::File::create(&path).expect("create file");
        f.write_all(&data).expect("write file");
        f.sync_all().expect("fsync file");
        let mut d = Some(dir);
        while let Some(p) = d {
            fsync_path(p);
            d = if p == root { None } else { p.parent() };
        }
        sums.push((name.to_string(), len, crc32c::crc32c(&data)));
    }
    sums
}

fn verify_fs_files(root: &Path, sums: &[(String, u64, u32)], when: &str) {
    for (name, len, crc) in sums {
        let data = fs::read(root.join(name)).unwrap_or_else(|e| panic!("{when}: read {name}: {e}"));
        assert_eq!(
            data.len() as u64,
            *len,
            "{when}: {name} has the wrong length"
        );
        assert_eq!(
            crc32c::crc32c(&data),
            *crc,
            "{when}: {name} has the wrong content"
        );
    }
}

fn e2fsck_fn(dev: &str) -> Output {
    run(tool("e2fsck").arg("-fn").arg(dev), Duration::from_secs(120))
}

/// Whether the filesystem's journal needs replaying (the `needs_recovery` feature).
fn needs_recovery(dev: &str) -> bool {
    let out = run(tool("dumpe2fs").arg("-h").arg(dev), CMD_TIMEOUT).ok();
    let features = out
        .stdout
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("dumpe2fs -h shows no features: {out}"))
        .to_string();
    features.split_whitespace().any(|f| f == "needs_recovery")
}

#[test]
fn ext4_survives_failover() {
    if !require_all(&[
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "dumpe2fs",
        "mount",
        "umount",
    ]) || !require_root("loop devices and mounts")
        || !require_path("/dev/fuse", "FUSE")
    {
        return;
    }
    let _g = shared();
    let size = 128 * MIB;
    let mut pair = Pair::up_with(quick(size), |_| PairExtras {
        sections: failover_section(true, "disconnect"),
        ..PairExtras::default()
    });
    // Declared after the pair: dropped (unmounted, detached) before the daemons stop.
    let mut on_alpha = BlockStack::default();
    let mut on_beta = BlockStack::default();
    let mnt_alpha = pair.path("mnt-alpha");
    let mnt_beta = pair.path("mnt-beta");

    let file = on_alpha.nbdfuse(&pair.path("fuse-alpha"), &pair.alpha.uri(), &[]);
    let dev = on_alpha.loop_attach(&file, &["--direct-io=on"]);
    run(
        tool("mkfs.ext4")
            .args(["-F", "-q", "-L", "twinbd-failover"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&dev),
        Duration::from_secs(120),
    )
    .ok();
    on_alpha.mount(&dev, &mnt_alpha, &[]);
    let sums = write_fs_files(&mnt_alpha);
    verify_fs_files(&mnt_alpha, &sums, "on alpha before the crash");

    // Alpha dies with the filesystem mounted; what stood on its export is abandoned.
    let t0 = Instant::now();
    pair.alpha.kill();
    let steps = on_alpha.abandon();
    eprintln!("alpha's block stack abandoned: {}", steps.join("; "));
    let b = pair.beta.wait_status(
        "beta promoted itself after alpha died",
        Duration::from_secs(15),
        |s| s["role"] == "primary",
    );
    eprintln!(
        "beta primary {} ms after the kill",
        t0.elapsed().as_millis()
    );
    assert_eq!(b["disk"], "up_to_date", "{b:#}");

    // The filesystem through beta's export, read-only first.
    let file = on_beta.nbdfuse(&pair.path("fuse-beta"), &pair.beta.uri(), &[]);
    assert_eq!(fs::metadata(&file).expect("nbdfuse file").len(), size);
    let ro = on_beta.loop_attach(&file, &["--read-only"]);
    let first = e2fsck_fn(&ro);
    let journal = needs_recovery(&ro);
    eprintln!(
        "e2fsck -fn on beta's export: {}; journal needs recovery: {journal}",
        first.status
    );
    let dev = if !journal {
        assert!(
            first.success(),
            "e2fsck -fn on beta's export finds problems: {first}"
        );
        ro
    } else {
        // Mounted at the crash: the journal must be replayed, and nothing else be wrong.
        let text = first.all().to_lowercase();
        assert!(
            first.success() || (first.status.code() == Some(4) && text.contains("journal")),
            "e2fsck -fn on beta's export found more than a journal to replay: {first}"
        );
        on_beta.loop_detach(&ro);
        let rw = on_beta.loop_attach(&file, &["--direct-io=on"]);
        on_beta.mount(&rw, &mnt_beta, &[]);
        on_beta.umount(&mnt_beta);
        let again = e2fsck_fn(&rw);
        assert!(
            again.success() && !needs_recovery(&rw),
            "after the journal was replayed, e2fsck -fn still finds problems: {again}"
        );
        rw
    };
    on_beta.mount(&dev, &mnt_beta, &["-o", "ro"]);
    verify_fs_files(&mnt_beta, &sums, "through beta after the failover");
    on_beta.umount(&mnt_beta);
    on_beta.loop_detach(&dev);
    on_beta.nbdfuse_stop();
    // Beta's disk itself holds the same clean filesystem.
    let out = run(
        tool("e2fsck").arg("-fn").arg(&pair.beta.disk),
        Duration::from_secs(120),
    );
    assert!(
        out.success(),
        "beta's backing disk is not a clean filesystem: {out}"
    );
}

// ------------------------------------------------------------------------------------------
// 3. Split brain, under each policy
// ------------------------------------------------------------------------------------------

/// The `*.recovery` files of a node (beside its metadata).
fn recovery_files(node: &PairNode) -> Vec<PathBuf> {
    let dir = node.meta.parent().expect("metadata directory");
    let prefix = format!("{RESOURCE}-{}-splitbrain-", node.name);
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list node directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".recovery"))
        })
        .collect();
    v.sort();
    v
}

/// `twinbd recovery FILE`: its output and the records listed, (offset, length).
fn recovery_records(file: &Path) -> (Output, Vec<(u64, u64)>) {
    let out = run(Command::new(TWINBD).arg("recovery").arg(file), CMD_TIMEOUT).ok();
    let records = out
        .stdout
        .lines()
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            match t.as_slice() {
                [o, n, "crc32c", _] => Some((o.parse().ok()?, n.parse().ok()?)),
                _ => None,
            }
        })
        .collect();
    (out, records)
}

/// Asserts every 4 KiB block of `writes` lies in one of `records`.
fn assert_covered(what: &str, writes: &[(u64, Vec<u8>)], records: &[(u64, u64)]) {
    for (o, d) in writes {
        let mut b = o / BLOCK * BLOCK;
        while b < o + d.len() as u64 {
            assert!(
                records.iter().any(|(ro, rl)| *ro <= b && b + BLOCK <= ro + rl),
                "{what}: the block at {b} (of the write at {o}, {} bytes) is in no record: {records:?}",
                d.len()
            );
            b += BLOCK;
        }
    }
}

/// A partition while alpha is primary and beta promotes itself; both write (alpha less than
/// beta); the partition heals. `loser` is the node whose changes the policy drops (for
/// "disconnect", the one the operator picks).
fn split_brain(policy: &str, loser: &str) {
    let _g = shared();
    let size = 64 * MIB;
    let pair = Pair::up_with(
        PairOpts {
            disk_size: size,
            heartbeat_ms: Some(QUICK_HEARTBEAT),
            proxy: true,
            ..PairOpts::default()
        },
        |p| PairExtras {
            sections: format!(
                "{}\n{}",
                failover_section(true, policy),
                handlers_section(&[("on_split_brain", record_handler(&p.path("")))])
            ),
            ..PairExtras::default()
        },
    );
    let proxy = pair.proxy();
    let x = 8 * MIB;
    let base = vec![(x, random(64 * KIB, 1)), (16 * MIB, random(128 * KIB, 2))];
    // Alpha changes 132 KiB while apart, beta about 1.1 MiB; both change the block range at x.
    let on_alpha = vec![
        (x, random(64 * KIB, 10)),
        (4 * MIB, random(64 * KIB, 11)),
        (20 * MIB + BLOCK, random(BLOCK, 12)),
    ];
    let on_beta = vec![
        (x + 32 * KIB, random(64 * KIB, 20)),
        (16 * MIB, random(256 * KIB, 21)),
        (40 * MIB, random(512 * KIB, 22)),
        (size - 256 * KIB, random(256 * KIB, 23)),
    ];
    let mut all = ranges(&base);
    all.extend(ranges(&on_alpha));
    all.extend(ranges(&on_beta));
    let mut alpha_view = Model::default();
    alpha_view.apply(&base);
    alpha_view.apply(&on_alpha);
    let mut beta_view = Model::default();
    beta_view.apply(&base);
    beta_view.apply(&on_beta);

    write_blocks(&pair.alpha, &base);
    pair.wait_in_sync("the base data replicated", Duration::from_secs(30));
    if policy == "disconnect" {
        // A request to discard data is for the next sync decision only: made where there is
        // nothing to discard, it is used up, and the split brain below is still left to the
        // operator. While connected, the request is refused.
        let armed = if loser == "alpha" {
            &pair.alpha
        } else {
            &pair.beta
        };
        armed.cli(&["disconnect"]).ok();
        armed.cli(&["connect", "--discard-my-data"]).ok();
        assert!(
            log_shows_within(armed, "was not used", Duration::from_secs(20)),
            "{}: reconnected in sync, but the discard request was not reported cleared",
            armed.name
        );
        pair.wait_in_sync(
            "reconnected with nothing to discard",
            Duration::from_secs(30),
        );
        assert_refused(
            armed.cli(&["connect", "--discard-my-data"]),
            "already connected",
        );
    }

    // The network between the nodes goes silent: beta takes over, alpha serves on.
    proxy.set_blackhole(true);
    pair.beta.wait_status(
        "beta promoted itself during the partition",
        Duration::from_secs(20),
        |s| s["role"] == "primary",
    );
    let a = pair
        .alpha
        .wait_status("alpha lost its peer", Duration::from_secs(20), |s| {
            !linked(s)
        });
    assert_eq!(a["role"], "primary", "alpha stops being primary: {a:#}");
    write_blocks(&pair.alpha, &on_alpha);
    write_blocks(&pair.beta, &on_beta);
    let (a, b) = (pair.alpha.status(), pair.beta.status());
    let (oos_a, oos_b) = (num(&a, "out_of_sync_bytes"), num(&b, "out_of_sync_bytes"));
    eprintln!(
        "split brain ({policy}): out of sync while apart: alpha {oos_a} bytes, beta {oos_b} bytes"
    );
    assert!(
        0 < oos_a && oos_a < oos_b,
        "alpha should have fewer changes than beta, both some: alpha {a:#}\nbeta {b:#}"
    );
    assert_file_matches(
        "alpha's disk while apart",
        &pair.alpha.disk,
        &alpha_view,
        &all,
    );
    assert_file_matches("beta's disk while apart", &pair.beta.disk, &beta_view, &all);

    // The network returns: both detect the split brain and report it. A node that does not
    // is a daemon bug; it is recorded, the resolution is still checked, and the test fails
    // at the end with every such finding.
    let mut bugs: Vec<String> = Vec::new();
    proxy.set_blackhole(false);
    let first = wait_until_either_logs(&pair, "split brain detected", Duration::from_secs(30));
    for node in [&pair.alpha, &pair.beta] {
        let peer = if node.name == "alpha" {
            "beta"
        } else {
            "alpha"
        };
        if !log_shows_within(node, "split brain detected", Duration::from_secs(5)) {
            let bug = format!(
                "BUG ({policy}): {} never reported the split brain that {} detected: no \
                 \"split brain detected\" log line, no on_split_brain handler, status {}",
                node.name,
                first,
                node.status()
            );
            eprintln!("{bug}");
            bugs.push(bug);
            continue;
        }
        let lines = wait_lines(&handler_log(&pair, node.name), 1, Duration::from_secs(10));
        assert_eq!(
            lines[0],
            format!("split_brain {RESOURCE} {} primary {peer}", node.name),
            "{}'s on_split_brain handler: {lines:?}",
            node.name
        );
    }

    let (lose, win, lose_view, win_view) = match loser {
        "alpha" => (&pair.alpha, &pair.beta, &alpha_view, &beta_view),
        _ => (&pair.beta, &pair.alpha, &beta_view, &alpha_view),
    };
    if policy == "disconnect" {
        let (na, nb, a, b) = watch_links(&pair, Duration::from_millis(1500));
        if na + nb > 0 {
            let bug = format!(
                "BUG ({policy}): the link came up again after the unresolved split brain \
                 (alpha linked in {na} polls, beta in {nb} of 1.5 s): alpha {a}\nbeta {b}"
            );
            eprintln!("{bug}");
            bugs.push(bug);
        }
        for node in [&pair.alpha, &pair.beta] {
            let st = node.status();
            assert_eq!(st["role"], "primary", "{}: {st:#}", node.name);
            if st["connection"] != "split_brain" {
                let bug = format!(
                    "BUG ({policy}): {} does not show connection \"split_brain\" after the split brain \
                     was detected and left unresolved: {st}",
                    node.name
                );
                eprintln!("{bug}");
                bugs.push(bug);
            }
        }
        assert_file_matches(
            "alpha's disk, unresolved",
            &pair.alpha.disk,
            &alpha_view,
            &all,
        );
        assert_file_matches("beta's disk, unresolved", &pair.beta.disk, &beta_view, &all);
        assert!(recovery_files(&pair.alpha).is_empty() && recovery_files(&pair.beta).is_empty());
        // The operator drops the loser's changes.
        lose.cli(&["connect", "--discard-my-data"]).ok();
        win.cli(&["connect"]).ok();
    }

    let (a, b) = settle_or_report(&pair, policy, Duration::from_secs(30), &bugs);
    let (lst, wst) = if loser == "alpha" { (&a, &b) } else { (&b, &a) };
    assert_eq!(lst["role"], "secondary", "the loser {}: {lst:#}", lose.name);
    assert_eq!(wst["role"], "primary", "the winner {}: {wst:#}", win.name);
    flush_export(win);
    pair.assert_disks_identical(&format!("after the {policy} resolution"));
    assert_file_matches(
        "the winner's disk after the resolution",
        &win.disk,
        win_view,
        &all,
    );

    // The loser's overwritten blocks are in its recovery file, and can be put back.
    assert!(
        recovery_files(win).is_empty(),
        "the winner {} wrote a recovery file",
        win.name
    );
    let files = recovery_files(lose);
    assert_eq!(files.len(), 1, "{}'s recovery files: {files:?}", lose.name);
    let (listing, records) = recovery_records(&files[0]);
    assert!(!records.is_empty(), "no records listed: {listing}");
    let lost = if loser == "alpha" {
        &on_alpha
    } else {
        &on_beta
    };
    assert_covered(&format!("{}'s recovery file", lose.name), lost, &records);
    let image = pair.path("loser-view.img");
    fs::copy(&lose.disk, &image).expect("copy the final disk");
    run(
        Command::new(TWINBD)
            .arg("recovery")
            .arg(&files[0])
            .arg("--apply")
            .arg(&image),
        CMD_TIMEOUT,
    )
    .ok();
    assert_file_matches(
        "the final disk with the loser's recovery file applied",
        &image,
        lose_view,
        &all,
    );
    let saved: u64 = records.iter().map(|r| r.1).sum();
    eprintln!(
        "split brain ({policy}): {} lost; recovery file {} holds {} record(s), {saved} bytes",
        lose.name,
        files[0].display(),
        records.len()
    );
    assert!(
        bugs.is_empty(),
        "the split brain was resolved, but not reported as documented:\n{}",
        bugs.join("\n")
    );
}

/// Waits until the pair is in sync (as [`Pair::wait_in_sync`]); on timeout, fails with the
/// findings recorded before, which usually explain why.
fn settle_or_report(
    pair: &Pair,
    policy: &str,
    timeout: Duration,
    bugs: &[String],
) -> (Value, Value) {
    let deadline = Instant::now() + timeout;
    loop {
        let (a, b) = (pair.alpha.status(), pair.beta.status());
        if settled(&a) && settled(&b) {
            return (a, b);
        }
        assert!(
            Instant::now() < deadline,
            "the split brain ({policy}) was not resolved within {timeout:?}: the pair never \
             got in sync\nalpha: {a}\nbeta: {b}\nfindings before:\n{}",
            if bugs.is_empty() {
                "none".to_string()
            } else {
                bugs.join("\n")
            }
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until either node's log has a line containing `words`; returns that node's name.
fn wait_until_either_logs(pair: &Pair, words: &str, timeout: Duration) -> &'static str {
    let deadline = Instant::now() + timeout;
    loop {
        for node in [&pair.alpha, &pair.beta] {
            if node.log().to_lowercase().contains(words) {
                return node.name;
            }
        }
        assert!(
            Instant::now() < deadline,
            "neither node logged {words:?} within {timeout:?}:\n{}\n{}",
            pair.alpha.log(),
            pair.beta.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `node`'s log comes to contain `words` within `timeout`.
fn log_shows_within(node: &PairNode, words: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if node.log().to_lowercase().contains(words) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn split_brain_policies_disconnect() {
    split_brain("disconnect", "alpha");
}

#[test]
fn split_brain_policies_discard_younger_primary() {
    split_brain("discard-younger-primary", "beta");
}

#[test]
fn split_brain_policies_discard_least_changes() {
    split_brain("discard-least-changes", "alpha");
}

// ------------------------------------------------------------------------------------------
// 4. Manual switchover and failback, and the refusals on the way
// ------------------------------------------------------------------------------------------

/// Asserts a refused command: non-zero exit and a one-line reason on stderr mentioning
/// `word`; returns the reason.
fn assert_refused(out: Output, word: &str) -> String {
    let out = out.failed();
    let reason = out.stderr.trim().to_string();
    assert_eq!(
        reason.lines().count(),
        1,
        "a refusal is one line on stderr: {out}"
    );
    assert!(
        reason.to_lowercase().contains(word),
        "the refusal does not mention {word:?}: {out}"
    );
    reason
}

#[test]
fn command_line_errors_are_one_line() {
    for args in [
        &[][..],
        &["status"],
        &["status", "-c", "/etc/twinbd/r0.toml", "--bogus"],
        &["promot", "-c", "/etc/twinbd/r0.toml"],
    ] {
        let out = run(Command::new(TWINBD).args(args), CMD_TIMEOUT);
        assert_eq!(out.status.code(), Some(2), "{out}");
        assert!(out.stdout.is_empty(), "{out}");
        let reason = assert_refused(out, "twinbd: ");
        assert!(reason.contains("--help"), "{reason}");
    }
    let help = run(Command::new(TWINBD).args(["status", "--help"]), CMD_TIMEOUT).ok();
    assert!(help.stdout.contains("Usage:"), "{help}");
}

/// Waits until `node` sees its peer in `role`.
fn wait_peer_role(node: &PairNode, role: &str) -> Value {
    node.wait_status(&format!("peer role {role}"), Duration::from_secs(10), |s| {
        s["peer"]["role"] == role
    })
}

#[test]
fn manual_switchover_and_refusals() {
    if !require("nbdinfo") {
        return;
    }
    let _g = shared();
    let size = 32 * MIB;
    let pair = Pair::up(quick(size));
    assert_refuses_as_secondary(&pair.beta, "beta, standby of a connected primary");

    let before = vec![
        (0, random(64 * KIB, 1)),
        (size / 2 + BLOCK, random(128 * KIB, 2)),
        (size - BLOCK, random(BLOCK, 3)),
    ];
    let mut c = client(&pair.alpha);
    for (o, d) in &before {
        c.write_read_check(*o, d);
    }
    assert_eq!(c.flush().expect("flush"), 0);

    // Beta may not take over while alpha is connected and primary.
    let why = assert_refused(pair.beta.promote(false), "primary");
    eprintln!("promote on beta refused: {why}");
    assert_eq!(pair.beta.status()["role"], "secondary");
    // Alpha may not step down while a client holds its export.
    let why = assert_refused(pair.alpha.cli(&["demote"]), "client");
    eprintln!("demote on alpha refused: {why}");
    let a = pair.alpha.status();
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_eq!(num(&a, "stats.nbd_clients"), 1, "{a:#}");
    // The client did not notice.
    c.write_read_check(MIB, &random(64 * KIB, 4));
    c.disconnect();
    pair.alpha
        .wait_status("the client gone", Duration::from_secs(10), |s| {
            num(s, "stats.nbd_clients") == 0
        });
    let mut model = Model::default();
    model.apply(&before);
    model.apply(&[(MIB, random(64 * KIB, 4))]);
    let mut all = ranges(&before);
    all.push((MIB, 64 * KIB));

    // Switchover: alpha steps down, beta takes over without --force.
    pair.alpha.cli(&["demote"]).ok();
    assert_refuses_as_secondary(&pair.alpha, "alpha after its demotion");
    wait_peer_role(&pair.beta, "secondary");
    pair.beta.promote(false).ok();
    let b = wait_peer_role(&pair.alpha, "primary");
    assert_eq!(pair.alpha.status()["role"], "secondary");
    assert_eq!(b["role"], "secondary", "alpha: {b:#}");
    let b = pair.beta.status();
    assert_eq!(b["role"], "primary", "{b:#}");
    assert_refuses_as_secondary(&pair.alpha, "alpha, standby of beta");
    // What alpha's clients wrote is there on beta...
    let mut c = client(&pair.beta);
    assert_export_matches(&mut c, "beta's export after the switchover", &model, &all);
    // ...and what beta's clients write reaches alpha.
    let on_beta = vec![
        (3 * MIB, random(256 * KIB, 5)),
        (size - 8 * KIB, random(8 * KIB, 6)),
    ];
    for (o, d) in &on_beta {
        c.write_read_check(*o, d);
    }
    assert_eq!(c.flush().expect("flush"), 0);
    c.disconnect();
    model.apply(&on_beta);
    all.extend(ranges(&on_beta));
    pair.wait_in_sync("after writes on beta", Duration::from_secs(30));
    pair.assert_disks_identical("after writes on beta");
    assert_file_matches(
        "alpha's disk after writes on beta",
        &pair.alpha.disk,
        &model,
        &all,
    );

    // Failback.
    assert_refused(pair.alpha.promote(false), "primary");
    pair.beta.cli(&["demote"]).ok();
    assert_refuses_as_secondary(&pair.beta, "beta after its demotion");
    wait_peer_role(&pair.alpha, "secondary");
    pair.alpha.promote(false).ok();
    wait_peer_role(&pair.beta, "primary");
    assert_eq!(pair.alpha.status()["role"], "primary");
    assert_refuses_as_secondary(&pair.beta, "beta, standby again");
    let after = vec![(5 * MIB, random(64 * KIB, 7))];
    write_blocks(&pair.alpha, &after);
    model.apply(&after);
    all.extend(ranges(&after));
    let (a, b) = pair.wait_in_sync("after the failback", Duration::from_secs(30));
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_eq!(b["role"], "secondary", "{b:#}");
    pair.assert_disks_identical("after the failback");
    assert_file_matches(
        "beta's disk after the failback",
        &pair.beta.disk,
        &model,
        &all,
    );
}

// ------------------------------------------------------------------------------------------
// 5. Online verify finds exactly the blocks corrupted behind the daemons' backs
// ------------------------------------------------------------------------------------------

/// The number of differing blocks `twinbd verify` reports ("... N block(s) ... differed").
fn verify_count(out: &Output) -> u64 {
    let text = &out.stdout;
    let words: Vec<&str> = text.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == "block(s)")
        .unwrap_or_else(|| panic!("verify output names no block count: {out}"));
    assert!(i > 0, "verify output: {out}");
    words[i - 1]
        .parse()
        .unwrap_or_else(|_| panic!("verify output: {:?} is not a count: {out}", words[i - 1]))
}

#[test]
fn verify_finds_exactly_corrupted_blocks() {
    let _g = shared();
    let size = 64 * MIB;
    let pair = Pair::up(quick(size));
    let data = vec![
        (0, random(2 * MIB, 1)),
        (10 * MIB, random(MIB, 2)),
        (33 * MIB, random(3 * MIB, 3)),
        (size - MIB, random(MIB, 4)),
    ];
    write_blocks(&pair.alpha, &data);
    pair.wait_in_sync("the data replicated", Duration::from_secs(30));
    pair.assert_disks_identical("before the corruption");

    // Verify runs on the primary only, and finds nothing on a healthy pair.
    let why = assert_refused(pair.beta.cli(&["verify"]), "primary");
    eprintln!("verify on the secondary refused: {why}");
    let out = pair.alpha.cli(&["verify"]).ok();
    assert_eq!(verify_count(&out), 0, "verify of an identical pair: {out}");

    // Seven blocks of beta's disk change behind the daemon's back: some written, some never
    // written (zeros), two adjacent ones, and the device's last block.
    let corrupt = [
        0,
        100 * BLOCK,
        10 * MIB + 8 * BLOCK,
        10 * MIB + 9 * BLOCK,
        20 * MIB + 3 * BLOCK,
        34 * MIB,
        size - BLOCK,
    ];
    {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pair.beta.disk)
            .expect("open beta's disk");
        for &o in &corrupt {
            let mut b = read_at(&pair.beta.disk, o, BLOCK as usize);
            for x in &mut b {
                *x ^= 0xa5;
            }
            f.write_all_at(&b, o).expect("corrupt a block");
        }
        f.sync_all().expect("fsync beta's disk");
    }
    let runs = differing_blocks(&pair.alpha.disk, &pair.beta.disk, size);
    let blocks: u64 = runs.iter().map(|r| r.1 / BLOCK).sum();
    assert_eq!(
        blocks,
        corrupt.len() as u64,
        "the corruption itself: {runs:?}"
    );

    let out = pair.alpha.cli(&["verify"]).ok();
    eprintln!(
        "verify after corrupting {} blocks: {}",
        corrupt.len(),
        out.stdout.trim()
    );
    assert_eq!(
        verify_count(&out),
        corrupt.len() as u64,
        "verify must report exactly the corrupted blocks: {out}"
    );
    // The resync verify started repairs beta from alpha.
    pair.wait_in_sync("the resync after verify", Duration::from_secs(30));
    flush_export(&pair.alpha);
    pair.assert_disks_identical("after verify's resync");
    let mut model = Model::default();
    model.apply(&data);
    let r: Vec<(u64, u64)> = corrupt.iter().map(|&o| (o, BLOCK)).collect();
    assert_file_matches("beta's repaired blocks", &pair.beta.disk, &model, &r);
    // A second verify finds nothing left.
    let out = pair.alpha.cli(&["verify"]).ok();
    assert_eq!(verify_count(&out), 0, "verify after the repair: {out}");
}

// ------------------------------------------------------------------------------------------
// 6. Handlers run with their environment; a failing handler is logged and harmless
// ------------------------------------------------------------------------------------------

#[test]
fn handlers_get_their_environment() {
    let _g = shared();
    let mut pair = Pair::up_with(quick(16 * MIB), |p| {
        let record = record_handler(&p.path(""));
        PairExtras {
            sections: handlers_section(&[
                ("on_promote", record.clone()),
                ("on_demote", record.clone()),
                (
                    "on_peer_lost",
                    format!("{record}; echo 'peer-lost handler gives up' >&2; exit 3"),
                ),
            ]),
            ..PairExtras::default()
        }
    });
    let (alpha_log, beta_log) = (handler_log(&pair, "alpha"), handler_log(&pair, "beta"));
    let expect = |node: &str, role: &str, event: &str| {
        let peer = if node == "alpha" { "beta" } else { "alpha" };
        format!("{event} {RESOURCE} {node} {role} {peer}")
    };
    // The promotion that made alpha primary in the first place.
    let lines = wait_lines(&alpha_log, 1, Duration::from_secs(10));
    assert_eq!(lines, [expect("alpha", "primary", "promote")]);

    // Beta dies: alpha's peer-lost handler runs, fails, and alpha does not care. (SIGKILL,
    // not SIGTERM: a stopping node may still take the peer's reconnection before it exits,
    // which `operator_disconnect_keeps_the_link_down` covers.)
    pair.beta.kill();
    let lines = wait_lines(&alpha_log, 2, Duration::from_secs(10));
    assert_eq!(
        lines[1],
        expect("alpha", "primary", "peer_lost"),
        "{lines:?}"
    );
    let failed = wait_log_line(
        &pair.alpha,
        &["handler failed", "peer_lost"],
        Duration::from_secs(10),
    );
    assert!(
        failed.contains("peer-lost handler gives up"),
        "the log line of the failed handler lacks its stderr: {failed}"
    );
    eprintln!("failed handler logged: {failed}");
    pair.alpha.assert_alive("after a failing handler");
    let a = pair.alpha.status();
    assert_eq!(a["role"], "primary", "{a:#}");
    write_blocks(&pair.alpha, &[(MIB, random(64 * KIB, 1))]);

    // Beta returns, then a switchover: demote on alpha, promote on beta.
    pair.beta.start();
    pair.wait_in_sync("beta back", Duration::from_secs(30));
    pair.alpha.cli(&["demote"]).ok();
    wait_peer_role(&pair.beta, "secondary");
    pair.beta.promote(false).ok();
    let lines = wait_lines(&alpha_log, 3, Duration::from_secs(10));
    assert_eq!(
        lines[2],
        expect("alpha", "secondary", "demote"),
        "{lines:?}"
    );
    // Alpha dies: beta, primary now, runs its peer-lost handler.
    wait_peer_role(&pair.alpha, "primary");
    let before = read_lines(&beta_log);
    assert_eq!(
        before,
        [expect("beta", "primary", "promote")],
        "beta's handler lines"
    );
    let n = read_lines(&beta_log).len();
    pair.alpha.kill();
    let lines = wait_lines(&beta_log, n + 1, Duration::from_secs(10));
    assert_eq!(
        lines[n],
        expect("beta", "primary", "peer_lost"),
        "{lines:?}"
    );
    wait_log_line(
        &pair.beta,
        &["handler failed", "peer_lost"],
        Duration::from_secs(10),
    );
    pair.beta.assert_alive("after a failing handler");
    write_blocks(&pair.beta, &[(2 * MIB, random(64 * KIB, 2))]);
    // Nothing else ran: alpha's three lines, beta's two.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        read_lines(&alpha_log).len(),
        3,
        "{:?}",
        read_lines(&alpha_log)
    );
    assert_eq!(
        read_lines(&beta_log).len(),
        n + 1,
        "{:?}",
        read_lines(&beta_log)
    );
}

// ------------------------------------------------------------------------------------------
// 7. A failing disk: the node goes diskless and the data stays served
// ------------------------------------------------------------------------------------------

/// A pair in sync whose beta takes its `disk_faults` only after the initial full sync (which
/// writes all of beta's disk): `extras(pair, false)` while syncing, `extras(pair, true)` once
/// beta restarts with them.
fn pair_with_late_beta_faults(
    opts: PairOpts,
    extras: impl Fn(&Pair, bool) -> PairExtras,
    what: &str,
) -> Pair {
    let mut pair = Pair::up_with(opts, |p| extras(p, false));
    pair.beta.stop(Duration::from_secs(20));
    pair.write_configs_with(&extras(&pair, true));
    pair.beta.start();
    pair.wait_in_sync(what, Duration::from_secs(30));
    pair
}

fn faults(range: (u64, u64)) -> String {
    format!(
        "disk_faults = \"ranges={}+{},ops=write\"\n",
        range.0, range.1
    )
}

#[test]
fn disk_failure_primary_goes_diskless() {
    let _g = shared();
    let size = 128 * MIB;
    let bad = (64 * MIB, MIB);
    let pair = Pair::up_with(quick(size), |p| PairExtras {
        sections: handlers_section(&[("on_disk_failure", record_handler(&p.path("")))]),
        alpha_node: faults(bad),
        ..PairExtras::default()
    });
    let early = vec![
        (0, random(256 * KIB, 1)),
        (bad.0 - 64 * KIB, random(64 * KIB, 2)),
        (100 * MIB, random(MIB, 3)),
        (size - 64 * KIB, random(64 * KIB, 4)),
    ];
    write_blocks(&pair.alpha, &early);
    pair.wait_in_sync("the data replicated", Duration::from_secs(30));
    let events = EventLog::start(&pair, &pair.alpha);

    // A write into the failing range: answered with success, since beta holds it.
    let hit = vec![(bad.0 + 128 * KIB, random(256 * KIB, 5))];
    write_blocks(&pair.alpha, &hit);
    let a = pair
        .alpha
        .wait_status("alpha diskless", Duration::from_secs(10), |s| {
            s["disk"] == "diskless"
        });
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_eq!(a["connection"], "connected", "{a:#}");
    let ev = events.wait_for("a disk event", Duration::from_secs(10), |e| {
        e["kind"] == "disk"
    });
    eprintln!("disk event: {}", ev["detail"]);
    let lines = wait_lines(&handler_log(&pair, "alpha"), 1, Duration::from_secs(10));
    assert_eq!(
        lines,
        [format!("disk_failure {RESOURCE} alpha primary beta")]
    );

    // Alpha serves on through beta: writes anywhere, reads of any range.
    let later = vec![
        (32 * MIB, random(512 * KIB, 6)),
        (bad.0 + 512 * KIB, random(64 * KIB, 7)),
    ];
    write_blocks(&pair.alpha, &later);
    let mut model = Model::default();
    model.apply(&early);
    model.apply(&hit);
    model.apply(&later);
    let mut all = ranges(&early);
    all.extend(ranges(&hit));
    all.extend(ranges(&later));
    all.push((8 * MIB, 64 * KIB));
    all.push(bad);
    let mut c = client(&pair.alpha);
    assert_export_matches(&mut c, "alpha's export while diskless", &model, &all);
    // The whole device, as beta holds it.
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(8 * MIB);
        let (got, want) = (
            read_range(&mut c, off, n),
            read_at(&pair.beta.disk, off, n as usize),
        );
        // A plain comparison first: the byte-by-byte report is slow in a debug build.
        if got != want {
            assert_same_bytes(
                &format!("alpha's export against beta's disk at [{off}, +{n})"),
                &got,
                &want,
            );
        }
        off += n;
    }
    c.disconnect();
    eprintln!(
        "read the whole {} MiB device through diskless alpha in {:.1} s",
        size / MIB,
        t.elapsed().as_secs_f64()
    );
    assert_file_matches("beta's disk", &pair.beta.disk, &model, &all);
    let a = pair.alpha.status();
    assert_eq!(a["disk"], "diskless", "{a:#}");
    assert_eq!(a["peer"]["disk"], "up_to_date", "{a:#}");

    // A write beta confirmed and nobody flushed, then beta dies and returns: diskless alpha
    // marks nothing (its peer holds all it acknowledged) and takes beta back.
    let unflushed = vec![(48 * MIB, random(64 * KIB, 8))];
    let mut c = client(&pair.alpha);
    assert_eq!(c.write(unflushed[0].0, &unflushed[0].1).expect("write"), 0);
    c.disconnect();
    model.apply(&unflushed);
    let mut pair = pair;
    pair.beta.kill();
    pair.alpha
        .wait_status("alpha without its peer", Duration::from_secs(10), |s| {
            s["connection"] != "connected"
        });
    pair.beta.start();
    let a = pair.alpha.wait_status(
        "alpha serving through beta again",
        Duration::from_secs(15),
        |s| s["connection"] == "connected" && s["peer"]["disk"] == "up_to_date",
    );
    assert_eq!(a["disk"], "diskless", "{a:#}");
    let mut c = client(&pair.alpha);
    assert_export_matches(
        &mut c,
        "alpha's export after beta's return",
        &model,
        &ranges(&unflushed),
    );
    c.disconnect();
}

/// A primary that wrote while apart from its peer, then lost its disk, must not serve the
/// peer's older data when the link returns: the writes it acknowledged were on its disk only.
#[test]
fn diskless_primary_refuses_a_peer_that_lacks_its_writes() {
    let _g = shared();
    let size = 32 * MIB;
    let bad = (16 * MIB, MIB);
    let pair = Pair::up_with(quick(size), |_| PairExtras {
        alpha_node: faults(bad),
        ..PairExtras::default()
    });
    pair.alpha.cli(&["disconnect"]).ok();
    pair.alpha
        .wait_status("alpha standalone", Duration::from_secs(10), |s| {
            s["connection"] == "standalone"
        });
    // Acknowledged by alpha alone, then alpha's disk fails.
    let alone = vec![(0, random(64 * KIB, 1))];
    write_blocks(&pair.alpha, &alone);
    let mut c = client(&pair.alpha);
    let e = c.write(bad.0, &random(4 * KIB, 2)).expect("write");
    assert_ne!(e, 0, "a write to a failed disk with no peer must fail");
    c.disconnect();
    pair.alpha
        .wait_status("alpha diskless", Duration::from_secs(10), |s| {
            s["disk"] == "diskless"
        });

    pair.alpha.cli(&["connect"]).ok();
    wait_log_line(
        &pair.alpha,
        &["lacks writes it acknowledged"],
        Duration::from_secs(15),
    );
    let a = pair.alpha.status();
    assert_eq!(a["connection"], "standalone", "{a:#}");
    // Beta's older copy of block 0 is not served as if it were alpha's.
    let mut c = client(&pair.alpha);
    match c.read(0, 64 * KIB as u32).expect("read") {
        Ok(data) => assert_eq!(data, alone[0].1, "alpha served data it never acknowledged"),
        Err(e) => assert_ne!(e, 0),
    }
    c.disconnect();
}

#[test]
fn disk_failure_secondary_goes_diskless() {
    let _g = shared();
    let size = 64 * MIB;
    let bad = (32 * MIB, MIB);
    let extras = |p: &Pair, beta_faults: bool| PairExtras {
        sections: handlers_section(&[("on_disk_failure", record_handler(&p.path("")))]),
        beta_node: if beta_faults {
            faults(bad)
        } else {
            String::new()
        },
        ..PairExtras::default()
    };
    let pair = pair_with_late_beta_faults(quick(size), extras, "beta back with a failing disk");
    let fine = vec![(MIB, random(64 * KIB, 1))];
    write_blocks(&pair.alpha, &fine);
    assert_eq!(pair.beta.status()["disk"], "up_to_date");

    // A write into beta's failing range: answered with success by alpha.
    let hit = vec![(bad.0 + BLOCK, random(64 * KIB, 2))];
    write_blocks(&pair.alpha, &hit);
    let b = pair
        .beta
        .wait_status("beta diskless", Duration::from_secs(10), |s| {
            s["disk"] == "diskless"
        });
    assert_eq!(b["role"], "secondary", "{b:#}");
    let a = pair.alpha.wait_status(
        "alpha seeing its peer diskless, the whole device out of sync",
        Duration::from_secs(10),
        |s| s["peer"]["disk"] == "diskless" && s["out_of_sync_bytes"] == size,
    );
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_eq!(a["disk"], "up_to_date", "{a:#}");
    let lines = wait_lines(&handler_log(&pair, "beta"), 1, Duration::from_secs(10));
    assert_eq!(
        lines,
        [format!("disk_failure {RESOURCE} beta secondary alpha")]
    );

    // Alpha serves on alone, and its disk holds everything.
    let later = vec![(bad.0 + 256 * KIB, random(128 * KIB, 3))];
    write_blocks(&pair.alpha, &later);
    let mut model = Model::default();
    model.apply(&fine);
    model.apply(&hit);
    model.apply(&later);
    let mut all = ranges(&fine);
    all.extend(ranges(&hit));
    all.extend(ranges(&later));
    let mut c = client(&pair.alpha);
    assert_export_matches(&mut c, "alpha's export", &model, &all);
    c.disconnect();
    assert_file_matches("alpha's disk", &pair.alpha.disk, &model, &all);
    let a = pair.alpha.status();
    assert_eq!(num(&a, "out_of_sync_bytes"), size, "{a:#}");
}

// ------------------------------------------------------------------------------------------
// 8. An operator's disconnect keeps the link down, and is no failover
// ------------------------------------------------------------------------------------------

/// A primary without its disk under protocol A: the peer's disk is the only copy, so a write
/// is answered once the peer has written it, not once it is sent; a write whose local part
/// fails under A cannot know whether its frame arrived, and fails.
#[test]
fn diskless_primary_under_protocol_a_waits_for_the_peer() {
    let _g = shared();
    let size = 64 * MIB;
    let (bad_a, bad_b) = ((16 * MIB, MIB), (48 * MIB, MIB));
    let extras = |beta_faults: bool| PairExtras {
        alpha_node: faults(bad_a),
        beta_node: if beta_faults {
            faults(bad_b)
        } else {
            String::new()
        },
        ..PairExtras::default()
    };
    let pair = pair_with_late_beta_faults(
        PairOpts {
            disk_size: size,
            protocol: Some("A"),
            heartbeat_ms: Some(QUICK_HEARTBEAT),
            ..PairOpts::default()
        },
        |_, faulty| extras(faulty),
        "beta back with a failing range",
    );

    let mut c = client(&pair.alpha);
    let e = c
        .write(bad_a.0 + BLOCK, &random(64 * KIB, 1))
        .expect("write into alpha's failing range");
    assert_eq!(
        e, 5,
        "a write whose local part failed under protocol A: EIO"
    );
    pair.alpha
        .wait_status("alpha diskless", Duration::from_secs(10), |s| {
            s["disk"] == "diskless"
        });

    // A write beta can take: answered with success, and on beta's disk.
    let fine = vec![(MIB, random(128 * KIB, 2))];
    let e = c
        .write(fine[0].0, &fine[0].1)
        .expect("write through diskless alpha");
    assert_eq!(e, 0, "a write beta holds");
    let mut model = Model::default();
    model.apply(&fine);
    assert_file_matches("beta's disk", &pair.beta.disk, &model, &ranges(&fine));

    // A write beta's disk refuses: it exists nowhere, so it must not be answered with success.
    let e = c
        .write(bad_b.0 + BLOCK, &random(64 * KIB, 3))
        .expect("write into beta's failing range");
    assert_ne!(
        e, 0,
        "alpha (diskless, protocol A) answered success for a write its peer failed"
    );
    c.disconnect();
}

/// The peer confirms a write once it is in its page cache. Should it crash before writing
/// it back, the write is gone from its disk: the primary must mark what no flush of the
/// peer's disk covered when the link is lost, and copy it when the peer returns. Beta's
/// flushes never finish here, so nothing it confirmed ever becomes stable.
#[test]
fn writes_the_peer_never_flushed_are_resynced_after_it_dies() {
    let _g = shared();
    let size = 32 * MIB;
    let extras = |faulty: bool| PairExtras {
        beta_node: if faulty {
            "disk_faults = \"ops=flush,mode=hang\"\n".to_string()
        } else {
            String::new()
        },
        ..PairExtras::default()
    };
    let mut pair = pair_with_late_beta_faults(
        quick(size),
        |_, faulty| extras(faulty),
        "beta back with flushes that never finish",
    );
    let a = pair.alpha.status();
    let resynced_before = num(&a, "stats.resynced_bytes_total");
    assert_eq!(num(&a, "out_of_sync_bytes"), 0, "{a:#}");

    // Confirmed by beta (protocol C), never flushed there: no client flush, and any request
    // of alpha's to flush them hangs on beta's disk.
    let writes: Vec<(u64, Vec<u8>)> = (0..8u64)
        .map(|i| (i * 3 * MIB + 64 * KIB, random(64 * KIB, 10 + i)))
        .collect();
    let n: u64 = writes.iter().map(|w| w.1.len() as u64).sum();
    let mut c = client(&pair.alpha);
    for (off, data) in &writes {
        assert_eq!(c.write(*off, data).expect("write"), 0, "write at {off}");
    }
    c.disconnect();
    thread::sleep(Duration::from_millis(1500));
    let a = pair.alpha.status();
    assert_eq!(a["connection"], "connected", "{a:#}");
    assert_eq!(num(&a, "out_of_sync_bytes"), 0, "{a:#}");

    // Beta dies with the writes in its page cache (a power loss would lose them).
    pair.beta.kill();
    let a = pair.alpha.wait_status(
        "alpha marks what beta never flushed",
        Duration::from_secs(10),
        |s| s["connection"] != "connected" && num(s, "out_of_sync_bytes") >= n,
    );
    let slack = writes.len() as u64 * BLOCK;
    assert!(
        num(&a, "out_of_sync_bytes") <= n + slack,
        "only the unflushed writes are marked: {a:#}"
    );

    // Beta returns (without the fault): the resync copies them.
    pair.write_configs_with(&extras(false));
    pair.beta.start();
    let (a, _) = pair.wait_in_sync("beta back", Duration::from_secs(30));
    let copied = num(&a, "stats.resynced_bytes_total") - resynced_before;
    assert!(
        (n..=n + slack).contains(&copied),
        "the resync copied {copied} bytes; {n} were never flushed on beta: {a:#}"
    );
    pair.assert_disks_identical("after beta's return");
}

/// A secondary whose disk stops answering while the node itself answers pings: the
/// primary's writes must not wait for it forever. After `ack_timeout_ms` the primary drops
/// the link, marks what the peer did not confirm, and answers the write.
#[test]
fn a_peer_that_stops_answering_writes_is_dropped() {
    let _g = shared();
    let size = 64 * MIB;
    let stuck = (32 * MIB, MIB);
    let extras = |hang: bool| PairExtras {
        beta_node: if hang {
            format!(
                "disk_faults = \"ranges={}+{},ops=write,mode=hang\"\n",
                stuck.0, stuck.1
            )
        } else {
            String::new()
        },
        ..PairExtras::default()
    };
    let pair = pair_with_late_beta_faults(
        PairOpts {
            disk_size: size,
            heartbeat_ms: Some(QUICK_HEARTBEAT),
            ack_timeout_ms: Some(2000),
            ..PairOpts::default()
        },
        |_, faulty| extras(faulty),
        "beta back with a stuck range",
    );

    let mut c = client(&pair.alpha);
    let t = Instant::now();
    let e = c
        .write(stuck.0 + BLOCK, &random(64 * KIB, 1))
        .expect("a write beta's disk never finishes");
    let took = t.elapsed();
    assert_eq!(e, 0, "alpha's own disk has the write");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "the write was answered after {took:?}; the ack timeout is 2 s"
    );
    assert!(
        log_shows_within(&pair.alpha, "has not answered", Duration::from_secs(5)),
        "alpha did not say why it dropped the link"
    );
    let a = pair.alpha.status();
    assert!(
        num(&a, "out_of_sync_bytes") >= 64 * KIB,
        "the write beta never confirmed is not marked out of sync: {a:#}"
    );
    // Writes elsewhere go on.
    assert_eq!(c.write(MIB, &random(64 * KIB, 2)).expect("write"), 0);
    c.disconnect();
    eprintln!("a write to a peer whose disk hangs was answered after {took:?}");
}

/// A verify that the peer cannot read fails with a reason; the link stays up.
#[test]
fn a_verify_the_peer_cannot_read_fails_and_the_link_stays() {
    let _g = shared();
    let size = 16 * MIB;
    let pair = pair_with_late_beta_faults(
        quick(size),
        |_, faulty| PairExtras {
            beta_node: if faulty {
                format!("disk_faults = \"ranges={}+{},ops=read\"\n", 8 * MIB, MIB)
            } else {
                String::new()
            },
            ..PairExtras::default()
        },
        "beta back with a disk it cannot read in one range",
    );
    let why = assert_refused(pair.alpha.cli(&["verify"]), "could not read");
    eprintln!("verify against an unreadable peer: {why}");
    let a = pair.alpha.status();
    assert!(linked(&a), "the link went down with the verify: {a:#}");
}

/// A pair with `auto_promote = true` and an `on_peer_lost` handler that records its runs.
fn disconnect_pair() -> Pair {
    Pair::up_with(quick(16 * MIB), |p| PairExtras {
        sections: format!(
            "{}\n{}",
            failover_section(true, "disconnect"),
            handlers_section(&[("on_peer_lost", record_handler(&p.path("")))])
        ),
        ..PairExtras::default()
    })
}

/// Polls both nodes for `period`; returns how many polls saw each linked, and the last
/// statuses.
fn watch_links(pair: &Pair, period: Duration) -> (u32, u32, Value, Value) {
    let end = Instant::now() + period;
    let (mut na, mut nb) = (0, 0);
    loop {
        let (a, b) = (pair.alpha.status(), pair.beta.status());
        na += u32::from(linked(&a));
        nb += u32::from(linked(&b));
        if Instant::now() >= end {
            return (na, nb, a, b);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// After the disconnect: writes on alpha, `connect` on `who`, and the resync brings beta
/// up to date with only what changed.
fn reconnect_and_check(pair: &Pair, who: &PairNode) {
    let writes = vec![(3 * MIB, random(128 * KIB, 0xd15c))];
    write_blocks(&pair.alpha, &writes);
    let a = pair.alpha.status();
    assert!(
        num(&a, "out_of_sync_bytes") >= 128 * KIB,
        "alpha wrote while disconnected but marks nothing: {a:#}"
    );
    who.cli(&["connect"]).ok();
    let (a, b) = pair.wait_in_sync("after connect", Duration::from_secs(30));
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_eq!(b["role"], "secondary", "{b:#}");
    flush_export(&pair.alpha);
    pair.assert_disks_identical("after the reconnect");
}

#[test]
fn operator_disconnect_of_the_primary_is_no_failover() {
    let _g = shared();
    let pair = disconnect_pair();
    let timeout = Duration::from_millis(QUICK_HEARTBEAT.1);
    pair.alpha.cli(&["disconnect"]).ok();
    // Several heartbeat timeouts: beta must not take over, though auto_promote is on.
    let (na, nb, a, b) = watch_links(&pair, timeout * 4);
    assert_eq!(
        (na, nb),
        (0, 0),
        "the link came up after the operator's disconnect\nalpha: {a:#}\nbeta: {b:#}"
    );
    assert_eq!(a["connection"], "standalone", "{a:#}");
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_eq!(
        b["role"],
        "secondary",
        "BUG: `twinbd disconnect` on the primary made the standby promote itself \
         (auto_promote = true): two primaries without any failure, although an operator's \
         disconnect is documented to trigger no automatic failover. beta's log: {}\nbeta: {b:#}",
        pair.beta
            .log()
            .lines()
            .filter(|l| l.contains("failover") || l.contains("promoted"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    reconnect_and_check(&pair, &pair.alpha);
}

#[test]
fn operator_disconnect_of_the_standby_keeps_the_link_down() {
    let _g = shared();
    let pair = disconnect_pair();
    let timeout = Duration::from_millis(QUICK_HEARTBEAT.1);
    let (alpha_log, beta_log) = (handler_log(&pair, "alpha"), handler_log(&pair, "beta"));
    pair.beta.cli(&["disconnect"]).ok();
    let (na, nb, a, b) = watch_links(&pair, timeout * 5);
    let (la, lb) = (read_lines(&alpha_log), read_lines(&beta_log));
    let ups = pair
        .alpha
        .log()
        .lines()
        .filter(|l| l.contains("peer link up"))
        .count();
    assert!(
        na == 0 && nb == 0 && la.len() == 1 && lb.len() == 1,
        "BUG: after `twinbd disconnect` on beta, alpha's status showed the link up in {na} of \
         its polls ({ups} \"peer link up\" lines in its log in all) and its on_peer_lost handler \
         ran {} times in {:?}: beta (the node that accepts the peer's connections) still \
         completes peer handshakes while its link is disabled, so alpha reconnects, hears \
         nothing for timeout_ms, loses the link again, and so on\nalpha's handler runs: {la:?}\n\
         beta's handler runs: {lb:?}\nalpha: {a:#}\nbeta: {b:#}",
        la.len(),
        timeout * 5
    );
    assert_eq!(la, [format!("peer_lost {RESOURCE} alpha primary beta")]);
    assert_eq!(lb, [format!("peer_lost {RESOURCE} beta secondary alpha")]);
    assert_eq!(b["connection"], "standalone", "{b:#}");
    assert_eq!(b["role"], "secondary", "{b:#}");
    reconnect_and_check(&pair, &pair.beta);
}

//! Replication tests: two real `twinbd` daemons ("alpha" and "beta") on loopback, driven
//! through the CLI, written to through NBD by real clients (qemu-io, nbdcopy, fio), with
//! faults injected by killing daemons, by a wrong secret or a too small disk, and by a proxy
//! on the peer link that can go silent, cut the connections, or flip a bit.
//!
//! The checks are on what an operator can see: `status --json` on both nodes, the daemons'
//! logs, and the backing disk files, which must end up byte for byte identical.
//!
//! Every test runs its own pair in its own temporary directory with its own ports, so tests
//! run in parallel; the heartbeat test measures timing and therefore runs alone. Every wait
//! has a deadline, and dropping a pair stops its daemons even when a test panics. A missing
//! tool skips a test with a `SKIPPED:` line, except under `CI=true`, where it fails.

mod common;

use std::fs;
use std::io::Write;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

// ------------------------------------------------------------------------------------------
// Shared helpers
// ------------------------------------------------------------------------------------------

/// Tests that measure timing take this exclusively; all others share it.
static TIMING: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    TIMING.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    TIMING.write().unwrap_or_else(|p| p.into_inner())
}

/// Bitmap granularity of metadata made by `create-md` (bytes per bit).
const GRANULARITY: u64 = 4096;

/// One pattern write: `len` bytes of `pattern` at `offset`.
#[derive(Debug, Clone, Copy)]
struct PatternWrite {
    offset: u64,
    len: u64,
    pattern: u8,
}

impl PatternWrite {
    fn write_cmd(&self) -> String {
        format!(
            "write -P {:#04x} {} {}",
            self.pattern, self.offset, self.len
        )
    }

    fn read_cmd(&self) -> String {
        format!("read -P {:#04x} {} {}", self.pattern, self.offset, self.len)
    }
}

/// Writes `writes` in order through the export, then flushes.
fn write_patterns(uri: &str, writes: &[PatternWrite]) {
    let mut cmds: Vec<String> = writes.iter().map(PatternWrite::write_cmd).collect();
    cmds.push("flush".into());
    qemu_io(uri, &cmds);
}

/// `count` writes of `len` bytes spread over a device of `size` bytes, one per equal slot,
/// at 4 KiB aligned offsets that move within their slots, with distinct patterns.
fn scattered(count: u64, len: u64, size: u64, first_pattern: u8) -> Vec<PatternWrite> {
    let slot = size / count;
    assert!(slot >= len + 16 * 4096, "slots too small for the writes");
    (0..count)
        .map(|i| PatternWrite {
            offset: i * slot + (i * 37 % 16) * 4096,
            len,
            pattern: first_pattern.wrapping_add(i as u8),
        })
        .collect()
}

/// Asserts a disk file holds each write's pattern (later writes win where they overlap:
/// only the bytes no later write covers are checked).
/// Bytes of the device covered by `writes` once each is widened to whole `unit`s (counted
/// once where they overlap), plus the `extra` units given by their first byte.
fn covered(writes: &[&PatternWrite], unit: u64, extra: &[u64]) -> u64 {
    let mut units: std::collections::BTreeSet<u64> = extra.iter().copied().collect();
    for w in writes {
        units.extend(w.offset / unit..(w.offset + w.len).div_ceil(unit));
    }
    units.len() as u64 * unit
}

fn assert_disk_has(what: &str, disk: &std::path::Path, writes: &[PatternWrite]) {
    for (i, w) in writes.iter().enumerate() {
        let got = read_at(disk, w.offset, w.len as usize);
        for (j, b) in got.iter().enumerate() {
            let at = w.offset + j as u64;
            let overwritten = writes[i + 1..]
                .iter()
                .any(|l| l.offset <= at && at < l.offset + l.len);
            if !overwritten && *b != w.pattern {
                panic!(
                    "{what}: {} holds {b:#04x} at byte {at}, expected {:#04x} from {w:?}",
                    disk.display(),
                    w.pattern
                );
            }
        }
    }
}

/// Polls both nodes every 50 ms for `period`: the link must never come up.
fn assert_never_linked(pair: &Pair, period: Duration, why: &str) -> (Value, Value) {
    let end = Instant::now() + period;
    loop {
        let (a, b) = (pair.alpha.status(), pair.beta.status());
        assert!(
            !linked(&a) && !linked(&b),
            "{why}: the link came up\nalpha: {a:#}\nbeta: {b:#}"
        );
        if Instant::now() >= end {
            return (a, b);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `node`'s status every 20 ms from `t0` on until its connection is no longer
/// "connected"; returns how long after `t0` that was first seen.
fn time_until_link_lost(node: &PairNode, t0: Instant, limit: Duration) -> Duration {
    loop {
        let st = node.status();
        let seen = t0.elapsed();
        if st["connection"] != "connected" {
            return seen;
        }
        assert!(
            seen < limit,
            "{}: still connected {seen:?} after the network went silent: {st:#}",
            node.name
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Blackholes the proxy and measures, on both nodes at once, how long each takes to notice.
fn blackhole_and_measure(pair: &Pair) -> (Duration, Duration) {
    let limit = Duration::from_secs(10);
    let proxy = pair.proxy();
    let (alpha, beta) = (&pair.alpha, &pair.beta);
    thread::scope(|s| {
        let t0 = Instant::now();
        proxy.set_blackhole(true);
        let a = s.spawn(move || time_until_link_lost(alpha, t0, limit));
        let b = s.spawn(move || time_until_link_lost(beta, t0, limit));
        (
            a.join().expect("alpha's poller"),
            b.join().expect("beta's poller"),
        )
    })
}

/// Writes a file of `len` deterministic random bytes.
fn random_file(path: &std::path::Path, len: u64, seed: u64) {
    let mut f = fs::File::create(path).expect("create image");
    let mut rng = SplitMix::new(seed);
    let mut chunk = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill(&mut chunk[..n]);
        f.write_all(&chunk[..n]).expect("write image");
        left -= n as u64;
    }
    f.sync_all().expect("sync image");
}

/// Runs fio against `uri` with `args`; returns its JSON report's first job.
fn fio(dir: &std::path::Path, name: &str, uri: &str, args: &[&str]) -> Value {
    let json = dir.join(format!("{name}.json"));
    let mut cmd = tool("fio");
    cmd.current_dir(dir)
        .arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args([
            "--output-format=json",
            "--randrepeat=1",
            "--randseed=424242",
        ])
        .arg(format!("--output={}", json.display()))
        .args(args);
    let out = run(&mut cmd, Duration::from_secs(120));
    let report = fs::read_to_string(&json).unwrap_or_default();
    assert!(out.success(), "fio {name} failed: {out}\nreport:\n{report}");
    assert!(
        !out.all().to_lowercase().contains("verify"),
        "fio {name} reported verification problems: {out}"
    );
    let v: Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("fio {name} JSON report ({e}): {report}"));
    let job = v["jobs"][0].clone();
    assert_eq!(job["error"], 0, "fio {name}: {job:#}");
    job
}

/// Waits until alpha is connected with no resync running and nothing out of sync. Returns
/// alpha's last status if that does not happen within `timeout`, or as soon as alpha has
/// shown "connected", no resync and bytes out of sync for `stuck` on end (a state in which
/// nothing would ever copy those bytes).
fn recovers(pair: &Pair, timeout: Duration, stuck: Duration) -> Result<(), Value> {
    let deadline = Instant::now() + timeout;
    let mut stuck_since: Option<Instant> = None;
    loop {
        let st = pair.alpha.status();
        let idle = st["connection"] == "connected" && st["resync"].is_null();
        if idle && st["out_of_sync_bytes"] == 0 {
            return Ok(());
        }
        if idle {
            let since = *stuck_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= stuck {
                return Err(st);
            }
        } else {
            stuck_since = None;
        }
        if Instant::now() >= deadline {
            return Err(st);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Starts fio writing 64 KiB blocks at random through alpha's export until
/// [`stop_write_load`] (an upper bound of a minute keeps a forgotten load from running on).
fn start_write_load(pair: &Pair, name: &str, iodepth: u32) -> Background {
    let size = pair.opts.disk_size;
    let load = Background::spawn(
        tool("fio")
            .current_dir(pair.path(""))
            .arg(format!("--name={name}"))
            .args(["--ioengine=nbd", "--rw=randwrite", "--bs=64k"])
            .arg(format!("--iodepth={iodepth}"))
            .args(["--time_based", "--runtime=60"])
            .arg(format!("--size={size}"))
            .arg(format!("--uri={}", pair.alpha.uri())),
        &pair.path(name),
    );
    pair.alpha.wait_status(
        &format!("{name}: fio connected"),
        Duration::from_secs(10),
        |s| num(s, "stats.nbd_clients") > 0,
    );
    load
}

/// Stops the load (Ctrl-C: fio ends its jobs cleanly), then flushes the export from a fresh
/// client. While the link is up, the flush returns only once beta holds every earlier write,
/// which protocols A and B acknowledge before beta has them.
fn stop_write_load(pair: &Pair, load: Background) {
    load.interrupt();
    let out = load.wait(Duration::from_secs(60));
    // Stopped by a signal, fio may exit with 128 even though every job ended without error;
    // the jobs' own error codes ("err= 0") are what tells.
    let stopped = out.success() || out.stdout.contains("terminating on signal");
    let job_errors = out
        .stdout
        .lines()
        .filter(|l| l.contains("err=") && !l.contains("err= 0"))
        .count();
    assert!(
        stopped && out.stdout.contains("err= 0") && job_errors == 0 && out.stderr.trim().is_empty(),
        "the write load failed: {out}"
    );
    pair.alpha
        .wait_status("the load's NBD client gone", Duration::from_secs(10), |s| {
            num(s, "stats.nbd_clients") == 0
        });
    let mut c = match RawNbd::connect(pair.alpha.nbd, RESOURCE) {
        Ok(Ok(c)) => c,
        Ok(Err((code, msg))) => panic!("alpha refused an NBD client ({code:#x}): {msg}"),
        Err(e) => panic!("NBD handshake with alpha failed: {e}"),
    };
    assert_eq!(c.flush().expect("flush request"), 0, "flush after the load");
    c.disconnect();
}

/// The status checks every settled pair must pass: alpha primary, beta secondary, and each
/// sees the other's role.
fn assert_roles(a: &Value, b: &Value) {
    assert_eq!(a["role"], "primary", "alpha: {a:#}");
    assert_eq!(a["peer"]["name"], "beta", "alpha: {a:#}");
    assert_eq!(a["peer"]["role"], "secondary", "alpha: {a:#}");
    assert_eq!(b["role"], "secondary", "beta: {b:#}");
    assert_eq!(b["peer"]["name"], "alpha", "beta: {b:#}");
    assert_eq!(b["peer"]["role"], "primary", "beta: {b:#}");
}

// ------------------------------------------------------------------------------------------
// 1. Replicated writes from real clients
// ------------------------------------------------------------------------------------------

#[test]
fn replicated_writes_land_on_both_disks() {
    if !require_all(&["qemu-io", "nbdcopy", "fio"]) {
        return;
    }
    let _g = shared();
    let size = 64 * MIB;
    let mut pair = Pair::up(PairOpts {
        disk_size: size,
        ..PairOpts::default()
    });
    let (a, b) = pair.wait_in_sync("before the writes", Duration::from_secs(5));
    assert_roles(&a, &b);
    assert_eq!(num(&a, "size_bytes"), size, "{a:#}");
    assert_eq!(num(&b, "size_bytes"), size, "{b:#}");
    let writes_before = num(&a, "stats.replicated_writes_total");
    let uri = pair.alpha.uri();

    // What the device must hold afterwards, except the fio region (fio's data is its own).
    let mut model = vec![0u8; size as usize];
    let fio_region = (32 * MIB, 48 * MIB);

    // (a) nbdcopy: 32 MiB of random data over the start of the device.
    let image = pair.path("image.raw");
    random_file(&image, 32 * MIB, 0x7265_706c_0001);
    run(
        tool("nbdcopy").arg("--flush").arg(&image).arg(&uri),
        CMD_TIMEOUT,
    )
    .ok();
    model[..32 * MIB as usize].copy_from_slice(&fs::read(&image).expect("read image"));

    // (b) fio: 4 KiB random writes over [32 MiB, 48 MiB), each verified by reading it back.
    let job = fio(
        pair.alpha.path("").as_path(),
        "randwrite",
        &uri,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--offset={}", fio_region.0),
            &format!("--size={}", fio_region.1 - fio_region.0),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
    );
    let fio_writes = job["write"]["total_ios"].as_u64().expect("fio total_ios");
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(fio_region.1 - fio_region.0),
        "fio should cover its whole region: {job:#}"
    );

    // (c) qemu-io: pattern writes at many offsets, aligned and not, overlapping, the last
    // block and the last bytes of the device included.
    let mut writes = vec![
        PatternWrite {
            offset: 0,
            len: 4096,
            pattern: 0x11,
        },
        PatternWrite {
            offset: 7 * 4096 + 512,
            len: 65536,
            pattern: 0x22,
        },
        PatternWrite {
            offset: MIB + 1,
            len: 3000,
            pattern: 0x33,
        },
        PatternWrite {
            offset: 5 * MIB,
            len: MIB,
            pattern: 0x44,
        },
        PatternWrite {
            offset: 5 * MIB + 4096,
            len: 8192,
            pattern: 0x45,
        },
        PatternWrite {
            offset: 31 * MIB,
            len: MIB,
            pattern: 0x55,
        },
        PatternWrite {
            offset: 48 * MIB,
            len: 256 * 1024,
            pattern: 0x66,
        },
        PatternWrite {
            offset: 50 * MIB + 123,
            len: 77777,
            pattern: 0x67,
        },
        PatternWrite {
            offset: size - 4 * MIB,
            len: 2 * MIB,
            pattern: 0x68,
        },
        PatternWrite {
            offset: size - 4096,
            len: 4096,
            pattern: 0x77,
        },
        PatternWrite {
            offset: size - 512,
            len: 512,
            pattern: 0x78,
        },
    ];
    for i in 0..24u64 {
        let offset = (i * 2_654_435 + 4096) % (size - 65536) / 512 * 512;
        let len = 512 * (1 + i % 16);
        if offset + len > fio_region.0 && offset < fio_region.1 {
            continue;
        }
        writes.push(PatternWrite {
            offset,
            len,
            pattern: 0x80 + i as u8,
        });
    }
    write_patterns(&uri, &writes);
    for w in &writes {
        model[w.offset as usize..(w.offset + w.len) as usize].fill(w.pattern);
    }
    // The last pattern of every byte reads back through the export.
    let reads: Vec<String> = writes
        .iter()
        .enumerate()
        .filter(|(i, w)| {
            !writes[i + 1..]
                .iter()
                .any(|l| l.offset < w.offset + w.len && w.offset < l.offset + l.len)
        })
        .map(|(_, w)| w.read_cmd())
        .collect();
    qemu_io(&uri, &reads);

    let (a, b) = pair.wait_in_sync("after the writes", Duration::from_secs(30));
    assert_roles(&a, &b);
    let replicated = num(&a, "stats.replicated_writes_total") - writes_before;
    let minimum = writes.len() as u64 + fio_writes;
    assert!(
        replicated >= minimum,
        "alpha counted {replicated} replicated writes; qemu-io and fio alone made {minimum}: {a:#}"
    );

    // Both disks hold the same bytes, and they are what the clients wrote.
    pair.alpha.assert_alive("after the writes");
    pair.beta.assert_alive("after the writes");
    pair.assert_disks_identical("after nbdcopy, fio and qemu-io");
    let beta_disk = fs::read(&pair.beta.disk).expect("read beta's disk");
    let outside_fio = |v: &[u8]| -> Vec<u8> {
        let mut v = v.to_vec();
        v.drain(fio_region.0 as usize..fio_region.1 as usize);
        v
    };
    assert_same_bytes(
        "beta's disk outside the fio region, against what the clients wrote",
        &outside_fio(&beta_disk),
        &outside_fio(&model),
    );
    // Reading through the export gives the same bytes as well.
    let download = pair.path("download.raw");
    run(tool("nbdcopy").arg(&uri).arg(&download), CMD_TIMEOUT).ok();
    assert_same_files(
        "the export's content against beta's disk",
        &pair.beta.disk,
        &download,
    );
    eprintln!(
        "replicated writes: {replicated} (qemu-io {}, fio {fio_writes})",
        writes.len()
    );
}

// ------------------------------------------------------------------------------------------
// 2. A returning secondary gets only what changed
// ------------------------------------------------------------------------------------------

#[test]
fn bitmap_resync_copies_only_changes() {
    if !require("qemu-io") {
        return;
    }
    let _g = shared();
    let size = 32 * MIB;
    let mut pair = Pair::up(PairOpts {
        disk_size: size,
        ..PairOpts::default()
    });
    let (a, _) = pair.wait_in_sync("after the initial sync", Duration::from_secs(5));
    let resynced_before = num(&a, "stats.resynced_bytes_total");
    assert!(
        resynced_before >= size,
        "the initial full sync copied only {resynced_before} of {size} bytes: {a:#}"
    );

    // Beta dies without a word; alpha notices and writes on alone.
    pair.beta.kill();
    pair.alpha.wait_status(
        "connection connecting after beta died",
        Duration::from_secs(10),
        |s| s["connection"] == "connecting",
    );
    let writes = scattered(32, 256 * 1024, size, 0x40);
    let n: u64 = writes.iter().map(|w| w.len).sum();
    assert_eq!(n, 8 * MIB);
    write_patterns(&pair.alpha.uri(), &writes);
    let a = pair.alpha.status();
    let oos = num(&a, "out_of_sync_bytes");
    let slack = writes.len() as u64 * GRANULARITY;
    assert!(
        (n..=n + slack).contains(&oos),
        "alpha should have {n} bytes out of sync (up to {slack} more for granularity), has {oos}: {a:#}"
    );

    // Beta returns: only the changed blocks travel.
    pair.beta.start();
    let (a, b) = pair.wait_in_sync("after beta returned", Duration::from_secs(30));
    assert_roles(&a, &b);
    let copied = num(&a, "stats.resynced_bytes_total") - resynced_before;
    eprintln!(
        "bitmap resync: wrote {n} bytes while apart, {oos} out of sync, resync copied {copied}"
    );
    assert!(
        (n..=n + slack).contains(&copied),
        "the resync after beta's return copied {copied} bytes; {n} changed (at most {slack} more \
         for granularity), the device is {size}: {a:#}"
    );
    let beta_copied = num(&b, "stats.resynced_bytes_total");
    assert!(
        (n..=n + slack).contains(&beta_copied),
        "beta received {beta_copied} resync bytes, {n} changed: {b:#}"
    );
    pair.assert_disks_identical("after the bitmap resync");
    assert_disk_has("beta after the bitmap resync", &pair.beta.disk, &writes);
}

// ------------------------------------------------------------------------------------------
// 3. The primary restarts (crash, then clean) while the secondary is away
// ------------------------------------------------------------------------------------------

#[test]
fn primary_restart_while_secondary_away() {
    if !require("qemu-io") {
        return;
    }
    let _g = shared();
    let size = 32 * MIB;
    let mut pair = Pair::up(PairOpts {
        disk_size: size,
        ..PairOpts::default()
    });
    pair.beta.stop(Duration::from_secs(20));
    pair.alpha.wait_status(
        "connection connecting after beta stopped",
        Duration::from_secs(10),
        |s| s["connection"] == "connecting",
    );
    let writes = scattered(32, 256 * 1024, size, 0x90);
    let n: u64 = writes.iter().map(|w| w.len).sum();
    let (first, second) = writes.split_at(16);
    let n1: u64 = first.iter().map(|w| w.len).sum();

    // First half, then alpha crashes: every acknowledged write must be out of sync. Writes
    // made without the peer set their bits in memory, covered by the activity log's 4 MiB
    // extents, which a crash marks whole: at most those extents.
    write_patterns(&pair.alpha.uri(), first);
    pair.alpha.kill();
    pair.alpha.start();
    let a = pair.alpha.status();
    assert_eq!(
        a["role"], "secondary",
        "a node always starts secondary: {a:#}"
    );
    assert_eq!(a["disk"], "up_to_date", "{a:#}");
    let oos = num(&a, "out_of_sync_bytes");
    let extent = 4 * MIB;
    let first_extents: Vec<u64> = first
        .iter()
        .flat_map(|w| w.offset / extent..(w.offset + w.len).div_ceil(extent))
        .collect();
    let crash_bound = covered(&[], extent, &first_extents);
    assert!(
        (n1..=crash_bound).contains(&oos),
        "after a crash alpha's bitmap should hold the {n1} bytes acknowledged before it, \
         at most their {crash_bound} bytes of activity-log extents; holds {oos}: {a:#}"
    );
    // What alpha may hold from here on: those extents and the second half's blocks.
    let first_blocks: Vec<u64> = first_extents
        .iter()
        .flat_map(|e| e * extent / GRANULARITY..(e + 1) * extent / GRANULARITY)
        .collect();
    let bound = covered(
        &second.iter().collect::<Vec<_>>(),
        GRANULARITY,
        &first_blocks,
    );
    let out = pair.alpha.promote(false);
    assert!(
        out.success(),
        "promote without --force refused although the disk is up to date: {out}"
    );

    // Second half, then a clean restart.
    write_patterns(&pair.alpha.uri(), second);
    pair.alpha.stop(Duration::from_secs(20));
    pair.alpha.start();
    let a = pair.alpha.status();
    assert_eq!(a["disk"], "up_to_date", "{a:#}");
    let oos = num(&a, "out_of_sync_bytes");
    assert!(
        (n..=bound).contains(&oos),
        "after a clean restart alpha's bitmap should hold the {n} bytes written while beta was \
         away (at most {bound} with the crash's extents), holds {oos}: {a:#}"
    );
    let out = pair.alpha.promote(false);
    assert!(
        out.success(),
        "promote without --force refused although the disk is up to date: {out}"
    );
    let a = pair.alpha.status();
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_eq!(
        num(&a, "out_of_sync_bytes"),
        oos,
        "promotion changed the bitmap: {a:#}"
    );
    // The data written before both restarts reads back from alpha.
    let reads: Vec<String> = writes.iter().map(PatternWrite::read_cmd).collect();
    qemu_io(&pair.alpha.uri(), &reads);

    // Beta returns to a primary that restarted twice: still only the changes travel.
    pair.beta.start();
    let (a, b) = pair.wait_in_sync("after beta returned", Duration::from_secs(30));
    assert_roles(&a, &b);
    let copied = num(&a, "stats.resynced_bytes_total");
    eprintln!(
        "resync after primary restarts: {n} bytes written while apart, resync copied {copied}"
    );
    assert!(
        (n..=bound).contains(&copied),
        "the resync copied {copied} bytes; {n} changed (at most {bound} with the crash's \
         extents), the device is {size}: {a:#}"
    );
    pair.assert_disks_identical("after the resync");
    assert_disk_has("beta after the resync", &pair.beta.disk, &writes);
}

// ------------------------------------------------------------------------------------------
// 4. A corrupted frame is never applied
// ------------------------------------------------------------------------------------------

#[test]
fn corrupted_frame_is_never_applied() {
    if !require("qemu-io") {
        return;
    }
    let _g = shared();
    let size = 32 * MIB;
    let pair = Pair::up(PairOpts {
        disk_size: size,
        proxy: true,
        ..PairOpts::default()
    });
    let proxy = pair.proxy();
    let (a, _) = pair.wait_in_sync("before the corruption", Duration::from_secs(5));
    let resynced_before = num(&a, "stats.resynced_bytes_total");

    // The next write of at least 64 KiB reaches beta with one bit flipped in its data, and
    // the proxy refuses new connections from then on, so beta's disk can be inspected
    // before any resync repairs it.
    proxy.corrupt_next_write(64 * 1024, true);
    let writes: Vec<PatternWrite> = (0..4u64)
        .map(|i| PatternWrite {
            offset: (2 + 4 * i) * MIB,
            len: MIB,
            pattern: 0xa1 + i as u8,
        })
        .collect();
    let n: u64 = writes.iter().map(|w| w.len).sum();
    write_patterns(&pair.alpha.uri(), &writes);
    let corruptions = proxy.corruptions();
    assert_eq!(
        corruptions.len(),
        1,
        "the proxy should have corrupted exactly one write: {corruptions:?}"
    );
    let c = corruptions[0];
    eprintln!("corrupted: {c:?}");
    let hit = writes
        .iter()
        .find(|w| w.offset <= c.write_offset && c.write_offset + c.data_len <= w.offset + w.len)
        .unwrap_or_else(|| panic!("the corrupted write {c:?} is none of {writes:?}"));

    // The link went down, and beta says why.
    let line = wait_log_line(&pair.beta, &["checksum"], Duration::from_secs(10));
    eprintln!("beta: {line}");
    pair.alpha.wait_status(
        "the link down after the corruption",
        Duration::from_secs(10),
        |s| !linked(s),
    );
    pair.beta.wait_status(
        "the link down after the corruption",
        Duration::from_secs(10),
        |s| !linked(s),
    );

    // Beta never applied the corrupted write: its range still holds the old (zero) bytes.
    let on_beta = read_at(&pair.beta.disk, c.write_offset, c.data_len as usize);
    let bad = hit.pattern ^ c.mask;
    assert_ne!(
        on_beta[c.byte_in_data as usize],
        bad,
        "beta wrote the corrupted byte {bad:#04x} at {} to its disk",
        c.write_offset + c.byte_in_data
    );
    assert_same_bytes(
        "beta's copy of the range of the corrupted write (never applied: still zero)",
        &on_beta,
        &vec![0u8; c.data_len as usize],
    );
    // Alpha answered the client and knows beta lacks every write since.
    let a = pair.alpha.status();
    let oos = num(&a, "out_of_sync_bytes");
    let slack = writes.len() as u64 * GRANULARITY;
    assert!(
        (n..=n + slack).contains(&oos),
        "alpha should have the {n} bytes written since the corruption out of sync, has {oos}: {a:#}"
    );

    // The network heals: the link comes back and the bitmap resync repairs beta.
    proxy.set_refuse(false);
    let (a, b) = pair.wait_in_sync("after the link returned", Duration::from_secs(30));
    assert_roles(&a, &b);
    let copied = num(&a, "stats.resynced_bytes_total") - resynced_before;
    assert!(
        (n..=n + slack).contains(&copied),
        "the resync after the corruption copied {copied} bytes, {n} were out of sync: {a:#}"
    );
    assert_eq!(proxy.corruptions().len(), 1, "a second corruption happened");
    pair.assert_disks_identical("after the corruption was repaired");
    assert_disk_has("beta after the repair", &pair.beta.disk, &writes);
    let reads: Vec<String> = writes.iter().map(PatternWrite::read_cmd).collect();
    qemu_io(&pair.alpha.uri(), &reads);
}

// ------------------------------------------------------------------------------------------
// 5. A peer with the wrong secret is refused
// ------------------------------------------------------------------------------------------

#[test]
fn wrong_secret_is_refused() {
    if !require("qemu-io") {
        return;
    }
    let _g = shared();
    let size = 32 * MIB;
    let mut pair = Pair::new(PairOpts {
        disk_size: size,
        beta_secret: Some("not-the-shared-secret".into()),
        ..PairOpts::default()
    });
    pair.alpha.create_md();
    pair.beta.create_md();
    pair.alpha.start();
    pair.beta.start();
    pair.alpha.promote(true).ok();

    // Alpha serves writes meanwhile and remembers what beta lacks.
    thread::sleep(Duration::from_millis(300));
    let before = num(&pair.alpha.status(), "out_of_sync_bytes");
    let writes = scattered(8, 512 * 1024, size, 0x30);
    let n: u64 = writes.iter().map(|w| w.len).sum();
    write_patterns(&pair.alpha.uri(), &writes);
    let (a, b) = assert_never_linked(&pair, Duration::from_secs(3), "the secrets differ");
    let after = num(&a, "out_of_sync_bytes");
    eprintln!("wrong secret: alpha out of sync {before} before writing {n} bytes, {after} after");
    assert!(
        after >= before + n,
        "alpha's out-of-sync bytes went from {before} to {after} while it wrote {n} bytes to \
         blocks its peer does not have: {a:#}"
    );
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_eq!(b["peer"]["role"], "unknown", "{b:#}");
    for node in [&pair.alpha, &pair.beta] {
        let line = wait_log_line(node, &["authenticat"], Duration::from_secs(5));
        eprintln!("{}: {line}", node.name);
    }
    assert!(
        !fs::read(&pair.beta.disk)
            .expect("read beta's disk")
            .iter()
            .any(|b| *b != 0),
        "beta's disk received data over a link that was never authenticated"
    );

    // With the right secret, beta joins and gets everything.
    pair.beta.stop(Duration::from_secs(20));
    pair.opts.beta_secret = None;
    pair.write_configs();
    pair.beta.start();
    let (a, b) = pair.wait_in_sync("with the right secret", Duration::from_secs(60));
    assert_roles(&a, &b);
    assert!(num(&a, "stats.resynced_bytes_total") >= n, "{a:#}");
    pair.assert_disks_identical("after the resync");
    assert_disk_has("beta after the resync", &pair.beta.disk, &writes);
}

// ------------------------------------------------------------------------------------------
// 6. Heartbeat loss is detected in time, and only when it happens
// ------------------------------------------------------------------------------------------

#[test]
fn heartbeat_loss_is_detected_in_time() {
    if !require("fio") {
        return;
    }
    let _g = exclusive();
    let (interval, timeout) = (100u64, 600u64);
    // A node may have heard its peer up to one interval before the silence began, checks
    // once per interval, and the status poll adds its own latency.
    let earliest = Duration::from_millis(timeout - interval - 50);
    let latest = Duration::from_millis(timeout + interval + 150);
    let size = 32 * MIB;
    let pair = Pair::up(PairOpts {
        disk_size: size,
        heartbeat_ms: Some((interval, timeout)),
        proxy: true,
        ..PairOpts::default()
    });
    let proxy = pair.proxy();
    let check = |what: &str, (a, b): (Duration, Duration)| {
        eprintln!(
            "heartbeat loss detected {what}: alpha after {} ms, beta after {} ms (timeout {timeout} ms, interval {interval} ms)",
            a.as_millis(),
            b.as_millis()
        );
        for (name, t) in [("alpha", a), ("beta", b)] {
            assert!(
                t <= latest,
                "{what}: {name} took {} ms to notice the silent peer; at most {} ms allowed",
                t.as_millis(),
                latest.as_millis()
            );
            assert!(
                t >= earliest,
                "{what}: {name} declared the peer lost after {} ms, before its {timeout} ms timeout could have passed",
                t.as_millis()
            );
        }
    };

    // Idle link.
    pair.wait_in_sync("before the first partition", Duration::from_secs(5));
    check("on an idle link", blackhole_and_measure(&pair));
    proxy.set_blackhole(false);
    pair.wait_in_sync("after the first partition healed", Duration::from_secs(30));

    // Under load: no false alarm while the link is healthy...
    let (a0, _) = pair.wait_in_sync("before the load", Duration::from_secs(5));
    let writes_before = num(&a0, "stats.replicated_writes_total");
    let logged_before = [pair.alpha.log().len(), pair.beta.log().len()];
    let load = start_write_load(&pair, "load", 8);
    pair.alpha
        .wait_status("replicated writes from fio", Duration::from_secs(10), |s| {
            num(s, "stats.replicated_writes_total") > writes_before + 10
        });
    let healthy = Instant::now();
    while healthy.elapsed() < Duration::from_millis(2500) {
        for node in [&pair.alpha, &pair.beta] {
            let st = node.status();
            assert_eq!(
                st["connection"], "connected",
                "{}: the link dropped under load although the network is healthy: {st:#}",
                node.name
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let a1 = pair.alpha.status();
    let during = num(&a1, "stats.replicated_writes_total") - writes_before;
    eprintln!("writes replicated during the healthy load phase: {during}");
    for (node, from) in [&pair.alpha, &pair.beta].into_iter().zip(logged_before) {
        let log = node.log();
        let recent = &log[from..];
        assert!(
            !recent.contains("link lost"),
            "{}: the link was dropped while the network was healthy:\n{recent}",
            node.name
        );
    }

    // ...and a prompt one when the network goes silent under load.
    check("under load", blackhole_and_measure(&pair));
    // Alpha goes on serving the client while its peer is gone.
    let served = num(&pair.alpha.status(), "stats.nbd_requests_total");
    pair.alpha.wait_status(
        "writes completing while the peer is lost",
        Duration::from_secs(10),
        |s| num(s, "stats.nbd_requests_total") > served + 50,
    );
    let a = pair.alpha.status();
    assert!(!linked(&a), "{a:#}");
    assert!(
        num(&a, "out_of_sync_bytes") > 0,
        "alpha wrote without its peer but marks nothing out of sync: {a:#}"
    );
    stop_write_load(&pair, load);
    proxy.set_blackhole(false);
    pair.wait_in_sync(
        "after the partition under load healed",
        Duration::from_secs(30),
    );
    pair.assert_disks_identical("after the load and the partitions");
}

// ------------------------------------------------------------------------------------------
// 7. Protocols A and B
// ------------------------------------------------------------------------------------------

#[test]
fn protocols_a_and_b() {
    if !require("qemu-io") {
        return;
    }
    // Without fio only the load-and-cut phase is skipped (and announced).
    let have_fio = require("fio");
    let _g = shared();
    let size = 16 * MIB;
    for protocol in ["A", "B"] {
        let pair = Pair::up(PairOpts {
            disk_size: size,
            protocol: Some(protocol),
            proxy: true,
            ..PairOpts::default()
        });
        let (a, _) = pair.wait_in_sync("before the writes", Duration::from_secs(5));
        let before = num(&a, "stats.replicated_writes_total");
        let mut writes = scattered(16, 256 * 1024, size, 0x10);
        // Overlapping writes in sequence: the last one must win on beta too.
        for (i, len) in [(0u64, MIB), (1, 4096), (2, 300 * 1024), (3, 512)] {
            writes.push(PatternWrite {
                offset: 3 * MIB + i * 1000,
                len,
                pattern: 0xe0 + i as u8,
            });
        }
        writes.push(PatternWrite {
            offset: size - 4096,
            len: 4096,
            pattern: 0xef,
        });
        write_patterns(&pair.alpha.uri(), &writes);
        let count = writes.len() as u64;
        pair.alpha.wait_status(
            &format!("protocol {protocol}: every write acknowledged by the peer"),
            Duration::from_secs(10),
            |s| num(s, "stats.replicated_writes_total") >= before + count,
        );
        let (a, b) = pair.wait_in_sync(
            &format!("protocol {protocol}: after the writes"),
            Duration::from_secs(30),
        );
        assert_roles(&a, &b);
        pair.assert_disks_identical(&format!("protocol {protocol}"));
        assert_disk_has(
            &format!("protocol {protocol}: beta"),
            &pair.beta.disk,
            &writes,
        );

        // Writes the client already had acknowledged, in flight when the link is cut, must
        // still reach beta (by resync).
        if !have_fio {
            continue;
        }
        // Each round: a deep queue of writes in flight (sent, not yet confirmed by beta), the
        // link cut under it, the load stopped at once (so no later write can overwrite, and so
        // hide, what the cut lost), and then the pair must settle with identical disks.
        const CUTS: u32 = 5;
        for cut in 1..=CUTS {
            let (a, _) = pair.wait_in_sync(
                &format!("protocol {protocol}: before cut {cut}"),
                Duration::from_secs(30),
            );
            let seen = num(&a, "stats.replicated_writes_total");
            let load = start_write_load(&pair, &format!("load-{protocol}-{cut}"), 32);
            pair.alpha.wait_status(
                &format!("protocol {protocol}: writes replicated before cut {cut}"),
                Duration::from_secs(10),
                |s| {
                    s["connection"] == "connected"
                        && num(s, "stats.replicated_writes_total") > seen + 100
                },
            );
            let accepted = pair.proxy().accepted();
            pair.proxy().cut();
            stop_write_load(&pair, load);
            // The link is re-established within milliseconds, faster than a status poll
            // can see it down: the proxy counts the new connections instead.
            wait_until(
                &format!("protocol {protocol}: alpha reconnecting after cut {cut}"),
                Duration::from_secs(10),
                || pair.proxy().accepted() >= accepted + 2,
            );
            // Whatever the cut left unconfirmed must be resynced: nothing may stay out of
            // sync while the link is up.
            if let Err(st) = recovers(&pair, Duration::from_secs(15), Duration::from_secs(2)) {
                assert!(
                    st["connection"] == "connected" && st["resync"].is_null(),
                    "protocol {protocol}: alpha did not recover within 15 s of cut {cut}: {st:#}"
                );
                let diff = differing_blocks(&pair.alpha.disk, &pair.beta.disk, size);
                let differ: u64 = diff.iter().map(|(_, l)| l).sum();
                panic!(
                    "protocol {protocol}, cut {cut}: alpha reconnected at once and reports the \
                     link \"connected\" with no resync running, yet {} bytes have stayed out of \
                     sync for 2 s, and nothing copies them while the link stays up. Beta's disk \
                     differs from alpha's in {differ} bytes ({} runs of 4 KiB blocks, first {:?}) \
                     although every write was flushed: writes acknowledged before the cut are \
                     missing on beta.\nalpha: {st:#}\nbeta: {:#}",
                    st["out_of_sync_bytes"],
                    diff.len(),
                    diff.first(),
                    pair.beta.status()
                );
            }
            let (a, b) = pair.wait_in_sync(
                &format!("protocol {protocol}: after cut {cut}"),
                Duration::from_secs(30),
            );
            assert_roles(&a, &b);
            pair.assert_disks_identical(&format!(
                "protocol {protocol}: after writes in flight were cut (cut {cut})"
            ));
        }
    }
}

// ------------------------------------------------------------------------------------------
// 8. A peer too small to hold a copy is refused
// ------------------------------------------------------------------------------------------

#[test]
fn smaller_peer_is_refused() {
    let _g = shared();
    let (size, small) = (32 * MIB, 24 * MIB);
    let mut pair = Pair::new(PairOpts {
        disk_size: size,
        beta_disk_size: Some(small),
        ..PairOpts::default()
    });
    pair.alpha.create_md();
    pair.beta.create_md();
    pair.alpha.start();
    pair.beta.start();
    pair.alpha.promote(true).ok();
    // Alpha serves a client meanwhile; none of it may reach beta.
    let mut client = match RawNbd::connect(pair.alpha.nbd, RESOURCE) {
        Ok(Ok(c)) => c,
        Ok(Err((code, msg))) => panic!("alpha refused an NBD client ({code:#x}): {msg}"),
        Err(e) => panic!("NBD handshake with alpha failed: {e}"),
    };
    client.write_read_check(MIB, &SplitMix::new(8).bytes(65536));
    assert_eq!(client.flush().expect("flush request"), 0, "flush");
    client.disconnect();
    let (a, b) = assert_never_linked(&pair, Duration::from_secs(3), "beta's disk is smaller");
    assert_eq!(num(&a, "size_bytes"), size, "{a:#}");
    assert_eq!(num(&b, "size_bytes"), small, "{b:#}");
    // The refusal says which sizes did not fit.
    for node in [&pair.alpha, &pair.beta] {
        let line = wait_log_line(
            node,
            &["smaller", &small.to_string()],
            Duration::from_secs(5),
        );
        eprintln!("{}: {line}", node.name);
    }
    pair.alpha.assert_alive("after refusing the peer");
    pair.beta.assert_alive("after being refused");
    let st = pair.beta.status();
    assert_eq!(st["disk"], "inconsistent", "beta never got data: {st:#}");
    assert!(
        !fs::read(&pair.beta.disk)
            .expect("read beta's disk")
            .iter()
            .any(|b| *b != 0),
        "data reached beta's disk over a refused link"
    );
}

// ------------------------------------------------------------------------------------------
// 9. Writes during the initial full sync
// ------------------------------------------------------------------------------------------

#[test]
fn writes_during_full_sync_land_on_both_disks() {
    if !require("qemu-io") {
        return;
    }
    let _g = shared();
    // 16 MiB at 4 MiB/s: the full sync takes about four seconds.
    let size = 16 * MIB;
    let mut pair = Pair::new(PairOpts {
        disk_size: size,
        rate_mb_s: Some(4),
        ..PairOpts::default()
    });
    pair.alpha.create_md();
    pair.beta.create_md();
    pair.alpha.start();
    pair.beta.start();
    let promoted = Instant::now();
    pair.alpha.promote(true).ok();

    // The sync is under way, with progress in the status on both sides.
    let a = pair.alpha.wait_status(
        "a full sync under way (sync_source, some bytes done)",
        Duration::from_secs(10),
        |s| s["connection"] == "sync_source" && s["resync"]["done_bytes"].as_u64() > Some(0),
    );
    assert_eq!(num(&a, "resync.total_bytes"), size, "{a:#}");
    assert!(num(&a, "resync.done_bytes") < size, "{a:#}");
    let b = pair.beta.status();
    assert_eq!(b["connection"], "sync_target", "{b:#}");
    assert_eq!(
        b["disk"], "inconsistent",
        "beta is not up to date before the sync ends: {b:#}"
    );
    assert!(
        b["resync"].is_object(),
        "beta shows no resync progress: {b:#}"
    );
    // The target knows it differs by what is left to copy, though its own bitmap is clean.
    let (b_done, b_total) = (num(&b, "resync.done_bytes"), num(&b, "resync.total_bytes"));
    assert_eq!(b_total, size, "beta's resync total: {b:#}");
    assert_eq!(
        num(&b, "out_of_sync_bytes"),
        b_total - b_done,
        "the sync target's out_of_sync_bytes is not what is left to copy: {b:#}"
    );
    assert!(
        b_done < b_total,
        "beta's sync ended too soon to check: {b:#}"
    );

    // Writes everywhere: into parts already copied and parts not yet copied.
    let mut writes = scattered(16, 64 * 1024, size, 0x20);
    writes.push(PatternWrite {
        offset: size - 4096,
        len: 4096,
        pattern: 0x2f,
    });
    write_patterns(&pair.alpha.uri(), &writes);
    let a = pair.alpha.status();
    assert_eq!(
        a["connection"], "sync_source",
        "the sync ended before the writes did, so this test did not test writes during a sync: {a:#}"
    );
    assert!(a["resync"]["rate_bytes_per_s"].is_u64(), "{a:#}");

    let (a, b) = pair.wait_in_sync("after the full sync", Duration::from_secs(30));
    let took = promoted.elapsed();
    eprintln!("full sync of {size} bytes at rate_mb_s = 4 took {took:?}");
    // The limit holds over the whole sync (a first chunk may go out at once).
    assert!(
        took >= Duration::from_secs(3),
        "a full sync of {size} bytes limited to 4 MiB/s finished after {took:?}"
    );
    assert_roles(&a, &b);
    pair.assert_disks_identical("after writes during the full sync");
    assert_disk_has("beta after the full sync", &pair.beta.disk, &writes);
}

/// With an activity log of 4 extents (16 MiB), a 32 MiB write across 9 extents and trims and
/// zero-writes over the whole device are replicated in pieces the log can hold: each is
/// answered, and both disks end identical.
#[test]
fn requests_larger_than_the_activity_log_are_served() {
    let _g = shared();
    let size = 64 * MIB;
    let pair = Pair::up(PairOpts {
        disk_size: size,
        al_extents: Some(4),
        ..PairOpts::default()
    });
    pair.wait_in_sync("after the initial sync", Duration::from_secs(30));
    let mut c = match RawNbd::connect(pair.alpha.nbd, RESOURCE) {
        Ok(Ok(c)) => c,
        Ok(Err((code, msg))) => panic!("alpha refused the NBD handshake ({code:#x}): {msg}"),
        Err(e) => panic!("NBD handshake with alpha: {e}"),
    };
    let data: Vec<u8> = (0..32 * MIB).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    assert_eq!(c.write(4 * MIB + 4096, &data).expect("32 MiB write"), 0);
    assert_eq!(c.trim(0, size as u32).expect("trim of the device"), 0);
    assert_eq!(c.write(20 * MIB, &data[..MIB as usize]).expect("write"), 0);
    assert_eq!(
        c.write_zeroes(24 * MIB, 40 * MIB as u32)
            .expect("zero-write"),
        0
    );
    assert_eq!(c.flush().expect("flush"), 0);
    eprintln!(
        "large requests against a 4-extent activity log: {:?}",
        t.elapsed()
    );
    c.disconnect();
    pair.wait_in_sync("after the large requests", Duration::from_secs(30));
    pair.assert_disks_identical("after the large requests");
}

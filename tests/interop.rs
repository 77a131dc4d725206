//! Interoperability tests: the real `twinbd` binary, driven through its CLI, serving real NBD
//! clients (libnbd's nbdinfo/nbdcopy/nbdfuse, qemu-io, fio) and a raw protocol client.
//!
//! Every test runs its own daemon in its own temporary directory with its own ports, so the
//! tests run in parallel. Every external command has a deadline. A missing tool skips the
//! test with a `SKIPPED:` line, except under `CI=true`, where it fails the test.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

// ------------------------------------------------------------------------------------------
// Shared checks
// ------------------------------------------------------------------------------------------

/// Asserts every field the interface contract promises in `status --json` is present with the
/// right JSON type.
fn assert_contract_fields(st: &Value) {
    let text = |v: &Value, k: &str| {
        assert!(
            v[k].is_string(),
            "status field {k:?} missing or not a string: {st:#}"
        );
    };
    let num = |v: &Value, k: &str| {
        assert!(
            v[k].is_u64(),
            "status field {k:?} missing or not a number: {st:#}"
        );
    };
    for k in ["resource", "node", "role", "disk", "connection"] {
        text(st, k);
    }
    assert!(st["peer"].is_object(), "status has no peer object: {st:#}");
    for k in ["name", "role", "disk"] {
        text(&st["peer"], k);
    }
    num(st, "size_bytes");
    num(st, "out_of_sync_bytes");
    let resync = st
        .get("resync")
        .unwrap_or_else(|| panic!("status has no resync field: {st:#}"));
    assert!(
        resync.is_null() || resync.is_object(),
        "resync must be null or an object: {st:#}"
    );
    assert!(
        st["stats"].is_object(),
        "status has no stats object: {st:#}"
    );
    for k in [
        "resynced_bytes_total",
        "replicated_writes_total",
        "nbd_clients",
    ] {
        num(&st["stats"], k);
    }
}

/// stderr of a refused command: exactly one non-empty line.
fn one_line_reason(out: &Output) -> String {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected a one-line reason on stderr: {out}"
    );
    lines[0].to_string()
}

/// Reads from `s` until the peer closes; fails if it stays open for `IO_TIMEOUT`.
fn expect_closed(s: &mut TcpStream, what: &str) {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{what}: the server kept the connection open")
            }
            Err(_) => return, // reset: closed as well
        }
        assert!(Instant::now() < deadline, "{what}: the server kept sending");
    }
}

/// Compares the first `len` bytes of two files, a MiB at a time.
fn assert_files_equal(what: &str, a: &Path, b: &Path, len: u64) {
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        assert_same_bytes(
            &format!("{what}, MiB at offset {off}"),
            &read_at(a, off, n),
            &read_at(b, off, n),
        );
        off += n as u64;
    }
}

/// The daemon is alive, answers `status`, has no NBD client left, and a fresh client can
/// write and read back.
fn assert_serving(node: &mut Node, when: &str, seed: u64) {
    node.assert_alive(when);
    let st = node.wait_status(&format!("no NBD clients left {when}"), |s| {
        s["stats"]["nbd_clients"] == 0
    });
    assert_eq!(st["role"], "primary", "{when}: {st:#}");
    let mut c = node.raw_client();
    let data = SplitMix::new(seed).bytes(8192 + 3);
    // Away from the first MiB, which some tests check afterwards.
    c.write_read_check(16 * MIB + seed * 65536 + 1, &data);
    assert_eq!(c.flush().expect("flush request"), 0, "flush {when}");
    c.disconnect();
}

// ------------------------------------------------------------------------------------------
// 1. CLI and roles
// ------------------------------------------------------------------------------------------

#[test]
fn cli_and_roles() {
    let mut node = Node::new(NodeOpts::default());
    node.create_md();

    // create-md refuses to overwrite valid metadata unless forced.
    let out = node.cli(&["create-md"]).failed();
    let reason = one_line_reason(&out);
    assert!(reason.contains("--force"), "create-md refusal: {out}");
    node.cli(&["create-md", "--force"]).ok();

    // A node always starts secondary; fresh metadata is inconsistent.
    node.start();
    let st = node.status();
    assert_contract_fields(&st);
    assert_eq!(st["resource"], RESOURCE, "{st:#}");
    assert_eq!(st["node"], NODE, "{st:#}");
    assert_eq!(st["role"], "secondary", "{st:#}");
    assert_eq!(st["disk"], "inconsistent", "{st:#}");
    assert_eq!(st["connection"], "standalone", "{st:#}");
    assert_eq!(st["peer"]["role"], "unknown", "{st:#}");
    assert_eq!(st["peer"]["disk"], "unknown", "{st:#}");
    assert_eq!(st["size_bytes"], 32 * MIB, "{st:#}");
    assert_eq!(st["out_of_sync_bytes"], 0, "{st:#}");
    assert!(st["resync"].is_null(), "{st:#}");
    assert_eq!(st["stats"]["nbd_clients"], 0, "{st:#}");
    let table = node.cli(&["status"]).ok();
    assert!(
        table.stdout.contains("secondary") && table.stdout.contains("inconsistent"),
        "human status table: {table}"
    );

    // The secondary refuses NBD clients, saying why.
    match RawNbd::connect(node.tcp_addr(), RESOURCE).expect("handshake") {
        Ok(_) => panic!("a secondary accepted an NBD client"),
        Err((code, msg)) => {
            assert_ne!(code & REP_ERR_BIT, 0, "not an error reply");
            assert!(msg.contains("secondary"), "refusal message: {msg:?}");
        }
    }
    if require("nbdinfo") {
        let out = run(
            tool("nbdinfo").arg(node.uri()).env("LIBNBD_DEBUG", "1"),
            CMD_TIMEOUT,
        )
        .failed();
        assert!(
            out.stderr.contains("secondary"),
            "nbdinfo against the secondary should show the server's message: {out}"
        );
    }

    // Promotion of an inconsistent disk needs --force.
    let out = node.cli(&["promote"]).failed();
    let reason = one_line_reason(&out);
    assert!(
        reason.contains("--force")
            && (reason.contains("up to date") || reason.contains("up_to_date")),
        "promote refusal should explain the disk is not up to date and mention --force: {out}"
    );
    assert_eq!(node.status()["role"], "secondary");
    node.promote(true);
    let st = node.status();
    assert_eq!(st["role"], "primary", "{st:#}");
    assert_eq!(st["disk"], "up_to_date", "{st:#}");

    // Restart: clean exit, back as secondary, disk still up to date.
    let exit = node.stop(Duration::from_secs(40));
    assert_eq!(exit.code(), Some(0), "exit status after SIGTERM: {exit}");
    assert!(
        !node.admin.exists(),
        "control socket left behind after a clean shutdown"
    );
    node.start();
    let st = node.status();
    assert_eq!(st["role"], "secondary", "after restart: {st:#}");
    assert_eq!(st["disk"], "up_to_date", "after restart: {st:#}");

    // `events`: the current state first, then the role change of a promotion, which no longer
    // needs --force.
    let mut events = Events::start(&node);
    events.wait_for("the current state (secondary)", |e| {
        e["status"]["role"] == "secondary"
    });
    node.promote(false);
    let ev = events.wait_for("the role change to primary", |e| {
        e["kind"] == "role" && e["status"]["role"] == "primary"
    });
    assert!(ev["ts_ms"].is_u64(), "event without ts_ms: {ev}");
    assert_contract_fields(&ev["status"]);
    drop(events);
    let out = node.cli(&["promote"]).ok();
    assert!(
        out.stdout.contains("already primary"),
        "promote of a primary: {out}"
    );

    // Demotion is refused while a client holds the export open.
    let mut client = node.raw_client();
    let data = SplitMix::new(1).bytes(4096);
    client.write_read_check(0, &data);
    let st = node.wait_status("one NBD client", |s| s["stats"]["nbd_clients"] == 1);
    assert_eq!(st["role"], "primary");
    let out = node.cli(&["demote"]).failed();
    let reason = one_line_reason(&out);
    assert!(
        reason.contains("client") && reason.contains("--force"),
        "demote refusal should name the clients and --force: {out}"
    );
    assert_eq!(
        node.status()["role"],
        "primary",
        "refused demote changed the role"
    );
    client.write_read_check(4096, &data);

    // --force disconnects the client.
    node.cli(&["demote", "--force"]).ok();
    expect_closed(&mut client.s, "client of a force-demoted node");
    drop(client);
    let st = node.wait_status("secondary without NBD clients", |s| {
        s["stats"]["nbd_clients"] == 0
    });
    assert_eq!(st["role"], "secondary", "{st:#}");
    assert_eq!(st["disk"], "up_to_date", "{st:#}");

    bad_configs(&node);
    node.assert_alive("at the end");
}

/// Configuration errors: an unknown key is named with its line; an unknown node lists the
/// nodes that exist.
fn bad_configs(node: &Node) {
    let good = fs::read_to_string(&node.config).expect("read resource file");

    for (table_header, key) in [("[resource]", "frobnicate"), ("[[node]]", "disks")] {
        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        let at = lines
            .iter()
            .position(|l| l.trim() == table_header)
            .expect("table in the resource file")
            + 2;
        lines.insert(at, format!("{key} = \"x\""));
        let line_no = at + 1;
        let bad = node.path(&format!("bad-{key}.toml"));
        fs::write(&bad, lines.join("\n") + "\n").expect("write bad resource file");
        for cmd in [&["status"][..], &["create-md", "--force"][..], &["run"][..]] {
            let mut c = Command::new(TWINBD);
            c.args(cmd).arg("-c").arg(&bad).args(["-n", NODE]);
            let out = run(&mut c, CMD_TIMEOUT).failed();
            let reason = one_line_reason(&out);
            assert!(
                reason.contains(key)
                    && (reason.contains(&format!(":{line_no}:"))
                        || reason.contains(&format!("line {line_no}"))),
                "unknown key {key} on line {line_no} should be named with its line: {out}"
            );
        }
    }

    // Two nodes, and a name that is neither.
    let two = node.path("two.toml");
    fs::write(
        &two,
        format!(
            "{good}\n[[node]]\nname = \"beta\"\ndisk = \"{d}\"\nmeta = \"internal\"\n\
             replication = \"127.0.0.1:{p}\"\nnbd = \"127.0.0.1:{q}\"\nadmin = \"{a}\"\n",
            d = node.path("beta.img").display(),
            p = free_port(),
            q = free_port(),
            a = node.path("beta.sock").display(),
        ),
    )
    .expect("write two-node resource file");
    for cmd in ["status", "promote", "run"] {
        let mut c = Command::new(TWINBD);
        c.arg(cmd).arg("-c").arg(&two).args(["-n", "nosuch"]);
        let out = run(&mut c, CMD_TIMEOUT).failed();
        let reason = one_line_reason(&out);
        assert!(
            reason.contains("nosuch") && reason.contains("alpha") && reason.contains("beta"),
            "unknown node should be answered with the node names: {out}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// 2. nbdinfo
// ------------------------------------------------------------------------------------------

fn check_nbdinfo_export(node: &Node, uri: &str, expect_name: &str) {
    let out = run(tool("nbdinfo").arg("--json").arg(uri), CMD_TIMEOUT).ok();
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json is not JSON ({e}): {out}"));
    assert_eq!(v["protocol"], "newstyle-fixed", "{v:#}");
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{v:#}");
    let e = &exports[0];
    assert_eq!(e["export-name"], expect_name, "{v:#}");
    let size = node.status()["size_bytes"].as_u64().expect("size_bytes");
    assert_eq!(e["export-size"], size, "export size vs status: {v:#}");
    assert_eq!(e["block_size_minimum"], 1, "{v:#}");
    assert_eq!(e["block_size_preferred"], 4096, "{v:#}");
    assert_eq!(e["block_size_maximum"], 33_554_432, "{v:#}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag}: {v:#}");
    }
    assert_eq!(e["is_read_only"], false, "{v:#}");
}

#[test]
fn nbdinfo_json() {
    if !require("nbdinfo") {
        return;
    }
    let tcp = Node::primary(NodeOpts {
        disk_size: 48 * MIB,
        ..NodeOpts::default()
    });
    let unix = Node::primary(NodeOpts {
        disk_size: 48 * MIB,
        internal_meta: true,
        nbd_unix: true,
        ..NodeOpts::default()
    });

    check_nbdinfo_export(&tcp, &tcp.uri(), RESOURCE);
    assert_eq!(tcp.status()["size_bytes"], 48 * MIB, "external metadata");
    // The empty export name works too (the server names its export in the reply).
    let sa = tcp.tcp_addr();
    check_nbdinfo_export(&tcp, &format!("nbd://{sa}"), RESOURCE);
    // The export list names the resource.
    let out = run(
        tool("nbdinfo")
            .args(["--list", "--json"])
            .arg(format!("nbd://{sa}")),
        CMD_TIMEOUT,
    )
    .ok();
    let v: Value = serde_json::from_str(&out.stdout).expect("nbdinfo --list --json");
    assert_eq!(v["exports"][0]["export-name"], RESOURCE, "{v:#}");
    // A name that is not exported is refused.
    run(
        tool("nbdinfo").arg(format!("nbd://{sa}/not-{RESOURCE}")),
        CMD_TIMEOUT,
    )
    .failed();

    check_nbdinfo_export(&unix, &unix.uri(), RESOURCE);
    let size = unix.status()["size_bytes"].as_u64().expect("size");
    assert!(
        (40 * MIB..48 * MIB).contains(&size) && size % 4096 == 0,
        "internal metadata should take a little room at the end: {size}"
    );
}

// ------------------------------------------------------------------------------------------
// 3. qemu-io patterns
// ------------------------------------------------------------------------------------------

/// What the test expects the device to hold.
struct Model {
    bytes: Vec<u8>,
    /// False where the content is unspecified (discarded: old data or zeroes).
    known: Vec<bool>,
    before_discard: BTreeMap<u64, Vec<u8>>,
}

impl Model {
    fn write(&mut self, off: u64, len: u64, byte: u8) {
        let r = off as usize..(off + len) as usize;
        self.bytes[r.clone()].fill(byte);
        self.known[r].fill(true);
    }

    fn discard(&mut self, off: u64, len: u64) {
        let r = off as usize..(off + len) as usize;
        self.before_discard
            .insert(off, self.bytes[r.clone()].to_vec());
        self.known[r].fill(false);
    }

    /// Maximal runs (offset, len, Some(byte)) of one known value, or (offset, len, None) of
    /// unspecified content.
    fn runs(&self) -> Vec<(u64, u64, Option<u8>)> {
        let mut out = Vec::new();
        let mut start = 0usize;
        for i in 1..=self.bytes.len() {
            let split = i == self.bytes.len()
                || self.known[i] != self.known[start]
                || (self.known[i] && self.bytes[i] != self.bytes[start]);
            if split {
                let v = self.known[start].then_some(self.bytes[start]);
                out.push((start as u64, (i - start) as u64, v));
                start = i;
            }
        }
        out
    }
}

#[test]
fn qemu_io_patterns() {
    if !require("qemu-io") {
        return;
    }
    let mut node = Node::primary(NodeOpts::default());
    let size = 32 * MIB;
    let uri = node.uri();
    let mut model = Model {
        bytes: vec![0u8; size as usize],
        known: vec![true; size as usize],
        before_discard: BTreeMap::new(),
    };

    // Varied sizes and alignments, the first and last block and the last byte.
    let writes: &[(u64, u64, u8)] = &[
        (0, 512, 0x11),
        (513, 4095, 0x22),
        (8192, 4096, 0x33),
        (65536 + 4095, 65536, 0x44),
        (MIB, MIB, 0x55),
        (3 * MIB + 513, 3 * MIB, 0x66),
        (7 * MIB + 4095, 4096, 0x77),
        (8 * MIB - 1, 2, 0x78),
        (9 * MIB, 64 * 1024, 0x88),
        (12 * MIB, 2 * MIB, 0x99),
        (16 * MIB, MIB, 0xaa),
        (20 * MIB + 1, 511, 0xbb),
        (size - 3 * MIB - 7, MIB, 0xcc),
        (size - 4096, 4096, 0xdd),
        (size - 1, 1, 0xee),
    ];
    let mut cmds = Vec::new();
    for &(off, len, byte) in writes {
        cmds.push(format!("write -P {byte:#x} {off} {len}"));
        cmds.push(format!("read -P {byte:#x} {off} {len}"));
        model.write(off, len, byte);
    }
    // Zeroes into the middle of a written range, then a discard.
    cmds.push(format!("write -z {} {}", 12 * MIB + 4096, MIB));
    cmds.push(format!("read -P 0 {} {}", 12 * MIB + 4096, MIB));
    model.write(12 * MIB + 4096, MIB, 0);
    cmds.push(format!("discard {} {}", 16 * MIB, 512 * 1024));
    model.discard(16 * MIB, 512 * 1024);
    qemu_io(&uri, &cmds);

    // A second connection verifies the whole device against the model.
    let mut verify = Vec::new();
    for (off, len, v) in model.runs() {
        match v {
            Some(b) => verify.push(format!("read -P {b:#x} {off} {len}")),
            None => verify.push(format!("read {off} {len}")),
        }
    }
    assert!(verify.len() > 20, "model produced too few runs: {verify:?}");
    qemu_io(&uri, &verify);

    // The backing disk holds exactly what was written (external metadata: offsets agree).
    let disk = read_at(&node.disk, 0, size as usize);
    for (off, len, v) in model.runs() {
        let r = off as usize..(off + len) as usize;
        match v {
            Some(_) => assert_same_bytes(
                &format!("disk file at {off}"),
                &disk[r.clone()],
                &model.bytes[r],
            ),
            None => {
                let old = &model.before_discard[&off];
                for (i, (blk, old)) in disk[r].chunks(4096).zip(old.chunks(4096)).enumerate() {
                    assert!(
                        blk == old || blk.iter().all(|&b| b == 0),
                        "discarded block {} at {off} is neither the old data nor zeroes",
                        i
                    );
                }
            }
        }
    }

    // Beyond the end: refused cleanly, by qemu and by the server itself.
    for c in [
        format!("read {} 1024", size - 512),
        format!("write -P 1 {size} 512"),
    ] {
        let out = run(
            tool("qemu-io").args(["-f", "raw", &uri, "-c", &c]),
            CMD_TIMEOUT,
        );
        assert!(
            !out.success() || out.all().contains("failed"),
            "{c} past the end should fail: {out}"
        );
    }
    let mut c = node.raw_client();
    assert_eq!(c.size, size);
    assert_eq!(
        c.read(size - 512, 1024).expect("io"),
        Err(EINVAL),
        "read across the end"
    );
    assert_eq!(c.read(size, 1).expect("io"), Err(EINVAL), "read at the end");
    let w = c.write(size - 1, &[0xff, 0xff]).expect("io");
    assert!(
        w == ENOSPC || w == EINVAL,
        "write across the end should get ENOSPC (or EINVAL), got {w}"
    );
    let last = c.read(size - 1, 1).expect("io").expect("last byte");
    assert_eq!(last, [0xee], "a refused write changed the last byte");
    c.disconnect();
    node.assert_alive("after requests past the end");
    qemu_io(
        &uri,
        &[
            format!("read -P 0xdd {} 4095", size - 4096),
            format!("read -P 0xee {} 1", size - 1),
        ],
    );
}

// ------------------------------------------------------------------------------------------
// 4. nbdcopy
// ------------------------------------------------------------------------------------------

#[test]
fn nbdcopy_roundtrip() {
    if !require("nbdcopy") {
        return;
    }
    let size = 64 * MIB;
    // An exact 64 MiB disk with external metadata: the export is exactly 64 MiB.
    let node = Node::primary(NodeOpts {
        disk_size: size,
        ..NodeOpts::default()
    });
    assert_eq!(node.status()["size_bytes"], size);
    let image = node.path("image.raw");
    {
        let mut f = fs::File::create(&image).expect("create image");
        let mut rng = SplitMix::new(0x7769_6e62_6400_0004);
        let mut chunk = vec![0u8; MIB as usize];
        for _ in 0..size / MIB {
            rng.fill(&mut chunk);
            f.write_all(&chunk).expect("write image");
        }
    }
    let out_file = node.path("out.raw");
    run(
        tool("nbdcopy").arg("--flush").arg(&image).arg(node.uri()),
        CMD_TIMEOUT,
    )
    .ok();
    run(tool("nbdcopy").arg(node.uri()).arg(&out_file), CMD_TIMEOUT).ok();
    assert_eq!(
        fs::metadata(&out_file).expect("out.raw").len(),
        size,
        "downloaded image size"
    );
    assert_files_equal("downloaded image", &out_file, &image, size);
    assert_files_equal("backing disk", &node.disk, &image, size);
}

// ------------------------------------------------------------------------------------------
// 5. fio with verification
// ------------------------------------------------------------------------------------------

fn fio_job(node: &Node, name: &str, extra: &[&str]) -> Value {
    let json = node.path(&format!("{name}.json"));
    let mut cmd = tool("fio");
    cmd.current_dir(node.dir.path())
        .arg(format!("--name={name}"))
        .args(["--ioengine=nbd", "--size=64M", "--verify=crc32c"])
        .args(["--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"])
        .args([
            "--randrepeat=1",
            "--randseed=20240601",
            "--output-format=json",
        ])
        .arg(format!("--uri={}", node.uri()))
        .arg(format!("--output={}", json.display()))
        .args(extra);
    let out = run(&mut cmd, Duration::from_secs(120));
    let report = fs::read_to_string(&json).unwrap_or_default();
    assert!(out.success(), "fio {name} failed: {out}\nreport:\n{report}");
    assert!(
        !out.all().to_lowercase().contains("verify"),
        "fio {name} reported verification problems: {out}"
    );
    let v: Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("fio {name} JSON report ({e}): {report}"));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio {name}: {job:#}");
    job.clone()
}

#[test]
fn fio_verify() {
    if !require("fio") {
        return;
    }
    let node = Node::primary(NodeOpts {
        disk_size: 64 * MIB,
        ..NodeOpts::default()
    });

    let job = fio_job(
        &node,
        "randwrite-4k",
        &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    );
    let written = job["write"]["io_bytes"].as_u64().expect("write io_bytes");
    let read = job["read"]["io_bytes"].as_u64().expect("read io_bytes");
    assert_eq!(
        written,
        64 * MIB,
        "randwrite should cover the whole region: {job:#}"
    );
    assert_eq!(
        read, written,
        "the verify pass should read back every block: {job:#}"
    );

    let job = fio_job(
        &node,
        "randrw-64k",
        &["--rw=randrw", "--bs=64k", "--iodepth=16"],
    );
    let written = job["write"]["io_bytes"].as_u64().expect("write io_bytes");
    let read = job["read"]["io_bytes"].as_u64().expect("read io_bytes");
    assert!(written > 0, "{job:#}");
    assert!(
        read >= written,
        "the verify pass should read back every block: {job:#}"
    );
}

// ------------------------------------------------------------------------------------------
// 6. ext4 through nbdfuse and a loop device
// ------------------------------------------------------------------------------------------

/// The files written to the filesystem: path, size, content seed.
const EXT4_FILES: &[(&str, usize, u64)] = &[
    ("small.txt", 100, 1),
    ("a/one.bin", 3 * MIB as usize, 2),
    ("a/b/two.bin", 2 * MIB as usize + 123, 3),
    ("a/b/c/d/four.bin", 512 * 1024, 4),
    ("c/three.bin", MIB as usize + 4097, 5),
    ("c/five.bin", 4 * MIB as usize - 1, 6),
];

fn fsync_dir(p: &Path) {
    fs::File::open(p)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync directory {}: {e}", p.display()));
}

fn write_ext4_files(root: &Path) {
    for &(name, len, seed) in EXT4_FILES {
        let path = root.join(name);
        let dir = path.parent().expect("parent");
        fs::create_dir_all(dir).expect("mkdir");
        let mut f = fs::File::create(&path).expect("create file");
        f.write_all(&SplitMix::new(seed).bytes(len))
            .expect("write file");
        f.sync_all().expect("fsync file");
        fsync_dir(dir);
    }
    for d in ["a/b/c/d", "a/b/c", "a/b", "a", "c", ""] {
        fsync_dir(&root.join(d));
    }
}

fn verify_ext4_files(root: &Path, when: &str) {
    for &(name, len, seed) in EXT4_FILES {
        let path = root.join(name);
        let got = fs::read(&path).unwrap_or_else(|e| panic!("{when}: read {name}: {e}"));
        assert_same_bytes(
            &format!("{when}: {name}"),
            &got,
            &SplitMix::new(seed).bytes(len),
        );
    }
    // Nothing else appeared (apart from ext4's own lost+found).
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("dir entry").path();
            let rel = p.strip_prefix(root).expect("under root").to_path_buf();
            if rel == Path::new("lost+found") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                found.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    let mut want: Vec<String> = EXT4_FILES.iter().map(|f| f.0.to_string()).collect();
    want.sort();
    assert_eq!(found, want, "{when}: files in the filesystem");
}

fn drop_caches() {
    // Best effort: the final check on the backing disk is what proves the data reached the
    // server, not this.
    let _ = run(&mut tool("sync"), CMD_TIMEOUT);
    let _ = fs::write("/proc/sys/vm/drop_caches", "3\n");
}

#[test]
fn ext4_through_nbdfuse() {
    if !require_all(&[
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "sync",
    ]) || !require_root("loop devices and mounts")
        || !require_path("/dev/fuse", "FUSE")
    {
        return;
    }
    let size = 64 * MIB;
    let mut node = Node::primary(NodeOpts {
        disk_size: size,
        ..NodeOpts::default()
    });
    assert_eq!(node.status()["size_bytes"], size);
    // Declared after the node: dropped (unmounted, detached) before the daemon is stopped.
    let mut stack = BlockStack::default();
    let fuse_dir = node.path("fuse");
    let mnt = node.path("mnt");

    let fuse_file = stack.nbdfuse(&fuse_dir, &node.uri(), &[]);
    assert_eq!(fs::metadata(&fuse_file).expect("nbdfuse file").len(), size);
    let dev = stack.loop_attach(&fuse_file, &["--direct-io=on"]);
    run(
        tool("mkfs.ext4")
            .args(["-F", "-q", "-L", "twinbd-it"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&dev),
        Duration::from_secs(120),
    )
    .ok();
    stack.mount(&dev, &mnt, &[]);
    write_ext4_files(&mnt);
    verify_ext4_files(&mnt, "after writing");
    stack.umount(&mnt);
    drop_caches();
    stack.mount(&dev, &mnt, &[]);
    verify_ext4_files(&mnt, "after remount");
    stack.umount(&mnt);
    stack.loop_detach(&dev);
    stack.nbdfuse_stop();

    let exit = node.stop(Duration::from_secs(40));
    assert_eq!(exit.code(), Some(0), "daemon exit after SIGTERM: {exit}");
    drop_caches();

    // The backing disk on its own is a clean filesystem holding every file.
    run(
        tool("e2fsck").arg("-fn").arg(&node.disk),
        Duration::from_secs(120),
    )
    .ok();
    let dev = stack.loop_attach(&node.disk, &["--read-only"]);
    stack.mount(&dev, &mnt, &["-o", "ro,noload"]);
    verify_ext4_files(&mnt, "on the backing disk");
    stack.umount(&mnt);
    stack.loop_detach(&dev);
}

// ------------------------------------------------------------------------------------------
// 7. Hostile clients
// ------------------------------------------------------------------------------------------

/// One misbehaving connection during the negotiation; `case` picks the misbehaviour.
fn hostile_negotiation(node: &Node, case: usize, rng: &mut SplitMix) -> io::Result<()> {
    let addr = node.tcp_addr();
    match case {
        // Connect and hang up at once.
        0 => drop(TcpStream::connect_timeout(&addr, IO_TIMEOUT)?),
        // Read the greeting, hang up.
        1 => {
            let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let mut g = [0u8; 18];
            s.read_exact(&mut g)?;
        }
        // Garbage instead of client flags and options.
        2 => {
            let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let n = 1 + (rng.next_u64() % 300) as usize;
            s.write_all(&rng.bytes(n))?;
            // Unknown client flags or a bad option magic: either way the server hangs up.
            if n >= 4 {
                expect_closed(&mut s, "garbage after the greeting");
            }
        }
        // A truncated option header.
        3 => {
            let mut s = greet(addr)?;
            s.write_all(&option(OPT_GO, &go_data(RESOURCE))[..7])?;
        }
        // An option claiming 4 GiB of data.
        4 => {
            let mut s = greet(addr)?;
            let mut h = option(OPT_GO, &[]);
            h[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
            s.write_all(&h)?;
            s.write_all(&rng.bytes(1000))?;
            if let Ok(r) = read_opt_reply(&mut s) {
                assert_ne!(r.kind & REP_ERR_BIT, 0, "4 GiB option accepted: {r:?}");
            }
            expect_closed(&mut s, "4 GiB option");
        }
        // Bad option magic.
        5 => {
            let mut s = greet(addr)?;
            let mut h = option(OPT_GO, &go_data(RESOURCE));
            h[0] ^= 0xff;
            s.write_all(&h)?;
            expect_closed(&mut s, "bad option magic");
        }
        // Unknown client flags (the server must hang up).
        6 => {
            let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let mut g = [0u8; 18];
            s.read_exact(&mut g)?;
            s.write_all(&u32::MAX.to_be_bytes())?;
            s.write_all(&option(OPT_GO, &go_data(RESOURCE)))?;
            expect_closed(&mut s, "unknown client flags");
        }
        // NBD_OPT_GO whose name length runs past the option's data.
        7 => {
            let mut s = greet(addr)?;
            let mut d = go_data(RESOURCE);
            d[0..4].copy_from_slice(&1000u32.to_be_bytes());
            s.write_all(&option(OPT_GO, &d))?;
            let r = read_opt_reply(&mut s)?;
            assert_ne!(
                r.kind & REP_ERR_BIT,
                0,
                "malformed NBD_OPT_GO accepted: {r:?}"
            );
        }
        // NBD_OPT_EXPORT_NAME for an export that does not exist: no reply, the server hangs up.
        8 => {
            let mut s = greet(addr)?;
            s.write_all(&option(OPT_EXPORT_NAME, b"no-such-export"))?;
            expect_closed(&mut s, "unknown export name");
        }
        // A complete handshake, then a request with a bad magic and a truncated one.
        _ => {
            let mut c = node.raw_client();
            if rng.next_u64() % 2 == 0 {
                let mut h = request(0, CMD_READ, 1, 0, 512);
                h[0] ^= 0x55;
                c.s.write_all(&h)?;
                expect_closed(&mut c.s, "bad request magic");
            } else {
                c.s.write_all(&request(0, CMD_WRITE, 1, 0, 4096)[..10])?;
            }
        }
    }
    Ok(())
}

#[test]
fn hostile_clients() {
    let mut node = Node::primary(NodeOpts::default());
    let size = 32 * MIB;
    let mut rng = SplitMix::new(0xbad_c0de);

    // (a) 50 broken negotiations, and a burst of connections left half open.
    for i in 0..50 {
        if let Err(e) = hostile_negotiation(&node, i % 10, &mut rng) {
            // The server may reset a connection it gave up on; anything else is not expected.
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                ),
                "hostile case {}: {e}",
                i % 10
            );
        }
    }
    let half_open: Vec<TcpStream> = (0..20)
        .map(|_| greet(node.tcp_addr()).expect("greeting"))
        .collect();
    drop(half_open);
    assert_serving(&mut node, "after broken negotiations", 1);

    // (b) 400 pipelined 4 KiB writes, replies never read, then a reset.
    let mut c = node.raw_client();
    let blocks = 400u64;
    let mut burst = Vec::with_capacity(blocks as usize * (28 + 4096));
    for i in 0..blocks {
        burst.extend_from_slice(&request(0, CMD_WRITE, i + 1, i * 4096, 4096));
        burst.extend_from_slice(&[(i % 251) as u8 + 1; 4096]);
    }
    c.s.write_all(&burst).expect("pipelined writes");
    // Every reply has arrived (unread) once 400 x 16 bytes are waiting.
    let mut peek = vec![0u8; blocks as usize * 16];
    wait_until("400 replies queued", Duration::from_secs(30), || {
        c.s.peek(&mut peek)
            .map(|n| n == peek.len())
            .unwrap_or(false)
    });
    // Half of one more write, then close with unread data: the kernel sends a reset.
    c.s.write_all(&request(0, CMD_WRITE, 999, 0, 4096))
        .expect("header");
    c.s.write_all(&[0u8; 1000]).expect("partial payload");
    drop(c);
    assert_serving(&mut node, "after a reset mid-stream", 2);
    // The 400 acknowledged writes are all there, the unfinished one is not.
    let mut c = node.raw_client();
    for i in 0..blocks {
        let got = c.read(i * 4096, 4096).expect("io").expect("read");
        assert!(
            got.iter().all(|&b| b == (i % 251) as u8 + 1),
            "acknowledged pipelined write {i} lost"
        );
    }
    c.disconnect();

    // (b') Reads whose replies are never collected: the server blocks writing, then the client
    // resets.
    let mut c = node.raw_client();
    let mut burst = Vec::new();
    for i in 0..200u64 {
        burst.extend_from_slice(&request(0, CMD_READ, i + 1, (i % 64) * 65536, 65536));
    }
    c.s.write_all(&burst).expect("pipelined reads");
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    assert_serving(&mut node, "after a reset with replies backed up", 3);

    // (c) Requests over the 32 MiB maximum, and lengths that overflow.
    let mut c = node.raw_client();
    assert_eq!(
        c.read(0, (32 << 20) + 1).expect("io"),
        Err(EINVAL),
        "read over 32 MiB"
    );
    let big = vec![0x5au8; (32 << 20) + 4096];
    assert_eq!(c.write(0, &big).expect("io"), EINVAL, "write over 32 MiB");
    let r = c.read(u64::MAX - 100, 4096).expect("io");
    assert!(
        r == Err(EINVAL) || r == Err(EOVERFLOW),
        "read at an offset that overflows: {r:?}"
    );
    // The connection still works, and the refused write left no trace.
    let first = c.read(8 * MIB, 4096).expect("io").expect("read");
    assert!(
        first.iter().all(|&b| b != 0x5a),
        "refused write was applied"
    );
    c.write_read_check(size - 4096, &SplitMix::new(9).bytes(4096));
    c.disconnect();
    // A write header announcing 4 GiB, then the client disappears.
    let mut c = node.raw_client();
    c.s.write_all(&request(0, CMD_WRITE, 7, 0, u32::MAX))
        .expect("header");
    c.s.write_all(&[0u8; 65536]).expect("some payload");
    drop(c);
    assert_serving(&mut node, "after oversized requests", 4);
}

// ------------------------------------------------------------------------------------------
// 8. The sync storage engine
// ------------------------------------------------------------------------------------------

#[test]
fn sync_engine_interop() {
    if !require("qemu-io") {
        return;
    }
    let node = Node::primary(NodeOpts {
        env: vec![("TWINBD_IO_ENGINE".into(), "sync".into())],
        ..NodeOpts::default()
    });
    let st = node.status();
    assert_eq!(st["io_engine"], "sync", "{st:#}");
    let log = node.log();
    assert!(
        log.lines()
            .any(|l| l.contains("engine") && l.contains("sync")),
        "the daemon's log should say it uses the sync engine:\n{log}"
    );
    let uri = node.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0x5e 0 1M".into(),
            "write -P 0x6f 1049089 65536".into(),
            format!("write -P 0x70 {} 4096", 32 * MIB - 4096),
            "write -z 2M 64k".into(),
            "flush".into(),
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x5e 0 1M".into(),
            "read -P 0 1048576 513".into(),
            "read -P 0x6f 1049089 65536".into(),
            format!("read -P 0x70 {} 4096", 32 * MIB - 4096),
            "read -P 0 2M 64k".into(),
        ],
    );
    assert_same_bytes(
        "backing disk after sync-engine writes",
        &read_at(&node.disk, 1049089, 65536),
        &[0x6f; 65536],
    );
}

//! Failover time: from the primary's death (SIGKILL) to the first write answered by the new
//! primary, over many runs, with the default heartbeat settings and `auto_promote = true`.
//!
//! `cargo bench --bench failover` (release build of the daemon; `RUNS=20` by default). Two
//! nodes run on loopback; a client writes to the primary, the primary is killed, the client
//! keeps trying the standby's export (refused while it is secondary) until a write is
//! answered. The killed node is restarted (it rejoins as secondary and resyncs), and the next
//! run kills the other node. Prints every run, then median and worst.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NBD_PORT: [u16; 2] = [21809, 21810];
const REPL_PORT: [u16; 2] = [21789, 21790];
const NAMES: [&str; 2] = ["alpha", "beta"];

fn bin() -> PathBuf {
    if let Ok(p) = std::env::var("TWINBD") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("cargo")
        .args(["build", "--release", "--quiet"])
        .current_dir(root)
        .status()
        .expect("cargo build");
    assert!(status.success(), "release build failed");
    root.join("target/release/twinbd")
}

/// Fixed-newstyle handshake with NBD_OPT_GO; `None` if the server refuses (a secondary).
fn nbd_connect(port: u16) -> Option<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_nodelay(true).ok()?;
    let mut g = [0u8; 18];
    s.read_exact(&mut g).ok()?;
    s.write_all(&3u32.to_be_bytes()).ok()?;
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&8u32.to_be_bytes());
    opt.extend_from_slice(&2u32.to_be_bytes());
    opt.extend_from_slice(b"r0");
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).ok()?;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).ok()?;
        let typ = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).ok()?;
        match typ {
            1 => return Some(s),
            3 => continue,
            _ => return None,
        }
    }
}

/// One 4 KiB write; true when answered without error.
fn nbd_write(s: &mut TcpStream, cookie: u64, offset: u64) -> bool {
    let mut m = Vec::with_capacity(28 + 4096);
    m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&4096u32.to_be_bytes());
    m.extend_from_slice(&[cookie as u8; 4096]);
    if s.write_all(&m).is_err() {
        return false;
    }
    let mut r = [0u8; 16];
    s.read_exact(&mut r).is_ok() && r[4..8] == [0, 0, 0, 0]
}

struct Node {
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(bin: &Path, res: &Path, dir: &Path, i: usize) -> Node {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{}.log", NAMES[i])))
        .expect("log");
    let child = Command::new(bin)
        .args(["run", "-c"])
        .arg(res)
        .args(["-n", NAMES[i]])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn daemon");
    let sock = dir.join(format!("{}.sock", NAMES[i]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Node { child: Some(child) }
}

fn status(bin: &Path, res: &Path, i: usize) -> String {
    let out = Command::new(bin)
        .args(["status", "--json", "-c"])
        .arg(res)
        .args(["-n", NAMES[i]])
        .output()
        .expect("status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, deadline_s: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(deadline_s);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let bin = bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut res = String::from(
        "[resource]\nname = \"r0\"\nsecret = \"bench\"\n[failover]\nauto_promote = true\n",
    );
    for i in 0..2 {
        let disk = d.join(format!("{}.img", NAMES[i]));
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(256 << 20))
            .expect("disk");
        res.push_str(&format!(
            "[[node]]\nname = \"{n}\"\ndisk = \"{disk}\"\nmeta = \"{meta}\"\nreplication = \"127.0.0.1:{r}\"\nnbd = \"127.0.0.1:{p}\"\nadmin = \"{sock}\"\n",
            n = NAMES[i],
            disk = disk.display(),
            meta = d.join(format!("{}.meta", NAMES[i])).display(),
            r = REPL_PORT[i],
            p = NBD_PORT[i],
            sock = d.join(format!("{}.sock", NAMES[i])).display(),
        ));
    }
    let res_path = d.join("r0.toml");
    std::fs::write(&res_path, res).expect("resource file");
    for n in NAMES {
        let ok = Command::new(&bin)
            .args(["create-md", "-c"])
            .arg(&res_path)
            .args(["-n", n])
            .output()
            .expect("create-md")
            .status
            .success();
        assert!(ok, "create-md {n}");
    }
    let mut nodes = [
        Some(start(&bin, &res_path, d, 0)),
        Some(start(&bin, &res_path, d, 1)),
    ];
    let ok = Command::new(&bin)
        .args(["promote", "--force", "-c"])
        .arg(&res_path)
        .args(["-n", "alpha"])
        .output()
        .expect("promote")
        .status
        .success();
    assert!(ok, "promote alpha");
    let mut primary = 0usize;
    let mut times = Vec::new();
    for run in 0..runs {
        let standby = 1 - primary;
        wait_for("the pair in sync", 60, || {
            let s = status(&bin, &res_path, standby);
            s.contains("\"connection\": \"connected\"") && s.contains("\"disk\": \"up_to_date\"")
        });
        // Steady writes on the primary, then its death.
        let mut c = nbd_connect(NBD_PORT[primary]).expect("connect to the primary");
        for k in 0..50 {
            assert!(nbd_write(&mut c, k, k * 4096), "write to the primary");
        }
        drop(nodes[primary].take());
        let died = Instant::now();
        let mut cookie = 1000u64;
        let elapsed = loop {
            if let Some(mut s) = nbd_connect(NBD_PORT[standby]) {
                cookie += 1;
                if nbd_write(&mut s, cookie, 1 << 20) {
                    break died.elapsed();
                }
            }
            assert!(
                died.elapsed() < Duration::from_secs(30),
                "no failover within 30 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        println!(
            "run {:>2}: {} died, {} answered a write after {:>5} ms",
            run + 1,
            NAMES[primary],
            NAMES[standby],
            elapsed.as_millis()
        );
        times.push(elapsed);
        nodes[primary] = Some(start(&bin, &res_path, d, primary));
        primary = standby;
    }
    times.sort();
    let median = times[times.len() / 2];
    let worst = times[times.len() - 1];
    println!(
        "failover over {} runs (interval 200 ms, timeout 1000 ms): median {} ms, worst {} ms, best {} ms",
        times.len(),
        median.as_millis(),
        worst.as_millis(),
        times[0].as_millis()
    );
}

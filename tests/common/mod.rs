//! Harness for the integration tests: drives the real `twinbd` binary and the external NBD
//! clients installed on the machine, with a deadline on everything and cleanup on panic.
//!
//! - [`run`] runs one external command under a timeout (the whole process group is killed
//!   when it overruns) and captures its output.
//! - [`Node`] is one daemon in its own temporary directory: resource file, disk, metadata,
//!   admin socket and log. Dropping it stops the daemon (SIGTERM, then SIGKILL) and, when the
//!   test is failing, prints the daemon's log.
//! - [`RawNbd`] is a minimal fixed-newstyle NBD client speaking simple replies, for the cases
//!   the stock clients cannot produce (idle clients, pipelining without reading, bad lengths).
//! - [`BlockStack`] tracks nbdfuse mounts, loop devices and filesystem mounts and undoes them
//!   in reverse order when dropped.
//! - [`Background`] is an external command running while the test goes on (a write load),
//!   killed with its process group when dropped.
//! - [`Pair`] is a replicated pair of daemons, "alpha" and "beta", each [`PairNode`] with its
//!   own directory, disk, metadata, ports and resource file; optionally with a [`FaultProxy`]
//!   on the peer link, which can go silent, cut the connections, refuse new ones, or flip one
//!   bit in a replicated write.

// Every test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The daemon under test, built by cargo for this test binary.
pub const TWINBD: &str = env!("CARGO_BIN_EXE_twinbd");
/// Resource name used by every test node.
pub const RESOURCE: &str = "r0";
/// Node name used by every test node.
pub const NODE: &str = "alpha";
/// Default deadline for one external command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

pub const MIB: u64 = 1 << 20;

// ------------------------------------------------------------------------------------------
// Tool availability
// ------------------------------------------------------------------------------------------

/// Writes straight to the process's stderr, bypassing the test harness's output capture, so
/// that a skip is visible in a normal `cargo test` run.
pub fn announce(msg: &str) {
    let _ = writeln!(io::stderr(), "{msg}");
}

fn unavailable(what: &str) -> bool {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what}, and CI=true: this test must run in CI, not be skipped");
    }
    announce(&format!(
        "SKIPPED: {what} ({})",
        thread::current().name().unwrap_or("test")
    ));
    false
}

/// Full path of an executable found in `PATH` (plus the sbin directories, which a non-login
/// root shell may lack).
pub fn tool_path(tool: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter().map(|d| d.join(tool)).find(|p| {
        fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// True when `tool` is installed. Otherwise: panics when `CI=true` (CI must fail, not skip),
/// else announces `SKIPPED: <tool> not installed` and returns false.
pub fn require(tool: &str) -> bool {
    tool_path(tool).is_some() || unavailable(&format!("{tool} not installed"))
}

/// Like [`require`], for several tools; reports every missing one.
pub fn require_all(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| tool_path(t).is_none())
        .collect();
    missing.is_empty() || unavailable(&format!("{} not installed", missing.join(", ")))
}

/// True when running as root; same skip/fail rule as [`require`].
pub fn require_root(why: &str) -> bool {
    effective_uid() == Some(0) || unavailable(&format!("not running as root ({why})"))
}

/// The effective user id, from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// True when the path exists; same skip/fail rule as [`require`].
pub fn require_path(path: &str, what: &str) -> bool {
    Path::new(path).exists() || unavailable(&format!("{path} is missing ({what})"))
}

/// A command for an installed tool, by its full path.
pub fn tool(name: &str) -> Command {
    let path = tool_path(name).unwrap_or_else(|| panic!("{name} is not installed"));
    Command::new(path)
}

// ------------------------------------------------------------------------------------------
// Running commands with a deadline
// ------------------------------------------------------------------------------------------

/// What a finished command left behind.
#[derive(Debug)]
pub struct Output {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Both streams, for searching and for failure messages.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Panics with the whole output unless the command succeeded.
    pub fn ok(self) -> Output {
        assert!(self.success(), "command failed: {self}");
        self
    }

    /// Panics with the whole output if the command succeeded.
    pub fn failed(self) -> Output {
        assert!(!self.success(), "command unexpectedly succeeded: {self}");
        self
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n  exit: {}\n  stdout:\n{}\n  stderr:\n{}",
            self.what,
            self.status,
            indent(&self.stdout),
            indent(&self.stderr)
        )
    }
}

fn indent(s: &str) -> String {
    let tail: Vec<&str> = s.lines().collect();
    // Keep failure messages readable: the end of a long output is what matters.
    let skip = tail.len().saturating_sub(80);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("    ... ({skip} lines omitted)\n"));
    }
    for l in &tail[skip..] {
        out.push_str("    ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Waits for a child until `deadline`; `None` if it is still running then.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` (stdin from /dev/null, output captured) in its own process group. If it has not
/// finished after `timeout`, the whole group is killed and the test fails.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let out_rx = spawn_reader(child.stdout.take().expect("piped stdout"));
    let err_rx = spawn_reader(child.stderr.take().expect("piped stderr"));
    let status = wait_deadline(&mut child, timeout);
    let timed_out = status.is_none();
    if timed_out {
        let _ = signal::killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    }
    let status = match status {
        Some(s) => s,
        None => wait_deadline(&mut child, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{what}: still alive after SIGKILL")),
    };
    // A grandchild that inherited the pipes could keep them open: bounded waits here too.
    let grab = |rx: mpsc::Receiver<Vec<u8>>| {
        String::from_utf8_lossy(&rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default())
            .into_owned()
    };
    let out = Output {
        what,
        status,
        stdout: grab(out_rx),
        stderr: grab(err_rx),
    };
    assert!(!timed_out, "timed out after {timeout:?}: {out}");
    out
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to a child of ours (by its pid only).
pub fn signal_child(child: &Child, sig: Signal) {
    let _ = signal::kill(Pid::from_raw(child.id() as i32), sig);
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`. Returns its exit status if it exited.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    signal_child(child, Signal::SIGTERM);
    if let Some(st) = wait_deadline(child, grace) {
        return Some(st);
    }
    signal_child(child, Signal::SIGKILL);
    wait_deadline(child, Duration::from_secs(10))
}

// ------------------------------------------------------------------------------------------
// Ports and data
// ------------------------------------------------------------------------------------------

static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A TCP port on 127.0.0.1 that was free a moment ago and is never handed out twice by this
/// process (tests run in parallel threads).
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local address").port();
        drop(l);
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port)
        {
            return port;
        }
    }
}

/// A small deterministic PRNG (splitmix64): the same seed gives the same bytes on every run
/// and every platform.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// Reads `len` bytes of a file at `offset`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    buf
}

/// Asserts two byte slices are equal; on mismatch, reports the first differing offset
/// instead of dumping megabytes.
pub fn assert_same_bytes(what: &str, actual: &[u8], expected: &[u8]) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length {} instead of {}",
        actual.len(),
        expected.len()
    );
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (i + 16).min(actual.len());
        panic!(
            "{what}: first difference at byte {i}: got {:02x?}, expected {:02x?}",
            &actual[i..end],
            &expected[i..end]
        );
    }
}

// ------------------------------------------------------------------------------------------
// A twinbd node
// ------------------------------------------------------------------------------------------

/// How a test node is laid out.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    /// Size of the backing disk file.
    pub disk_size: u64,
    /// Metadata inside the disk ("internal") instead of a separate file.
    pub internal_meta: bool,
    /// Export on a unix socket instead of TCP.
    pub nbd_unix: bool,
    /// Extra environment for the daemon.
    pub env: Vec<(String, String)>,
}

impl Default for NodeOpts {
    fn default() -> Self {
        NodeOpts {
            disk_size: 32 * MIB,
            internal_meta: false,
            nbd_unix: false,
            env: Vec::new(),
        }
    }
}

/// Where a node exports.
#[derive(Debug, Clone)]
pub enum NbdAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// One twinbd node in its own temporary directory. The daemon it runs is stopped when the
/// node is dropped, and the daemon's logs are printed if the test is failing.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub disk: PathBuf,
    pub meta: Option<PathBuf>,
    pub admin: PathBuf,
    pub nbd: NbdAddr,
    env: Vec<(String, String)>,
    child: Option<Child>,
    logs: Vec<PathBuf>,
}

impl Node {
    /// Creates the directory, a sparse disk file and the resource file; no metadata yet.
    pub fn new(opts: NodeOpts) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("twinbd-it.")
            .tempdir()
            .expect("temporary directory");
        let root = dir.path().to_path_buf();
        let disk = root.join("disk.img");
        fs::File::create(&disk)
            .and_then(|f| f.set_len(opts.disk_size))
            .expect("create disk file");
        let nbd = if opts.nbd_unix {
            NbdAddr::Unix(root.join("nbd.sock"))
        } else {
            NbdAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port())))
        };
        let node = Node {
            config: root.join("r0.toml"),
            meta: (!opts.internal_meta).then(|| root.join("disk.meta")),
            admin: root.join("alpha.sock"),
            dir,
            disk,
            nbd,
            env: opts.env,
            child: None,
            logs: Vec::new(),
        };
        node.write_config();
        node
    }

    /// Writes the resource file (a fresh replication port each time).
    fn write_config(&self) {
        let nbd_value = match &self.nbd {
            NbdAddr::Tcp(sa) => sa.to_string(),
            NbdAddr::Unix(p) => format!("unix:{}", p.display()),
        };
        let meta_value = match &self.meta {
            Some(p) => p.display().to_string(),
            None => "internal".to_string(),
        };
        let text = format!(
            "[resource]\n\
             name = \"{RESOURCE}\"\n\
             secret = \"integration-test-secret\"\n\
             \n\
             [[node]]\n\
             name = \"{NODE}\"\n\
             disk = \"{}\"\n\
             meta = \"{meta_value}\"\n\
             replication = \"127.0.0.1:{}\"\n\
             nbd = \"{nbd_value}\"\n\
             admin = \"{}\"\n",
            self.disk.display(),
            free_port(),
            self.admin.display(),
        );
        fs::write(&self.config, text).expect("write resource file");
        // The file holds the secret: keep it private, as an operator would.
        fs::set_permissions(&self.config, fs::Permissions::from_mode(0o600)).expect("chmod 600");
    }

    /// A node with metadata created and its daemon running (secondary).
    pub fn started(opts: NodeOpts) -> Node {
        let mut n = Node::new(opts);
        n.create_md();
        n.start();
        n
    }

    /// A running node promoted (forced: fresh metadata is never up to date) to primary.
    pub fn primary(opts: NodeOpts) -> Node {
        let n = Node::started(opts);
        n.promote(true);
        n
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `twinbd <args...> -c CONFIG -n alpha`, under a deadline.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(TWINBD);
        cmd.args(args)
            .arg("-c")
            .arg(&self.config)
            .args(["-n", NODE])
            .env("NO_COLOR", "1");
        run(&mut cmd, CMD_TIMEOUT)
    }

    pub fn create_md(&self) {
        self.cli(&["create-md"]).ok();
    }

    /// Starts the daemon and waits until its control socket answers. A port picked for this
    /// node may have been taken by another process in the meantime: then the resource file
    /// gets fresh ports and the start is retried (a few times).
    pub fn start(&mut self) {
        for attempt in 1..=3 {
            match self.try_start() {
                Ok(()) => return,
                Err(log) if attempt < 3 && log.contains("in use") => {
                    announce(&format!(
                        "twinbd could not bind a port picked for it (attempt {attempt}); retrying with new ports"
                    ));
                    if let NbdAddr::Tcp(_) = self.nbd {
                        self.nbd = NbdAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port())));
                    }
                    self.write_config();
                }
                Err(log) => panic!("daemon exited during start-up:\n{log}\n{}", self.log()),
            }
        }
    }

    /// One start attempt; `Err(log of this attempt)` if the daemon exited during start-up.
    fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "daemon already running");
        let log = self.path(&format!("daemon-{}.log", self.logs.len() + 1));
        let file = fs::File::create(&log).expect("create daemon log");
        let mut cmd = Command::new(TWINBD);
        cmd.args(["run", "-c"])
            .arg(&self.config)
            .args(["-n", NODE])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file);
        self.logs.push(log.clone());
        self.child = Some(cmd.spawn().expect("spawn twinbd run"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let text = fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("exit status {st}; log:\n{text}"));
            }
            if std::os::unix::net::UnixStream::connect(&self.admin).is_ok() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "daemon's control socket not answering after 20s:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// True while the daemon process has not exited.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Asserts the daemon is still running (no crash).
    pub fn assert_alive(&mut self, when: &str) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                panic!("daemon died {when}: {st}\n{}", self.log());
            }
        } else {
            panic!("daemon not running {when}");
        }
    }

    /// Clean shutdown by SIGTERM; returns the exit status. Fails the test if the daemon does
    /// not exit within `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        signal_child(&child, Signal::SIGTERM);
        match wait_deadline(&mut child, timeout) {
            Some(st) => st,
            None => {
                terminate(&mut child, Duration::from_secs(1));
                panic!(
                    "daemon did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
        }
    }

    /// All of this node's daemon logs so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        for (i, p) in self.logs.iter().enumerate() {
            s.push_str(&format!(
                "----- daemon log {} ({}) -----\n",
                i + 1,
                p.display()
            ));
            s.push_str(&fs::read_to_string(p).unwrap_or_else(|e| format!("<unreadable: {e}>\n")));
        }
        s
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]).ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
    }

    pub fn promote(&self, force: bool) -> Output {
        let args: &[&str] = if force {
            &["promote", "--force"]
        } else {
            &["promote"]
        };
        self.cli(args).ok()
    }

    /// Waits until `status --json` satisfies `cond`.
    pub fn wait_status(&self, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = self.status();
            if cond(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "status never showed {what}; last: {st:#}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The export's URI as libnbd and qemu write it.
    pub fn uri(&self) -> String {
        match &self.nbd {
            NbdAddr::Tcp(sa) => format!("nbd://{sa}/{RESOURCE}"),
            NbdAddr::Unix(p) => format!("nbd+unix:///{RESOURCE}?socket={}", p.display()),
        }
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        match &self.nbd {
            NbdAddr::Tcp(sa) => *sa,
            NbdAddr::Unix(_) => panic!("this node exports on a unix socket"),
        }
    }

    /// A raw client connected to the export (panics if the handshake is refused).
    pub fn raw_client(&self) -> RawNbd {
        match RawNbd::connect(self.tcp_addr(), RESOURCE) {
            Ok(Ok(c)) => c,
            Ok(Err((code, msg))) => panic!("handshake refused ({code:#x}): {msg}"),
            Err(e) => panic!("handshake failed: {e}"),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if terminate(&mut child, Duration::from_secs(10)).is_none() {
                announce(&format!(
                    "twinbd pid {} survived SIGKILL in test cleanup",
                    child.id()
                ));
            }
        }
        if thread::panicking() {
            eprintln!("{}", self.log());
        }
    }
}

// ------------------------------------------------------------------------------------------
// `twinbd events` in the background
// ------------------------------------------------------------------------------------------

/// A running `twinbd events`, its lines delivered through a channel. Killed when dropped.
pub struct Events {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Events {
    pub fn start(node: &Node) -> Events {
        let mut child = Command::new(TWINBD)
            .args(["events", "-c"])
            .arg(&node.config)
            .args(["-n", NODE])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn twinbd events");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Events {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one, parsed as JSON, satisfies `cond`.
    pub fn wait_for(&mut self, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    let v: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("events line is not JSON ({e}): {line}"));
                    if cond(&v) {
                        return v;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "no event showing {what} within 20s; lines so far:\n{}",
                    self.seen.join("\n")
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "`twinbd events` ended before showing {what} ({:?}); lines so far:\n{}",
                    self.child.try_wait(),
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(2));
    }
}

// ------------------------------------------------------------------------------------------
// A raw NBD client
// ------------------------------------------------------------------------------------------

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_GO: u32 = 7;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT + 9;
pub const INFO_EXPORT: u16 = 0;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// Option data of `NBD_OPT_GO` for `name` with no information requests.
pub fn go_data(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// An option request header followed by `data`.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A transmission request header.
pub fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

/// An option reply as the server sent it.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A TCP connection to an NBD server in the transmission phase (simple replies only).
pub struct RawNbd {
    pub s: TcpStream,
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

/// Connects and reads the server greeting; returns the socket after the client flags went
/// out (fixed newstyle, no zeroes), ready for options.
pub fn greet(addr: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    assert_eq!(be64(&g[0..]), NBDMAGIC, "greeting magic");
    assert_eq!(be64(&g[8..]), IHAVEOPT, "greeting is not newstyle");
    let hflags = be16(&g[16..]);
    assert_eq!(hflags & 3, 3, "server lacks fixed newstyle / no zeroes");
    s.write_all(&3u32.to_be_bytes())?;
    Ok(s)
}

/// Reads one option reply.
pub fn read_opt_reply(s: &mut TcpStream) -> io::Result<OptReply> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    assert_eq!(be64(&h[0..]), OPT_REPLY_MAGIC, "option reply magic");
    let len = be32(&h[16..]);
    assert!(len <= 1 << 20, "option reply of {len} bytes");
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok(OptReply {
        option: be32(&h[8..]),
        kind: be32(&h[12..]),
        data,
    })
}

impl RawNbd {
    /// Handshake with `NBD_OPT_GO`. `Ok(Err((reply type, message)))` when the server refuses.
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<Result<RawNbd, (u32, String)>> {
        let mut s = greet(addr)?;
        s.write_all(&option(OPT_GO, &go_data(export)))?;
        let mut size = None;
        let mut flags = 0;
        loop {
            let r = read_opt_reply(&mut s)?;
            assert_eq!(r.option, OPT_GO, "reply to another option");
            if r.kind & REP_ERR_BIT != 0 {
                return Ok(Err((r.kind, String::from_utf8_lossy(&r.data).into_owned())));
            }
            match r.kind {
                REP_INFO if r.data.len() >= 2 && be16(&r.data) == INFO_EXPORT => {
                    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                    size = Some(be64(&r.data[2..]));
                    flags = be16(&r.data[10..]);
                }
                REP_INFO => {}
                REP_ACK => break,
                k => panic!("unexpected option reply type {k:#x}"),
            }
        }
        let size = size.expect("server sent no NBD_INFO_EXPORT before its ACK");
        Ok(Ok(RawNbd {
            s,
            size,
            flags,
            cookie: 0,
        }))
    }

    fn next_cookie(&mut self) -> u64 {
        self.cookie += 1;
        self.cookie
    }

    /// Sends a request (and its payload) without waiting; returns its cookie.
    pub fn send(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<u64> {
        let cookie = self.next_cookie();
        let mut msg = request(0, cmd, cookie, offset, len).to_vec();
        msg.extend_from_slice(payload);
        self.s.write_all(&msg)?;
        Ok(cookie)
    }

    /// Reads one simple reply: (cookie, error). Read data, if any, is left in the socket.
    pub fn reply_header(&mut self) -> io::Result<(u64, u32)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(
            be32(&h),
            SIMPLE_REPLY_MAGIC,
            "reply magic (structured replies were not negotiated)"
        );
        Ok((be64(&h[8..]), be32(&h[4..])))
    }

    fn expect_reply(&mut self, cookie: u64) -> io::Result<u32> {
        let (c, err) = self.reply_header()?;
        assert_eq!(c, cookie, "reply for another request");
        Ok(err)
    }

    /// `NBD_CMD_READ`: the data, or the NBD error code.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let cookie = self.send(CMD_READ, offset, len, &[])?;
        let err = self.expect_reply(cookie)?;
        if err != 0 {
            return Ok(Err(err));
        }
        let mut buf = vec![0u8; len as usize];
        self.s.read_exact(&mut buf)?;
        Ok(Ok(buf))
    }

    /// `NBD_CMD_WRITE`: `Ok(0)` or the NBD error code.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<u32> {
        let cookie = self.send(CMD_WRITE, offset, data.len() as u32, data)?;
        self.expect_reply(cookie)
    }

    pub fn flush(&mut self) -> io::Result<u32> {
        let cookie = self.send(CMD_FLUSH, 0, 0, &[])?;
        self.expect_reply(cookie)
    }

    /// `NBD_CMD_TRIM`: `Ok(0)` or the NBD error code.
    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<u32> {
        let cookie = self.send(CMD_TRIM, offset, len, &[])?;
        self.expect_reply(cookie)
    }

    /// `NBD_CMD_WRITE_ZEROES`: `Ok(0)` or the NBD error code.
    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> io::Result<u32> {
        let cookie = self.send(CMD_WRITE_ZEROES, offset, len, &[])?;
        self.expect_reply(cookie)
    }

    /// `NBD_CMD_DISC`, then waits for the server to close.
    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, &[]);
        let _ = self.s.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 64];
        while matches!(self.s.read(&mut sink), Ok(n) if n > 0) {}
    }

    /// Writes `data` at `offset`, reads it back and compares.
    pub fn write_read_check(&mut self, offset: u64, data: &[u8]) {
        let e = self.write(offset, data).expect("write request");
        assert_eq!(e, 0, "write of {} bytes at {offset}: error {e}", data.len());
        let back = self
            .read(offset, data.len() as u32)
            .expect("read request")
            .unwrap_or_else(|e| panic!("read of {} bytes at {offset}: error {e}", data.len()));
        assert_same_bytes(&format!("read back at {offset}"), &back, data);
    }
}

// ------------------------------------------------------------------------------------------
// nbdfuse, loop devices and mounts, undone on drop
// ------------------------------------------------------------------------------------------

/// Is `path` a mount point right now?
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    let want = canon.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        // /proc/mounts escapes spaces and friends as octal; test paths never contain them.
        .any(|m| m == want)
}

/// Everything a filesystem-over-NBD test sets up, torn down in reverse on drop: filesystem
/// mounts, then loop devices, then the nbdfuse mount and process.
#[derive(Default)]
pub struct BlockStack {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    fuse: Option<(PathBuf, Child)>,
    nbdfuse_log: Option<PathBuf>,
}

impl BlockStack {
    /// Starts `nbdfuse DIR/disk URI` and waits until the file is there; returns its path.
    pub fn nbdfuse(&mut self, dir: &Path, uri: &str, extra: &[&str]) -> PathBuf {
        assert!(self.fuse.is_none(), "one nbdfuse at a time");
        fs::create_dir_all(dir).expect("create nbdfuse mount point");
        let pidfile = dir.with_extension("pid");
        let log = dir.with_extension("log");
        let _ = fs::remove_file(&pidfile);
        let file = dir.join("disk");
        let mut cmd = tool("nbdfuse");
        cmd.arg("-P")
            .arg(&pidfile)
            .args(extra)
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("nbdfuse log"));
        let child = cmd.spawn().expect("spawn nbdfuse");
        self.fuse = Some((dir.to_path_buf(), child));
        self.nbdfuse_log = Some(log.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The pid file appears only once the mount is ready.
            if fs::metadata(&pidfile).map(|m| m.len() > 0).unwrap_or(false) && file.exists() {
                return file;
            }
            let child = &mut self.fuse.as_mut().expect("nbdfuse").1;
            if let Ok(Some(st)) = child.try_wait() {
                self.fuse = None;
                panic!(
                    "nbdfuse exited before the mount was ready ({st}): {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nbdfuse not ready after 30s");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cleanly unmounts nbdfuse (it flushes and disconnects) and checks that it exits with 0.
    pub fn nbdfuse_stop(&mut self) {
        let (dir, mut child) = self.fuse.take().expect("nbdfuse running");
        let out = run(tool("fusermount3").arg("-u").arg(&dir), CMD_TIMEOUT);
        if !out.success() {
            self.fuse = Some((dir, child));
            panic!("fusermount3 -u failed: {out}");
        }
        match wait_deadline(&mut child, Duration::from_secs(60)) {
            Some(st) => assert!(
                st.success(),
                "nbdfuse exited with {st}: {}",
                self.nbdfuse_log_text()
            ),
            None => {
                terminate(&mut child, Duration::from_secs(5));
                panic!("nbdfuse did not exit within 60s of fusermount3 -u");
            }
        }
    }

    fn nbdfuse_log_text(&self) -> String {
        self.nbdfuse_log
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// `losetup --find --show FLAGS FILE`; returns the device.
    pub fn loop_attach(&mut self, file: &Path, flags: &[&str]) -> String {
        let out = run(
            tool("losetup")
                .args(["--find", "--show"])
                .args(flags)
                .arg(file),
            CMD_TIMEOUT,
        )
        .ok();
        let dev = out.stdout.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.loops.push(dev.clone());
        dev
    }

    /// Detaches a loop device and waits until it is really gone (detach is asynchronous).
    pub fn loop_detach(&mut self, dev: &str) {
        run(tool("losetup").args(["-d", dev]), CMD_TIMEOUT).ok();
        self.loops.retain(|d| d != dev);
        wait_until(&format!("{dev} detached"), Duration::from_secs(30), || {
            !run(tool("losetup").arg(dev), CMD_TIMEOUT).success()
        });
    }

    pub fn mount(&mut self, dev: &str, dir: &Path, opts: &[&str]) {
        fs::create_dir_all(dir).expect("create mount point");
        run(
            tool("mount")
                .args(["-t", "ext4"])
                .args(opts)
                .arg(dev)
                .arg(dir),
            CMD_TIMEOUT,
        )
        .ok();
        self.mounts.push(dir.to_path_buf());
    }

    pub fn umount(&mut self, dir: &Path) {
        run(tool("umount").arg(dir), CMD_TIMEOUT).ok();
        self.mounts.retain(|d| d != dir);
    }
}

impl Drop for BlockStack {
    fn drop(&mut self) {
        let quick = Duration::from_secs(30);
        let quiet = |cmd: &mut Command, t: Duration| -> bool {
            // Cleanup must never panic (it may run while unwinding).
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cmd, t).success()))
                .unwrap_or(false)
        };
        for dir in self.mounts.drain(..).rev() {
            if is_mounted(&dir) && !quiet(tool_cmd("umount").arg(&dir), quick) {
                quiet(tool_cmd("umount").arg("-l").arg(&dir), quick);
            }
        }
        for dev in self.loops.drain(..).rev() {
            quiet(tool_cmd("losetup").args(["-d", &dev]), quick);
            for _ in 0..100 {
                if !quiet(tool_cmd("losetup").arg(&dev), quick) {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some((dir, mut child)) = self.fuse.take() {
            if is_mounted(&dir) && !quiet(tool_cmd("fusermount3").arg("-u").arg(&dir), quick) {
                // Not unmountable cleanly: stop nbdfuse, then detach the mount lazily.
                terminate(&mut child, Duration::from_secs(5));
                if !quiet(tool_cmd("fusermount3").arg("-uz").arg(&dir), quick) {
                    quiet(tool_cmd("umount").arg("-l").arg(&dir), quick);
                }
            }
            if terminate_after(&mut child, Duration::from_secs(10)).is_none() {
                announce(&format!("nbdfuse pid {} survived cleanup", child.id()));
            }
        }
        if thread::panicking() {
            let log = self.nbdfuse_log_text();
            if !log.is_empty() {
                eprintln!("----- nbdfuse log -----\n{log}");
            }
        }
    }
}

/// A command for a tool that may be missing (cleanup paths): falls back to the bare name.
fn tool_cmd(name: &str) -> Command {
    Command::new(tool_path(name).map_or_else(|| OsString::from(name), |p| p.into_os_string()))
}

/// Waits for a child to exit on its own for `grace`, then stops it.
fn terminate_after(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    wait_deadline(child, grace).or_else(|| terminate(child, Duration::from_secs(5)))
}

// ------------------------------------------------------------------------------------------
// Background processes
// ------------------------------------------------------------------------------------------

/// An external command running in the background in its own process group, its output going
/// to files. Dropping it kills the whole group (cleanup on panic).
pub struct Background {
    what: String,
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Background {
    /// Starts `cmd`; its stdout and stderr go to `<log_prefix>.out` and `<log_prefix>.err`.
    pub fn spawn(cmd: &mut Command, log_prefix: &Path) -> Background {
        let what = describe(cmd);
        let stdout = log_prefix.with_extension("out");
        let stderr = log_prefix.with_extension("err");
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("create stdout file"))
            .stderr(fs::File::create(&stderr).expect("create stderr file"))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Background {
            what,
            child: Some(child),
            stdout,
            stderr,
        }
    }

    /// True while the command has not exited.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends SIGINT to the command's main process only (it stops its helpers itself).
    pub fn interrupt(&self) {
        if let Some(c) = self.child.as_ref() {
            signal_child(c, Signal::SIGINT);
        }
    }

    /// Waits for the command to finish; kills its group and fails the test after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let mut child = self.child.take().expect("background command running");
        let status = wait_deadline(&mut child, timeout);
        let timed_out = status.is_none();
        if timed_out {
            let _ = signal::killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        }
        let status = match status {
            Some(s) => s,
            None => wait_deadline(&mut child, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{}: still alive after SIGKILL", self.what)),
        };
        let out = Output {
            what: self.what.clone(),
            status,
            stdout: fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
        };
        assert!(!timed_out, "timed out after {timeout:?}: {out}");
        out
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = signal::killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            }
            let _ = wait_deadline(&mut child, Duration::from_secs(10));
        }
    }
}

// ------------------------------------------------------------------------------------------
// A fault-injecting TCP proxy
// ------------------------------------------------------------------------------------------

/// Peer-protocol constants the proxy needs to find a replicated write in the byte stream:
/// the 24-byte frame header (`len` at bytes 16..20 counts the payload), the kind of a write
/// (`kind` at bytes 4..6) and the fixed fields before a write's data (id, offset, fua).
const PEER_HEADER_LEN: usize = 24;
const PEER_KIND_WRITE: u16 = 8;
const PEER_WRITE_PREFIX: u64 = 17;
/// The kind of the handshake's first frame, and where its channel byte is in the stream
/// (`version` u32, then `channel` u8: 0 data, 1 meta).
const PEER_KIND_HELLO: u16 = 1;
const PEER_HELLO_CHANNEL_AT: usize = PEER_HEADER_LEN + 4;
/// What the proxy knows of a connection's channel.
const CHANNEL_UNKNOWN: u8 = 0;
const CHANNEL_DATA: u8 = 1;
const CHANNEL_META: u8 = 2;

/// The one bit the proxy flipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corruption {
    /// Device offset of the replicated write whose data was corrupted.
    pub write_offset: u64,
    /// Length of that write's data.
    pub data_len: u64,
    /// Index of the corrupted byte within the write's data.
    pub byte_in_data: u64,
    /// The bit flipped in that byte (the mask XORed into it).
    pub mask: u8,
}

#[derive(Default)]
struct ProxyCtl {
    stop: AtomicBool,
    blackhole: AtomicBool,
    refuse: AtomicBool,
    /// Corrupt the next write whose data is at least this long (0: disarmed).
    corrupt_min: AtomicU64,
    refuse_after_corrupt: AtomicBool,
    corrupted: Mutex<Vec<Corruption>>,
    accepted: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
    /// One-direction silence: bytes from the dialing node to the target are held back.
    blackhole_to_target: AtomicBool,
    /// One-direction silence: bytes from the target back to the dialing node are held back.
    blackhole_to_dialer: AtomicBool,
    /// Silence on the meta connections only (both directions); data connections flow.
    blackhole_meta: AtomicBool,
    /// Like `corrupt_min`, for a write going from the target back to the dialing node.
    corrupt_back_min: AtomicU64,
}

/// A TCP proxy between the node that dials (the client side) and the listening node (the
/// target), with switches for network faults. Every accepted connection is forwarded to the
/// target, both directions, by plain threads. Dropping the proxy closes everything.
pub struct FaultProxy {
    addr: SocketAddr,
    ctl: Arc<ProxyCtl>,
    accept: Option<thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a port of the kernel's choosing) and forwards to `target`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        // The kernel may pick a port that `free_port` handed out (and released) a moment
        // ago for a daemon: take only a port never handed out, and reserve it.
        let mut rejected = Vec::new();
        let listener = loop {
            let l = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
            let port = l.local_addr().expect("proxy: local address").port();
            if HANDED_OUT
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(port)
            {
                break l;
            }
            rejected.push(l);
        };
        drop(rejected);
        let addr = listener.local_addr().expect("proxy: local address");
        listener
            .set_nonblocking(true)
            .expect("proxy: non-blocking listener");
        let ctl = Arc::new(ProxyCtl::default());
        let c = Arc::clone(&ctl);
        let accept = thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || proxy_accept_loop(listener, target, c))
            .expect("proxy: spawn accept thread");
        FaultProxy {
            addr,
            ctl,
            accept: Some(accept),
        }
    }

    /// Where the dialing node must connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// On: no byte moves in either direction, but every socket stays open (a silent
    /// partition: the nodes hear nothing, not even a reset). New connections are accepted and
    /// then starve the same way. Off: forwarding resumes with whatever was held back.
    pub fn set_blackhole(&self, on: bool) {
        self.ctl.blackhole.store(on, Ordering::SeqCst);
    }

    /// On: connections are closed as soon as they are accepted (the peer is unreachable).
    pub fn set_refuse(&self, on: bool) {
        self.ctl.refuse.store(on, Ordering::SeqCst);
    }

    /// Closes every connection currently forwarded (both sides see the close).
    pub fn cut(&self) {
        let conns = std::mem::take(&mut *self.ctl.conns.lock().unwrap_or_else(|p| p.into_inner()));
        for s in conns {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Arms a one-shot corruption: in the next replicated write going from the dialing node to
    /// the target whose data is at least `min_data_len` bytes, one bit in the middle of the
    /// data is flipped (header and checksum are left alone). With `then_refuse`, the proxy
    /// refuses new connections from that moment on, so the link stays down until
    /// [`FaultProxy::set_refuse`] turns it back on.
    pub fn corrupt_next_write(&self, min_data_len: u64, then_refuse: bool) {
        assert!(
            min_data_len > 0,
            "a corruption needs a minimum write length"
        );
        self.ctl
            .refuse_after_corrupt
            .store(then_refuse, Ordering::SeqCst);
        self.ctl.corrupt_min.store(min_data_len, Ordering::SeqCst);
    }

    /// The corruptions done so far.
    pub fn corruptions(&self) -> Vec<Corruption> {
        self.ctl
            .corrupted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.ctl.accepted.load(Ordering::SeqCst)
    }

    /// Like [`FaultProxy::set_blackhole`], in one direction only: bytes from the dialing node
    /// to the target are held back (sockets stay open); the other direction flows.
    pub fn set_blackhole_to_target(&self, on: bool) {
        self.ctl.blackhole_to_target.store(on, Ordering::SeqCst);
    }

    /// Like [`FaultProxy::set_blackhole`], in one direction only: bytes from the target back
    /// to the dialing node are held back (sockets stay open); the other direction flows.
    pub fn set_blackhole_to_dialer(&self, on: bool) {
        self.ctl.blackhole_to_dialer.store(on, Ordering::SeqCst);
    }

    /// On: the meta connection of every link (heartbeats, acknowledgements, state) goes
    /// silent in both directions, sockets open, while data connections keep flowing. A
    /// connection is recognised by the channel byte of its handshake's first frame; a new
    /// meta connection is held back right after that frame. Off: forwarding resumes.
    pub fn set_blackhole_meta(&self, on: bool) {
        self.ctl.blackhole_meta.store(on, Ordering::SeqCst);
    }

    /// Like [`FaultProxy::corrupt_next_write`] (without `then_refuse`), for the next
    /// replicated write going the other way: from the target back to the dialing node (when
    /// the target is primary). The corruption is listed by [`FaultProxy::corruptions`].
    pub fn corrupt_next_write_back(&self, min_data_len: u64) {
        assert!(
            min_data_len > 0,
            "a corruption needs a minimum write length"
        );
        self.ctl
            .corrupt_back_min
            .store(min_data_len, Ordering::SeqCst);
    }

    /// Disarms both one-shot corruptions that have not happened yet.
    pub fn disarm_corruption(&self) {
        self.ctl.corrupt_min.store(0, Ordering::SeqCst);
        self.ctl.corrupt_back_min.store(0, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn proxy_accept_loop(listener: TcpListener, target: SocketAddr, ctl: Arc<ProxyCtl>) {
    while !ctl.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        ctl.accepted.fetch_add(1, Ordering::SeqCst);
        if ctl.refuse.load(Ordering::SeqCst) {
            let _ = client.shutdown(std::net::Shutdown::Both);
            continue;
        }
        let _ = client.set_nonblocking(false);
        let server = match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(_) => {
                let _ = client.shutdown(std::net::Shutdown::Both);
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let clones = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        );
        let (Ok(c_read), Ok(s_write), Ok(c_keep), Ok(s_keep)) = clones else {
            continue;
        };
        {
            let mut conns = ctl.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.push(c_keep);
            conns.push(s_keep);
        }
        let (c1, c2) = (Arc::clone(&ctl), Arc::clone(&ctl));
        let channel = Arc::new(AtomicU8::new(CHANNEL_UNKNOWN));
        let ch1 = Arc::clone(&channel);
        let _ = thread::Builder::new()
            .name("proxy-fwd".into())
            .spawn(move || proxy_pump(c_read, s_write, c1, true, ch1));
        let _ = thread::Builder::new()
            .name("proxy-back".into())
            .spawn(move || proxy_pump(server, client, c2, false, channel));
    }
}

/// Whether one direction of a connection is silenced right now by a one-direction or a
/// meta-only blackhole.
fn proxy_stalled(ctl: &ProxyCtl, forward: bool, channel: &AtomicU8) -> bool {
    let one_way = if forward {
        &ctl.blackhole_to_target
    } else {
        &ctl.blackhole_to_dialer
    };
    one_way.load(Ordering::SeqCst)
        || (ctl.blackhole_meta.load(Ordering::SeqCst)
            && channel.load(Ordering::SeqCst) == CHANNEL_META)
}

/// Learns a connection's channel from the first bytes the dialing node sends (its Hello).
#[derive(Default)]
struct ChannelSniffer {
    head: Vec<u8>,
    done: bool,
}

impl ChannelSniffer {
    fn feed(&mut self, bytes: &[u8], channel: &AtomicU8) {
        if self.done {
            return;
        }
        let want = PEER_HELLO_CHANNEL_AT + 1 - self.head.len();
        self.head.extend_from_slice(&bytes[..want.min(bytes.len())]);
        if self.head.len() <= PEER_HELLO_CHANNEL_AT {
            return;
        }
        self.done = true;
        let kind = u16::from_be_bytes([self.head[4], self.head[5]]);
        if kind == PEER_KIND_HELLO {
            let c = match self.head[PEER_HELLO_CHANNEL_AT] {
                0 => CHANNEL_DATA,
                1 => CHANNEL_META,
                _ => CHANNEL_UNKNOWN,
            };
            channel.store(c, Ordering::SeqCst);
        }
    }
}

/// Moves bytes from `src` to `dst` until either side closes, the proxy stops or the
/// connection is cut. While blackholed, neither reads nor writes (bytes held back stay held).
fn proxy_pump(
    mut src: TcpStream,
    mut dst: TcpStream,
    ctl: Arc<ProxyCtl>,
    forward: bool,
    channel: Arc<AtomicU8>,
) {
    let tick = Duration::from_millis(10);
    let _ = src.set_read_timeout(Some(tick));
    let _ = dst.set_write_timeout(Some(tick));
    let mut frames = FrameTracker {
        back: !forward,
        ..FrameTracker::default()
    };
    let mut sniffer = ChannelSniffer::default();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut start, mut end) = (0usize, 0usize);
    let close = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
    };
    loop {
        if ctl.stop.load(Ordering::SeqCst) {
            close(&src, &dst);
            return;
        }
        if ctl.blackhole.load(Ordering::SeqCst) || proxy_stalled(&ctl, forward, &channel) {
            thread::sleep(Duration::from_millis(2));
            continue;
        }
        if start < end {
            match dst.write(&buf[start..end]) {
                Ok(0) => {
                    close(&src, &dst);
                    return;
                }
                Ok(n) => start += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    close(&src, &dst);
                    return;
                }
            }
            continue;
        }
        match src.read(&mut buf) {
            Ok(0) => {
                close(&src, &dst);
                return;
            }
            Ok(n) => {
                if forward {
                    sniffer.feed(&buf[..n], &channel);
                }
                // Both directions are followed from their first byte, so frame boundaries
                // are known whenever a corruption gets armed.
                frames.process(&mut buf[..n], &ctl);
                start = 0;
                end = n;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                close(&src, &dst);
                return;
            }
        }
    }
}

/// Follows the frames of one direction of a peer connection, to corrupt a write's data.
#[derive(Default)]
struct FrameTracker {
    head: [u8; PEER_HEADER_LEN],
    head_fill: usize,
    /// Payload bytes of the current frame not seen yet (0: between frames).
    remaining: u64,
    /// Payload bytes of the current frame seen so far.
    pos: u64,
    payload_len: u64,
    /// The fixed fields of the current write (to learn its offset).
    prefix: Vec<u8>,
    /// Index in the current payload of the byte to corrupt.
    target: Option<u64>,
    /// Follows the direction from the target back to the dialing node (armed by
    /// `corrupt_back_min` instead of `corrupt_min`).
    back: bool,
}

impl FrameTracker {
    fn corrupt_arm<'a>(&self, ctl: &'a ProxyCtl) -> &'a AtomicU64 {
        if self.back {
            &ctl.corrupt_back_min
        } else {
            &ctl.corrupt_min
        }
    }

    fn process(&mut self, buf: &mut [u8], ctl: &ProxyCtl) {
        let mut i = 0;
        while i < buf.len() {
            if self.remaining == 0 {
                let take = (PEER_HEADER_LEN - self.head_fill).min(buf.len() - i);
                self.head[self.head_fill..self.head_fill + take].copy_from_slice(&buf[i..i + take]);
                self.head_fill += take;
                i += take;
                if self.head_fill < PEER_HEADER_LEN {
                    continue;
                }
                self.head_fill = 0;
                let kind = u16::from_be_bytes([self.head[4], self.head[5]]);
                let len = u32::from_be_bytes(self.head[16..20].try_into().expect("4 bytes"));
                self.remaining = u64::from(len);
                self.payload_len = u64::from(len);
                self.pos = 0;
                self.prefix.clear();
                self.target = None;
                let arm = self.corrupt_arm(ctl);
                let min = arm.load(Ordering::SeqCst);
                if kind == PEER_KIND_WRITE
                    && min > 0
                    && self.payload_len >= PEER_WRITE_PREFIX + min
                    && arm
                        .compare_exchange(min, 0, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    let data_len = self.payload_len - PEER_WRITE_PREFIX;
                    self.target = Some(PEER_WRITE_PREFIX + data_len / 2);
                }
                continue;
            }
            let take = self.remaining.min((buf.len() - i) as u64) as usize;
            if self.pos < PEER_WRITE_PREFIX {
                let want = (PEER_WRITE_PREFIX - self.pos).min(take as u64) as usize;
                self.prefix.extend_from_slice(&buf[i..i + want]);
            }
            if let Some(t) = self.target {
                if t >= self.pos && t < self.pos + take as u64 {
                    let mask = 1u8 << 3;
                    buf[i + (t - self.pos) as usize] ^= mask;
                    self.target = None;
                    let write_offset =
                        u64::from_be_bytes(self.prefix[8..16].try_into().expect("8 bytes"));
                    ctl.corrupted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Corruption {
                            write_offset,
                            data_len: self.payload_len - PEER_WRITE_PREFIX,
                            byte_in_data: t - PEER_WRITE_PREFIX,
                            mask,
                        });
                    if !self.back && ctl.refuse_after_corrupt.load(Ordering::SeqCst) {
                        ctl.refuse.store(true, Ordering::SeqCst);
                    }
                }
            }
            self.pos += take as u64;
            self.remaining -= take as u64;
            i += take;
        }
    }
}

// ------------------------------------------------------------------------------------------
// A replicated pair: nodes "alpha" and "beta"
// ------------------------------------------------------------------------------------------

/// Compares two files of equal length, a MiB at a time, reporting the first difference.
pub fn assert_same_files(what: &str, a: &Path, b: &Path) {
    let la = fs::metadata(a)
        .unwrap_or_else(|e| panic!("{}: {e}", a.display()))
        .len();
    let lb = fs::metadata(b)
        .unwrap_or_else(|e| panic!("{}: {e}", b.display()))
        .len();
    assert_eq!(
        la,
        lb,
        "{what}: {} and {} differ in length",
        a.display(),
        b.display()
    );
    let runs = differing_blocks(a, b, la);
    if !runs.is_empty() {
        let total: u64 = runs.iter().map(|(_, l)| l).sum();
        let shown: Vec<String> = runs
            .iter()
            .take(16)
            .map(|(o, l)| format!("[{o}, +{l})"))
            .collect();
        let first = runs[0].0;
        let n = (la - first).min(16) as usize;
        panic!(
            "{what}: {total} bytes in {} run(s) of 4 KiB blocks differ: {}{}; at {first}: {:02x?} instead of {:02x?}",
            runs.len(),
            shown.join(", "),
            if runs.len() > 16 { ", ..." } else { "" },
            read_at(b, first, n),
            read_at(a, first, n),
        );
    }
}

/// The runs of 4 KiB blocks (offset, length) in which the first `len` bytes of two files
/// differ.
pub fn differing_blocks(a: &Path, b: &Path, len: u64) -> Vec<(u64, u64)> {
    const BLOCK: usize = 4096;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        let (x, y) = (read_at(a, off, n), read_at(b, off, n));
        for (i, (p, q)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
            if p != q {
                let at = off + (i * BLOCK) as u64;
                let l = p.len() as u64;
                match runs.last_mut() {
                    Some((o, rl)) if *o + *rl == at => *rl += l,
                    _ => runs.push((at, l)),
                }
            }
        }
        off += n as u64;
    }
    runs
}

/// How a pair is set up.
#[derive(Debug, Clone)]
pub struct PairOpts {
    /// Size of alpha's disk file (and beta's, unless `beta_disk_size` says otherwise).
    pub disk_size: u64,
    pub beta_disk_size: Option<u64>,
    /// `resource.protocol`; the default ("C") when `None`.
    pub protocol: Option<&'static str>,
    /// `heartbeat.interval_ms` and `timeout_ms`; the defaults when `None`.
    pub heartbeat_ms: Option<(u64, u64)>,
    /// `heartbeat.ack_timeout_ms`; the default when `None`.
    pub ack_timeout_ms: Option<u64>,
    /// `sync.rate_mb_s` (MiB/s); unlimited when `None`.
    pub rate_mb_s: Option<u64>,
    /// `sync.al_extents`; the default when `None`.
    pub al_extents: Option<u32>,
    /// A secret for beta's resource file that differs from alpha's.
    pub beta_secret: Option<String>,
    /// Alpha reaches beta through a [`FaultProxy`]: alpha's resource file names the proxy as
    /// beta's replication address, beta's file the real one.
    pub proxy: bool,
}

impl Default for PairOpts {
    fn default() -> Self {
        PairOpts {
            disk_size: 32 * MIB,
            beta_disk_size: None,
            protocol: None,
            heartbeat_ms: None,
            ack_timeout_ms: None,
            rate_mb_s: None,
            al_extents: None,
            beta_secret: None,
            proxy: false,
        }
    }
}

/// The secret both nodes share unless a test says otherwise.
pub const PAIR_SECRET: &str = "integration-test-secret";

/// One node of a [`Pair`]. Dropping it stops its daemon and, when the test is failing,
/// prints the daemon's logs.
pub struct PairNode {
    pub name: &'static str,
    pub config: PathBuf,
    pub disk: PathBuf,
    pub meta: PathBuf,
    pub admin: PathBuf,
    pub nbd: SocketAddr,
    /// Where this node listens for its peer.
    pub replication: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
    logs: Vec<PathBuf>,
}

impl PairNode {
    fn new(root: &Path, name: &'static str, disk_size: u64) -> PairNode {
        let dir = root.join(name);
        fs::create_dir_all(&dir).expect("create node directory");
        let disk = dir.join("disk.img");
        fs::File::create(&disk)
            .and_then(|f| f.set_len(disk_size))
            .expect("create disk file");
        PairNode {
            name,
            config: dir.join("r0.toml"),
            meta: dir.join("disk.meta"),
            admin: dir.join("admin.sock"),
            nbd: SocketAddr::from(([127, 0, 0, 1], free_port())),
            replication: SocketAddr::from(([127, 0, 0, 1], free_port())),
            disk,
            dir,
            child: None,
            logs: Vec::new(),
        }
    }

    fn node_section(&self, replication: SocketAddr) -> String {
        format!(
            "[[node]]\n\
             name = \"{}\"\n\
             disk = \"{}\"\n\
             meta = \"{}\"\n\
             replication = \"{replication}\"\n\
             nbd = \"{}\"\n\
             admin = \"{}\"\n",
            self.name,
            self.disk.display(),
            self.meta.display(),
            self.nbd,
            self.admin.display(),
        )
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `twinbd <args...> -c CONFIG -n NAME`, under a deadline.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(TWINBD);
        cmd.args(args)
            .arg("-c")
            .arg(&self.config)
            .args(["-n", self.name])
            .env("NO_COLOR", "1");
        run(&mut cmd, CMD_TIMEOUT)
    }

    pub fn create_md(&self) {
        self.cli(&["create-md"]).ok();
    }

    /// Starts the daemon and waits until its control socket answers.
    pub fn start(&mut self) {
        assert!(
            self.child.is_none(),
            "{}: daemon already running",
            self.name
        );
        let log = self.path(&format!("daemon-{}.log", self.logs.len() + 1));
        let file = fs::File::create(&log).expect("create daemon log");
        let mut cmd = Command::new(TWINBD);
        cmd.args(["run", "-c"])
            .arg(&self.config)
            .args(["-n", self.name])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file);
        self.logs.push(log);
        self.child = Some(cmd.spawn().expect("spawn twinbd run"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.assert_alive("during start-up");
            if std::os::unix::net::UnixStream::connect(&self.admin).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: control socket not answering after 20s:\n{}",
                self.name,
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Asserts the daemon is still running (no crash).
    pub fn assert_alive(&mut self, when: &str) {
        let name = self.name;
        let Some(c) = self.child.as_mut() else {
            panic!("{name}: daemon not running {when}");
        };
        if let Ok(Some(st)) = c.try_wait() {
            self.child = None;
            panic!("{name}: daemon died {when}: {st}\n{}", self.log());
        }
    }

    /// Clean shutdown by SIGTERM; fails the test unless the daemon exits successfully within
    /// `timeout`.
    pub fn stop(&mut self, timeout: Duration) {
        let mut child = self.child.take().expect("daemon running");
        signal_child(&child, Signal::SIGTERM);
        match wait_deadline(&mut child, timeout) {
            Some(st) => assert!(
                st.success(),
                "{}: daemon exited with {st} after SIGTERM:\n{}",
                self.name,
                self.log()
            ),
            None => {
                terminate(&mut child, Duration::from_secs(1));
                panic!(
                    "{}: daemon did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.name,
                    self.log()
                );
            }
        }
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        signal_child(&child, Signal::SIGKILL);
        assert!(
            wait_deadline(&mut child, Duration::from_secs(10)).is_some(),
            "{}: daemon survived SIGKILL",
            self.name
        );
    }

    /// All of this node's daemon logs so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        for (i, p) in self.logs.iter().enumerate() {
            s.push_str(&format!(
                "----- {} daemon log {} ({}) -----\n",
                self.name,
                i + 1,
                p.display()
            ));
            s.push_str(&fs::read_to_string(p).unwrap_or_else(|e| format!("<unreadable: {e}>\n")));
        }
        s
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]).ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{}: status --json is not JSON ({e}): {out}", self.name))
    }

    /// `promote [--force]`; the caller checks the outcome.
    pub fn promote(&self, force: bool) -> Output {
        let args: &[&str] = if force {
            &["promote", "--force"]
        } else {
            &["promote"]
        };
        self.cli(args)
    }

    /// Polls `status --json` every 20 ms until `cond` holds; fails after `timeout`.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status();
            if cond(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{}: status never showed {what} within {timeout:?}; last: {st:#}",
                self.name
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The export's URI as libnbd, qemu and fio write it.
    pub fn uri(&self) -> String {
        format!("nbd://{}/{RESOURCE}", self.nbd)
    }
}

impl Drop for PairNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if terminate(&mut child, Duration::from_secs(10)).is_none() {
                announce(&format!(
                    "twinbd pid {} ({}) survived SIGKILL in test cleanup",
                    child.id(),
                    self.name
                ));
            }
        }
        if thread::panicking() {
            eprintln!("{}", self.log());
        }
    }
}

/// Two nodes of resource r0 on loopback, each with its own disk, metadata, resource file and
/// ports, optionally with a [`FaultProxy`] on the link. Dropping the pair stops both daemons,
/// then the proxy, then removes the files.
pub struct Pair {
    pub alpha: PairNode,
    pub beta: PairNode,
    pub proxy: Option<FaultProxy>,
    pub opts: PairOpts,
    dir: tempfile::TempDir,
}

impl Pair {
    /// Creates the files (disks, resource files); no metadata, no daemons yet.
    pub fn new(opts: PairOpts) -> Pair {
        let dir = tempfile::Builder::new()
            .prefix("twinbd-pair.")
            .tempdir()
            .expect("temporary directory");
        let alpha = PairNode::new(dir.path(), "alpha", opts.disk_size);
        let beta = PairNode::new(
            dir.path(),
            "beta",
            opts.beta_disk_size.unwrap_or(opts.disk_size),
        );
        let proxy = opts.proxy.then(|| FaultProxy::start(beta.replication));
        let pair = Pair {
            alpha,
            beta,
            proxy,
            opts,
            dir,
        };
        pair.write_configs();
        pair
    }

    /// Both nodes with metadata created, both daemons running, alpha promoted (forced: fresh
    /// metadata is never up to date) and the initial full sync to beta finished.
    pub fn up(opts: PairOpts) -> Pair {
        let mut pair = Pair::new(opts);
        pair.alpha.create_md();
        pair.beta.create_md();
        pair.alpha.start();
        pair.beta.start();
        pair.alpha.promote(true).ok();
        pair.wait_in_sync("the initial full sync", Duration::from_secs(60));
        pair
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn proxy(&self) -> &FaultProxy {
        self.proxy.as_ref().expect("this pair has no proxy")
    }

    fn config_text(&self, secret: &str, beta_replication: SocketAddr) -> String {
        let mut s = format!("[resource]\nname = \"{RESOURCE}\"\nsecret = \"{secret}\"\n");
        if let Some(p) = self.opts.protocol {
            s.push_str(&format!("protocol = \"{p}\"\n"));
        }
        if self.opts.heartbeat_ms.is_some() || self.opts.ack_timeout_ms.is_some() {
            s.push_str("\n[heartbeat]\n");
        }
        if let Some((interval, timeout)) = self.opts.heartbeat_ms {
            s.push_str(&format!(
                "interval_ms = {interval}\ntimeout_ms = {timeout}\n"
            ));
        }
        if let Some(ack) = self.opts.ack_timeout_ms {
            s.push_str(&format!("ack_timeout_ms = {ack}\n"));
        }
        if self.opts.rate_mb_s.is_some() || self.opts.al_extents.is_some() {
            s.push_str("\n[sync]\n");
        }
        if let Some(rate) = self.opts.rate_mb_s {
            s.push_str(&format!("rate_mb_s = {rate}\n"));
        }
        if let Some(n) = self.opts.al_extents {
            s.push_str(&format!("al_extents = {n}\n"));
        }
        s.push('\n');
        s.push_str(&self.alpha.node_section(self.alpha.replication));
        s.push('\n');
        s.push_str(&self.beta.node_section(beta_replication));
        s
    }

    /// Writes both resource files from `opts`: identical, except that alpha's names the
    /// proxy as beta's address (if there is one) and beta's may carry another secret.
    pub fn write_configs(&self) {
        let via = self
            .proxy
            .as_ref()
            .map_or(self.beta.replication, |p| p.addr());
        let beta_secret = self.opts.beta_secret.as_deref().unwrap_or(PAIR_SECRET);
        for (node, text) in [
            (&self.alpha, self.config_text(PAIR_SECRET, via)),
            (
                &self.beta,
                self.config_text(beta_secret, self.beta.replication),
            ),
        ] {
            fs::write(&node.config, text).expect("write resource file");
            fs::set_permissions(&node.config, fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
        }
    }

    /// Both nodes connected with nothing out of sync, no resync running, both disks up to
    /// date and each seeing its peer's disk up to date. Returns (alpha's, beta's) status.
    pub fn wait_in_sync(&self, what: &str, timeout: Duration) -> (Value, Value) {
        let deadline = Instant::now() + timeout;
        loop {
            let (a, b) = (self.alpha.status(), self.beta.status());
            if settled(&a) && settled(&b) {
                return (a, b);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the pair did not settle in sync within {timeout:?}\nalpha: {a:#}\nbeta: {b:#}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The two backing disk files are byte for byte identical.
    pub fn assert_disks_identical(&self, what: &str) {
        assert_same_files(
            &format!("{what}: beta's disk against alpha's"),
            &self.alpha.disk,
            &self.beta.disk,
        );
    }
}

// ---- failover tests ----

/// Additions to a pair's resource files: whole sections after the `[resource]` part (such as
/// `[failover]` and `[handlers]`), and keys added to one node's `[[node]]` table (such as
/// `disk_faults`).
#[derive(Debug, Clone, Default)]
pub struct PairExtras {
    pub sections: String,
    pub alpha_node: String,
    pub beta_node: String,
}

impl Pair {
    /// Rewrites both resource files as [`Pair::write_configs`] does, plus `extras`. A running
    /// daemon does not reread its file: restart it for a change to apply.
    pub fn write_configs_with(&self, extras: &PairExtras) {
        let via = self
            .proxy
            .as_ref()
            .map_or(self.beta.replication, |p| p.addr());
        let beta_secret = self.opts.beta_secret.as_deref().unwrap_or(PAIR_SECRET);
        let text = |secret: &str, beta_replication: SocketAddr| {
            let base = self.config_text(secret, beta_replication);
            let head = base.find("[[node]]").map_or(base.as_str(), |i| &base[..i]);
            let mut s = head.trim_end().to_string();
            s.push_str("\n\n");
            if !extras.sections.trim().is_empty() {
                s.push_str(extras.sections.trim());
                s.push_str("\n\n");
            }
            s.push_str(&self.alpha.node_section(self.alpha.replication));
            s.push_str(&extras.alpha_node);
            s.push('\n');
            s.push_str(&self.beta.node_section(beta_replication));
            s.push_str(&extras.beta_node);
            s
        };
        for (node, text) in [
            (&self.alpha, text(PAIR_SECRET, via)),
            (&self.beta, text(beta_secret, self.beta.replication)),
        ] {
            fs::write(&node.config, text).expect("write resource file");
            fs::set_permissions(&node.config, fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
        }
    }

    /// [`Pair::up`] with extra settings in both resource files; `extras` gets the pair
    /// (whose directory handler commands may need) before any daemon starts.
    pub fn up_with(opts: PairOpts, extras: impl FnOnce(&Pair) -> PairExtras) -> Pair {
        let mut pair = Pair::new(opts);
        pair.write_configs_with(&extras(&pair));
        pair.alpha.create_md();
        pair.beta.create_md();
        pair.alpha.start();
        pair.beta.start();
        pair.alpha.promote(true).ok();
        pair.wait_in_sync("the initial full sync", Duration::from_secs(60));
        pair
    }
}

impl BlockStack {
    /// Gives up everything this stack set up without waiting for it to go cleanly, as an
    /// operator does after the server under it died: lazy unmounts, loop devices detached
    /// (the kernel finishes when their last user is gone), the nbdfuse mount detached lazily
    /// and nbdfuse killed. Every error is ignored; returns what each step reported.
    pub fn abandon(&mut self) -> Vec<String> {
        let t = Duration::from_secs(15);
        let mut report = Vec::new();
        let mut step = |cmd: &mut Command| {
            let what = describe(cmd);
            let res =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cmd, t).success()));
            report.push(format!(
                "{what}: {}",
                match res {
                    Ok(true) => "ok",
                    Ok(false) => "failed (ignored)",
                    Err(_) => "timed out (ignored)",
                }
            ));
        };
        for dir in self.mounts.drain(..).rev() {
            step(tool_cmd("umount").arg("-l").arg(&dir));
        }
        for dev in self.loops.drain(..).rev() {
            step(tool_cmd("losetup").args(["-d", &dev]));
        }
        if let Some((dir, mut child)) = self.fuse.take() {
            step(tool_cmd("fusermount3").arg("-u").arg("-z").arg(&dir));
            if terminate(&mut child, Duration::from_secs(2)).is_none() {
                announce(&format!("nbdfuse pid {} survived SIGKILL", child.id()));
            }
        }
        report
    }
}

// ---- shared by several test files ----

/// `qemu-io -f raw URI -c CMD...`; fails the test unless every command succeeded and every
/// pattern verified. qemu-io's exit status and its messages are both checked.
pub fn qemu_io(uri: &str, cmds: &[String]) -> Output {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(&mut cmd, CMD_TIMEOUT);
    let all = out.all();
    assert!(
        !all.contains("Pattern verification failed"),
        "qemu-io found wrong data: {out}"
    );
    assert!(
        !all.contains("failed") && !all.contains("error"),
        "a qemu-io command failed: {out}"
    );
    out.ok()
}

/// Waits until `node`'s logs contain a line with every one of `words` (case-insensitive);
/// returns that line.
pub fn wait_log_line(node: &PairNode, words: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = node.log();
        if let Some(l) = log.lines().find(|l| {
            let l = l.to_lowercase();
            words.iter().all(|w| l.contains(&w.to_lowercase()))
        }) {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{}'s log has no line mentioning all of {words:?} within {timeout:?}:\n{log}",
            node.name
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A `u64` field of a status, by path (`"stats.resynced_bytes_total"`).
pub fn num(st: &Value, path: &str) -> u64 {
    let mut v = st;
    for k in path.split('.') {
        v = &v[k];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("status field {path} missing or not a number: {st:#}"))
}

/// True while a node's link is up (connected or resyncing).
pub fn linked(st: &Value) -> bool {
    matches!(
        st["connection"].as_str(),
        Some("connected" | "sync_source" | "sync_target")
    )
}

/// Connected, nothing out of sync, no resync, this node's and its peer's disks up to date.
pub fn settled(st: &Value) -> bool {
    st["connection"] == "connected"
        && st["out_of_sync_bytes"] == 0
        && st["resync"].is_null()
        && st["disk"] == "up_to_date"
        && st["peer"]["disk"] == "up_to_date"
}

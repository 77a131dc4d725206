//! `twinbd demo`: a ready-to-try setup on loopback.
//!
//! It writes a resource file and disk images under a directory, starts the node daemons as
//! child processes of this binary (exactly as an operator would with `twinbd run`), promotes
//! one, prints how to connect a client, and shows a live status line until Ctrl-C.
//!
//! This version runs a single node: peer replication is not part of it yet, and the demo
//! says so rather than pretending to mirror anything.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{Client, Request};

/// Parses sizes such as `256MiB`, `1GiB`, `512M`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("bad size {s:?}: expected a number with an optional unit, e.g. 256MiB")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "bad size unit {other:?} in {s:?} (use KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if v < (1 << 20) {
        return Err(format!("size {s:?} is too small: at least 1MiB"));
    }
    Ok(v)
}

struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM for a clean shutdown, then wait (bounded), then kill.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn twinbd(args: &[&str]) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let out = Command::new(exe)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run twinbd {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "twinbd {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn wait_for_socket(path: &Path, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the node daemon exited early ({status}); see its log above"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "the node daemon did not open {} in time",
        path.display()
    ))
}

pub fn run(dir: Option<PathBuf>, size: &str) -> Result<(), String> {
    let size = parse_size(size)?;
    let (dir, _temp) = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            let d = std::fs::canonicalize(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("twinbd-demo-")
                .tempdir()
                .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let disk = dir.join("alpha.img");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&disk)
        .map_err(|e| format!("cannot create {}: {e}", disk.display()))?;
    f.set_len(size)
        .map_err(|e| format!("cannot size {}: {e}", disk.display()))?;
    let res = dir.join("demo.toml");
    let admin = dir.join("alpha.sock");
    let text = format!(
        r#"# twinbd demo resource (single node)
[resource]
name = "demo"
secret = "demo-secret"

[[node]]
name = "alpha"
disk = "{disk}"
meta = "{meta}"
replication = "127.0.0.1:17789"
nbd = "127.0.0.1:10809"
admin = "{admin}"
"#,
        disk = disk.display(),
        meta = dir.join("alpha.meta").display(),
        admin = admin.display(),
    );
    std::fs::write(&res, text).map_err(|e| format!("cannot write {}: {e}", res.display()))?;
    let res_s = res.display().to_string();
    twinbd(&["create-md", "-c", &res_s, "-n", "alpha", "--force"])?;

    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let child = Command::new(exe)
        .args(["run", "-c", &res_s, "-n", "alpha"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("alpha.log"))
                .map_err(|e| format!("cannot create the log file: {e}"))?,
        ))
        .spawn()
        .map_err(|e| format!("cannot start the node daemon: {e}"))?;
    let mut daemon = Daemon { child };
    wait_for_socket(&admin, &mut daemon.child)?;
    let mut client = Client::connect(&admin).map_err(|e| e.to_string())?;
    client
        .call(&Request::Promote { force: true }, Duration::from_secs(30))
        .map_err(|e| e.to_string())?;

    println!(
        r#"twinbd demo: resource "demo", node alpha is PRIMARY, {size} exported over NBD.
  files:   {dir}   (log: alpha.log)
  NOTE:    single node: replication to a standby is not part of this version.

Try it (in another terminal):
  nbdinfo nbd://127.0.0.1:10809/demo
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' nbd://127.0.0.1:10809/demo
  twinbd status -c {res} -n alpha
  twinbd demote -c {res} -n alpha --force     # the export closes; promote opens it again

Ctrl-C stops the node.
"#,
        size = crate::status::human_bytes(size),
        dir = dir.display(),
        res = res.display(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc_flag(stop)?;
    }
    while !stop.load(Ordering::SeqCst) {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            return Err(format!(
                "the node daemon exited ({status}); see {}",
                dir.join("alpha.log").display()
            ));
        }
        match client.call(&Request::Status, Duration::from_secs(5)) {
            Ok(r) => {
                if let Some(st) = r.status {
                    print!("\r\x1b[2K{}", st.line());
                    let _ = std::io::stdout().flush();
                }
            }
            Err(e) => print!("\r\x1b[2Kstatus unavailable: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("\nstopping the node...");
    drop(daemon);
    println!("stopped.");
    Ok(())
}

/// Sets `flag` on SIGINT or SIGTERM.
fn ctrlc_flag(flag: Arc<AtomicBool>) -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    // Block the signals in this thread (inherited by threads created after) and wait for them
    // on a dedicated thread.
    set.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("12").is_err());
        assert!(parse_size("10XB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }
}

//! `twinbd demo`: a ready-to-try setup on loopback.
//!
//! It writes a resource file and disk images under a directory, starts the node daemons as
//! child processes of this binary (exactly as an operator would with `twinbd run`), promotes
//! one, prints how to connect a client, and shows a live status line until Ctrl-C.
//!
//! Two nodes, alpha and beta, replicate over loopback; alpha is promoted and exported at
//! 127.0.0.1:10809, beta stands by (its export, 127.0.0.1:10810, opens when it is promoted).

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

const NODES: [(&str, u16, u16); 2] = [("alpha", 17789, 10809), ("beta", 17790, 10810)];

fn resource_text(dir: &Path) -> String {
    let mut t = String::from(
        "# twinbd demo resource: two nodes on loopback\n\
         [resource]\nname = \"demo\"\nsecret = \"demo-secret\"\nprotocol = \"C\"\n\n\
         [heartbeat]\ninterval_ms = 200\ntimeout_ms = 1000\n",
    );
    for (name, repl, nbd) in NODES {
        t.push_str(&format!(
            "\n[[node]]\nname = \"{name}\"\ndisk = \"{disk}\"\nmeta = \"{meta}\"\n\
             replication = \"127.0.0.1:{repl}\"\nnbd = \"127.0.0.1:{nbd}\"\nadmin = \"{admin}\"\n",
            disk = dir.join(format!("{name}.img")).display(),
            meta = dir.join(format!("{name}.meta")).display(),
            admin = dir.join(format!("{name}.sock")).display(),
        ));
    }
    t
}

fn start_node(exe: &Path, res: &str, dir: &Path, name: &str) -> Result<Daemon, String> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))
        .map_err(|e| format!("cannot create the log file: {e}"))?;
    let child = Command::new(exe)
        .args(["run", "-c", res, "-n", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| format!("cannot start node {name}: {e}"))?;
    let mut d = Daemon { child };
    wait_for_socket(&dir.join(format!("{name}.sock")), &mut d.child)?;
    Ok(d)
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
    for (name, _, _) in NODES {
        let disk = dir.join(format!("{name}.img"));
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&disk)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("cannot create {}: {e}", disk.display()))?;
    }
    let res = dir.join("demo.toml");
    std::fs::write(&res, resource_text(&dir))
        .map_err(|e| format!("cannot write {}: {e}", res.display()))?;
    let res_s = res.display().to_string();
    for (name, _, _) in NODES {
        twinbd(&["create-md", "-c", &res_s, "-n", name, "--force"])?;
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let mut daemons = Vec::new();
    for (name, _, _) in NODES {
        daemons.push((name, start_node(&exe, &res_s, &dir, name)?));
    }
    let mut clients = Vec::new();
    for (name, _, _) in NODES {
        clients
            .push(Client::connect(&dir.join(format!("{name}.sock"))).map_err(|e| e.to_string())?);
    }
    clients[0]
        .call(&Request::Promote { force: true }, Duration::from_secs(30))
        .map_err(|e| e.to_string())?;

    println!(
        r#"twinbd demo: resource "demo" on two nodes, {size} each, replicating over loopback.
  alpha is PRIMARY, exported at nbd://127.0.0.1:10809/demo; beta is its standby
  (it serves nbd://127.0.0.1:10810/demo once promoted). The first full sync runs now.
  files:   {dir}   (logs: alpha.log, beta.log)

Try it (in another terminal):
  nbdinfo nbd://127.0.0.1:10809/demo
  qemu-io -f raw -c 'write -P 0xab 0 1M' nbd://127.0.0.1:10809/demo
  twinbd status -c {res} -n alpha           # or -n beta; --json for scripts
  twinbd events -c {res} -n beta            # one JSON line per state change

A failover by hand:
  twinbd demote -c {res} -n alpha --force   # (or kill the alpha daemon)
  twinbd promote -c {res} -n beta
  qemu-io -f raw -c 'read -P 0xab 0 1M' nbd://127.0.0.1:10810/demo

Ctrl-C stops both nodes.
"#,
        size = crate::status::human_bytes(size),
        dir = dir.display(),
        res = res.display(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    ctrlc_flag(Arc::clone(&stop))?;
    while !stop.load(Ordering::SeqCst) {
        let mut line = String::new();
        for ((name, d), c) in daemons.iter_mut().zip(clients.iter_mut()) {
            if let Ok(Some(st)) = d.child.try_wait() {
                line.push_str(&format!("{name}: exited ({st}) | "));
                continue;
            }
            match c.call(&Request::Status, Duration::from_secs(5)) {
                Ok(r) => {
                    if let Some(st) = r.status {
                        line.push_str(&st.line());
                        if let Some(rs) = &st.resync {
                            line.push_str(&format!(
                                " sync {:.0}%",
                                rs.done_bytes as f64 * 100.0 / rs.total_bytes.max(1) as f64
                            ));
                        }
                    }
                }
                Err(e) => line.push_str(&format!("{name}: status unavailable: {e}")),
            }
            line.push_str("  ||  ");
        }
        print!("\r\x1b[2K{}", line.trim_end_matches([' ', '|']));
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("\nstopping both nodes...");
    drop(daemons);
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

//! Settings for the TCP connections of the NBD server and of the peer link.
//!
//! Every connection gets `TCP_NODELAY`: both protocols send small messages (replies,
//! acknowledgements, pings) that must not wait for more data.
//!
//! A connection whose two ends are on this machine (a loopback address, or our own address
//! on both ends) also loses the pacing of a congestion control that paces (BBR, the default
//! of some distributions). Over loopback there is no network to be congested; the pacing
//! timer only spreads each large reply or frame over time, and a sender with one thread
//! waits for it. Such a connection gets `cubic` instead, or `reno` where the kernel lacks
//! cubic (`docs/benchmarks.md`, "Connections on this machine: no pacing"). Connections to
//! other machines keep the system's choice, and so does a local one whose algorithm does not
//! pace.

use std::ffi::OsString;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{getsockopt, setsockopt, sockopt::TcpCongestion};
use tokio::net::TcpStream;

/// Congestion controls that do not pace, in order of preference. Linux always has `reno`.
const UNPACED: [&str; 2] = ["cubic", "reno"];

/// Whether a connection from `peer` to our address `local` stays on this machine.
pub fn same_machine(peer: IpAddr, local: IpAddr) -> bool {
    let peer = peer.to_canonical();
    peer.is_loopback() || peer == local.to_canonical()
}

/// Whether `s` connects two sockets of this machine.
pub fn is_local(s: &TcpStream) -> bool {
    match (s.peer_addr(), s.local_addr()) {
        (Ok(p), Ok(l)) => same_machine(p.ip(), l.ip()),
        _ => false,
    }
}

/// Sets up a new connection (see the module's documentation). A setting the kernel refuses
/// is logged and the connection used as it is: it still works, only slower.
pub fn tune(s: &TcpStream) {
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY refused");
    }
    if !is_local(s) {
        return;
    }
    match unpace(s) {
        Ok(Some((was, now))) => {
            tracing::debug!(
                was,
                now,
                "connection on this machine: congestion control without pacing"
            )
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "congestion control not changed"),
    }
}

/// The congestion control of `s`.
pub fn congestion_control<F: AsFd>(s: &F) -> nix::Result<String> {
    let name = getsockopt(s, TcpCongestion)?;
    // The kernel pads the name with NULs to the full option length.
    Ok(name.to_string_lossy().trim_end_matches('\0').to_string())
}

/// Replaces a pacing congestion control on `s` with one that does not pace. Returns the
/// algorithm before and after, or `None` when `s` did not pace.
pub fn unpace<F: AsFd>(s: &F) -> nix::Result<Option<(String, String)>> {
    let was = congestion_control(s)?;
    if !paces(&was) {
        return Ok(None);
    }
    let mut refused = nix::errno::Errno::ENOENT;
    for name in UNPACED {
        match setsockopt(s, TcpCongestion, &OsString::from(name)) {
            Ok(()) => return Ok(Some((was, name.to_string()))),
            Err(e) => refused = e,
        }
    }
    Err(refused)
}

/// A socket's receive low-water mark (`SO_RCVLOWAT`), kept by a reader of large messages.
///
/// While the rest of a large message is read straight into its buffer, the mark makes the
/// kernel report the socket readable only once that rest has arrived (up to [`Self::MAX`]),
/// instead of at every segment: the reader wakes and reads once per message, not four or
/// five times, and the sender's wake-ups of the reader drop with it (`docs/benchmarks.md`,
/// "Waking once per large payload"). Between messages the mark is 1, the kernel's default.
///
/// The mark must never exceed what the sender is bound to send (the rest of the message being
/// read), or the reader waits for bytes that never come: a sender of a request waits for its
/// reply before it sends more. A peer that closes wakes the reader whatever the mark.
#[derive(Debug)]
pub struct LowWater {
    current: usize,
}

impl Default for LowWater {
    fn default() -> LowWater {
        LowWater { current: 1 }
    }
}

impl LowWater {
    /// The highest mark set: a larger message is read in pieces of about this size, so that
    /// a 32 MiB payload does not sit whole in the socket before it is read.
    pub const MAX: usize = 1 << 20;

    /// The mark as last set.
    #[cfg(test)]
    fn current(&self) -> usize {
        self.current
    }

    /// Sets the mark on `s` for the next read: `bound` is what the sender is bound to send
    /// next (0 between messages). Costs a system call only when the mark changes. An error
    /// means the mark may be left above `bound`: the caller must stop reading the socket.
    pub fn follow<F: AsRawFd>(&mut self, s: &F, bound: usize) -> std::io::Result<()> {
        let want = bound.clamp(1, Self::MAX);
        if want == self.current {
            return Ok(());
        }
        match set_receive_low_water(s, want) {
            Ok(()) => {
                self.current = want;
                Ok(())
            }
            // Left lower than wanted: reads wake earlier, nothing more.
            Err(e) if self.current < want => {
                tracing::debug!(error = %e, "receive low-water mark not raised");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Sets `SO_RCVLOWAT` on `s` (see [`LowWater`]). The kernel caps the value at half its
/// largest receive buffer and grows the socket's buffer to hold it.
fn set_receive_low_water<F: AsRawFd>(s: &F, bytes: usize) -> std::io::Result<()> {
    let v = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is an open socket for the duration of the call (`s` is
    // borrowed); the option value is a c_int on the stack, passed with its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The receive low-water mark of `s`, as the kernel has it.
#[cfg(test)]
pub(crate) fn receive_low_water<F: AsRawFd>(s: &F) -> std::io::Result<usize> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the descriptor is an open socket while `s` is borrowed; the kernel writes at
    // most `len` bytes into `v`, a c_int on the stack.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(usize::try_from(v).unwrap_or(0))
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the congestion control named `name` paces its sends itself.
fn paces(name: &str) -> bool {
    name.starts_with("bbr")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn same_machine_means_loopback_or_our_own_address() {
        let local = ip("10.0.0.5");
        assert!(same_machine(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(same_machine(ip("127.8.0.1"), local));
        assert!(same_machine(ip("127.3.2.1"), local));
        assert!(same_machine(ip("::1"), ip("::1")));
        assert!(same_machine(ip("::ffff:127.0.0.1"), ip("::ffff:127.0.0.1")));
        assert!(same_machine(ip("10.0.0.5"), local));
        assert!(same_machine(ip("::ffff:10.0.0.5"), local));
        assert!(!same_machine(ip("10.0.0.9"), local));
        assert!(!same_machine(ip("fd00::9"), ip("fd00::5")));
    }

    #[test]
    fn only_pacing_algorithms_count_as_pacing() {
        assert!(paces("bbr"));
        assert!(paces("bbr2"));
        for name in ["cubic", "reno", "dctcp", "vegas"] {
            assert!(!paces(name), "{name}");
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("address");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    fn set(s: &TcpStream, name: &str) -> nix::Result<()> {
        setsockopt(s, TcpCongestion, &OsString::from(name))
    }

    #[tokio::test]
    async fn a_local_connection_loses_pacing_and_keeps_other_algorithms() {
        let (c, s) = pair().await;
        assert!(is_local(&c) && is_local(&s));

        set(&s, "reno").expect("reno is always there");
        tune(&s);
        assert_eq!(congestion_control(&s).expect("read back"), "reno");
        assert!(s.nodelay().expect("nodelay"));

        // Setting an algorithm the kernel has as a module loads it for root; the test
        // machines run as root and have BBR.
        match set(&c, "bbr") {
            Ok(()) => {}
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("BBR unavailable here ({e}): the pacing case is not exercised");
                return;
            }
            Err(e) => panic!("BBR unavailable ({e}); CI needs it to test the pacing case"),
        }
        assert_eq!(congestion_control(&c).expect("read back"), "bbr");
        tune(&c);
        let now = congestion_control(&c).expect("read back");
        assert!(UNPACED.contains(&now.as_str()), "still {now}");
        assert_eq!(unpace(&c).expect("unpace"), None);
    }

    /// Whether the socket reports itself readable within `ms`.
    fn readable_within(s: &TcpStream, ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack, for a socket `s` keeps open.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        n == 1 && p.revents & libc::POLLIN != 0
    }

    #[tokio::test]
    async fn the_low_water_mark_follows_the_bound_and_holds_readiness_back() {
        use tokio::io::AsyncWriteExt;
        let (mut c, s) = pair().await;
        let mut lw = LowWater::default();
        assert_eq!(receive_low_water(&s).expect("read"), 1);

        lw.follow(&s, 100_000).expect("set");
        assert_eq!(receive_low_water(&s).expect("read"), 100_000);
        assert_eq!(lw.current(), 100_000);
        // Less than the mark waiting: not readable.
        c.write_all(&[7u8; 60_000]).await.expect("send");
        assert!(!readable_within(&s, 100));
        // The mark lowered to what is waiting: readable at once.
        lw.follow(&s, 60_000).expect("lower");
        assert!(readable_within(&s, 1000));
        // A larger bound is capped.
        lw.follow(&s, 32 << 20).expect("cap");
        assert_eq!(receive_low_water(&s).expect("read"), LowWater::MAX);
        assert!(!readable_within(&s, 50));
        // A peer that closes wakes the reader whatever the mark.
        c.shutdown().await.expect("shutdown");
        assert!(readable_within(&s, 1000));
        // Between messages: back to the default.
        lw.follow(&s, 0).expect("reset");
        assert_eq!(receive_low_water(&s).expect("read"), 1);
        assert_eq!(lw.current(), 1);
    }
}

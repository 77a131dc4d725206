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
use std::os::fd::AsFd;

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
}

//! twinbd: a userspace block-device mirroring daemon.
//!
//! Layers, each readable and testable alone:
//! * [`storage`]: the data disk behind one trait (io_uring engine, portable fallback).
//! * [`nbd`]: the NBD wire format (pure codec) and the export server built on it.
//! * [`meta`] / [`bitmap`]: on-disk metadata and the dirty-region bitmap.
//! * [`config`]: the resource file.
//! * [`node`]: the daemon: role rules, control socket, NBD export lifecycle.
//! * [`control`] / [`status`]: the control protocol and the status object of the CLI.
//! * [`sockpoll`]: the brief socket poll of readers whose other end answers quickly.
//! * [`tcp`]: settings of the NBD and peer connections (no delay; no pacing on this machine).

pub mod bitmap;
pub mod config;
pub mod control;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod meta;
pub mod nbd;
pub mod node;
pub mod peer;
pub mod repl;
pub mod sockpoll;
pub mod status;
pub mod storage;
pub mod tcp;

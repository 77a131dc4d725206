//! twinbd: a userspace block-device mirroring daemon.
//!
//! Layers, each readable and testable alone:
//! * [`storage`]: the data disk behind one trait (io_uring engine, portable fallback).
//! * [`nbd`]: the NBD wire format (pure codec) and the export server built on it.
//! * [`meta`] / [`bitmap`]: on-disk metadata and the dirty-region bitmap.
//! * [`config`]: the resource file.
//! * [`node`]: the daemon: role state, control socket, NBD export lifecycle.

pub mod storage;

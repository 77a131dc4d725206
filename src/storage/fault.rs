//! Fault injection for tests: make a disk fail on purpose.
//!
//! Selected per node in the resource file (`disk_faults = "..."`, for testing only), as
//! comma-separated settings:
//!
//! * `after=N`: the first N operations succeed, every later one fails;
//! * `ranges=A+L;B+M`: operations touching `[A, A+L)` or `[B, B+M)` fail (byte offsets);
//! * `ops=read|write|flush|all`: which operations may fail (default `all`; with `write`, a
//!   flush counts as a write; `flush` fails flushes only, and without `after` or `ranges`
//!   every one of them: a disk whose written data never becomes durable);
//! * `mode=error|hang`: a failing operation returns `EIO`, as a dying disk reports it
//!   (default), or never completes, as a stuck device.
//!
//! With both `after` and `ranges`, an operation fails when either says so.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// What to break.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSpec {
    pub after_ops: Option<u64>,
    pub ranges: Vec<(u64, u64)>,
    pub reads: bool,
    pub writes: bool,
    pub flushes: bool,
    /// Failing operations never complete instead of returning `EIO`.
    pub hang: bool,
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.after_ops {
            parts.push(format!("after={n}"));
        }
        if !self.ranges.is_empty() {
            let r: Vec<String> = self
                .ranges
                .iter()
                .map(|(a, l)| format!("{a}+{l}"))
                .collect();
            parts.push(format!("ranges={}", r.join(";")));
        }
        parts.push(
            match (self.reads, self.writes, self.flushes) {
                (true, false, false) => "ops=read",
                (false, true, _) => "ops=write",
                (false, false, true) => "ops=flush",
                _ => "ops=all",
            }
            .to_string(),
        );
        if self.hang {
            parts.push("mode=hang".to_string());
        }
        f.write_str(&parts.join(","))
    }
}

impl FromStr for FaultSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<FaultSpec, String> {
        let mut spec = FaultSpec {
            after_ops: None,
            ranges: Vec::new(),
            reads: true,
            writes: true,
            flushes: true,
            hang: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected key=value"))?;
            match k.trim() {
                "after" => {
                    spec.after_ops = Some(
                        v.trim()
                            .parse()
                            .map_err(|_| format!("after={v}: not a number"))?,
                    )
                }
                "ranges" => {
                    for r in v.split(';').map(str::trim).filter(|r| !r.is_empty()) {
                        let (a, l) = r
                            .split_once('+')
                            .ok_or_else(|| format!("range {r:?}: expected OFFSET+LENGTH"))?;
                        let a: u64 = a
                            .trim()
                            .parse()
                            .map_err(|_| format!("range {r:?}: bad offset"))?;
                        let l: u64 = l
                            .trim()
                            .parse()
                            .map_err(|_| format!("range {r:?}: bad length"))?;
                        spec.ranges.push((a, l));
                    }
                }
                "ops" => {
                    (spec.reads, spec.writes, spec.flushes) = match v.trim() {
                        "read" => (true, false, false),
                        "write" => (false, true, true),
                        "flush" => (false, false, true),
                        "all" => (true, true, true),
                        o => return Err(format!("ops={o}: expected read, write, flush or all")),
                    }
                }
                "mode" => {
                    spec.hang = match v.trim() {
                        "error" => false,
                        "hang" => true,
                        m => return Err(format!("mode={m}: expected error or hang")),
                    }
                }
                other => {
                    return Err(format!(
                        "unknown setting {other:?} (after, ranges, ops, mode)"
                    ))
                }
            }
        }
        let flushes_only = spec.flushes && !spec.reads && !spec.writes;
        if spec.after_ops.is_none() && spec.ranges.is_empty() && !flushes_only {
            return Err("nothing to inject: give after=N and/or ranges=OFFSET+LENGTH".into());
        }
        Ok(spec)
    }
}

/// The kinds of operation a spec selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Flush,
}

/// A live injector: the spec and an operation counter.
#[derive(Debug)]
pub struct Faults {
    spec: FaultSpec,
    ops: AtomicU64,
}

impl Faults {
    pub fn new(spec: FaultSpec) -> Faults {
        Faults {
            spec,
            ops: AtomicU64::new(0),
        }
    }

    /// Whether failing operations hang rather than return an error.
    pub fn hangs(&self) -> bool {
        self.spec.hang
    }

    /// Whether this operation fails.
    pub fn fails(&self, op: FaultOp, offset: u64, len: u64) -> bool {
        let enabled = match op {
            FaultOp::Read => self.spec.reads,
            FaultOp::Write => self.spec.writes,
            FaultOp::Flush => self.spec.flushes,
        };
        if !enabled {
            return false;
        }
        let flushes_only = !self.spec.reads && !self.spec.writes;
        if flushes_only && self.spec.after_ops.is_none() && self.spec.ranges.is_empty() {
            return true;
        }
        let n = self.ops.fetch_add(1, Ordering::Relaxed);
        if self.spec.after_ops.is_some_and(|after| n >= after) {
            return true;
        }
        let end = offset.saturating_add(len.max(1));
        self.spec
            .ranges
            .iter()
            .any(|&(a, l)| a < end && offset < a.saturating_add(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_apply() {
        let s: FaultSpec = "after=2,ops=write".parse().expect("parse");
        let f = Faults::new(s.clone());
        assert!(
            !f.fails(FaultOp::Read, 0, 1),
            "reads never fail with ops=write"
        );
        assert!(!f.fails(FaultOp::Write, 0, 1));
        assert!(!f.fails(FaultOp::Write, 0, 1));
        assert!(f.fails(FaultOp::Write, 0, 1));
        assert_eq!(s.to_string(), "after=2,ops=write");
        let r: FaultSpec = "ranges=4096+4096;1048576+512".parse().expect("parse");
        let f = Faults::new(r);
        assert!(!f.fails(FaultOp::Read, 0, 4096));
        assert!(f.fails(FaultOp::Read, 8191, 1));
        assert!(f.fails(FaultOp::Write, 1048000, 1000));
        assert!(!f.fails(FaultOp::Write, 1048576 + 512, 10));
        // Flushes alone: every one fails, nothing else does.
        let fl: FaultSpec = "ops=flush,mode=hang".parse().expect("parse");
        assert_eq!(fl.to_string(), "ops=flush,mode=hang");
        let f = Faults::new(fl);
        assert!(f.fails(FaultOp::Flush, 0, 0));
        assert!(f.fails(FaultOp::Flush, 0, 0));
        assert!(!f.fails(FaultOp::Write, 0, 4096));
        assert!(!f.fails(FaultOp::Read, 0, 4096));
        // Flushes after the first two.
        let f = Faults::new("after=2,ops=flush".parse().expect("parse"));
        assert!(!f.fails(FaultOp::Flush, 0, 0));
        assert!(!f.fails(FaultOp::Flush, 0, 0));
        assert!(f.fails(FaultOp::Flush, 0, 0));
        // With ops=write a flush counts as a write.
        let w = Faults::new("after=0,ops=write".parse().expect("parse"));
        assert!(w.fails(FaultOp::Flush, 0, 0));
        for bad in ["", "after=x", "ranges=5", "ops=some", "what=1", "ranges=1+"] {
            assert!(bad.parse::<FaultSpec>().is_err(), "{bad:?}");
        }
    }
}

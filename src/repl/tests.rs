//! The end of a resync against a write of the primary that marks its range at that moment;
//! and, at the end, what a device error does to a node without a peer.
//!
//! A write that started before replication did takes the unreplicated path: it holds its
//! extent and marks its range with `DirtyMarker::mark_held`. That mark can land on either side
//! of the sync source's final check (`finish_source`). Both orders are driven here step by
//! step, with the real metadata of both nodes, and judged by what matters after a crash: the
//! decision the two nodes reach from what their metadata files hold.

use super::*;
use crate::meta::{CreateParams, MetaLocation};
use crate::repl::decide::{decide, Decision, Side};

/// Generation of the data both nodes held when the primary lost its peer.
const OLD: u64 = 0x0a0a;
/// Generation the primary moved on to when it wrote without its peer.
const NEW: u64 = 0x1b1b;
const WRITE: (u64, u64) = (8 << 20, 4096);

fn loc(dir: &std::path::Path, node: &str) -> MetaLocation {
    MetaLocation::External(dir.join(format!("{node}.meta")))
}

/// A node's metadata, up to date at generation `current`, tracking changes against `bitmap`.
fn node(dir: &std::path::Path, node: &str, current: u64, bitmap: u64) -> Arc<Mutex<MetaStore>> {
    let mut s = MetaStore::create(
        &loc(dir, node),
        CreateParams {
            resource: "r0".into(),
            node: node.into(),
            data_size: 64 << 20,
            granularity: 4096,
        },
        false,
    )
    .expect("create metadata");
    s.update(|sb| {
        sb.generations.current = current;
        sb.generations.bitmap = bitmap;
        sb.disk_state = DiskState::UpToDate;
    })
    .expect("set generations");
    Arc::new(Mutex::new(s))
}

/// What a node would tell its peer at connect, read from its metadata file (after a crash).
fn side_on_disk(dir: &std::path::Path, node: &str, primary: bool, id: u64) -> Side {
    let (s, _) = MetaStore::open(&loc(dir, node)).expect("reopen metadata");
    let g = s.superblock().generations;
    Side {
        primary,
        disk: s.superblock().disk_state,
        current: g.current,
        bitmap: g.bitmap,
        history: g.history,
        dirty_bytes: s.bitmap().dirty_bytes(),
        id,
    }
}

/// The primary (alpha) moved on while beta was away; beta is the target of a bitmap resync.
fn pair(dir: &std::path::Path) -> (Arc<Mutex<MetaStore>>, Arc<Mutex<MetaStore>>, DirtyMarker) {
    let alpha = node(dir, "alpha", NEW, OLD);
    let beta = node(dir, "beta", OLD, 0);
    let (tx, _rx) = mpsc::unbounded_channel();
    let marker = DirtyMarker::spawn(
        Arc::clone(&alpha),
        Arc::new(AtomicBool::new(true)),
        DiskHealth::new(tx),
    );
    assert_eq!(
        decide(
            &side_on_disk(dir, "alpha", true, 1),
            &side_on_disk(dir, "beta", false, 2)
        ),
        Decision::Source { full: false },
        "the setting: alpha is the source of a bitmap resync"
    );
    (alpha, beta, marker)
}

#[tokio::test]
async fn a_mark_before_the_final_check_gets_another_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alpha, _beta, marker) = pair(dir.path());
    // Every marked region has been copied; then the write marks its range.
    marker.mark_held(WRITE.0, WRITE.1).await.expect("mark");
    assert_eq!(
        finish_source(&mut lock(&alpha)).expect("finish"),
        None,
        "a marked range must be copied by another pass first"
    );
    let g = lock(&alpha).superblock().generations;
    assert_eq!((g.current, g.bitmap), (NEW, OLD), "still tracking");
}

#[tokio::test]
async fn a_mark_after_the_final_check_keeps_the_primary_the_source_after_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alpha, beta, marker) = pair(dir.path());
    let current = finish_source(&mut lock(&alpha))
        .expect("finish")
        .expect("nothing marked: the resync ends");
    assert_eq!(current, NEW);
    finish_target(&mut lock(&beta), current).expect("target records the end");
    assert_eq!(
        decide(
            &side_on_disk(dir.path(), "alpha", true, 1),
            &side_on_disk(dir.path(), "beta", false, 2)
        ),
        Decision::InSync
    );

    // The late write marks its range (it then goes to alpha's disk only), and both nodes crash.
    marker.mark_held(WRITE.0, WRITE.1).await.expect("mark");
    drop(marker);
    let a = side_on_disk(dir.path(), "alpha", false, 1);
    let b = side_on_disk(dir.path(), "beta", false, 2);
    assert_ne!(
        a.current, NEW,
        "the mark moved alpha's data generation on, on disk"
    );
    assert_eq!(
        a.bitmap, NEW,
        "alpha tracks changes against what beta holds"
    );
    let (reopened, _) = MetaStore::open(&loc(dir.path(), "alpha")).expect("reopen");
    assert!(reopened.bitmap().is_all_dirty(WRITE.0, WRITE.1));
    // Whoever restarts first, alpha copies the write to beta, and never the other way.
    assert_eq!(decide(&a, &b), Decision::Source { full: false });
    assert_eq!(decide(&b, &a), Decision::Target { full: false });
    drop(reopened);
    drop(alpha);
}

/// On a secondary, or a primary already tracking, a held mark stays in memory: the activity
/// log covers it until the next bitmap flush.
#[tokio::test]
async fn a_tracking_node_marks_in_memory_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alpha, _beta, marker) = pair(dir.path());
    marker.mark_held(WRITE.0, WRITE.1).await.expect("mark");
    let s = lock(&alpha);
    assert!(s.bitmap().is_all_dirty(WRITE.0, WRITE.1));
    assert!(s.has_unflushed(), "no metadata write for a tracked mark");
    assert_eq!(s.superblock().generations.current, NEW);
}

/// The export of a node without a peer over a 1 MiB disk of 7s at `dir/name` that fails as
/// `faults` says, and the disk's health.
fn standalone(
    dir: &std::path::Path,
    name: &str,
    faults: &str,
) -> (ReplicatedDisk, Arc<DiskHealth>) {
    let path = dir.join(name);
    std::fs::write(&path, vec![7u8; 1 << 20]).expect("disk");
    let spec: crate::storage::FaultSpec = faults.parse().expect("fault spec");
    let disk = crate::storage::open_disk(&path, None, crate::storage::EngineChoice::Sync)
        .expect("open")
        .with_faults(spec);
    let (tx, _rx) = mpsc::unbounded_channel();
    let health = DiskHealth::new(tx);
    let d = ReplicatedDisk::new(Arc::new(disk), None, Arc::clone(&health));
    (d, health)
}

/// A node without a peer keeps its disk after a device error: the error goes to the client,
/// and the rest of the disk stays served (detaching would leave nothing to serve from).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_peer_passes_disk_errors_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, health) = standalone(dir.path(), "disk.img", "ranges=65536+4096");
    assert!(
        d.read(65536, 4096).await.is_err(),
        "a read of the failing range"
    );
    assert!(d.flush().await.is_ok());
    assert!(
        !health.diskless(),
        "a node without a peer detached its disk"
    );
    let data = d.read(0, 4096).await.expect("a read elsewhere");
    assert_eq!(&data[..], &[7u8; 4096][..]);
    assert!(d.write(65536, vec![1u8; 4096].into(), false).await.is_err());
    d.write(131072, vec![1u8; 4096].into(), false)
        .await
        .expect("a write elsewhere");

    // A disk failing everything, flushes included: errors, and the disk is kept.
    let (d, health) = standalone(dir.path(), "failing.img", "after=0");
    assert!(d.flush().await.is_err());
    assert!(d.read(0, 4096).await.is_err());
    assert!(
        !health.diskless(),
        "a node without a peer detached its disk"
    );
}

#[test]
fn pieces_cut_at_multiples_of_the_piece() {
    let m = 1u64 << 20;
    let all = |o, l, p| pieces(o, l, p).collect::<Vec<_>>();
    assert_eq!(all(0, 0, 8 * m), vec![]);
    assert_eq!(all(5, 10, 8 * m), vec![(5, 10)]);
    assert_eq!(
        all(4 * m + 4096, 32 * m, 8 * m),
        vec![
            (4 * m + 4096, 4 * m - 4096),
            (8 * m, 8 * m),
            (16 * m, 8 * m),
            (24 * m, 8 * m),
            (32 * m, 4 * m + 4096)
        ]
    );
    // Near the top of the u64 range nothing overflows.
    let top = u64::MAX - 10;
    assert_eq!(all(top, 10, 8 * m), vec![(top, 10)]);
}

/// An epoch's confirmations: exact ranges while few, 64 KiB chunks covering every one of
/// them once many.
#[test]
fn confirmed_ranges_turn_into_chunks_that_cover_them() {
    let size = 1 << 30;
    let mut c = Confirmed::Ranges(Vec::new());
    c.add(size, 4096, 4096);
    c.add(size, 1 << 20, 512);
    assert!(matches!(&c, Confirmed::Ranges(v) if v.len() == 2));
    let mut c2 = Confirmed::Ranges(Vec::new());
    let writes: Vec<(u64, u64)> = (0..=UNSTABLE_RANGES as u64)
        .map(|i| (i * 3 * 65536 + 8192, 4096))
        .collect();
    for &(o, l) in &writes {
        c2.add(size, o, l);
    }
    assert!(matches!(c2, Confirmed::Chunks(_)));
    let marked = c2.ranges();
    for &(o, l) in &writes {
        assert!(
            marked.iter().any(|&(mo, ml)| mo <= o && o + l <= mo + ml),
            "[{o}, +{l}) not covered"
        );
    }
    let total: u64 = marked.iter().map(|r| r.1).sum();
    assert_eq!(total, writes.len() as u64 * u64::from(UNSTABLE_CHUNK));
    assert_eq!(c.ranges(), vec![(4096, 4096), (1 << 20, 512)]);
}

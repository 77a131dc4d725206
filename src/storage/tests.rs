//! One test suite, run against every engine.

use super::*;

fn temp_disk(size: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let f = File::create(&path).expect("create");
    f.set_len(size).expect("set_len");
    (dir, path)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn suite<B: Backend>(b: &B, path: &Path) {
    let size = b.size();
    assert_eq!(size, 4 << 20);

    // Round trips at several offsets and sizes, including the last block.
    for (off, len, seed) in [
        (0u64, 4096usize, 1u8),
        (512, 512, 2),
        (1 << 20, 128 << 10, 3),
        (size - 4096, 4096, 4),
        (size - 1, 1, 5),
    ] {
        b.write(off, pattern(seed, len).into(), false)
            .await
            .expect("write");
        assert_eq!(
            &b.read(off, len).await.expect("read")[..],
            &pattern(seed, len)[..]
        );
    }
    b.flush().await.expect("flush");
    b.write(8192, pattern(9, 4096).into(), true)
        .await
        .expect("fua write");

    // The bytes really are in the file.
    let raw = std::fs::read(path).expect("read file");
    assert_eq!(&raw[8192..12288], &pattern(9, 4096)[..]);

    // Out of range is refused, never clamped.
    assert!(matches!(
        b.read(size - 4096, 8192).await,
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.write(size, vec![0; 1].into(), false).await,
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.write(u64::MAX - 1, vec![0; 4].into(), false).await,
        Err(StorageError::OutOfRange { .. })
    ));

    // Write-zeroes and trim.
    b.write(65536, pattern(7, 65536).into(), false)
        .await
        .expect("write");
    b.write_zeroes(65536, 65536, false).await.expect("zeroes");
    assert!(b
        .read(65536, 65536)
        .await
        .expect("read")
        .iter()
        .all(|&x| x == 0));
    b.write(65536, pattern(8, 65536).into(), false)
        .await
        .expect("write");
    b.write_zeroes(65536, 32768, true)
        .await
        .expect("zeroes+trim");
    let back = b.read(65536, 65536).await.expect("read");
    assert!(back[..32768].iter().all(|&x| x == 0));
    assert_eq!(&back[32768..], &pattern(8, 65536)[32768..]);
    b.trim(0, 65536).await.expect("trim");

    // Many requests in flight at once, each checked.
    let mut futs = Vec::new();
    for i in 0..300u64 {
        futs.push(async move {
            let off = (2 << 20) | ((i * 4096) % (1 << 20));
            let data = pattern(i as u8, 4096);
            b.write(off, data.clone().into(), false)
                .await
                .expect("write");
            let back = b.read(off, 4096).await.expect("read");
            (off, back)
        });
    }
    let results = futures_util::future::join_all(futs).await;
    for (off, back) in results {
        let again = b.read(off, 4096).await.expect("read");
        assert_eq!(back.len(), 4096);
        assert_eq!(again.len(), 4096);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_engine_suite() {
    let (_d, path) = temp_disk(4 << 20);
    let disk = open_disk(&path, None, EngineChoice::Sync).expect("open");
    assert_eq!(disk.engine(), "sync");
    suite(&disk, &path).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_engine_suite() {
    let (_d, path) = temp_disk(4 << 20);
    UringBackend::probe().expect("io_uring must be available on the test machine");
    let disk = open_disk(&path, None, EngineChoice::Uring).expect("open");
    assert_eq!(disk.engine(), "io_uring");
    suite(&disk, &path).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_dropped_requests_do_not_leak_or_crash() {
    let (_d, path) = temp_disk(4 << 20);
    let disk = open_disk(&path, None, EngineChoice::Uring).expect("open");
    // Start many writes and drop them half way: buffers stay owned by the engine until the
    // kernel completes, and the engine keeps working afterwards.
    for round in 0..20u8 {
        let mut futs: Vec<_> = (0..64u64)
            .map(|i| Box::pin(disk.write(i * 65536, pattern(round, 65536).into(), false)))
            .collect();
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        for f in futs.iter_mut() {
            let _ = f.as_mut().poll(&mut cx);
        }
        drop(futs);
    }
    disk.write(0, pattern(99, 4096).into(), false)
        .await
        .expect("write");
    assert_eq!(
        &disk.read(0, 4096).await.expect("read")[..],
        &pattern(99, 4096)[..]
    );
    drop(disk);
}

#[test]
fn limit_shrinks_the_visible_size() {
    let (_d, path) = temp_disk(1 << 20);
    let f = DiskFile::open(&path, Some(4096)).expect("open");
    assert_eq!(f.size, 4096);
    assert!(f.check_range("read", 4096, 1).is_err());
    assert!(f.check_range("read", 0, 4096).is_ok());
}

#[test]
fn missing_disk_names_the_path() {
    let err = DiskFile::open(Path::new("/nonexistent/disk.img"), None).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
}

#[test]
fn a_disk_cannot_be_opened_twice() {
    let (_d, path) = temp_disk(1 << 20);
    let first = DiskFile::open(&path, None).expect("open");
    let err = DiskFile::open(&path, None).unwrap_err();
    assert!(matches!(err, StorageError::InUse { .. }), "{err}");
    drop(first);
    DiskFile::open(&path, None).expect("free again");
}

/// Preallocation allocates every block of a sparse file and keeps what was written.
#[tokio::test]
async fn preallocation_allocates_and_keeps_data() {
    use std::os::unix::fs::MetadataExt;
    for choice in [EngineChoice::Sync, EngineChoice::Auto] {
        let (_dir, path) = temp_disk(4 << 20);
        let d = open_disk(&path, None, choice).expect("open");
        d.write(1 << 20, pattern(7, 4096).into(), false)
            .await
            .expect("write");
        let before = std::fs::metadata(&path).expect("stat").blocks() * 512;
        assert!(before < 4 << 20, "sparse to begin with");
        assert!(d.preallocate_blocking().expect("preallocate"));
        let after = std::fs::metadata(&path).expect("stat").blocks() * 512;
        assert!(after >= 4 << 20, "allocated {after} bytes");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 4 << 20);
        assert_eq!(
            &d.read(1 << 20, 4096).await.expect("read")[..],
            &pattern(7, 4096)[..]
        );
        assert!(d.read(0, 4096).await.expect("read").iter().all(|b| *b == 0));
    }
}

/// Reads the kernel cannot complete inline (the file's pages dropped from the cache) still
/// complete, many at once and one at a time: their completions arrive later, through the
/// ring's eventfd or the reaper's periodic look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_uncached_reads_complete() {
    use std::os::fd::AsRawFd;
    let (_d, path) = temp_disk(4 << 20);
    std::fs::write(&path, pattern(3, 4 << 20)).expect("fill");
    let disk = Arc::new(open_disk(&path, None, EngineChoice::Uring).expect("open"));
    let want = pattern(3, 4 << 20);
    for round in 0..3 {
        let f = File::open(&path).expect("open");
        f.sync_all().expect("fsync");
        // SAFETY: plain advice call on a descriptor we own.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut reads = Vec::new();
        for i in 0..64u64 {
            let d = Arc::clone(&disk);
            reads.push(tokio::spawn(async move {
                let off = (i * 61 % 1024) * 4096;
                (off, d.read(off, 4096).await)
            }));
        }
        for r in reads {
            let (off, data) = tokio::time::timeout(std::time::Duration::from_secs(10), r)
                .await
                .expect("read completes")
                .expect("task");
            assert_eq!(
                &data.expect("read")[..],
                &want[off as usize..off as usize + 4096],
                "round {round}"
            );
        }
        // One alone: nothing else will come along to reap it.
        // SAFETY: as above.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let one =
            tokio::time::timeout(std::time::Duration::from_secs(10), disk.read(2 << 20, 4096))
                .await
                .expect("a lone uncached read completes")
                .expect("read");
        assert_eq!(&one[..], &want[2 << 20..(2 << 20) + 4096]);
    }
}

#[test]
fn the_engine_variable_is_parsed_strictly() {
    assert_eq!(EngineChoice::parse(None), Ok(EngineChoice::Auto));
    assert_eq!(EngineChoice::parse(Some("")), Ok(EngineChoice::Auto));
    assert_eq!(EngineChoice::parse(Some("auto")), Ok(EngineChoice::Auto));
    assert_eq!(EngineChoice::parse(Some("uring")), Ok(EngineChoice::Uring));
    assert_eq!(
        EngineChoice::parse(Some("io_uring")),
        Ok(EngineChoice::Uring)
    );
    assert_eq!(EngineChoice::parse(Some("sync")), Ok(EngineChoice::Sync));
    let e = EngineChoice::parse(Some("urign")).unwrap_err();
    assert!(e.contains("TWINBD_IO_ENGINE") && e.contains("urign"), "{e}");
}

/// `read_bulk` of `want.len()` bytes at `offset` returns `want`.
async fn assert_bulk_reads(disk: &Disk, offset: u64, want: &[u8]) {
    let got = disk.read_bulk(offset, want.len()).await.expect("read_bulk");
    assert_eq!(&got[..], want, "read_bulk at {offset}");
}

/// Resync's direct reads and writes stay coherent with writes through the page cache, and
/// fall back to it for ranges direct IO cannot take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_io_is_coherent_with_the_page_cache() {
    let (_d, path) = temp_disk(4 << 20);
    let disk = open_disk(&path, None, EngineChoice::Auto).expect("open");
    assert!(
        disk.has_direct_io(),
        "the test disk's filesystem must allow direct IO, or this test checks only the fallback"
    );
    // Dirty cached pages under a direct write: the write must land on them.
    disk.write(0, pattern(1, 65536).into(), false)
        .await
        .expect("write");
    let mut expect = pattern(1, 65536);
    let bulk = pattern(2, 8192);
    // A buffer at an address that is not aligned: write_bulk aligns it itself.
    let mut odd = vec![0u8; 8192 + 1];
    odd[1..].copy_from_slice(&bulk);
    let odd = IoBuf::from(&odd[1..]);
    disk.write_bulk(4096, odd).await.expect("write_bulk");
    expect[4096..4096 + 8192].copy_from_slice(&bulk);
    assert_eq!(&disk.read(0, 65536).await.expect("read")[..], &expect[..]);
    // A range nobody cached is read directly, and sees what was written directly.
    disk.write_bulk(1 << 20, pattern(6, 65536).into())
        .await
        .expect("write_bulk");
    assert!(cached::none_cached(&disk.disk_file().file, 1 << 20, 65536));
    assert_bulk_reads(&disk, 1 << 20, &pattern(6, 65536)).await;
    // A range with pages in the cache, some dirty, is read with the latest data.
    disk.write(32768, pattern(3, 4096).into(), false)
        .await
        .expect("write");
    expect[32768..36864].copy_from_slice(&pattern(3, 4096));
    assert_bulk_reads(&disk, 0, &expect).await;
    // Unaligned ranges go through the page cache.
    disk.write_bulk(100, pattern(4, 1000).into())
        .await
        .expect("unaligned write_bulk");
    expect[100..1100].copy_from_slice(&pattern(4, 1000));
    assert_bulk_reads(&disk, 0, &expect).await;
    assert_bulk_reads(&disk, 100, &pattern(4, 1000)).await;
    // The data is on the disk, as another reader of the file sees it after a flush.
    disk.flush().await.expect("flush");
    let on_disk = std::fs::read(&path).expect("read file");
    assert_eq!(&on_disk[..65536], &expect[..]);
    // Out of range is refused, direct or not.
    assert!(disk
        .write_bulk((4 << 20) - 4096, pattern(5, 8192).into())
        .await
        .is_err());
    assert!(disk.read_bulk(4 << 20, 4096).await.is_err());
}

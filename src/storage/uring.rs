//! The io_uring engine.
//!
//! One ring per disk, shared by every task that does IO on it. A request is pushed and submitted
//! by the task that makes it, and the completion queue is drained right after the submit, so a
//! request the kernel completes inline (a page-cache hit) never leaves the calling thread.
//! Completions that come later raise the ring's eventfd (switched off while a task submits
//! and reaps); a reaper task waiting on it drains the queue and wakes the waiting requests,
//! and also looks every few milliseconds while requests are in the kernel, so a notification
//! lost to the switching can delay a completion, never strand it.
//!
//! Buffer ownership: a request's buffer lives in its slot, not in the future, until the kernel
//! has completed it. A future dropped early (its client went away) marks the slot abandoned and
//! the reaper frees the buffer when the completion arrives; the ring itself is dropped only
//! after every request in flight has completed.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{trim_blocking, write_zeroes_blocking, Backend, DiskFile, IoBuf, Result, StorageError};

/// Submission queue depth; also the cap on requests in flight.
const RING_ENTRIES: u32 = 256;
/// Transfers from this size on are handed to the kernel's worker threads, so the copy runs
/// on another CPU while this thread goes on with the socket. Below it, the hand-off costs more
/// than the copy.
const PARALLEL_COPY: usize = 128 * 1024;
/// Largest single transfer handed to the kernel at once.
const MAX_CHUNK: usize = 1 << 30;

enum Slot {
    Free,
    Pending {
        waker: Option<Waker>,
        buf: Option<IoBuf>,
        abandoned: bool,
        _permit: OwnedSemaphorePermit,
    },
    Done {
        res: i32,
        buf: Option<IoBuf>,
    },
}

struct State {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Requests handed to the ring whose completion has not been reaped.
    in_kernel: usize,
    /// The reaper looks periodically (it knew of requests in the kernel when it last waited).
    reaper_ticking: bool,
}

impl State {
    fn alloc(&mut self, slot: Slot) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, i: usize) {
        self.slots[i] = Slot::Free;
        self.free.push(i);
    }

    /// Drains the completion queue; returns the wakers to call once the lock is released.
    fn reap(&mut self, wake: &mut Vec<Waker>) {
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            done.push((cqe.user_data() as usize, cqe.result()));
        }
        for (i, res) in done {
            self.in_kernel = self.in_kernel.saturating_sub(1);
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            match std::mem::replace(slot, Slot::Free) {
                Slot::Pending {
                    waker,
                    buf,
                    abandoned,
                    _permit,
                } => {
                    if abandoned {
                        self.free.push(i);
                    } else {
                        *slot = Slot::Done { res, buf };
                        if let Some(w) = waker {
                            wake.push(w);
                        }
                    }
                }
                other => *slot = other,
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The kernel is backed up on completions; what stays queued goes with the next
                // submit (the reaper submits again after draining).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // Never free buffers the kernel may still write into: wait for every request in flight.
        let mut wake = Vec::new();
        while self.in_kernel > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                // Cannot wait: leak the buffers rather than risk the kernel writing freed memory.
                for slot in self.slots.drain(..) {
                    std::mem::forget(slot);
                }
                return;
            }
            self.reap(&mut wake);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    permits: Arc<Semaphore>,
    disk: Arc<DiskFile>,
    /// Tells an idle reaper that requests are in the kernel again (so it starts ticking).
    kick: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the slots half-updated in a way that
        // matters more than losing the engine, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The io_uring storage engine.
pub struct UringBackend {
    shared: Arc<Shared>,
    reaper: tokio::task::JoinHandle<()>,
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

impl UringBackend {
    pub(crate) fn disk_file(&self) -> &Arc<DiskFile> {
        &self.shared.disk
    }

    /// Checks that this kernel lets us create a ring and run the operations we need.
    pub fn probe() -> io::Result<()> {
        let ring = IoUring::new(8)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "read"),
            (opcode::Write::CODE, "write"),
            (opcode::Fsync::CODE, "fsync"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring {name} not supported by this kernel"),
                ));
            }
        }
        Ok(())
    }

    /// Creates the ring for `disk` and spawns its completion reaper on the current runtime.
    pub fn new(disk: DiskFile) -> Result<UringBackend> {
        let setup = |source: io::Error| StorageError::Open {
            path: disk.path.clone(),
            source,
        };
        let ring = IoUring::new(RING_ENTRIES).map_err(setup)?;
        // SAFETY: eventfd returns a new descriptor (or -1, checked below) that we then own.
        let raw: RawFd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(setup(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a valid descriptor owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter()
            .register_eventfd(efd.as_raw_fd())
            .map_err(setup)?;
        // SAFETY: OwnedFd always returns the same valid descriptor, which stays open for as
        // long as the AsyncFd owns it.
        let afd = unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
            .map_err(|e| setup(e.into()))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                in_kernel: 0,
                reaper_ticking: false,
            }),
            permits: Arc::new(Semaphore::new(RING_ENTRIES as usize)),
            disk: Arc::new(disk),
            kick: tokio::sync::Notify::new(),
        });
        let reaper = tokio::spawn(reap_loop(Arc::clone(&shared), afd));
        Ok(UringBackend { shared, reaper })
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.shared.disk.file.as_raw_fd())
    }

    /// Submits one request built by `make` over `buf` and waits for its completion.
    /// Returns the raw result (negative errno on failure) and the buffer.
    async fn run(
        &self,
        mut buf: Option<IoBuf>,
        make: impl FnOnce(Option<&mut IoBuf>) -> squeue::Entry,
    ) -> (i32, Option<IoBuf>) {
        let permit = match Arc::clone(&self.shared.permits).acquire_owned().await {
            Ok(p) => p,
            Err(_) => return (-libc::ESHUTDOWN, buf),
        };
        let mut wake = Vec::new();
        let idx = {
            let mut st = self.shared.lock();
            let entry = make(buf.as_mut());
            let idx = st.alloc(Slot::Pending {
                waker: None,
                buf: buf.take(),
                abandoned: false,
                _permit: permit,
            });
            let entry = entry.user_data(idx as u64);
            // SAFETY: the entry points into the slot's buffer (a heap allocation that does not
            // move when the Vec is moved) or at nothing; the slot keeps it alive until the
            // completion is reaped, and State's Drop waits for all completions.
            let mut pushed = unsafe { st.ring.submission().push(&entry).is_ok() };
            if !pushed {
                // The queue is full of entries not yet handed over: hand them over and retry.
                let _ = st.submit();
                // SAFETY: as above.
                pushed = unsafe { st.ring.submission().push(&entry).is_ok() };
            }
            if !pushed {
                let buf = match std::mem::replace(&mut st.slots[idx], Slot::Free) {
                    Slot::Pending { buf, .. } => buf,
                    _ => None,
                };
                st.release(idx);
                return (-libc::EAGAIN, buf);
            }
            st.in_kernel += 1;
            // The eventfd is off while we submit and reap: a request the kernel completes
            // inline is reaped right here, and waking the reaper for it as well cost a thread
            // hand-off and a contended lock per request (perf, cached 4 KiB reads at QD32:
            // 150k context switches per second). Completions that land meanwhile are reaped
            // after the eventfd is back on.
            st.ring.completion().disable_eventfd();
            if let Err(e) = st.submit() {
                tracing::error!(error = %e, "io_uring submit failed");
            }
            st.reap(&mut wake);
            st.ring.completion().enable_eventfd();
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            st.reap(&mut wake);
            let kick = st.in_kernel > 0 && !st.reaper_ticking;
            if kick {
                st.reaper_ticking = true;
                self.shared.kick.notify_one();
            }
            idx
        };
        for w in wake {
            w.wake();
        }
        Completion {
            shared: &self.shared,
            idx: Some(idx),
        }
        .await
    }

    /// Reads or writes `len` bytes at `offset`, resubmitting after short transfers.
    async fn transfer(&self, write: bool, offset: u64, mut buf: IoBuf, fua: bool) -> Result<IoBuf> {
        let op = if write { "write" } else { "read" };
        let len = buf.len();
        self.shared.disk.check_range(op, offset, len as u64)?;
        let fd = self.fd();
        let mut done = 0usize;
        while done < len {
            let chunk = (len - done).min(MAX_CHUNK);
            let pos = offset + done as u64;
            let (res, back) = self
                .run(Some(buf), |b| {
                    let base = b.map_or(std::ptr::null_mut(), |v| v.as_mut_ptr());
                    // SAFETY: done + chunk <= len, the buffer's length, so the pointer stays inside it.
                    let ptr = unsafe { base.add(done) };
                    if write {
                        let flags = if fua { libc::RWF_DSYNC } else { 0 };
                        opcode::Write::new(fd, ptr, chunk as u32)
                            .offset(pos)
                            .rw_flags(flags)
                            .build()
                    } else {
                        let e = opcode::Read::new(fd, ptr, chunk as u32).offset(pos).build();
                        if chunk >= PARALLEL_COPY {
                            e.flags(squeue::Flags::ASYNC)
                        } else {
                            e
                        }
                    }
                })
                .await;
            buf = back.ok_or(StorageError::Closed)?;
            match res {
                r if r > 0 => done += r as usize,
                0 => {
                    return Err(StorageError::ShortTransfer {
                        op,
                        offset,
                        len: len as u64,
                        done: done as u64,
                    })
                }
                r if r == -libc::EINTR || r == -libc::EAGAIN => continue,
                r => {
                    return Err(StorageError::Io {
                        op,
                        offset: pos,
                        len: chunk as u64,
                        source: io::Error::from_raw_os_error(-r),
                    })
                }
            }
        }
        Ok(buf)
    }

    async fn blocking<F>(&self, f: F) -> Result<()>
    where
        F: FnOnce(&DiskFile) -> Result<()> + Send + 'static,
    {
        let disk = Arc::clone(&self.shared.disk);
        tokio::task::spawn_blocking(move || f(&disk))
            .await
            .map_err(|_| StorageError::Closed)?
    }
}

impl Backend for UringBackend {
    fn engine(&self) -> &'static str {
        "io_uring"
    }

    fn size(&self) -> u64 {
        self.shared.disk.size
    }

    async fn read(&self, offset: u64, len: usize) -> Result<IoBuf> {
        self.transfer(false, offset, IoBuf::with_len(len), false)
            .await
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<()> {
        if fua || data.len() >= PARALLEL_COPY {
            return self.transfer(true, offset, data, fua).await.map(drop);
        }
        // A buffered write is a copy into the page cache. io_uring cannot do that without
        // blocking on filesystems lacking async buffered writes (ext4), so it hands every one
        // to a kernel worker thread and back: two thread switches that cost more than the copy.
        // Done right here, the copy never leaves the calling thread.
        let disk = &self.shared.disk;
        disk.check_range("write", offset, data.len() as u64)?;
        disk.file
            .write_all_at(&data, offset)
            .map_err(|source| StorageError::Io {
                op: "write",
                offset,
                len: data.len() as u64,
                source,
            })
    }

    async fn flush(&self) -> Result<()> {
        let fd = self.fd();
        loop {
            let (res, _) = self
                .run(None, |_| {
                    opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                })
                .await;
            match res {
                0.. => return Ok(()),
                r if r == -libc::EINTR || r == -libc::EAGAIN => continue,
                r => {
                    return Err(StorageError::Io {
                        op: "flush",
                        offset: 0,
                        len: self.size(),
                        source: io::Error::from_raw_os_error(-r),
                    })
                }
            }
        }
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.shared.disk.check_range("trim", offset, len)?;
        self.blocking(move |d| trim_blocking(d, offset, len)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.shared.disk.check_range("write_zeroes", offset, len)?;
        self.blocking(move |d| write_zeroes_blocking(d, offset, len, may_trim))
            .await
    }
}

/// Waits for the completion of the request in slot `idx`.
struct Completion<'a> {
    shared: &'a Shared,
    idx: Option<usize>,
}

impl Future for Completion<'_> {
    type Output = (i32, Option<IoBuf>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(idx) = self.idx else {
            return Poll::Ready((-libc::EINVAL, None));
        };
        let mut st = self.shared.lock();
        match &mut st.slots[idx] {
            Slot::Pending { waker, .. } => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Done { res, buf } => {
                let out = (*res, buf.take());
                st.release(idx);
                drop(st);
                self.idx = None;
                Poll::Ready(out)
            }
            Slot::Free => {
                st.release(idx);
                drop(st);
                self.idx = None;
                Poll::Ready((-libc::EIO, None))
            }
        }
    }
}

impl Drop for Completion<'_> {
    fn drop(&mut self) {
        let Some(idx) = self.idx.take() else {
            return;
        };
        let mut st = self.shared.lock();
        match &mut st.slots[idx] {
            Slot::Pending {
                abandoned, waker, ..
            } => {
                *abandoned = true;
                *waker = None;
            }
            _ => st.release(idx),
        }
    }
}

/// Longest a completion can wait when its eventfd notification was lost.
const REAP_TICK: std::time::Duration = std::time::Duration::from_millis(10);

async fn reap_loop(shared: Arc<Shared>, afd: AsyncFd<OwnedFd>) {
    loop {
        let ticking = {
            let mut st = shared.lock();
            st.reaper_ticking = st.in_kernel > 0;
            st.reaper_ticking
        };
        let ready = tokio::select! {
            r = afd.readable() => Some(r),
            _ = tokio::time::sleep(REAP_TICK), if ticking => None,
            _ = shared.kick.notified(), if !ticking => None,
        };
        let mut guard = match ready {
            None => None,
            Some(Ok(g)) => Some(g),
            Some(Err(e)) => {
                tracing::error!(error = %e, "io_uring eventfd failed; completion reaper stops");
                return;
            }
        };
        if let Some(guard) = guard.as_mut() {
            guard.clear_ready();
        }
        let mut counter = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer from the eventfd we own (non-blocking).
        unsafe {
            libc::read(
                afd.get_ref().as_raw_fd(),
                counter.as_mut_ptr().cast(),
                counter.len(),
            );
        }
        let mut wake = Vec::new();
        {
            let mut st = shared.lock();
            st.reap(&mut wake);
            if !st.ring.submission().is_empty() {
                let _ = st.submit();
                st.reap(&mut wake);
            }
        }
        for w in wake {
            w.wake();
        }
    }
}

//! The socket side of a session. Replies go to a [`ReplySink`]: a byte stream, and for
//! sockets to clients on other machines ([`SocketSink::new`], [`splice_pays`]) also file
//! ranges spliced from the page cache through a pipe, so that read data reaches the client
//! without being copied by this process.
//! Requests come from a [`RequestSource`]: a byte stream, and for sockets also the socket
//! itself, for the short poll between a reply and the next request of a client that sends
//! one at a time (`crate::sockpoll`).

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest};

/// The writing half of a client connection.
pub trait ReplySink: AsyncWrite + Unpin + Send {
    /// Whether [`ReplySink::poll_send_file_range`] works on this connection.
    fn sends_file_ranges(&self) -> bool {
        false
    }

    /// Sends up to `len` bytes of `file` from `offset`, straight from the page cache; returns
    /// how many bytes were sent (at least one).
    fn poll_send_file_range(
        &mut self,
        _cx: &mut Context<'_>,
        _file: &File,
        _offset: u64,
        _len: usize,
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::from(io::ErrorKind::Unsupported)))
    }

    /// Writes some of `bufs`, telling the socket that more follows at once (`MSG_MORE`), so
    /// a reply header and the file range after it leave in the same segments.
    fn poll_write_more(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write_vectored(cx, bufs)
    }
}

/// What sending on a tokio socket outside its `AsyncWrite` needs: readiness, and a
/// non-blocking call that clears it on `WouldBlock` (so the next poll registers the waker).
pub trait Socket: AsRawFd {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_write_io(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize>;
}

impl Socket for tokio::net::TcpStream {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_ready(cx)
    }
    fn try_write_io(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(Interest::WRITABLE, f)
    }
}

impl Socket for tokio::net::UnixStream {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_ready(cx)
    }
    fn try_write_io(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(Interest::WRITABLE, f)
    }
}

/// One non-blocking `sendmsg` with `MSG_MORE`, retried on EINTR.
fn send_more_once(sock: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed to have the layout of iovec.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(1024) as _;
    loop {
        // SAFETY: the iovecs point into buffers borrowed for the call.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_MORE | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn poll_send_more_on<S: Socket>(
    sock: &S,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(sock.poll_writable(cx))?;
        match sock.try_write_io(|| send_more_once(sock.as_raw_fd(), bufs)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            res => return Poll::Ready(res),
        }
    }
}

/// The writing half of a socket, which knows its socket.
pub trait SocketHalf: AsyncWrite + Unpin + Send {
    type Sock: Socket;
    fn socket(&self) -> &Self::Sock;
}

impl SocketHalf for tokio::net::tcp::OwnedWriteHalf {
    type Sock = tokio::net::TcpStream;
    fn socket(&self) -> &Self::Sock {
        self.as_ref()
    }
}

impl SocketHalf for tokio::net::unix::OwnedWriteHalf {
    type Sock = tokio::net::UnixStream;
    fn socket(&self) -> &Self::Sock {
        self.as_ref()
    }
}

/// Bytes moved through the session's pipe at once: a whole 1 MiB read, whatever the size of
/// the page-cache folios holding it. (`sendfile` moves at most 16 folios per round through
/// its internal pipe: 64 KiB when the file is cached in 4 KiB pages, as after random writes,
/// which made it slower than a plain read and send.)
const PIPE_BYTES: usize = 1 << 20;

/// A pipe for splicing file pages to a socket.
struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl SplicePipe {
    fn new() -> io::Result<SplicePipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array, which is valid for the call.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe where the system allows it; the default (64 KiB) still works.
        // SAFETY: plain fcntl on a descriptor we own.
        let got = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        let capacity = if got > 0 { got as usize } else { 64 * 1024 };
        Ok(SplicePipe {
            read,
            write,
            capacity,
        })
    }
}

/// One non-blocking `splice`, retried on EINTR.
fn splice_once(
    from: RawFd,
    from_off: Option<&mut libc::loff_t>,
    to: RawFd,
    len: usize,
    flags: libc::c_uint,
) -> io::Result<usize> {
    let off_ptr = from_off.map_or(std::ptr::null_mut(), |o| o as *mut libc::loff_t);
    loop {
        // SAFETY: plain syscall on descriptors that outlive the call; `off_ptr` is null or
        // points to a loff_t the kernel updates.
        let n = unsafe { libc::splice(from, off_ptr, to, std::ptr::null_mut(), len, flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A socket's writing half with what sending file ranges needs: a pipe, and how many bytes of
/// the range at the front of the reply queue are already in it. Those go to the socket before
/// anything else does (the session never writes past an unfinished range), and the range is
/// only ever advanced by the bytes that reached the socket.
pub struct SocketSink<W> {
    w: W,
    /// `None` if no pipe could be made (out of descriptors): replies are then copied.
    pipe: Option<SplicePipe>,
    staged: usize,
}

impl<W> SocketSink<W> {
    /// A sink that splices cached file ranges to the socket.
    pub fn new(w: W) -> SocketSink<W> {
        let pipe = SplicePipe::new()
            .map_err(
                |e| tracing::warn!(error = %e, "no pipe for this NBD connection: reads are copied"),
            )
            .ok();
        SocketSink {
            pipe,
            ..SocketSink::copying(w)
        }
    }

    /// A sink that sends every reply from memory (see [`splice_pays`]).
    pub fn copying(w: W) -> SocketSink<W> {
        SocketSink {
            w,
            pipe: None,
            staged: 0,
        }
    }
}

/// Whether splicing read data from the page cache pays for the client at the other end of
/// `s`.
///
/// For a client on another machine it does: the network card reads the pages where they
/// are, and this process copies nothing. For a client on this machine (a loopback address,
/// or our own address) the client's receive copies the data out of the socket anyway, and it
/// is cheaper to copy it once into a buffer here (`docs/benchmarks.md`, "Cached reads for a
/// client on the same machine"): a spliced page is cold when the client copies it, where a
/// copy made just before is still in the CPU's cache, and the loopback device's receive work
/// for skbs of many page fragments runs in the sending thread. Unix-socket clients are
/// always local: their sessions copy.
pub fn splice_pays(s: &tokio::net::TcpStream) -> bool {
    !crate::tcp::is_local(s)
}

impl<W: SocketHalf> AsyncWrite for SocketSink<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.staged > 0 {
            return Poll::Ready(Err(half_sent()));
        }
        Pin::new(&mut self.w).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.staged > 0 {
            return Poll::Ready(Err(half_sent()));
        }
        Pin::new(&mut self.w).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.w.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.w).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.w).poll_shutdown(cx)
    }
}

/// Bytes written past a file range still in the pipe would reach the client in the wrong
/// order: the connection is given up instead.
fn half_sent() -> io::Error {
    io::Error::other("reply bytes written while a file range was half sent")
}

impl<W: SocketHalf> ReplySink for SocketSink<W> {
    fn sends_file_ranges(&self) -> bool {
        self.pipe.is_some()
    }

    /// Moves up to a pipe's worth of the range from the file into the pipe (page references,
    /// no copy), then from the pipe to the socket; returns the bytes that reached the socket.
    /// Called again with the range advanced by that count, it sends what the pipe still
    /// holds first.
    fn poll_send_file_range(
        &mut self,
        cx: &mut Context<'_>,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let Some(pipe) = &self.pipe else {
            return Poll::Ready(Err(io::Error::from(io::ErrorKind::Unsupported)));
        };
        if self.staged == 0 {
            let mut off = libc::loff_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let want = len.min(pipe.capacity);
            let n = splice_once(
                file.as_raw_fd(),
                Some(&mut off),
                pipe.write.as_raw_fd(),
                want,
                libc::SPLICE_F_NONBLOCK,
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("disk ended at offset {offset} while sending {len} bytes"),
                )));
            }
            self.staged = n;
        }
        let more = if len > self.staged {
            libc::SPLICE_F_MORE
        } else {
            0
        };
        let (sock, staged) = (self.w.socket(), self.staged);
        let from = pipe.read.as_raw_fd();
        loop {
            ready!(sock.poll_writable(cx))?;
            match sock.try_write_io(|| {
                splice_once(
                    from,
                    None,
                    sock.as_raw_fd(),
                    staged,
                    libc::SPLICE_F_NONBLOCK | more,
                )
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(n) => {
                    self.staged -= n;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_write_more(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.staged > 0 {
            return Poll::Ready(Err(half_sent()));
        }
        poll_send_more_on(self.w.socket(), cx, bufs)
    }
}

/// In-memory pipes (tests, fuzzing): bytes only.
impl<T: AsyncRead + AsyncWrite + Send> ReplySink for tokio::io::WriteHalf<T> {}

/// The reading half of a client connection.
pub trait RequestSource: AsyncRead + Unpin + Send {
    /// The socket, for reads that bypass the reactor (`crate::sockpoll`); `None` for a
    /// source that is not a socket.
    fn socket_fd(&self) -> Option<RawFd> {
        None
    }

    /// The socket, when the kernel honours its receive low-water mark in the readiness it
    /// reports (TCP; `crate::tcp::LowWater`); `None` otherwise.
    fn low_water_fd(&self) -> Option<RawFd> {
        None
    }
}

impl RequestSource for tokio::net::tcp::OwnedReadHalf {
    fn socket_fd(&self) -> Option<RawFd> {
        Some(self.as_ref().as_raw_fd())
    }

    fn low_water_fd(&self) -> Option<RawFd> {
        self.socket_fd()
    }
}

impl RequestSource for tokio::net::unix::OwnedReadHalf {
    fn socket_fd(&self) -> Option<RawFd> {
        Some(self.as_ref().as_raw_fd())
    }
}

impl<T: AsyncRead + AsyncWrite + Send> RequestSource for tokio::io::ReadHalf<T> {}

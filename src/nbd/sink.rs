//! The socket side of a session. Replies go to a [`ReplySink`]: a byte stream, and for
//! sockets also `sendfile`, so that read data in the page cache reaches the client without
//! being copied into this process first. Requests come from a [`RequestSource`]: a byte
//! stream, and for sockets also the socket itself, for the short poll between a reply and the
//! next request of a client that sends one at a time (`crate::sockpoll`).

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest};

/// The writing half of a client connection.
pub trait ReplySink: AsyncWrite + Unpin + Send {
    /// Whether [`ReplySink::poll_sendfile`] can send file ranges on this connection.
    fn can_sendfile(&self) -> bool {
        false
    }

    /// Sends up to `len` bytes of `file` from `offset`, straight from the page cache; returns
    /// how many bytes were sent (at least one).
    fn poll_sendfile(
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

/// What `sendfile` needs from a tokio socket.
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

/// One non-blocking `sendfile`, retried on EINTR.
fn sendfile_once(sock: RawFd, file: &File, offset: u64, len: usize) -> io::Result<usize> {
    let mut off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: plain syscall on two descriptors that outlive the call; `off` is a valid
        // off_t the kernel updates.
        let n = unsafe { libc::sendfile(sock, file.as_raw_fd(), &mut off, len) };
        if n > 0 {
            return Ok(n as usize);
        }
        if n == 0 {
            // The file ended before the range did: the disk shrank under us.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("disk ended at offset {offset} while sending {len} bytes"),
            ));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
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

fn poll_sendfile_on<S: Socket>(
    sock: &S,
    cx: &mut Context<'_>,
    file: &File,
    offset: u64,
    len: usize,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(sock.poll_writable(cx))?;
        // On WouldBlock, try_io clears the readiness, so the next poll registers the waker.
        match sock.try_write_io(|| sendfile_once(sock.as_raw_fd(), file, offset, len)) {
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

impl<W: SocketHalf> ReplySink for W {
    fn can_sendfile(&self) -> bool {
        true
    }
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        poll_sendfile_on(self.socket(), cx, file, offset, len)
    }
    fn poll_write_more(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_send_more_on(self.socket(), cx, bufs)
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
}

impl RequestSource for tokio::net::tcp::OwnedReadHalf {
    fn socket_fd(&self) -> Option<RawFd> {
        Some(self.as_ref().as_raw_fd())
    }
}

impl RequestSource for tokio::net::unix::OwnedReadHalf {
    fn socket_fd(&self) -> Option<RawFd> {
        Some(self.as_ref().as_raw_fd())
    }
}

impl<T: AsyncRead + AsyncWrite + Send> RequestSource for tokio::io::ReadHalf<T> {}

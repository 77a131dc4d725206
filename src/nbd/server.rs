//! The NBD export server: listeners, the option negotiation and the transmission phase.
//!
//! A session runs as one task. In transmission it multiplexes three things with `select!`:
//! reading requests (into its own buffer, so a read interrupted by another branch loses
//! nothing), running the requests it has read (many in flight, polled in the same task, so
//! no thread hand-off sits on the request path), and writing replies as they complete
//! (vectored, batched: replies that complete together leave in one `writev`; large cached
//! reads spliced from the page cache). A session with nothing in flight polls its socket
//! briefly before it waits on the reactor, while its client sends one request at a time.
//! While it reads the rest of a large write payload it raises the socket's receive
//! low-water mark to that rest, so that it wakes once per payload, not per segment
//! (`crate::tcp::LowWater`).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use super::proto::{self, *};
pub use super::sink::{ReplySink, RequestSource};
use crate::storage::{Backend, FileRange, IoBuf};

/// How long a client may take to negotiate: a connection that says nothing holds one of the
/// `MAX_CONNECTIONS` this long at most.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a session that has sent its last reply waits for its client to close, reading
/// and dropping what it still sends (`Transmission::discard_until_closed`).
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Requests in flight per connection before the session stops reading more.
const MAX_IN_FLIGHT: usize = 512;
/// Payload bytes in flight per connection (reads and writes) before it stops reading more.
const MAX_IN_FLIGHT_BYTES: u64 = 256 << 20;
/// Longest option payload read and dropped (answered `NBD_REP_ERR_TOO_BIG`); a longer one
/// ends the negotiation.
const MAX_SKIPPED_OPTION_LEN: u32 = 16 << 20;
/// Connections accepted at once per listener.
const MAX_CONNECTIONS: usize = 256;
/// Largest read or write payload (the Linux client sends up to 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size advertised to clients.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Reads from this size on are spliced from the page cache to the socket when all their
/// pages are cached (one copy fewer). Smaller replies go out together in one `writev`, which
/// costs less than a splice each.
const FILE_RANGE_MIN: u32 = 64 * 1024;

/// The data an export serves: a storage backend and its visible size.
pub struct Export<B: Backend> {
    pub backend: Arc<B>,
    pub size: u64,
}

/// Whether this node serves the export right now.
pub enum ExportState<B: Backend> {
    Open(Arc<Export<B>>),
    /// Not served; the reason is sent to clients (e.g. "node beta is secondary").
    Closed(String),
}

impl<B: Backend> Clone for ExportState<B> {
    fn clone(&self) -> Self {
        match self {
            ExportState::Open(e) => ExportState::Open(Arc::clone(e)),
            ExportState::Closed(r) => ExportState::Closed(r.clone()),
        }
    }
}

/// What every session of a server shares.
pub struct ServerCtx<B: Backend> {
    /// The export name (the resource name); the empty name is accepted too.
    pub name: String,
    pub description: String,
    pub state: watch::Receiver<ExportState<B>>,
    /// Sessions in the transmission phase now.
    pub clients: AtomicUsize,
    /// Requests served since start, for statistics.
    pub requests: AtomicU64,
    /// Read replies sent straight from the page cache.
    pub file_range_replies: AtomicU64,
    /// How long a session whose export closed, with every request done, waits for its client
    /// to take more of its replies before it drops the connection.
    pub reply_drain: std::time::Duration,
}

impl<B: Backend> ServerCtx<B> {
    pub fn new(name: String, state: watch::Receiver<ExportState<B>>) -> ServerCtx<B> {
        ServerCtx {
            description: format!("twinbd resource {name}"),
            name,
            state,
            clients: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            file_range_replies: AtomicU64::new(0),
            reply_drain: REPLY_DRAIN,
        }
    }

    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_CACHE
            // Every connection shares one backend, and a flush syncs the whole disk: a flush
            // on any connection covers the writes completed on all of them.
            | TFLAG_CAN_MULTI_CONN;
        if structured {
            // Reads are always answered in one chunk, so "don't fragment" always holds.
            f |= TFLAG_SEND_DF;
        }
        f
    }

    fn name_matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

/// Errors that end a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("client did not finish the negotiation within {0:?}")]
    NegotiationTimeout(Duration),
    #[error("option of {0} bytes is too large")]
    OptionTooBig(u32),
    #[error("{0}")]
    Refused(String),
}

/// A listening socket for the export.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    /// Binds the NBD address of a node: `host:port` or `unix:/path`.
    pub async fn bind(addr: &crate::config::NbdAddr) -> io::Result<Listener> {
        match addr {
            crate::config::NbdAddr::Tcp(sa) => {
                let sock = if sa.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                sock.set_reuseaddr(true)?;
                sock.bind(*sa)?;
                Ok(Listener::Tcp(sock.listen(128)?))
            }
            crate::config::NbdAddr::Unix(path) => {
                // A socket file left by a previous run that is not listening any more.
                if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
                    let _ = std::fs::remove_file(path);
                }
                let l = tokio::net::UnixListener::bind(path)?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }
}

/// Accepts connections until `shutdown` turns true, one session task each.
pub async fn serve<B: Backend>(
    listener: Listener,
    ctx: Arc<ServerCtx<B>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    let result = match stream {
                        Stream::Tcp(s) => {
                            crate::tcp::tune(&s);
                            let splice = super::sink::splice_pays(&s);
                            tracing::debug!(%peer, splice, "NBD client connected");
                            let (r, w) = s.into_split();
                            let w = if splice {
                                super::sink::SocketSink::new(w)
                            } else {
                                super::sink::SocketSink::copying(w)
                            };
                            run_session(r, w, &ctx).await
                        }
                        Stream::Unix(s) => {
                            let (r, w) = s.into_split();
                            run_session(r, super::sink::SocketSink::copying(w), &ctx).await
                        }
                    };
                    match result {
                        Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                        Err(e) => tracing::info!(%peer, error = %e, "NBD session ended"),
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> io::Result<(Stream, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            Ok((Stream::Tcp(s), a.to_string()))
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), format!("unix:{}", path.display())))
        }
    }
}

/// Runs one client connection: negotiation, then transmission until the client disconnects
/// or the export closes.
pub async fn run_session<B, R, W>(r: R, mut w: W, ctx: &ServerCtx<B>) -> Result<(), SessionError>
where
    B: Backend,
    R: RequestSource,
    W: ReplySink,
{
    let mut r = r;
    let negotiated =
        match tokio::time::timeout(NEGOTIATION_TIMEOUT, negotiate(&mut r, &mut w, ctx)).await {
            Ok(res) => res?,
            Err(_) => return Err(SessionError::NegotiationTimeout(NEGOTIATION_TIMEOUT)),
        };
    let Some((export, structured)) = negotiated else {
        return Ok(());
    };
    ctx.clients.fetch_add(1, Ordering::SeqCst);
    let flags = ctx.transmission_flags(structured);
    let lim = Limits {
        size: export.size,
        flags,
        max_payload: MAX_PAYLOAD,
        structured,
    };
    let mut state = ctx.state.clone();
    let res = Transmission {
        r,
        w,
        rbuf: BytesMut::with_capacity(256 * 1024),
        after_large_write: false,
        low_water: Default::default(),
        out: OutQueue::default(),
        lim,
        export,
    }
    .run(&mut state, ctx)
    .await;
    ctx.clients.fetch_sub(1, Ordering::SeqCst);
    res
}

/// The fixed-newstyle negotiation. Returns the export and whether structured replies were
/// agreed, or `None` when the client ended the negotiation.
async fn negotiate<B, R, W>(
    r: &mut R,
    w: &mut W,
    ctx: &ServerCtx<B>,
) -> Result<Option<(Arc<Export<B>>, bool)>, SessionError>
where
    B: Backend,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    encode_greeting(&mut out);
    w.write_all(&out).await?;
    let mut cf = [0u8; 4];
    r.read_exact(&mut cf).await?;
    let client = decode_client_flags(cf)?;
    let mut structured = false;
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        r.read_exact(&mut hdr).await?;
        let h = decode_option_header(&hdr)?;
        out.clear();
        if h.len > MAX_OPTION_LEN {
            // EXPORT_NAME has no error reply; any other option's data is read and dropped,
            // and the negotiation goes on, unless there is so much of it that the client can
            // only mean to waste our time.
            if h.option == OPT_EXPORT_NAME || h.len > MAX_SKIPPED_OPTION_LEN {
                return Err(SessionError::OptionTooBig(h.len));
            }
            let mut rest = u64::from(h.len);
            let mut sink = vec![0u8; 64 * 1024];
            while rest > 0 {
                let n = rest.min(sink.len() as u64) as usize;
                r.read_exact(&mut sink[..n]).await?;
                rest -= n as u64;
            }
            encode_option_error(
                &mut out,
                h.option,
                REP_ERR_TOO_BIG,
                &format!("option data of {} bytes exceeds {MAX_OPTION_LEN}", h.len),
            );
            w.write_all(&out).await?;
            continue;
        }
        let mut data = vec![0u8; h.len as usize];
        r.read_exact(&mut data).await?;
        let opt = match decode_option(h.option, &data) {
            Ok(o) => o,
            Err(InvalidOption(msg)) => {
                if h.option == OPT_EXPORT_NAME {
                    // No error reply exists for EXPORT_NAME: the only answer is to hang up.
                    return Err(SessionError::Refused(format!("bad export name: {msg}")));
                }
                encode_option_error(&mut out, h.option, REP_ERR_INVALID, &msg);
                w.write_all(&out).await?;
                continue;
            }
        };
        let current = ctx.state.borrow().clone();
        match opt {
            ClientOption::Abort => {
                encode_option_reply(&mut out, OPT_ABORT, REP_ACK, &[]);
                // The client may already have closed; the reply is a courtesy.
                let _ = w.write_all(&out).await;
                return Ok(None);
            }
            ClientOption::StructuredReply => {
                if structured {
                    encode_option_error(
                        &mut out,
                        h.option,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    structured = true;
                    encode_option_reply(&mut out, h.option, REP_ACK, &[]);
                }
            }
            ClientOption::List => match &current {
                ExportState::Open(_) => {
                    encode_server_entry(&mut out, &ctx.name, &ctx.description);
                    encode_option_reply(&mut out, OPT_LIST, REP_ACK, &[]);
                }
                ExportState::Closed(reason) => {
                    encode_option_error(&mut out, OPT_LIST, REP_ERR_POLICY, reason)
                }
            },
            ClientOption::Info { go, name, requests } => {
                if !ctx.name_matches(&name) {
                    encode_option_error(
                        &mut out,
                        h.option,
                        REP_ERR_UNKNOWN,
                        &format!(
                            "no export named {name:?}; this server exports {:?}",
                            ctx.name
                        ),
                    );
                } else {
                    match &current {
                        ExportState::Closed(reason) => {
                            encode_option_error(&mut out, h.option, REP_ERR_POLICY, reason)
                        }
                        ExportState::Open(export) => {
                            let info = ExportInfo {
                                name: ctx.name.clone(),
                                description: ctx.description.clone(),
                                size: export.size,
                                flags: ctx.transmission_flags(structured),
                                min_block: 1,
                                preferred_block: PREFERRED_BLOCK,
                                max_block: MAX_PAYLOAD,
                            };
                            encode_info_replies(&mut out, h.option, &info, &requests);
                            encode_option_reply(&mut out, h.option, REP_ACK, &[]);
                            if go {
                                w.write_all(&out).await?;
                                return Ok(Some((Arc::clone(export), structured)));
                            }
                        }
                    }
                }
            }
            ClientOption::ExportName(name) => {
                if !ctx.name_matches(&name) {
                    return Err(SessionError::Refused(format!("no export named {name:?}")));
                }
                let ExportState::Open(export) = &current else {
                    let ExportState::Closed(reason) = current else {
                        unreachable!("state is either open or closed")
                    };
                    return Err(SessionError::Refused(reason));
                };
                let flags = ctx.transmission_flags(structured);
                encode_export_name_reply(&mut out, export.size, flags, client.no_zeroes);
                w.write_all(&out).await?;
                return Ok(Some((Arc::clone(export), structured)));
            }
            ClientOption::Unsupported(o) => {
                let what = if o == OPT_STARTTLS {
                    "TLS is not supported by this server".to_string()
                } else {
                    format!("option {o} is not supported by this server")
                };
                encode_option_error(&mut out, o, REP_ERR_UNSUP, &what);
            }
        }
        w.write_all(&out).await?;
    }
}

/// A completed request, ready to be encoded.
struct Done {
    cookie: u64,
    command: u16,
    offset: u64,
    len: u32,
    result: Result<Option<Chunk>, (u32, String)>,
}

/// Reply data: in memory, or a cached file range spliced to the socket.
enum Chunk {
    Mem(IoBuf),
    File(FileRange),
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Mem(b) => b.len(),
            Chunk::File(r) => r.len,
        }
    }
}

type Pending = Pin<Box<dyn Future<Output = Done> + Send>>;

/// Replies waiting to be written: headers are collected in `tail`, read data is queued as is.
#[derive(Default)]
struct OutQueue {
    /// Buffers in the order they go out.
    bufs: VecDeque<Chunk>,
    /// Bytes of the front buffer already written.
    pos: usize,
    /// Headers appended after the last queued buffer.
    tail: Vec<u8>,
    /// Bytes of the buffers in `bufs`, whole (`pos` not deducted).
    queued: usize,
}

impl OutQueue {
    fn small(&mut self) -> &mut Vec<u8> {
        &mut self.tail
    }

    fn data(&mut self, data: Chunk) {
        if data.len() > 0 {
            self.seal();
            self.queued += data.len();
            self.bufs.push_back(data);
        }
    }

    /// Queues the collected headers behind the buffers already queued.
    fn seal(&mut self) {
        if !self.tail.is_empty() {
            let v = std::mem::take(&mut self.tail);
            self.queued += v.len();
            self.bufs.push_back(Chunk::Mem(IoBuf::from_vec(v)));
        }
    }

    /// Bytes waiting to be written.
    fn bytes(&self) -> usize {
        self.queued - self.pos + self.tail.len()
    }

    fn is_empty(&self) -> bool {
        self.bufs.is_empty() && self.tail.is_empty()
    }

    /// The buffers in memory at the front of the queue, up to the first file range.
    fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut v = Vec::with_capacity(self.bufs.len().min(64));
        for (i, c) in self.bufs.iter().take(64).enumerate() {
            let Chunk::Mem(b) = c else { break };
            let s = if i == 0 { &b[self.pos..] } else { &b[..] };
            v.push(IoSlice::new(s));
        }
        v
    }

    /// Writes some of the front of the queue: the buffers in memory with one `writev`, or
    /// part of a file range. Cancel-safe: an interrupted call sent nothing (bytes of a range
    /// already moved into the sink's pipe stay there for the next call).
    async fn write_some<W: ReplySink>(&self, w: &mut W) -> io::Result<usize> {
        match self.bufs.front() {
            Some(Chunk::File(r)) => {
                let (offset, len) = (r.offset + self.pos as u64, r.len - self.pos);
                std::future::poll_fn(|cx| w.poll_send_file_range(cx, &r.file, offset, len)).await
            }
            Some(Chunk::Mem(_)) => {
                let slices = self.slices();
                if matches!(self.bufs.get(slices.len()), Some(Chunk::File(_))) {
                    std::future::poll_fn(|cx| w.poll_write_more(cx, &slices)).await
                } else {
                    w.write_vectored(&slices).await
                }
            }
            None => std::future::pending().await,
        }
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.bufs.front() else {
                return;
            };
            let left = front.len() - self.pos;
            if n >= left {
                n -= left;
                self.pos = 0;
                self.queued -= front.len();
                self.bufs.pop_front();
            } else {
                self.pos += n;
                n = 0;
            }
        }
    }
}

struct Transmission<B: Backend, R, W> {
    r: R,
    w: W,
    rbuf: BytesMut,
    /// The last request read was a write with a payload of `DIRECT_PAYLOAD` or more.
    after_large_write: bool,
    /// The socket's receive low-water mark.
    low_water: crate::tcp::LowWater,
    out: OutQueue,
    lim: Limits,
    export: Arc<Export<B>>,
}

enum Event {
    Done(Done),
    Wrote(io::Result<usize>),
    Read(io::Result<usize>),
    StateChanged(bool),
    /// The export closed, every request is done, and the client has not taken its replies.
    GaveUp,
}

/// How long a session whose export closed waits for a client that takes none of its replies
/// (below the node's own wait for its clients, so a demotion sees them gone).
const REPLY_DRAIN: std::time::Duration = std::time::Duration::from_secs(20);
/// The longest a session stays after its export closed, however slowly its client reads.
const REPLY_DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(25);

/// What the reader is doing.
enum ReadState {
    /// Waiting for a request header.
    Header,
    /// Filling the payload of a write.
    Payload {
        req: Request,
        buf: IoBuf,
        filled: usize,
    },
    /// Discarding the payload of a write that was refused.
    Discard { req: Request, errno: u32, left: u64 },
}

impl<B, R, W> Transmission<B, R, W>
where
    B: Backend,
    R: RequestSource,
    W: ReplySink,
{
    async fn run(
        mut self,
        state: &mut watch::Receiver<ExportState<B>>,
        ctx: &ServerCtx<B>,
    ) -> Result<(), SessionError> {
        let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
        let mut in_flight_bytes: u64 = 0;
        let mut rstate = ReadState::Header;
        let mut reading = true;
        let mut result = Ok(());
        // Replies being written; `self.out` collects new ones meanwhile.
        let mut wq = OutQueue::default();
        // Whether to poll the socket briefly when idle.
        let mut idle_poll = crate::sockpoll::IdlePoll::default();
        // Once the export closed under this session: when it last saw progress (the close, a
        // request finishing, replies taken by the client).
        let mut closed_at: Option<tokio::time::Instant> = None;
        let mut first_closed_at: Option<tokio::time::Instant> = None;
        // Whether the session stopped reading while the client may still be sending (the
        // export closed, or a request was malformed): its input must be drained at the end.
        let mut stopped_early = false;
        loop {
            // Turn everything already buffered into requests before waiting on anything.
            if reading {
                let queued = self.out.bytes() + wq.bytes();
                match self.parse_buffered(&mut rstate, &mut pending, &mut in_flight_bytes, queued) {
                    Ok(true) => {}
                    Ok(false) => reading = false, // NBD_CMD_DISC
                    Err(e) => {
                        result = Err(e);
                        reading = false;
                        stopped_early = true;
                    }
                }
            }
            if !reading && pending.is_empty() && self.out.is_empty() && wq.is_empty() {
                break;
            }
            let can_read = reading
                && has_room(
                    pending.len(),
                    in_flight_bytes,
                    self.out.bytes() + wq.bytes(),
                );
            if wq.is_empty() {
                std::mem::swap(&mut self.out, &mut wq);
                wq.seal();
            }
            if can_read {
                if let Err(e) = self.follow_low_water(&rstate) {
                    // The mark may be above what the client will send: reading on could
                    // wait forever, so the session ends once its requests have.
                    tracing::warn!(error = %e, "cannot set the socket's receive low-water mark");
                    result = Err(e.into());
                    reading = false;
                    continue;
                }
            }
            let idle = can_read
                && pending.is_empty()
                && wq.is_empty()
                && matches!(rstate, ReadState::Header);
            // With nothing in flight, poll the socket for the next request before going
            // back to the reactor (`crate::sockpoll`).
            if let Some(fd) = self.r.socket_fd().filter(|_| idle && idle_poll.waiting()) {
                match crate::sockpoll::poll_socket(fd, &mut self.rbuf) {
                    Ok(0) => {
                        reading = false;
                        continue;
                    }
                    Ok(_) => {
                        idle_poll.arrived();
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => idle_poll.missed(),
                    Err(e) => {
                        result = Err(e.into());
                        reading = false;
                        continue;
                    }
                }
            }
            let ev = {
                let Transmission {
                    r,
                    w,
                    rbuf,
                    after_large_write,
                    ..
                } = &mut self;
                let limit = if *after_large_write {
                    READ_AFTER_LARGE_WRITE
                } else {
                    usize::MAX
                };
                let writing = !wq.is_empty();
                // Progress defers giving up, but never past `REPLY_DRAIN_MAX` after the close.
                let give_up = closed_at.filter(|_| pending.is_empty()).map(|at| {
                    (at + ctx.reply_drain).min(first_closed_at.unwrap_or(at) + REPLY_DRAIN_MAX)
                });
                tokio::select! {
                    biased;
                    Some(done) = pending.next(), if !pending.is_empty() => Event::Done(done),
                    n = wq.write_some(w), if writing => Event::Wrote(n),
                    n = read_some(r, rbuf, &mut rstate, limit), if can_read => Event::Read(n),
                    changed = state.changed(), if reading => Event::StateChanged(changed.is_ok()),
                    _ = sleep_until_some(give_up) => Event::GaveUp,
                }
            };
            match ev {
                Event::Done(done) => {
                    let structured = self.lim.structured;
                    in_flight_bytes -= u64::from(done.len).min(in_flight_bytes);
                    encode_done(&mut self.out, done, structured, ctx);
                    // Collect every other completion ready now, to write them together.
                    while let Some(Some(done)) =
                        futures_util::FutureExt::now_or_never(pending.next())
                    {
                        in_flight_bytes -= u64::from(done.len).min(in_flight_bytes);
                        encode_done(&mut self.out, done, structured, ctx);
                    }
                    if closed_at.is_some() {
                        closed_at = Some(tokio::time::Instant::now());
                    }
                }
                Event::Wrote(Ok(n)) if n > 0 => {
                    wq.advance(n);
                    if closed_at.is_some() {
                        closed_at = Some(tokio::time::Instant::now());
                    }
                }
                Event::Wrote(n) => {
                    // The client is gone: finish what is in flight, then stop.
                    result = match n {
                        Err(e) => Err(e.into()),
                        Ok(_) => Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                    };
                    while pending.next().await.is_some() {}
                    return result;
                }
                Event::Read(Ok(0)) => reading = false,
                Event::Read(Ok(_)) => idle_poll.arrived(),
                Event::Read(Err(e)) => {
                    result = Err(e.into());
                    reading = false;
                }
                Event::StateChanged(alive) => {
                    let still_ours = alive
                        && matches!(&*state.borrow(),
                            ExportState::Open(e) if Arc::ptr_eq(e, &self.export));
                    if !still_ours {
                        tracing::info!("export closed: disconnecting NBD client");
                        stopped_early = reading;
                        reading = false;
                        closed_at = Some(tokio::time::Instant::now());
                        first_closed_at = closed_at;
                    }
                }
                Event::GaveUp => {
                    // Nothing is in flight: only replies the client does not read are lost.
                    tracing::warn!(
                        "export closed: the NBD client took no replies for {} s; dropping it",
                        ctx.reply_drain.as_secs()
                    );
                    return Err(io::Error::from(io::ErrorKind::TimedOut).into());
                }
            }
        }
        let _ = self.w.flush().await;
        let _ = self.w.shutdown().await;
        if stopped_early {
            self.discard_until_closed().await;
        }
        result
    }

    /// After the last reply: reads and drops what the client still sends until it closes its
    /// side, for `CLOSE_LINGER` at most. A TCP socket closed with unread input is reset, and
    /// the reset drops the replies still queued in the kernel (a client slow to read them
    /// would lose replies to requests that were done).
    async fn discard_until_closed(&mut self) {
        // A receive low-water mark left from a payload would hold back a short read.
        if self.follow_low_water(&ReadState::Header).is_err() {
            return;
        }
        let mut scratch = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while matches!(self.r.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    /// Sets the socket's receive low-water mark for the next read: the rest of a large write
    /// payload, which is read straight into its buffer, or 1 (`crate::tcp::LowWater`).
    fn follow_low_water(&mut self, rstate: &ReadState) -> io::Result<()> {
        let Some(fd) = self.r.low_water_fd() else {
            return Ok(());
        };
        let bound = match rstate {
            ReadState::Payload { buf, filled, .. } if buf.len() - *filled >= DIRECT_PAYLOAD => {
                buf.len() - *filled
            }
            _ => 0,
        };
        self.low_water.follow(&fd, bound)
    }

    /// Parses every complete request in the read buffer and starts it. Returns `Ok(false)`
    /// after `NBD_CMD_DISC`.
    fn parse_buffered(
        &mut self,
        rstate: &mut ReadState,
        pending: &mut FuturesUnordered<Pending>,
        in_flight_bytes: &mut u64,
        queued_replies: usize,
    ) -> Result<bool, SessionError> {
        loop {
            match rstate {
                ReadState::Header => {
                    // The limits hold however many requests one read brought: the rest wait
                    // in the buffer until requests finish.
                    if self.rbuf.len() < REQUEST_LEN
                        || !has_room(pending.len(), *in_flight_bytes, queued_replies)
                    {
                        return Ok(true);
                    }
                    let mut hdr = [0u8; REQUEST_LEN];
                    hdr.copy_from_slice(&self.rbuf[..REQUEST_LEN]);
                    self.rbuf.advance(REQUEST_LEN);
                    let req = decode_request(&hdr)?;
                    if req.command == CMD_DISC {
                        return Ok(false);
                    }
                    let check = proto::check_request(&req, &self.lim);
                    if req.command == CMD_WRITE {
                        match check {
                            Ok(()) => {
                                let len = req.len as usize;
                                self.after_large_write = len >= DIRECT_PAYLOAD;
                                let take = len.min(self.rbuf.len());
                                let buf = IoBuf::starting_with(&self.rbuf[..take], len);
                                self.rbuf.advance(take);
                                *rstate = ReadState::Payload {
                                    req,
                                    buf,
                                    filled: take,
                                };
                            }
                            Err(errno) => {
                                *rstate = ReadState::Discard {
                                    req,
                                    errno,
                                    left: u64::from(req.len),
                                };
                            }
                        }
                        continue;
                    }
                    self.after_large_write = false;
                    match check {
                        Ok(()) => {
                            if req.command == CMD_READ {
                                *in_flight_bytes += u64::from(req.len);
                            }
                            pending.push(start(
                                &self.export,
                                req,
                                None,
                                self.w.sends_file_ranges(),
                            ));
                        }
                        Err(errno) => pending.push(refused(req, errno)),
                    }
                }
                ReadState::Payload { req, buf, filled } => {
                    if *filled < buf.len() {
                        let take = (buf.len() - *filled).min(self.rbuf.len());
                        buf[*filled..*filled + take].copy_from_slice(&self.rbuf[..take]);
                        self.rbuf.advance(take);
                        *filled += take;
                    }
                    if *filled < buf.len() {
                        return Ok(true);
                    }
                    let req = *req;
                    let data = std::mem::take(buf);
                    *in_flight_bytes += u64::from(req.len);
                    pending.push(start(&self.export, req, Some(data), false));
                    *rstate = ReadState::Header;
                }
                ReadState::Discard { req, errno, left } => {
                    let take = (*left).min(self.rbuf.len() as u64);
                    self.rbuf.advance(take as usize);
                    *left -= take;
                    if *left > 0 {
                        return Ok(true);
                    }
                    pending.push(refused(*req, *errno));
                    *rstate = ReadState::Header;
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether a session may take another request: fewer than `MAX_IN_FLIGHT` in flight, their
/// bytes under `MAX_IN_FLIGHT_BYTES` (one request, however large, may always run alone), and
/// replies waiting to be written under `MAX_IN_FLIGHT_BYTES` too: a client that does not read
/// its replies stops being read from.
fn has_room(pending: usize, in_flight_bytes: u64, queued_replies: usize) -> bool {
    (queued_replies as u64) < MAX_IN_FLIGHT_BYTES
        && pending < MAX_IN_FLIGHT
        && (in_flight_bytes < MAX_IN_FLIGHT_BYTES || pending == 0)
}

/// The rest of a write payload at least this large is read straight into its buffer.
const DIRECT_PAYLOAD: usize = 64 * 1024;
/// After a write with such a payload, the next read into the session's buffer takes at most
/// this much: with large writes queued back to back, a full read would bring a quarter MiB
/// of the next payload into the read buffer, to be copied out again.
const READ_AFTER_LARGE_WRITE: usize = 4096;

/// Reads more bytes: large write payloads straight into their buffer, everything else into the
/// session's read buffer, at most `limit` bytes beyond the rest of a payload being read.
/// Cancel-safe: an interrupted call has consumed nothing.
async fn read_some<R: AsyncRead + Unpin>(
    r: &mut R,
    rbuf: &mut BytesMut,
    rstate: &mut ReadState,
    mut limit: usize,
) -> io::Result<usize> {
    if let ReadState::Payload { buf, filled, .. } = rstate {
        let rest = buf.len() - *filled;
        if rest >= DIRECT_PAYLOAD {
            let n = r.read(&mut buf[*filled..]).await?;
            *filled += n;
            return Ok(n);
        }
        // The tail of the payload comes through the buffer in one read.
        limit = limit.saturating_add(rest);
    }
    if rbuf.capacity() - rbuf.len() < 64 * 1024 {
        rbuf.reserve(256 * 1024);
    }
    r.read_buf(&mut bytes::BufMut::limit(rbuf, limit)).await
}

fn refused(req: Request, errno: u32) -> Pending {
    let msg = format!(
        "{} of {} bytes at offset {} refused",
        command_name(req.command),
        req.len,
        req.offset
    );
    Box::pin(std::future::ready(Done {
        cookie: req.cookie,
        command: req.command,
        offset: req.offset,
        len: 0,
        result: Err((errno, msg)),
    }))
}

/// Starts one request. With `zero_copy`, a large read whose pages are all cached is answered
/// with the file range itself, spliced to the socket when its turn to go out comes: the reply
/// then carries the data as it is at that moment, which NBD allows (a read overlapping a
/// write in flight may return either).
fn start<B: Backend>(
    export: &Arc<Export<B>>,
    req: Request,
    payload: Option<IoBuf>,
    zero_copy: bool,
) -> Pending {
    let export = Arc::clone(export);
    Box::pin(async move {
        let b = &export.backend;
        let off = req.offset;
        let len = u64::from(req.len);
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let result = match req.command {
            CMD_READ => {
                let cached = (zero_copy && req.len >= FILE_RANGE_MIN)
                    .then(|| b.cached_range(off, req.len as usize))
                    .flatten();
                match cached {
                    Some(r) => Ok(Some(Chunk::File(r))),
                    None => b
                        .read(off, req.len as usize)
                        .await
                        .map(|d| Some(Chunk::Mem(d))),
                }
            }
            CMD_WRITE => b
                .write(off, payload.unwrap_or_default(), fua)
                .await
                .map(|_| None),
            CMD_FLUSH => b.flush().await.map(|_| None),
            CMD_TRIM => {
                async {
                    b.trim(off, len).await?;
                    if fua {
                        b.flush().await?;
                    }
                    Ok(None)
                }
                .await
            }
            CMD_WRITE_ZEROES => {
                async {
                    b.write_zeroes(off, len, req.flags & CMD_FLAG_NO_HOLE == 0)
                        .await?;
                    if fua {
                        b.flush().await?;
                    }
                    Ok(None)
                }
                .await
            }
            // The data is in the page cache or on a local disk already: nothing to prefetch
            // beyond what a read would do, so CACHE succeeds at once.
            CMD_CACHE => Ok(None),
            _ => Err(crate::storage::StorageError::Closed),
        };
        let len = match req.command {
            CMD_READ | CMD_WRITE => req.len,
            _ => 0,
        };
        Done {
            cookie: req.cookie,
            command: req.command,
            offset: off,
            len,
            result: result.map_err(|e| {
                tracing::warn!(error = %e, "NBD {} failed", command_name(req.command));
                (e.errno() as u32, e.to_string())
            }),
        }
    })
}

fn encode_done<B: Backend>(out: &mut OutQueue, done: Done, structured: bool, ctx: &ServerCtx<B>) {
    ctx.requests.fetch_add(1, Ordering::Relaxed);
    if let Ok(Some(Chunk::File(_))) = &done.result {
        ctx.file_range_replies.fetch_add(1, Ordering::Relaxed);
    }
    match done.result {
        Ok(data) => {
            if structured {
                match data {
                    Some(d) if done.command == CMD_READ && d.len() > 0 => {
                        encode_read_chunk_header(
                            out.small(),
                            done.cookie,
                            done.offset,
                            d.len() as u32,
                        );
                        out.data(d);
                    }
                    // A read always ends with a structured chunk. Any other
                    // command's success carries no payload, and the protocol lets
                    // the server answer it with a 16-byte simple reply: clients
                    // read it in one receive, where the 20-byte structured chunk
                    // takes libnbd two.
                    _ if done.command == CMD_READ => {
                        encode_structured_done(out.small(), done.cookie)
                    }
                    _ => encode_simple_reply(out.small(), done.cookie, 0),
                }
            } else {
                encode_simple_reply(out.small(), done.cookie, 0);
                if let Some(d) = data {
                    out.data(d);
                }
            }
        }
        Err((errno, msg)) => {
            if structured {
                encode_structured_error(out.small(), done.cookie, errno, &msg);
            } else {
                encode_simple_reply(out.small(), done.cookie, errno);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_waiting_and_requests_in_flight_both_bound_reading() {
        let mib = 1usize << 20;
        assert!(has_room(0, 0, 0));
        // One request may always run alone, however large.
        assert!(has_room(0, u64::MAX, 0));
        assert!(!has_room(1, MAX_IN_FLIGHT_BYTES, 0));
        assert!(!has_room(MAX_IN_FLIGHT, 0, 0));
        assert!(has_room(MAX_IN_FLIGHT - 1, MAX_IN_FLIGHT_BYTES - 1, 0));
        // A client that leaves its replies unread is not read from, even with nothing in
        // flight.
        assert!(!has_room(0, 0, MAX_IN_FLIGHT_BYTES as usize));
        assert!(has_room(0, 0, MAX_IN_FLIGHT_BYTES as usize - mib));

        let mut q = OutQueue::default();
        q.small().extend_from_slice(&[0; 16]);
        assert_eq!(q.bytes(), 16);
        q.data(Chunk::Mem(IoBuf::from(&vec![1u8; mib][..])));
        q.small().extend_from_slice(&[0; 16]);
        assert_eq!(q.bytes(), 16 + mib + 16);
        q.seal();
        q.advance(10);
        assert_eq!(q.bytes(), 6 + mib + 16);
        q.advance(6 + mib);
        assert_eq!(q.bytes(), 16);
        q.advance(16);
        assert_eq!(q.bytes(), 0);
        assert!(q.is_empty());
    }
}

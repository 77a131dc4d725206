//! Peer connections: framed, checksummed sockets and the authenticated handshake.
//!
//! A link is two TCP connections between the nodes: `data` (writes, flushes, resync data, in
//! order) and `meta` (heartbeats, acknowledgements, state), so a ping or an ack never waits
//! behind megabytes of bulk data. The node whose name sorts first dials both; the other
//! accepts. Both connections of a link carry the same session number.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::auth::{self, Role};
use super::wire::{self, Channel, Header, Hello, Msg, WireError, HEADER_LEN, VERSION};
use crate::storage::IoBuf;

/// Longest a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("peer connection: {0}")]
    Io(#[from] io::Error),
    #[error("peer sent a bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("peer closed the connection")]
    Closed,
    #[error("peer refused the connection: {0}")]
    Refused(String),
    #[error("peer {0} failed authentication (wrong secret?)")]
    AuthFailed(String),
    #[error("{0}")]
    Rejected(String),
    #[error("handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error("peer sent {got} where {expected} was expected")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

/// Longest payload of a handshake frame (a Hello with the longest names is about 8 KiB).
const HANDSHAKE_FRAME_MAX: u32 = 16 * 1024;

/// Who we are and whom we expect, for the handshake.
#[derive(Debug, Clone)]
pub struct LinkParams {
    pub resource: String,
    pub secret: String,
    pub me: String,
    pub node_id: u64,
    pub peer: String,
    pub size: u64,
    /// Bytes per bit of this node's dirty bitmap; the peer's must match.
    pub granularity: u32,
    pub listen: SocketAddr,
    pub peer_addr: SocketAddr,
}

impl LinkParams {
    /// The node whose name sorts first dials; the other accepts.
    pub fn dials(&self) -> bool {
        self.me < self.peer
    }
}

/// Sends frames on one connection. Callers share it behind a lock; the lock is held for the
/// whole frame, so frames never interleave.
pub struct FrameWriter {
    w: OwnedWriteHalf,
    seq: u64,
}

impl FrameWriter {
    pub fn new(w: OwnedWriteHalf) -> FrameWriter {
        FrameWriter { w, seq: 0 }
    }

    pub async fn send(&mut self, msg: &Msg) -> io::Result<()> {
        let head = wire::encode(msg, self.seq);
        self.seq += 1;
        let data = msg.data();
        let total = head.len() + data.len();
        let mut done = 0;
        while done < total {
            let n = if done < head.len() {
                let bufs = [IoSlice::new(&head[done..]), IoSlice::new(data)];
                self.w.write_vectored(&bufs).await?
            } else {
                self.w.write(&data[done - head.len()..]).await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        Ok(())
    }

    /// Sends several messages in one write (small messages: acknowledgements).
    pub async fn send_batch(&mut self, msgs: &[Msg]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(msgs.len() * 48);
        for m in msgs {
            buf.extend_from_slice(&wire::encode(m, self.seq));
            buf.extend_from_slice(m.data());
            self.seq += 1;
        }
        self.w.write_all(&buf).await
    }

    pub async fn shutdown(&mut self) {
        let _ = self.w.shutdown().await;
    }
}

/// The writer of a connection many tasks send on, with frames that can wait to be batched.
///
/// `send` writes a frame at once (large payloads, frames whose sender must know it left).
/// `enqueue` only encodes a frame, copying its payload, behind the ones already waiting, and
/// `flush` writes everything waiting in one call: frames queued by the requests a client
/// sent together leave in one `write`, and the peer reads them in one `read`. Sequence numbers
/// are given under the queue's lock and a `send` first writes what is queued, so frames
/// leave in the order their calls were made, whichever way they take.
pub struct SharedFrameWriter {
    w: tokio::sync::Mutex<OwnedWriteHalf>,
    q: std::sync::Mutex<Queued>,
    /// Every frame with a smaller sequence number has been handed to the socket.
    written: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    seq: u64,
    /// The buffer of the last batch written, kept to be the next queue.
    spare: Vec<u8>,
}

impl Queued {
    /// Takes the queued bytes, leaving the spare buffer as the new queue.
    fn take(&mut self) -> Vec<u8> {
        let spare = std::mem::take(&mut self.spare);
        std::mem::replace(&mut self.bytes, spare)
    }
}

/// Frames larger than this are never copied into the queue.
pub const QUEUE_FRAME_MAX: usize = 64 * 1024;

impl SharedFrameWriter {
    pub fn new(fw: FrameWriter) -> SharedFrameWriter {
        SharedFrameWriter {
            w: tokio::sync::Mutex::new(fw.w),
            q: std::sync::Mutex::new(Queued {
                seq: fw.seq,
                ..Queued::default()
            }),
            written: tokio::sync::watch::channel(fw.seq).0,
        }
    }

    /// Waits until the frame `seq` (as `enqueue` returned it) has been handed to the
    /// socket. Returns at once if it has; never returns if the writes stop, so callers also
    /// watch the link's end.
    pub async fn written(&self, seq: u64) {
        let mut rx = self.written.subscribe();
        // The sender lives as long as `self`, which the caller borrows.
        let _ = rx.wait_for(|&w| w > seq).await;
    }

    fn wrote_through(&self, upto: u64) {
        self.written.send_if_modified(|w| {
            let newer = upto > *w;
            if newer {
                *w = upto;
            }
            newer
        });
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame; returns whether the queue was empty (the caller arranges a `flush`)
    /// and the frame's sequence number (for [`SharedFrameWriter::written`]).
    pub fn enqueue(&self, msg: &Msg) -> (bool, u64) {
        let mut q = self.queue();
        let first = q.bytes.is_empty();
        let seq = q.seq;
        let head = wire::encode(msg, seq);
        q.seq += 1;
        q.bytes.extend_from_slice(&head);
        q.bytes.extend_from_slice(msg.data());
        (first, seq)
    }

    /// Writes every queued frame.
    pub async fn flush(&self) -> io::Result<()> {
        let mut w = self.w.lock().await;
        let (bytes, upto) = {
            let mut q = self.queue();
            (q.take(), q.seq)
        };
        if !bytes.is_empty() {
            w.write_all(&bytes).await?;
        }
        self.give_back(bytes);
        self.wrote_through(upto);
        Ok(())
    }

    /// Keeps a written batch's buffer as the next spare.
    fn give_back(&self, mut buf: Vec<u8>) {
        buf.clear();
        self.queue().spare = buf;
    }

    /// Writes the queued frames, then `msg`.
    pub async fn send(&self, msg: &Msg) -> io::Result<()> {
        let mut w = self.w.lock().await;
        let (queued, head, upto) = {
            let mut q = self.queue();
            let head = wire::encode(msg, q.seq);
            q.seq += 1;
            (q.take(), head, q.seq)
        };
        let data = msg.data();
        let parts: [&[u8]; 3] = [&queued, &head, data];
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut done = 0;
        while done < total {
            let mut skip = done;
            let mut slices = Vec::with_capacity(3);
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                slices.push(IoSlice::new(&p[skip..]));
                skip = 0;
            }
            let n = w.write_vectored(&slices).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        self.give_back(queued);
        self.wrote_through(upto);
        Ok(())
    }

    pub async fn shutdown(&self) {
        let _ = self.w.lock().await.shutdown().await;
    }
}

enum ReadState {
    Header,
    Fixed(Header),
    Data {
        h: Header,
        fixed: Vec<u8>,
        data: IoBuf,
        filled: usize,
    },
}

/// The rest of a frame's data at least this large is read straight into its buffer.
const DIRECT_DATA: usize = 64 * 1024;

/// Receives frames from one connection. `recv` is cancel-safe: an interrupted call loses
/// nothing, so it can sit in a `select!` beside other work.
pub struct FrameReader {
    r: OwnedReadHalf,
    buf: BytesMut,
    state: ReadState,
    seq: u64,
    low_water: crate::tcp::LowWater,
    /// Longest payload accepted: small until the peer has authenticated.
    max_len: u32,
}

impl FrameReader {
    pub fn new(r: OwnedReadHalf) -> FrameReader {
        FrameReader {
            r,
            buf: BytesMut::with_capacity(64 * 1024),
            state: ReadState::Header,
            seq: 0,
            low_water: Default::default(),
            max_len: wire::MAX_PAYLOAD,
        }
    }

    /// The next message. Every check (magic, length, sequence, CRC, structure) passes before
    /// a message is returned; any failure is an error and the link must be dropped.
    /// The next message if it is already buffered, without reading the socket.
    pub fn try_recv(&mut self) -> Result<Option<Msg>, LinkError> {
        self.parse()
    }

    pub async fn recv(&mut self) -> Result<Msg, LinkError> {
        loop {
            if let Some(msg) = self.parse()? {
                return Ok(msg);
            }
            // The rest of a large frame's data, read straight into its buffer.
            let direct = match &self.state {
                ReadState::Data { data, filled, .. } if data.len() - *filled >= DIRECT_DATA => {
                    Some(data.len() - *filled)
                }
                _ => None,
            };
            // Wake once that rest is here, not at every segment (`crate::tcp::LowWater`);
            // the sender is bound to send it.
            self.low_water
                .follow(self.r.as_ref(), direct.unwrap_or(0))?;
            let n = match &mut self.state {
                ReadState::Data { data, filled, .. } if direct.is_some() => {
                    let n = self.r.read(&mut data[*filled..]).await?;
                    *filled += n;
                    n
                }
                _ => {
                    if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                        self.buf.reserve(64 * 1024);
                    }
                    self.r.read_buf(&mut self.buf).await?
                }
            };
            if n == 0 {
                return Err(LinkError::Closed);
            }
        }
    }

    fn parse(&mut self) -> Result<Option<Msg>, LinkError> {
        loop {
            match &mut self.state {
                ReadState::Header => {
                    if self.buf.len() < HEADER_LEN {
                        return Ok(None);
                    }
                    let mut hb = [0u8; HEADER_LEN];
                    hb.copy_from_slice(&self.buf[..HEADER_LEN]);
                    self.buf.advance(HEADER_LEN);
                    let h = wire::decode_header(&hb)?;
                    if h.len > self.max_len {
                        return Err(WireError::TooLong(h.len).into());
                    }
                    if h.seq != self.seq {
                        return Err(WireError::BadSeq {
                            expected: self.seq,
                            got: h.seq,
                        }
                        .into());
                    }
                    self.seq += 1;
                    self.state = ReadState::Fixed(h);
                }
                ReadState::Fixed(h) => {
                    let h = *h;
                    let len = h.len as usize;
                    match wire::data_prefix_len(h.kind) {
                        Some(pre) if len >= pre => {
                            if self.buf.len() < pre {
                                return Ok(None);
                            }
                            let fixed = self.buf[..pre].to_vec();
                            self.buf.advance(pre);
                            let want = len - pre;
                            let take = want.min(self.buf.len());
                            let data = IoBuf::starting_with(&self.buf[..take], want);
                            self.buf.advance(take);
                            self.state = ReadState::Data {
                                h,
                                fixed,
                                data,
                                filled: take,
                            };
                        }
                        _ => {
                            if self.buf.len() < len {
                                self.buf.reserve(len - self.buf.len());
                                return Ok(None);
                            }
                            let payload = IoBuf::from(&self.buf[..len]);
                            self.buf.advance(len);
                            self.state = ReadState::Header;
                            return Ok(Some(wire::decode(&h, payload)?));
                        }
                    }
                }
                ReadState::Data {
                    h,
                    fixed,
                    data,
                    filled,
                } => {
                    if *filled < data.len() {
                        let take = (data.len() - *filled).min(self.buf.len());
                        data[*filled..*filled + take].copy_from_slice(&self.buf[..take]);
                        self.buf.advance(take);
                        *filled += take;
                    }
                    if *filled < data.len() {
                        return Ok(None);
                    }
                    let h = *h;
                    let fixed = std::mem::take(fixed);
                    let data = std::mem::take(data);
                    self.state = ReadState::Header;
                    return Ok(Some(wire::decode_split(&h, &fixed, data)?));
                }
            }
        }
    }
}

/// One authenticated connection.
pub struct Conn {
    pub channel: Channel,
    pub session: u64,
    pub peer: Hello,
    pub reader: FrameReader,
    pub writer: FrameWriter,
}

/// Dials the peer and authenticates one connection of session `session`.
pub async fn dial(p: &LinkParams, channel: Channel, session: u64) -> Result<Conn, LinkError> {
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(p.peer_addr))
        .await
        .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))??;
    crate::tcp::tune(&s);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(s, p, Some((channel, session))))
        .await
        .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// Authenticates a connection the peer dialed.
pub async fn accept(s: TcpStream, p: &LinkParams) -> Result<Conn, LinkError> {
    crate::tcp::tune(&s);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(s, p, None))
        .await
        .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))?
}

fn hello(p: &LinkParams, channel: Channel, session: u64) -> Hello {
    Hello {
        version: VERSION,
        channel,
        session,
        node_id: p.node_id,
        size: p.size,
        granularity: p.granularity,
        resource: p.resource.clone(),
        node: p.me.clone(),
        challenge: auth::challenge(),
    }
}

/// Checks the peer's hello against what we expect; `Err` is the reason to refuse.
fn check_hello(p: &LinkParams, h: &Hello) -> Result<(), String> {
    // The decoder has already refused any other version (`WireError::Version`).
    if h.resource != p.resource {
        return Err(format!(
            "peer serves resource {:?}, this node {:?}",
            h.resource, p.resource
        ));
    }
    if h.node != p.peer {
        return Err(format!(
            "peer calls itself {:?}; node {:?} expects its peer {:?}",
            h.node, p.me, p.peer
        ));
    }
    if h.size < p.size {
        return Err(format!(
            "peer {} has a device of {} bytes, smaller than this node's {} bytes: it cannot hold a full copy",
            h.node, h.size, p.size
        ));
    }
    if h.granularity != p.granularity {
        return Err(format!(
            "peer {} keeps its dirty bitmap at {} bytes per bit, this node at {}: their bitmaps cannot be merged",
            h.node, h.granularity, p.granularity
        ));
    }
    Ok(())
}

/// Reads the peer's Hello. A peer of another protocol version is refused with a reason it
/// can log, as is one whose Hello `check_hello` rejects.
async fn read_hello(
    p: &LinkParams,
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
) -> Result<Hello, LinkError> {
    let reason = match expect(reader, "hello").await {
        Ok(Msg::Hello(h)) => match check_hello(p, &h) {
            Ok(()) => return Ok(h),
            Err(reason) => reason,
        },
        Ok(_) => unreachable!("expect checked the kind"),
        Err(LinkError::Wire(WireError::Version(v))) => {
            format!("node {} speaks protocol version {VERSION}, not {v}", p.me)
        }
        Err(e) => return Err(e),
    };
    let _ = writer
        .send(&Msg::Refuse {
            reason: reason.clone(),
        })
        .await;
    Err(LinkError::Rejected(reason))
}

async fn expect(r: &mut FrameReader, what: &'static str) -> Result<Msg, LinkError> {
    let m = r.recv().await?;
    if let Msg::Refuse { reason } = &m {
        return Err(LinkError::Refused(reason.clone()));
    }
    if m.name() != what {
        return Err(LinkError::Unexpected {
            expected: what,
            got: m.name(),
        });
    }
    Ok(m)
}

async fn handshake(
    s: TcpStream,
    p: &LinkParams,
    dialing: Option<(Channel, u64)>,
) -> Result<Conn, LinkError> {
    let (r, w) = s.into_split();
    let mut reader = FrameReader::new(r);
    // Nothing a stranger sends before it has authenticated gets a large buffer.
    reader.max_len = HANDSHAKE_FRAME_MAX;
    let mut writer = FrameWriter::new(w);

    // Hellos: the dialer speaks first; the acceptor learns channel and session from it.
    let (mine, theirs) = match dialing {
        Some((channel, session)) => {
            let mine = hello(p, channel, session);
            writer.send(&Msg::Hello(mine.clone())).await?;
            let theirs = read_hello(p, &mut reader, &mut writer).await?;
            if theirs.channel != channel || theirs.session != session {
                return Err(LinkError::Rejected(
                    "peer answered for another connection".into(),
                ));
            }
            (mine, theirs)
        }
        None => {
            let theirs = read_hello(p, &mut reader, &mut writer).await?;
            (hello(p, theirs.channel, theirs.session), theirs)
        }
    };
    if dialing.is_none() {
        writer.send(&Msg::Hello(mine.clone())).await?;
    }

    // Both prove they know the secret, the dialer first: the acceptor gives its proof only
    // to a dialer whose proof checked out, so it answers nobody's challenge blindly (`auth`).
    let role = if dialing.is_some() {
        Role::Dialer
    } else {
        Role::Acceptor
    };
    let my_proof = auth::Proof {
        role,
        verifier_challenge: &theirs.challenge,
        prover_challenge: &mine.challenge,
        prover: &p.me,
        channel: mine.channel,
        session: mine.session,
    };
    let their_proof = auth::Proof {
        role: match role {
            Role::Dialer => Role::Acceptor,
            Role::Acceptor => Role::Dialer,
        },
        verifier_challenge: &mine.challenge,
        prover_challenge: &theirs.challenge,
        prover: &theirs.node,
        channel: mine.channel,
        session: mine.session,
    };
    if role == Role::Dialer {
        writer
            .send(&Msg::Auth {
                mac: my_proof.give(&p.secret),
            })
            .await?;
    }
    let Msg::Auth { mac: their_mac } = expect(&mut reader, "auth").await? else {
        unreachable!("expect checked the kind")
    };
    if !their_proof.check(&p.secret, &their_mac) {
        let _ = writer
            .send(&Msg::Refuse {
                reason: format!("node {} could not authenticate you: check the secret", p.me),
            })
            .await;
        return Err(LinkError::AuthFailed(theirs.node.clone()));
    }
    if role == Role::Acceptor {
        writer
            .send(&Msg::Auth {
                mac: my_proof.give(&p.secret),
            })
            .await?;
    }
    writer.send(&Msg::Welcome).await?;
    expect(&mut reader, "welcome").await?;
    reader.max_len = wire::MAX_PAYLOAD;
    Ok(Conn {
        channel: mine.channel,
        session: mine.session,
        peer: theirs,
        reader,
        writer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn write(id: u64, len: usize) -> Msg {
        let mut data = IoBuf::with_len(len);
        data.fill(id as u8);
        Msg::Write {
            id,
            offset: id * 4096,
            fua: false,
            data,
        }
    }

    fn params(me: &str, peer: &str, listen: SocketAddr, peer_addr: SocketAddr) -> LinkParams {
        LinkParams {
            resource: "r0".into(),
            secret: "s3cret".into(),
            me: me.into(),
            node_id: if me == "alpha" { 1 } else { 2 },
            peer: peer.into(),
            size: 1 << 20,
            granularity: 4096,
            listen,
            peer_addr,
        }
    }

    /// Reads the next frame, if one comes within `wait`.
    async fn next_frame(r: &mut FrameReader, wait: Duration) -> Option<Result<Msg, LinkError>> {
        tokio::time::timeout(wait, r.recv()).await.ok()
    }

    /// Connects to `node`'s accept side (listening on `l`) and sends `as_hello` carrying
    /// `challenge`; returns the connection, `node`'s answering Hello and its handshake task.
    async fn pose_as(
        l: &TcpListener,
        node: &LinkParams,
        mut as_hello: Hello,
        challenge: [u8; wire::CHALLENGE_LEN],
    ) -> (
        FrameReader,
        FrameWriter,
        Hello,
        tokio::task::JoinHandle<Result<Conn, LinkError>>,
    ) {
        let (to, from) = tokio::join!(TcpStream::connect(node.listen), l.accept());
        let task = tokio::spawn({
            let node = node.clone();
            async move { accept(from.expect("accept").0, &node).await }
        });
        let (r, w) = to.expect("connect").into_split();
        let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
        as_hello.challenge = challenge;
        w.send(&Msg::Hello(as_hello)).await.expect("hello");
        let Some(Ok(Msg::Hello(answer))) = next_frame(&mut r, HANDSHAKE_TIMEOUT).await else {
            panic!("{} did not answer the hello", node.me)
        };
        (r, w, answer, task)
    }

    /// Alpha dials, beta accepts. Someone who can reach both ports but lacks the secret
    /// poses as alpha to beta and as beta to alpha, passing each one's challenge to the
    /// other: neither node gives a proof to a stranger that has not proven itself, so there
    /// is nothing to relay, and a proof made by one role never passes for the other's.
    #[tokio::test]
    async fn a_relayed_challenge_does_not_log_in() {
        let lb = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let la = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (a_addr, b_addr) = (la.local_addr().expect("a"), lb.local_addr().expect("b"));
        let alpha = params("alpha", "beta", a_addr, b_addr);
        let beta = params("beta", "alpha", b_addr, a_addr);

        // The genuine pair logs in.
        let (dialed, accepted) = tokio::join!(dial(&alpha, Channel::Data, 9), async {
            let (s, _) = lb.accept().await.expect("accept");
            accept(s, &beta).await
        });
        assert_eq!(dialed.expect("alpha dials").peer.node, "beta");
        assert_eq!(accepted.expect("beta accepts").peer.node, "alpha");

        // The stranger, as alpha, dials beta and gets beta's challenge.
        let stranger_challenge = auth::challenge();
        let (mut rb, mut wb, beta_hello, beta_side) = pose_as(
            &lb,
            &beta,
            hello(&alpha, Channel::Data, 10),
            stranger_challenge,
        )
        .await;
        // Beta waits for the dialer's proof before it proves anything itself.
        assert!(
            next_frame(&mut rb, Duration::from_millis(300))
                .await
                .is_none(),
            "beta sent a frame before the dialer proved itself"
        );

        // The stranger, as beta, connects to alpha's accept side with beta's challenge.
        let (mut ra, wa, _, alpha_side) = pose_as(
            &la,
            &alpha,
            hello(&beta, Channel::Data, 10),
            beta_hello.challenge,
        )
        .await;
        // Alpha, accepting, gives no proof either: nothing to relay. A proof of alpha's as an
        // acceptor, were it to get one, would not pass at beta, which checks a dialer's.
        assert!(
            next_frame(&mut ra, Duration::from_millis(300))
                .await
                .is_none(),
            "alpha sent a frame before the dialer proved itself"
        );
        // Made with the secret, it differs from what beta checks in the role alone.
        let acceptor_proof = auth::Proof {
            role: Role::Acceptor,
            verifier_challenge: &beta_hello.challenge,
            prover_challenge: &stranger_challenge,
            prover: "alpha",
            channel: Channel::Data,
            session: 10,
        }
        .give("s3cret");
        wb.send(&Msg::Auth {
            mac: acceptor_proof,
        })
        .await
        .expect("auth to beta");
        match next_frame(&mut rb, HANDSHAKE_TIMEOUT).await {
            Some(Ok(Msg::Refuse { .. })) | Some(Err(_)) | None => {}
            Some(Ok(m)) => panic!("beta answered a forged proof with {}", m.name()),
        }
        match beta_side.await.expect("beta's handshake task") {
            Err(LinkError::AuthFailed(n)) => assert_eq!(n, "alpha"),
            Err(e) => panic!("beta refused for another reason: {e}"),
            Ok(_) => panic!("beta let the stranger in"),
        }
        drop((wa, ra));
        assert!(alpha_side.await.expect("alpha's handshake task").is_err());
    }

    /// A peer whose bitmap counts in other units, or which speaks another protocol version,
    /// is refused before the login, and both sides learn why.
    #[tokio::test]
    async fn another_granularity_or_version_is_refused_with_the_reason() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let beta = params("beta", "alpha", addr, addr);
        let mut alpha = params("alpha", "beta", addr, addr);
        alpha.granularity = 64 * 1024;
        let (dialed, accepted) = tokio::join!(dial(&alpha, Channel::Data, 1), async {
            let (s, _) = l.accept().await.expect("accept");
            accept(s, &beta).await
        });
        match dialed {
            Err(LinkError::Refused(r)) => assert!(r.contains("65536 bytes per bit"), "{r}"),
            Err(e) => panic!("alpha failed for another reason: {e}"),
            Ok(_) => panic!("alpha linked with a bitmap of another granularity"),
        }
        assert!(matches!(accepted, Err(LinkError::Rejected(_))));

        // A Hello of the previous version: the layout of the rest is not read at all.
        let (c, a) = tokio::join!(TcpStream::connect(addr), l.accept());
        let server = tokio::spawn(async move { accept(a.expect("accept").0, &beta).await });
        let (r, w) = c.expect("connect").into_split();
        let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
        let mut old = hello(&params("alpha", "beta", addr, addr), Channel::Data, 2);
        old.version = VERSION - 1;
        w.send(&Msg::Hello(old)).await.expect("hello");
        let want = format!(
            "node beta speaks protocol version {VERSION}, not {}",
            VERSION - 1
        );
        match next_frame(&mut r, HANDSHAKE_TIMEOUT).await {
            Some(Ok(Msg::Refuse { reason })) => assert_eq!(reason, want),
            other => panic!("beta answered an old hello with {other:?}"),
        }
        match server.await.expect("task") {
            Err(LinkError::Rejected(reason)) => assert_eq!(reason, want),
            other => panic!("beta's handshake ended with {:?}", other.map(|c| c.peer)),
        }
    }

    /// Before the peer has authenticated, a frame announcing a large payload ends the
    /// handshake at its header: no buffer is sized by a stranger's length.
    #[tokio::test]
    async fn a_stranger_cannot_announce_a_large_frame() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let beta = params("beta", "alpha", addr, addr);
        let (c, a) = tokio::join!(TcpStream::connect(addr), l.accept());
        let server = tokio::spawn(async move { accept(a.expect("accept").0, &beta).await });
        let msg = write(1, 1 << 20);
        let header = wire::encode(&msg, 0);
        let (_r, mut w) = c.expect("connect").into_split();
        use tokio::io::AsyncWriteExt;
        w.write_all(&header).await.expect("header");
        let res = tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("the handshake ended at the header")
            .expect("task");
        match res {
            Err(LinkError::Wire(WireError::TooLong(_))) => {}
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    /// Queued frames and frames sent at once reach the reader in call order, each with the
    /// next sequence number, whatever mix of `enqueue`, `send` and `flush` made them.
    #[tokio::test]
    async fn queued_and_direct_frames_keep_call_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_, w) = client.expect("connect").into_split();
        let (r, _) = server.expect("accept").0.into_split();
        let writer = SharedFrameWriter::new(FrameWriter::new(w));
        let mut reader = FrameReader::new(r);

        use futures_util::FutureExt;
        let (first, s1) = writer.enqueue(&write(1, 4096));
        assert!(first);
        let (first, s2) = writer.enqueue(&write(2, 512));
        assert!(!first);
        assert_eq!(s2, s1 + 1);
        // Queued, not written: a waiter for either frame still waits.
        assert!(writer.written(s1).now_or_never().is_none());
        writer.send(&write(3, 200_000)).await.expect("send");
        // The send wrote the queue first.
        assert!(writer.written(s2).now_or_never().is_some());
        let (first, s4) = writer.enqueue(&write(4, 4096));
        assert!(first);
        assert_eq!(s4, s2 + 2);
        assert!(writer.written(s4).now_or_never().is_none());
        writer.flush().await.expect("flush");
        assert!(writer.written(s4).now_or_never().is_some());
        writer.flush().await.expect("empty flush");
        let (first, s5) = writer.enqueue(&Msg::Flush { id: 5 });
        assert!(first);
        assert!(writer.written(s5).now_or_never().is_none());
        writer.send(&write(6, 8192)).await.expect("send");
        assert!(writer.written(s5 + 1).now_or_never().is_some());

        for want in 1..=6u64 {
            let got = reader.recv().await.expect("frame");
            match got {
                Msg::Write { id, data, .. } => {
                    assert_eq!(id, want);
                    assert!(data.iter().all(|b| *b == want as u8));
                }
                Msg::Flush { id } => assert_eq!(id, want),
                other => panic!("unexpected {}", other.name()),
            }
        }
        assert!(reader.try_recv().expect("nothing buffered").is_none());
    }

    /// Large frames that arrive in pieces, with pauses between them: the reader raises the
    /// socket's receive low-water mark while it reads one, and must still get each frame as
    /// soon as its last byte is sent, with nothing of the next one sent yet (a mark beyond
    /// the frame's end would wait for bytes that never come); a close mid-frame ends it.
    #[tokio::test]
    async fn large_frames_in_pieces_are_received_once_their_last_byte_is_sent() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut tx = client.expect("connect");
        tx.set_nodelay(true).expect("nodelay");
        let (r, _w) = server.expect("accept").0.into_split();
        let mut reader = FrameReader::new(r);
        let sizes = [1 << 20, 64 * 1024 + 1, 3 << 20, 300_000, 4096, 2 << 20];
        for (seq, len) in sizes.into_iter().enumerate() {
            let msg = write(seq as u64 + 1, len);
            let mut frame = wire::encode(&msg, seq as u64);
            frame.extend_from_slice(msg.data());
            let mut got = std::pin::pin!(reader.recv());
            let mut early = None;
            for piece in frame.chunks(frame.len().div_ceil(3)) {
                assert!(early.is_none(), "frame {seq} received before its last byte");
                tx.write_all(piece).await.expect("piece");
                // The frame is not whole yet, or the reader must finish it now.
                early = tokio::time::timeout(Duration::from_millis(30), &mut got)
                    .await
                    .ok();
            }
            let msg = match early {
                Some(m) => m,
                None => tokio::time::timeout(Duration::from_secs(5), got)
                    .await
                    .unwrap_or_else(|_| panic!("frame {seq} ({len} bytes) not received")),
            }
            .expect("frame");
            match msg {
                Msg::Write { id, data, .. } => {
                    assert_eq!((id, data.len()), (seq as u64 + 1, len));
                    assert!(data.iter().all(|b| *b == id as u8));
                }
                other => panic!("unexpected {}", other.name()),
            }
        }
        // A sender that closes in the middle of a large frame: the reader still sees the
        // close, whatever the mark.
        let msg = write(99, 1 << 20);
        let mut frame = wire::encode(&msg, sizes.len() as u64);
        frame.extend_from_slice(&msg.data()[..300_000]);
        tx.write_all(&frame).await.expect("half a frame");
        let mut got = std::pin::pin!(reader.recv());
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut got)
            .await
            .is_err());
        drop(tx);
        let end = tokio::time::timeout(Duration::from_secs(5), got)
            .await
            .expect("the close is seen mid-frame");
        assert!(matches!(end, Err(LinkError::Closed)), "{end:?}");
    }
}

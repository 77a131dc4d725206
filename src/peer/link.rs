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

use super::auth;
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

/// Who we are and whom we expect, for the handshake.
#[derive(Debug, Clone)]
pub struct LinkParams {
    pub resource: String,
    pub secret: String,
    pub me: String,
    pub node_id: u64,
    pub peer: String,
    pub size: u64,
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

/// Receives frames from one connection. `recv` is cancel-safe: an interrupted call loses
/// nothing, so it can sit in a `select!` beside other work.
pub struct FrameReader {
    r: OwnedReadHalf,
    buf: BytesMut,
    state: ReadState,
    seq: u64,
}

impl FrameReader {
    pub fn new(r: OwnedReadHalf) -> FrameReader {
        FrameReader {
            r,
            buf: BytesMut::with_capacity(64 * 1024),
            state: ReadState::Header,
            seq: 0,
        }
    }

    /// The next message. Every check (magic, length, sequence, CRC, structure) passes before
    /// a message is returned; any failure is an error and the link must be dropped.
    pub async fn recv(&mut self) -> Result<Msg, LinkError> {
        loop {
            if let Some(msg) = self.parse()? {
                return Ok(msg);
            }
            let n = match &mut self.state {
                ReadState::Data { data, filled, .. } if data.len() - *filled >= 64 * 1024 => {
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
                            let mut data = IoBuf::with_len(len - pre);
                            let take = data.len().min(self.buf.len());
                            data[..take].copy_from_slice(&self.buf[..take]);
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

fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
}

/// Dials the peer and authenticates one connection of session `session`.
pub async fn dial(p: &LinkParams, channel: Channel, session: u64) -> Result<Conn, LinkError> {
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(p.peer_addr))
        .await
        .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))??;
    tune(&s);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(s, p, Some((channel, session))))
        .await
        .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// Authenticates a connection the peer dialed.
pub async fn accept(s: TcpStream, p: &LinkParams) -> Result<Conn, LinkError> {
    tune(&s);
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
        resource: p.resource.clone(),
        node: p.me.clone(),
        challenge: auth::challenge(),
    }
}

/// Checks the peer's hello against what we expect; `Err` is the reason to refuse.
fn check_hello(p: &LinkParams, h: &Hello) -> Result<(), String> {
    if h.version != VERSION {
        return Err(format!(
            "protocol version {} is not supported (this node speaks {VERSION})",
            h.version
        ));
    }
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
    Ok(())
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
    let mut writer = FrameWriter::new(w);

    // Hellos: the dialer speaks first; the acceptor learns channel and session from it.
    let (mine, theirs) = match dialing {
        Some((channel, session)) => {
            let mine = hello(p, channel, session);
            writer.send(&Msg::Hello(mine.clone())).await?;
            let Msg::Hello(theirs) = expect(&mut reader, "hello").await? else {
                unreachable!("expect checked the kind")
            };
            if theirs.channel != channel || theirs.session != session {
                return Err(LinkError::Rejected(
                    "peer answered for another connection".into(),
                ));
            }
            (mine, theirs)
        }
        None => {
            let Msg::Hello(theirs) = expect(&mut reader, "hello").await? else {
                unreachable!("expect checked the kind")
            };
            (hello(p, theirs.channel, theirs.session), theirs)
        }
    };
    if let Err(reason) = check_hello(p, &theirs) {
        let _ = writer
            .send(&Msg::Refuse {
                reason: reason.clone(),
            })
            .await;
        return Err(LinkError::Rejected(reason));
    }
    if dialing.is_none() {
        writer.send(&Msg::Hello(mine.clone())).await?;
    }

    // Both prove they know the secret by answering the other's challenge.
    let mac = auth::respond(
        &p.secret,
        &theirs.challenge,
        &p.me,
        mine.channel,
        mine.session,
    );
    writer.send(&Msg::Auth { mac }).await?;
    let Msg::Auth { mac: their_mac } = expect(&mut reader, "auth").await? else {
        unreachable!("expect checked the kind")
    };
    if !auth::verify(
        &p.secret,
        &mine.challenge,
        &theirs.node,
        mine.channel,
        mine.session,
        &their_mac,
    ) {
        let _ = writer
            .send(&Msg::Refuse {
                reason: format!("node {} could not authenticate you: check the secret", p.me),
            })
            .await;
        return Err(LinkError::AuthFailed(theirs.node.clone()));
    }
    writer.send(&Msg::Welcome).await?;
    expect(&mut reader, "welcome").await?;
    Ok(Conn {
        channel: mine.channel,
        session: mine.session,
        peer: theirs,
        reader,
        writer,
    })
}

//! The peer protocol's wire format: frames and messages, with no IO.
//!
//! Every frame is a 24-byte header and a payload (big-endian throughout):
//!
//! ```text
//!  0      4      6      8              16     20     24
//!  +------+------+------+--------------+------+------+-----------
//!  |magic |kind  |flags |seq           |len   |crc   | payload (len bytes)
//!  +------+------+------+--------------+------+------+-----------
//!  magic = "TBD1"; seq = per-connection frame counter starting at 0;
//!  crc   = CRC32C over header bytes 0..20 followed by the payload.
//! ```
//!
//! A receiver checks magic, length limit, sequence and CRC before it decodes, and never
//! applies a frame that fails any of them: it drops the link instead (see `docs/protocol.md`).

use crate::storage::IoBuf;

pub const MAGIC: u32 = 0x5442_4431; // "TBD1"
/// Protocol version spoken by this build.
pub const VERSION: u32 = 3;
pub const HEADER_LEN: usize = 24;
/// Largest payload accepted: a 32 MiB data message plus its fixed fields.
pub const MAX_PAYLOAD: u32 = (32 << 20) + 64;
/// Length of an authentication challenge and of its HMAC-SHA256 response.
pub const CHALLENGE_LEN: usize = 32;

/// Which of the two connections of a link a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Writes, flushes, resync data: ordered bulk traffic.
    Data = 0,
    /// Heartbeats, acknowledgements and state: never queued behind bulk data.
    Meta = 1,
}

impl Channel {
    fn from_u8(v: u8) -> Option<Channel> {
        match v {
            0 => Some(Channel::Data),
            1 => Some(Channel::Meta),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Data => "data",
            Channel::Meta => "meta",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLong(u32),
    #[error("frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc { stored: u32, computed: u32 },
    #[error("frame out of sequence: expected {expected}, got {got}")]
    BadSeq { expected: u64, got: u64 },
    #[error("peer speaks protocol version {0}; this node speaks version {VERSION}")]
    Version(u32),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("malformed {kind} message: {reason}")]
    Malformed { kind: &'static str, reason: String },
}

/// The first message on each connection, from both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub channel: Channel,
    /// Chosen by the connecting node; both connections of one link carry the same value.
    pub session: u64,
    pub node_id: u64,
    /// Exported size of the node's device.
    pub size: u64,
    /// Bytes per bit of the node's dirty bitmap: bitmaps are exchanged word by word, so both
    /// nodes must count in the same unit.
    pub granularity: u32,
    pub resource: String,
    pub node: String,
    pub challenge: [u8; CHALLENGE_LEN],
}

/// What a node tells its peer about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerState {
    /// 0 secondary, 1 primary.
    pub primary: bool,
    /// The metadata disk state byte (0 inconsistent, 1 outdated, 2 up to date).
    pub disk: u8,
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
    /// Bytes marked out of sync in the sender's bitmap.
    pub dirty_bytes: u64,
    /// `STATE_*` bits.
    pub flags: u32,
    /// When the sender was last promoted (ms since the Unix epoch; 0 = never).
    pub promoted_at_ms: u64,
}

/// State flag: the sender's operator asked it to discard its data to resolve a split brain.
pub const STATE_DISCARD_MY_DATA: u32 = 1 << 0;

#[derive(Debug, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    Auth {
        mac: [u8; 32],
    },
    Welcome,
    Refuse {
        reason: String,
    },
    State(PeerState),
    BitmapChunk {
        first_word: u64,
        words: Vec<u64>,
    },
    BitmapDone,
    Write {
        id: u64,
        offset: u64,
        fua: bool,
        data: IoBuf,
    },
    Received {
        id: u64,
    },
    Written {
        id: u64,
        errno: u32,
    },
    Trim {
        id: u64,
        offset: u64,
        len: u64,
    },
    Zeroes {
        id: u64,
        offset: u64,
        len: u64,
        may_trim: bool,
    },
    Flush {
        id: u64,
    },
    /// Asks the peer to make durable every write it has confirmed (`Written`) and every resync
    /// chunk it has acknowledged so far; answered by `Flushed` with the same id. Unlike
    /// `Flush`, it orders nothing: writes arriving meanwhile go on.
    Settle {
        id: u64,
    },
    Flushed {
        id: u64,
        errno: u32,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    ResyncData {
        offset: u64,
        data: IoBuf,
    },
    ResyncAck {
        offset: u64,
        len: u64,
        errno: u32,
    },
    ResyncDone {
        current: u64,
    },
    Bye {
        reason: String,
        /// Sent on the meta connection by a node that flushed its disk after its last
        /// confirmation (`Written`, `ResyncAck`) left: everything it confirmed is durable.
        stable: bool,
    },
    VerifyRequest {
        id: u64,
        offset: u64,
        len: u32,
    },
    VerifyReply {
        id: u64,
        crcs: Vec<u32>,
    },
    /// A diskless primary reads through its peer.
    ReadRequest {
        id: u64,
        offset: u64,
        len: u32,
    },
    ReadReply {
        id: u64,
        errno: u32,
        data: IoBuf,
    },
}

mod kind {
    pub const HELLO: u16 = 1;
    pub const AUTH: u16 = 2;
    pub const WELCOME: u16 = 3;
    pub const REFUSE: u16 = 4;
    pub const STATE: u16 = 5;
    pub const BITMAP_CHUNK: u16 = 6;
    pub const BITMAP_DONE: u16 = 7;
    pub const WRITE: u16 = 8;
    pub const RECEIVED: u16 = 9;
    pub const WRITTEN: u16 = 10;
    pub const TRIM: u16 = 11;
    pub const ZEROES: u16 = 12;
    pub const FLUSH: u16 = 13;
    pub const FLUSHED: u16 = 14;
    pub const PING: u16 = 15;
    pub const PONG: u16 = 16;
    pub const RESYNC_DATA: u16 = 17;
    pub const RESYNC_ACK: u16 = 18;
    pub const RESYNC_DONE: u16 = 19;
    pub const BYE: u16 = 20;
    pub const VERIFY_REQUEST: u16 = 21;
    pub const VERIFY_REPLY: u16 = 22;
    pub const READ_REQUEST: u16 = 23;
    pub const READ_REPLY: u16 = 24;
    pub const SETTLE: u16 = 25;
}

impl Msg {
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello(_) => "hello",
            Msg::Auth { .. } => "auth",
            Msg::Welcome => "welcome",
            Msg::Refuse { .. } => "refuse",
            Msg::State(_) => "state",
            Msg::BitmapChunk { .. } => "bitmap-chunk",
            Msg::BitmapDone => "bitmap-done",
            Msg::Write { .. } => "write",
            Msg::Received { .. } => "received",
            Msg::Written { .. } => "written",
            Msg::Trim { .. } => "trim",
            Msg::Zeroes { .. } => "zeroes",
            Msg::Flush { .. } => "flush",
            Msg::Settle { .. } => "settle",
            Msg::Flushed { .. } => "flushed",
            Msg::Ping { .. } => "ping",
            Msg::Pong { .. } => "pong",
            Msg::ResyncData { .. } => "resync-data",
            Msg::ResyncAck { .. } => "resync-ack",
            Msg::ResyncDone { .. } => "resync-done",
            Msg::Bye { .. } => "bye",
            Msg::VerifyRequest { .. } => "verify-request",
            Msg::VerifyReply { .. } => "verify-reply",
            Msg::ReadRequest { .. } => "read-request",
            Msg::ReadReply { .. } => "read-reply",
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Msg::Hello(_) => kind::HELLO,
            Msg::Auth { .. } => kind::AUTH,
            Msg::Welcome => kind::WELCOME,
            Msg::Refuse { .. } => kind::REFUSE,
            Msg::State(_) => kind::STATE,
            Msg::BitmapChunk { .. } => kind::BITMAP_CHUNK,
            Msg::BitmapDone => kind::BITMAP_DONE,
            Msg::Write { .. } => kind::WRITE,
            Msg::Received { .. } => kind::RECEIVED,
            Msg::Written { .. } => kind::WRITTEN,
            Msg::Trim { .. } => kind::TRIM,
            Msg::Zeroes { .. } => kind::ZEROES,
            Msg::Flush { .. } => kind::FLUSH,
            Msg::Settle { .. } => kind::SETTLE,
            Msg::Flushed { .. } => kind::FLUSHED,
            Msg::Ping { .. } => kind::PING,
            Msg::Pong { .. } => kind::PONG,
            Msg::ResyncData { .. } => kind::RESYNC_DATA,
            Msg::ResyncAck { .. } => kind::RESYNC_ACK,
            Msg::ResyncDone { .. } => kind::RESYNC_DONE,
            Msg::Bye { .. } => kind::BYE,
            Msg::VerifyRequest { .. } => kind::VERIFY_REQUEST,
            Msg::VerifyReply { .. } => kind::VERIFY_REPLY,
            Msg::ReadRequest { .. } => kind::READ_REQUEST,
            Msg::ReadReply { .. } => kind::READ_REPLY,
        }
    }

    /// The bulk data a message carries (sent after the fixed fields without copying).
    pub fn data(&self) -> &[u8] {
        match self {
            Msg::Write { data, .. }
            | Msg::ResyncData { data, .. }
            | Msg::ReadReply { data, .. } => data,
            _ => &[],
        }
    }
}

/// Encodes `msg` as frame number `seq`: returns the header plus fixed fields; the caller sends
/// [`Msg::data`] right after them. The CRC covers both.
pub fn encode(msg: &Msg, seq: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + 64);
    f.resize(HEADER_LEN, 0);
    match msg {
        Msg::Hello(h) => {
            put32(&mut f, h.version);
            f.push(h.channel as u8);
            put64(&mut f, h.session);
            put64(&mut f, h.node_id);
            put64(&mut f, h.size);
            put32(&mut f, h.granularity);
            put_str(&mut f, &h.resource);
            put_str(&mut f, &h.node);
            f.extend_from_slice(&h.challenge);
        }
        Msg::Auth { mac } => f.extend_from_slice(mac),
        Msg::Welcome | Msg::BitmapDone => {}
        Msg::Refuse { reason } => put_str(&mut f, reason),
        Msg::Bye { reason, stable } => {
            put_str(&mut f, reason);
            f.push(u8::from(*stable));
        }
        Msg::State(s) => {
            f.push(u8::from(s.primary));
            f.push(s.disk);
            put32(&mut f, s.flags);
            put64(&mut f, s.current);
            put64(&mut f, s.bitmap);
            put64(&mut f, s.history[0]);
            put64(&mut f, s.history[1]);
            put64(&mut f, s.dirty_bytes);
            put64(&mut f, s.promoted_at_ms);
        }
        Msg::BitmapChunk { first_word, words } => {
            put64(&mut f, *first_word);
            put32(&mut f, words.len() as u32);
            for w in words {
                put64(&mut f, *w);
            }
        }
        Msg::Write {
            id, offset, fua, ..
        } => {
            put64(&mut f, *id);
            put64(&mut f, *offset);
            f.push(u8::from(*fua));
        }
        Msg::Received { id } | Msg::Flush { id } | Msg::Settle { id } => put64(&mut f, *id),
        Msg::Written { id, errno } | Msg::Flushed { id, errno } => {
            put64(&mut f, *id);
            put32(&mut f, *errno);
        }
        Msg::Trim { id, offset, len } => {
            put64(&mut f, *id);
            put64(&mut f, *offset);
            put64(&mut f, *len);
        }
        Msg::Zeroes {
            id,
            offset,
            len,
            may_trim,
        } => {
            put64(&mut f, *id);
            put64(&mut f, *offset);
            put64(&mut f, *len);
            f.push(u8::from(*may_trim));
        }
        Msg::Ping { nonce } | Msg::Pong { nonce } => put64(&mut f, *nonce),
        Msg::ResyncData { offset, .. } => put64(&mut f, *offset),
        Msg::ResyncAck { offset, len, errno } => {
            put64(&mut f, *offset);
            put64(&mut f, *len);
            put32(&mut f, *errno);
        }
        Msg::ResyncDone { current } => put64(&mut f, *current),
        Msg::VerifyRequest { id, offset, len } => {
            put64(&mut f, *id);
            put64(&mut f, *offset);
            put32(&mut f, *len);
        }
        Msg::ReadRequest { id, offset, len } => {
            put64(&mut f, *id);
            put64(&mut f, *offset);
            put32(&mut f, *len);
        }
        Msg::ReadReply { id, errno, .. } => {
            put64(&mut f, *id);
            put32(&mut f, *errno);
        }
        Msg::VerifyReply { id, crcs } => {
            put64(&mut f, *id);
            put32(&mut f, crcs.len() as u32);
            for c in crcs {
                put32(&mut f, *c);
            }
        }
    }
    let data = msg.data();
    let len = (f.len() - HEADER_LEN + data.len()) as u32;
    f[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    f[4..6].copy_from_slice(&msg.kind().to_be_bytes());
    f[6..8].copy_from_slice(&0u16.to_be_bytes());
    f[8..16].copy_from_slice(&seq.to_be_bytes());
    f[16..20].copy_from_slice(&len.to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f[..20]), &f[HEADER_LEN..]);
    let crc = crc32c::crc32c_append(crc, data);
    f[20..24].copy_from_slice(&crc.to_be_bytes());
    f
}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u16,
    pub seq: u64,
    pub len: u32,
    pub crc: u32,
    raw: [u8; 20],
}

/// Checks magic and length of a received header. The sequence is checked by the caller
/// (it knows what to expect), the CRC by [`decode`] once the payload is in.
pub fn decode_header(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let len = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLong(len));
    }
    let mut raw = [0u8; 20];
    raw.copy_from_slice(&b[..20]);
    Ok(Header {
        kind: u16::from_be_bytes([b[4], b[5]]),
        seq: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        len,
        crc: u32::from_be_bytes([b[20], b[21], b[22], b[23]]),
        raw,
    })
}

/// Length of the fixed fields before the data of a data-bearing message kind, so a receiver
/// can read the data straight into its own buffer.
pub fn data_prefix_len(kind: u16) -> Option<usize> {
    match kind {
        kind::WRITE => Some(17),
        kind::RESYNC_DATA => Some(8),
        kind::READ_REPLY => Some(12),
        _ => None,
    }
}

/// Verifies the CRC over header and payload, then decodes the message.
pub fn decode(h: &Header, payload: IoBuf) -> Result<Msg, WireError> {
    match data_prefix_len(h.kind) {
        Some(n) if payload.len() >= n => {
            let fixed = payload[..n].to_vec();
            decode_split(h, &fixed, IoBuf::from(&payload[n..]))
        }
        _ => decode_split(h, &payload, IoBuf::default()),
    }
}

/// Like [`decode`] for a payload received in two parts: the fixed fields, and the data of a
/// data-bearing message (empty for every other kind). The CRC covers both.
pub fn decode_split(h: &Header, fixed: &[u8], data: IoBuf) -> Result<Msg, WireError> {
    let computed =
        crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&h.raw), fixed), &data);
    if computed != h.crc {
        return Err(WireError::BadCrc {
            stored: h.crc,
            computed,
        });
    }
    let mut r = Reader {
        b: fixed,
        at: 0,
        kind: kind_name(h.kind),
    };
    if data_prefix_len(h.kind).is_none() && !data.is_empty() {
        return Err(r.bad("unexpected data".into()));
    }
    let msg = match h.kind {
        kind::HELLO => {
            let version = r.u32()?;
            // The version comes first and fixes the layout of the rest, so a peer of another
            // version is told so plainly rather than as a malformed message.
            if version != VERSION {
                return Err(WireError::Version(version));
            }
            let ch = r.u8()?;
            let channel = Channel::from_u8(ch).ok_or_else(|| r.bad(format!("channel {ch}")))?;
            let session = r.u64()?;
            let node_id = r.u64()?;
            let size = r.u64()?;
            let granularity = r.u32()?;
            let resource = r.string()?;
            let node = r.string()?;
            let mut challenge = [0u8; CHALLENGE_LEN];
            challenge.copy_from_slice(r.bytes(CHALLENGE_LEN)?);
            Msg::Hello(Hello {
                version,
                channel,
                session,
                node_id,
                size,
                granularity,
                resource,
                node,
                challenge,
            })
        }
        kind::AUTH => {
            let mut mac = [0u8; 32];
            mac.copy_from_slice(r.bytes(32)?);
            Msg::Auth { mac }
        }
        kind::WELCOME => Msg::Welcome,
        kind::REFUSE => Msg::Refuse {
            reason: r.string()?,
        },
        kind::BYE => {
            let reason = r.string()?;
            let stable = match r.u8()? {
                0 => false,
                1 => true,
                v => return Err(r.bad(format!("stable flag {v}"))),
            };
            Msg::Bye { reason, stable }
        }
        kind::STATE => {
            let primary = r.u8()? != 0;
            let disk = r.u8()?;
            let flags = r.u32()?;
            Msg::State(PeerState {
                primary,
                disk,
                flags,
                current: r.u64()?,
                bitmap: r.u64()?,
                history: [r.u64()?, r.u64()?],
                dirty_bytes: r.u64()?,
                promoted_at_ms: r.u64()?,
            })
        }
        kind::BITMAP_CHUNK => {
            let first_word = r.u64()?;
            let n = r.u32()? as usize;
            if n > (fixed.len().saturating_sub(12)) / 8 {
                return Err(r.bad(format!("{n} words announced")));
            }
            let mut words = Vec::with_capacity(n);
            for _ in 0..n {
                words.push(r.u64()?);
            }
            Msg::BitmapChunk { first_word, words }
        }
        kind::BITMAP_DONE => Msg::BitmapDone,
        kind::WRITE => {
            let id = r.u64()?;
            let offset = r.u64()?;
            let fua = r.u8()? != 0;
            Msg::Write {
                id,
                offset,
                fua,
                data,
            }
        }
        kind::RECEIVED => Msg::Received { id: r.u64()? },
        kind::WRITTEN => Msg::Written {
            id: r.u64()?,
            errno: r.u32()?,
        },
        kind::TRIM => Msg::Trim {
            id: r.u64()?,
            offset: r.u64()?,
            len: r.u64()?,
        },
        kind::ZEROES => Msg::Zeroes {
            id: r.u64()?,
            offset: r.u64()?,
            len: r.u64()?,
            may_trim: r.u8()? != 0,
        },
        kind::FLUSH => Msg::Flush { id: r.u64()? },
        kind::SETTLE => Msg::Settle { id: r.u64()? },
        kind::FLUSHED => Msg::Flushed {
            id: r.u64()?,
            errno: r.u32()?,
        },
        kind::PING => Msg::Ping { nonce: r.u64()? },
        kind::PONG => Msg::Pong { nonce: r.u64()? },
        kind::RESYNC_DATA => Msg::ResyncData {
            offset: r.u64()?,
            data,
        },
        kind::RESYNC_ACK => Msg::ResyncAck {
            offset: r.u64()?,
            len: r.u64()?,
            errno: r.u32()?,
        },
        kind::RESYNC_DONE => Msg::ResyncDone { current: r.u64()? },
        kind::READ_REQUEST => Msg::ReadRequest {
            id: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        },
        kind::READ_REPLY => Msg::ReadReply {
            id: r.u64()?,
            errno: r.u32()?,
            data,
        },
        kind::VERIFY_REQUEST => Msg::VerifyRequest {
            id: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        },
        kind::VERIFY_REPLY => {
            let id = r.u64()?;
            let n = r.u32()? as usize;
            if n > fixed.len().saturating_sub(12) / 4 {
                return Err(r.bad(format!("{n} checksums announced")));
            }
            let mut crcs = Vec::with_capacity(n);
            for _ in 0..n {
                crcs.push(r.u32()?);
            }
            Msg::VerifyReply { id, crcs }
        }
        other => return Err(WireError::UnknownKind(other)),
    };
    if r.at != fixed.len() {
        return Err(r.bad(format!("{} trailing bytes", fixed.len() - r.at)));
    }
    Ok(msg)
}

fn kind_name(k: u16) -> &'static str {
    match k {
        kind::HELLO => "hello",
        kind::AUTH => "auth",
        kind::STATE => "state",
        kind::BITMAP_CHUNK => "bitmap-chunk",
        kind::WRITE => "write",
        kind::RESYNC_DATA => "resync-data",
        _ => "peer",
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn bad(&self, reason: String) -> WireError {
        WireError::Malformed {
            kind: self.kind,
            reason,
        }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() - self.at < n {
            return Err(self.bad(format!("truncated at byte {}", self.at)));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        if n > MAX_STR {
            return Err(self.bad(format!("string of {n} bytes")));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("string is not UTF-8".into()))
    }
}

fn put32(f: &mut Vec<u8>, v: u32) {
    f.extend_from_slice(&v.to_be_bytes());
}

fn put64(f: &mut Vec<u8>, v: u64) {
    f.extend_from_slice(&v.to_be_bytes());
}

/// Longest string a frame carries, in bytes.
const MAX_STR: usize = 4096;

/// Writes `s`, cut to `MAX_STR` bytes at a character boundary (a reason or a name too long is
/// shortened, never sent as something the receiver must refuse).
fn put_str(f: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_STR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let b = &s.as_bytes()[..end];
    put32(f, b.len() as u32);
    f.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_strings_are_cut_at_a_character_boundary() {
        // 4095 bytes of ASCII, then two-byte characters: the cut at 4096 would split one.
        let reason = format!("{}{}", "x".repeat(MAX_STR - 1), "é".repeat(10));
        let f = encode(
            &Msg::Bye {
                reason: reason.clone(),
                stable: true,
            },
            7,
        );
        let h = decode_header(f[..HEADER_LEN].try_into().expect("header")).expect("header");
        let got = decode(&h, IoBuf::from(&f[HEADER_LEN..])).expect("a long reason decodes");
        let Msg::Bye {
            reason: cut,
            stable: true,
        } = got
        else {
            panic!("decoded as {}", got.name())
        };
        assert_eq!(cut.len(), MAX_STR - 1);
        assert!(reason.starts_with(&cut));
    }

    fn roundtrip(msg: Msg) -> Msg {
        let mut frame = encode(&msg, 7);
        frame.extend_from_slice(msg.data());
        let hdr: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().expect("header");
        let h = decode_header(&hdr).expect("header ok");
        assert_eq!(h.seq, 7);
        assert_eq!(h.len as usize, frame.len() - HEADER_LEN);
        decode(&h, IoBuf::from(&frame[HEADER_LEN..])).expect("decode")
    }

    /// One message of every kind (shared with the fuzzing seeds, which must cover them all).
    fn samples() -> Vec<Msg> {
        crate::fuzzing::sample_messages()
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let name = m.name();
            let back = roundtrip(m);
            assert_eq!(back.name(), name);
        }
        let w = roundtrip(Msg::Write {
            id: 1,
            offset: 2,
            fua: false,
            data: IoBuf::from(&b"abc"[..]),
        });
        assert_eq!(
            w,
            Msg::Write {
                id: 1,
                offset: 2,
                fua: false,
                data: IoBuf::from(&b"abc"[..])
            }
        );
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let msg = Msg::Write {
            id: 1,
            offset: 4096,
            fua: false,
            data: IoBuf::from(&[0x5au8; 64][..]),
        };
        let mut frame = encode(&msg, 3);
        frame.extend_from_slice(msg.data());
        for bit in 0..frame.len() * 8 {
            let mut f = frame.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            let hdr: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().expect("header");
            let res = decode_header(&hdr).and_then(|h| {
                if h.seq != 3 {
                    return Err(WireError::BadSeq {
                        expected: 3,
                        got: h.seq,
                    });
                }
                if h.len as usize != f.len() - HEADER_LEN {
                    return Err(WireError::TooLong(h.len));
                }
                decode(&h, IoBuf::from(&f[HEADER_LEN..]))
            });
            assert!(res.is_err(), "flipped bit {bit} not detected");
        }
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        for m in samples() {
            let mut frame = encode(&m, 0);
            frame.extend_from_slice(m.data());
            let body = &frame[HEADER_LEN..];
            // Re-frame every truncation with a valid CRC: the decoder itself must reject it.
            for cut in 0..body.len() {
                let short = &body[..cut];
                let mut hdr = [0u8; HEADER_LEN];
                hdr[..20].copy_from_slice(&frame[..20]);
                hdr[16..20].copy_from_slice(&(cut as u32).to_be_bytes());
                let crc = crc32c::crc32c_append(crc32c::crc32c(&hdr[..20]), short);
                hdr[20..24].copy_from_slice(&crc.to_be_bytes());
                let h = decode_header(&hdr).expect("header");
                let res = decode(&h, IoBuf::from(short));
                let fixed_only = matches!(
                    m,
                    Msg::Write { .. } | Msg::ResyncData { .. } | Msg::ReadReply { .. }
                ) && cut >= body.len() - m.data().len();
                if !fixed_only {
                    assert!(res.is_err(), "{} truncated to {cut} accepted", m.name());
                }
            }
        }
        let mut hdr = [0u8; HEADER_LEN];
        hdr[..4].copy_from_slice(&MAGIC.to_be_bytes());
        hdr[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_header(&hdr), Err(WireError::TooLong(u32::MAX)));
        assert!(matches!(
            decode_header(&[0xff; HEADER_LEN]),
            Err(WireError::BadMagic(_))
        ));
    }
}

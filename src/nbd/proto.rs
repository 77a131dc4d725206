//! The NBD wire format: constants, decoders and encoders, with no IO.
//!
//! Everything is big-endian ("network byte order"), as the protocol says. Decoders take byte
//! slices that the caller has already read in full (fixed-size headers, or a payload whose
//! length came from a header and was checked against a limit first); encoders append to a
//! `Vec<u8>` so a session can batch several messages into one socket write.

use std::fmt;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Errors sent to clients (the protocol's own values, equal to Linux errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest option payload accepted; longer ones are answered `NBD_REP_ERR_TOO_BIG` and
/// skipped (`nbd::server`), up to a limit.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Wire-format errors that end a negotiation or a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad {what} magic {found:#x}")]
    BadMagic { what: &'static str, found: u64 },
    #[error("client did not set the fixed-newstyle flag (client flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("client sent unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
}

/// An option that was received whole but is malformed: answered `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub String);

impl fmt::Display for InvalidOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The server's greeting: magic, IHAVEOPT, handshake flags.
pub fn encode_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
}

/// Client flags, as agreed after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

pub fn decode_client_flags(buf: [u8; 4]) -> Result<ClientFlags, ProtoError> {
    let flags = u32::from_be_bytes(buf);
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle(flags));
    }
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// An option header: which option and how many payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn decode_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option",
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: be_u32(&buf[8..12]),
        len: be_u32(&buf[12..16]),
    })
}

/// The options this server understands, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO`.
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// Anything else: answered `NBD_REP_ERR_UNSUP` and negotiation goes on.
    Unsupported(u32),
}

/// Decodes an option's payload (already read in full, at most [`MAX_OPTION_LEN`] bytes).
pub fn decode_option(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(decode_string(
            data,
            "export name",
        )?)),
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => {
            if !data.is_empty() {
                return Err(InvalidOption("NBD_OPT_LIST takes no data".into()));
            }
            Ok(ClientOption::List)
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return Err(InvalidOption(
                    "NBD_OPT_STRUCTURED_REPLY takes no data".into(),
                ));
            }
            Ok(ClientOption::StructuredReply)
        }
        OPT_INFO | OPT_GO => {
            let go = option == OPT_GO;
            if data.len() < 4 {
                return Err(InvalidOption("truncated export name length".into()));
            }
            let name_len = be_u32(&data[0..4]) as usize;
            let rest = &data[4..];
            if name_len > rest.len() || rest.len() - name_len < 2 {
                return Err(InvalidOption(
                    "export name length exceeds the option data".into(),
                ));
            }
            let name = decode_string(&rest[..name_len], "export name")?;
            let rest = &rest[name_len..];
            let count = be_u16(&rest[0..2]) as usize;
            let rest = &rest[2..];
            if rest.len() != count * 2 {
                return Err(InvalidOption(format!(
                    "{count} information requests announced, {} bytes follow",
                    rest.len()
                )));
            }
            let requests = rest.chunks_exact(2).map(be_u16).collect();
            Ok(ClientOption::Info { go, name, requests })
        }
        other => Ok(ClientOption::Unsupported(other)),
    }
}

fn decode_string(data: &[u8], what: &str) -> Result<String, InvalidOption> {
    if data.len() > MAX_STRING {
        return Err(InvalidOption(format!(
            "{what} longer than {MAX_STRING} bytes"
        )));
    }
    let s = std::str::from_utf8(data)
        .map_err(|_| InvalidOption(format!("{what} is not valid UTF-8")))?;
    if s.contains('\0') {
        return Err(InvalidOption(format!("{what} contains a NUL byte")));
    }
    Ok(s.to_owned())
}

/// Appends an option reply header and its data.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error reply carrying a human-readable message (truncated to the protocol's limit).
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    let msg = truncate_utf8(message, MAX_STRING);
    encode_option_reply(out, option, reply, msg.as_bytes());
}

/// `NBD_REP_SERVER` entry for `NBD_OPT_LIST`.
pub fn encode_server_entry(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(description.as_bytes());
    encode_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// What the server tells a client about its export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

/// The `NBD_REP_INFO` replies for `NBD_OPT_INFO`/`NBD_OPT_GO`, before the final `NBD_REP_ACK`.
/// The export info is always sent; name, description and block sizes when asked for
/// (block sizes always: clients that did not ask may ignore them).
pub fn encode_info_replies(out: &mut Vec<u8>, option: u32, info: &ExportInfo, requests: &[u16]) {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&info.size.to_be_bytes());
    d.extend_from_slice(&info.flags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &d);

    if requests.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(truncate_utf8(&info.name, MAX_STRING).as_bytes());
        encode_option_reply(out, option, REP_INFO, &d);
    }
    if requests.contains(&INFO_DESCRIPTION) && !info.description.is_empty() {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(truncate_utf8(&info.description, MAX_STRING).as_bytes());
        encode_option_reply(out, option, REP_INFO, &d);
    }
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&info.min_block.to_be_bytes());
    d.extend_from_slice(&info.preferred_block.to_be_bytes());
    d.extend_from_slice(&info.max_block.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &d);
}

/// The reply that ends an `NBD_OPT_EXPORT_NAME` negotiation (no option reply header).
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A request header as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn decode_request(buf: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = be_u32(&buf[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            found: u64::from(magic),
        });
    }
    Ok(Request {
        flags: be_u16(&buf[4..6]),
        command: be_u16(&buf[6..8]),
        cookie: be_u64(&buf[8..16]),
        offset: be_u64(&buf[16..24]),
        len: be_u32(&buf[24..28]),
    })
}

pub fn encode_request(out: &mut Vec<u8>, req: &Request) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&req.flags.to_be_bytes());
    out.extend_from_slice(&req.command.to_be_bytes());
    out.extend_from_slice(&req.cookie.to_be_bytes());
    out.extend_from_slice(&req.offset.to_be_bytes());
    out.extend_from_slice(&req.len.to_be_bytes());
}

/// What a session has agreed with its client and the export's shape: everything needed to
/// judge a request without IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub size: u64,
    pub flags: u16,
    pub max_payload: u32,
    pub structured: bool,
}

/// Checks a request against the export. `Err` carries the errno to reply with; for a `WRITE`
/// the session must still consume (and discard) the payload that follows the header.
pub fn check_request(req: &Request, lim: &Limits) -> Result<(), u32> {
    let mut allowed_flags = match req.command {
        CMD_READ if lim.structured => CMD_FLAG_DF,
        CMD_READ | CMD_CACHE | CMD_FLUSH | CMD_DISC => 0,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return Err(EINVAL),
    };
    // Once FUA is advertised, a client may set it on any command (some do, on flushes) and
    // the server must accept it; where it means nothing, it is ignored.
    if lim.flags & TFLAG_SEND_FUA != 0 {
        allowed_flags |= CMD_FLAG_FUA;
    }
    if req.flags & !allowed_flags != 0 {
        return Err(EINVAL);
    }
    let needs = match req.command {
        CMD_FLUSH => TFLAG_SEND_FLUSH,
        CMD_TRIM => TFLAG_SEND_TRIM,
        CMD_WRITE_ZEROES => TFLAG_SEND_WRITE_ZEROES,
        CMD_CACHE => TFLAG_SEND_CACHE,
        _ => 0,
    };
    if lim.flags & needs != needs {
        return Err(EINVAL);
    }
    if req.flags & CMD_FLAG_FUA != 0 && lim.flags & TFLAG_SEND_FUA == 0 {
        return Err(EINVAL);
    }
    let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && lim.flags & TFLAG_READ_ONLY != 0 {
        return Err(EPERM);
    }
    if matches!(req.command, CMD_READ | CMD_WRITE) && req.len > lim.max_payload {
        return Err(EINVAL);
    }
    if matches!(req.command, CMD_FLUSH | CMD_DISC) {
        return Ok(());
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= lim.size);
    if !in_range {
        // The spec: ENOSPC for a write or write-zeroes past the end, EINVAL for a read or trim.
        return Err(if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        });
    }
    Ok(())
}

/// Appends a simple reply header (the caller appends read data after it on success).
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

fn encode_chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends the header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `data_len` bytes of data
/// must follow.
pub fn encode_read_chunk_header(out: &mut Vec<u8>, cookie: u64, offset: u64, data_len: u32) {
    encode_chunk_header(
        out,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        data_len + 8,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends a final `NBD_REPLY_TYPE_NONE` chunk (success with no data).
pub fn encode_structured_done(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk.
pub fn encode_structured_error(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = truncate_utf8(message, MAX_STRING);
    encode_chunk_header(
        out,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Name of a command, for logs.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        _ => "unknown",
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Big-endian integers at the start of `b` (callers check the length first).
pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        size: 1 << 20,
        flags: TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_CACHE,
        max_payload: 32 << 20,
        structured: false,
    };

    fn req(command: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let mut out = Vec::new();
        encode_request(&mut out, &r);
        let buf: [u8; REQUEST_LEN] = out.as_slice().try_into().expect("28 bytes");
        assert_eq!(decode_request(&buf), Ok(r));
        let mut bad = buf;
        bad[0] ^= 0xff;
        assert!(matches!(
            decode_request(&bad),
            Err(ProtoError::BadMagic {
                what: "request",
                ..
            })
        ));
    }

    #[test]
    fn requests_are_judged_against_the_export() {
        assert_eq!(check_request(&req(CMD_READ, 0, 0, 4096), &LIM), Ok(()));
        // The last byte and the exact end are in range; one past is not.
        assert_eq!(
            check_request(&req(CMD_READ, 0, (1 << 20) - 1, 1), &LIM),
            Ok(())
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, 1 << 20, 1), &LIM),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, 1 << 20, 1), &LIM),
            Err(ENOSPC)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, u64::MAX, 2), &LIM),
            Err(ENOSPC)
        );
        assert_eq!(
            check_request(&req(CMD_TRIM, 0, u64::MAX - 1, 9), &LIM),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &LIM),
            Err(ENOSPC)
        );
        // Oversized payloads.
        assert_eq!(
            check_request(&req(CMD_READ, 0, 0, (32 << 20) + 1), &LIM),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, 0, (32 << 20) + 1), &LIM),
            Err(EINVAL)
        );
        // FUA, once advertised, is accepted on every command (ignored where it means
        // nothing); not advertised, it is refused everywhere.
        for cmd in [CMD_READ, CMD_FLUSH, CMD_CACHE, CMD_WRITE, CMD_TRIM] {
            let len = if cmd == CMD_FLUSH { 0 } else { 1 };
            assert_eq!(check_request(&req(cmd, CMD_FLAG_FUA, 0, len), &LIM), Ok(()));
        }
        let no_fua = Limits {
            flags: LIM.flags & !TFLAG_SEND_FUA,
            ..LIM
        };
        assert_eq!(
            check_request(&req(CMD_READ, CMD_FLAG_FUA, 0, 1), &no_fua),
            Err(EINVAL)
        );
        // Flags not valid for the command, or not negotiated.
        assert_eq!(
            check_request(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &LIM),
            Err(EINVAL)
        );
        let structured = Limits {
            structured: true,
            ..LIM
        };
        assert_eq!(
            check_request(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &structured),
            Ok(())
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0x80, 0, 1), &LIM),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(
                &req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 1),
                &LIM
            ),
            Ok(())
        );
        // Unknown and unadvertised commands.
        assert_eq!(check_request(&req(7, 0, 0, 1), &LIM), Err(EINVAL));
        assert_eq!(check_request(&req(0xffff, 0, 0, 1), &LIM), Err(EINVAL));
        let no_trim = Limits {
            flags: TFLAG_HAS_FLAGS,
            ..LIM
        };
        assert_eq!(
            check_request(&req(CMD_TRIM, 0, 0, 1), &no_trim),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_FLUSH, 0, 0, 0), &no_trim),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &no_trim),
            Err(EINVAL)
        );
        let ro = Limits {
            flags: LIM.flags | TFLAG_READ_ONLY,
            ..LIM
        };
        assert_eq!(check_request(&req(CMD_WRITE, 0, 0, 1), &ro), Err(EPERM));
        // Trim and write-zeroes larger than the payload limit are fine (no payload).
        let big = Limits {
            size: 1 << 40,
            ..LIM
        };
        assert_eq!(check_request(&req(CMD_TRIM, 0, 0, u32::MAX), &big), Ok(()));
    }

    #[test]
    fn options_decode_and_reject_garbage() {
        let mut go = Vec::new();
        go.extend_from_slice(&2u32.to_be_bytes());
        go.extend_from_slice(b"r0");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            decode_option(OPT_GO, &go),
            Ok(ClientOption::Info {
                go: true,
                name: "r0".into(),
                requests: vec![INFO_NAME, INFO_BLOCK_SIZE]
            })
        );
        // Truncated at every length: never a panic, always invalid.
        for n in 0..go.len() {
            assert!(decode_option(OPT_GO, &go[..n]).is_err(), "prefix {n}");
        }
        // A name length far past the data.
        let mut liar = go.clone();
        liar[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_option(OPT_INFO, &liar).is_err());
        // Extra trailing bytes.
        let mut extra = go.clone();
        extra.push(0);
        assert!(decode_option(OPT_GO, &extra).is_err());
        assert!(decode_option(OPT_EXPORT_NAME, &[0xff, 0xfe]).is_err());
        assert!(decode_option(OPT_EXPORT_NAME, b"a\0b").is_err());
        assert!(decode_option(OPT_LIST, b"x").is_err());
        assert_eq!(decode_option(OPT_LIST, b""), Ok(ClientOption::List));
        assert_eq!(
            decode_option(11, b"junk"),
            Ok(ClientOption::Unsupported(11))
        );
    }

    #[test]
    fn client_flags() {
        assert!(decode_client_flags(0u32.to_be_bytes()).is_err());
        assert!(decode_client_flags(4u32.to_be_bytes()).is_err());
        assert_eq!(
            decode_client_flags(3u32.to_be_bytes()),
            Ok(ClientFlags { no_zeroes: true })
        );
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 0x0102_0304_0506_0708, EIO);
        assert_eq!(
            out,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        let mut out = Vec::new();
        encode_read_chunk_header(&mut out, 9, 4096, 512);
        assert_eq!(out.len(), 20 + 8);
        assert_eq!(be_u32(&out[16..20]), 520);
        let mut out = Vec::new();
        encode_structured_error(&mut out, 9, EINVAL, "bad");
        assert_eq!(be_u16(&out[6..8]), REPLY_TYPE_ERROR);
        assert_eq!(be_u32(&out[16..20]), 9);
        let mut out = Vec::new();
        encode_option_error(&mut out, OPT_GO, REP_ERR_POLICY, &"x".repeat(10_000));
        assert_eq!(be_u32(&out[16..20]) as usize, MAX_STRING);
    }
}

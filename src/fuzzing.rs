//! Fuzzing harnesses, shared by the coverage-guided targets in `fuzz/` and by the corpus replay
//! test (`tests/fuzz_corpus.rs`). Not part of the supported API.
//!
//! One function per target takes arbitrary bytes and drives one surface that reads untrusted
//! input:
//!
//! * [`nbd_negotiation`]: a whole NBD session (negotiation, then transmission) over an
//!   in-memory pipe, against a small file-backed export;
//! * [`nbd_request`]: the pure NBD codec (client flags, options, request headers and the
//!   judgement of a request against an export);
//! * [`peer_frame`]: peer frames through the codec, through [`FrameReader`] over loopback TCP,
//!   and the acceptor's side of the handshake;
//! * [`metadata`]: superblock slots, external and internal metadata areas
//!   ([`MetaStore::open`]) and split-brain recovery files;
//! * [`resource_file`]: the resource file ([`Config::parse_str`]).
//!
//! Errors returned by the code under test are the expected outcome for most inputs. A harness
//! panics only when an invariant breaks: a panic inside the code under test, a session that
//! does not end once its input is exhausted, or a decoded value that does not survive a round
//! trip. The first byte of most inputs selects a mode (see each function), so one corpus
//! reaches several entry points; where a checksum guards the input, a mode bit lets the
//! harness repair it so that mutated inputs get past the checksum to the decoders behind it.
//!
//! [`seeds`] builds meaningful starting inputs for each target.

use crate::nbd::proto::{be_u16, be_u32, be_u64};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::config::{self, Config};
use crate::meta::{self, DecodeError, MetaLocation, MetaStore, Superblock, SLOT_SIZE};
use crate::nbd::proto::*;
use crate::nbd::server::{run_session, Export, ExportState, ServerCtx};
use crate::peer::link::{self, FrameReader, LinkParams};
use crate::peer::wire::{self, Msg, WireError, HEADER_LEN};
use crate::repl::recovery;
use crate::storage::{open_disk, Disk, EngineChoice, IoBuf};

/// The fuzz targets, by name (the names of `fuzz/fuzz_targets/*.rs` and of the corpus folders).
pub const TARGETS: [&str; 5] = [
    "nbd_negotiation",
    "nbd_request",
    "peer_frame",
    "metadata",
    "resource_file",
];

/// Runs the harness of `target` on one input. Panics on an unknown target name.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "nbd_negotiation" => nbd_negotiation(data),
        "nbd_request" => nbd_request(data),
        "peer_frame" => peer_frame(data),
        "metadata" => metadata(data),
        "resource_file" => resource_file(data),
        other => panic!("no fuzz target named {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Size of the export a fuzzed NBD session works on.
const EXPORT_SIZE: u64 = 64 * 1024;
/// Longest a fuzzed session or handshake may run once its input has been sent in full.
const DEADLINE: Duration = Duration::from_secs(5);
/// The export name the fuzzed server announces.
const EXPORT_NAME: &str = "r0";
/// Why a closed export is closed.
const CLOSED: &str = "twinbd node beta is secondary; only the primary serves r0";

/// With `TWINBD_FUZZ_VERBOSE` set, prints what each input led to (to see which paths a corpus
/// reaches).
fn note(what: std::fmt::Arguments<'_>) {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *VERBOSE.get_or_init(|| std::env::var_os("TWINBD_FUZZ_VERBOSE").is_some()) {
        eprintln!("{what}");
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A fresh temporary file, in memory (`/dev/shm`) where the machine has it.
fn scratch_file() -> tempfile::NamedTempFile {
    let mut b = tempfile::Builder::new();
    b.prefix("twinbd-fuzz-");
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(f) = b.tempfile_in(shm) {
            return f;
        }
    }
    b.tempfile().expect("temporary file")
}

/// A temporary file holding `bytes` (removed when dropped).
fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = scratch_file();
    f.write_all(bytes).expect("write temporary file");
    f.flush().expect("flush temporary file");
    f
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

// ---------------------------------------------------------------------------
// NBD: whole sessions
// ---------------------------------------------------------------------------

/// What every fuzzed NBD session of a thread shares: a runtime and a small export on a temp
/// file (made once per thread, not per input).
struct NbdRig {
    rt: Runtime,
    export: Arc<Export<Disk>>,
}

impl NbdRig {
    fn new() -> NbdRig {
        let rt = runtime();
        let file = scratch_file();
        file.as_file()
            .set_len(EXPORT_SIZE)
            .expect("size the export file");
        let disk = open_disk(file.path(), None, EngineChoice::Sync).expect("open the export");
        // The disk keeps its own descriptor: the name can go now, so nothing is left behind.
        drop(file);
        NbdRig {
            rt,
            export: Arc::new(Export {
                backend: Arc::new(disk),
                size: EXPORT_SIZE,
            }),
        }
    }
}

thread_local! {
    static NBD_RIG: NbdRig = NbdRig::new();
}

/// One NBD session. Input: a selector byte, then everything the client sends.
///
/// Selector bit 0: the export is closed (as on a secondary); bit 1: the export closes (as on a
/// demotion) once the client has sent its last byte and the session has entered transmission,
/// or after a short bounded wait if it does not get there. The client's side is shut after the input, so every session
/// must end: by the client's `NBD_OPT_ABORT` or `NBD_CMD_DISC`, by an error, or at end of
/// input. Checked: no panic, the session ends within [`DEADLINE`], the greeting comes first,
/// and the count of clients in transmission is back to zero afterwards.
pub fn nbd_negotiation(data: &[u8]) {
    let Some((&sel, client)) = data.split_first() else {
        return;
    };
    NBD_RIG.with(|rig| nbd_session(rig, sel, client));
}

fn nbd_session(rig: &NbdRig, sel: u8, client: &[u8]) {
    let state = if sel & 1 == 0 {
        ExportState::Open(Arc::clone(&rig.export))
    } else {
        ExportState::Closed(CLOSED.into())
    };
    let close_at_end = sel & 2 != 0;
    let (tx, rx) = watch::channel(state);
    let ctx = ServerCtx::new(EXPORT_NAME.into(), rx);
    let outcome = rig.rt.block_on(async {
        let (client_end, server_end) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client_end);
        let (sr, sw) = tokio::io::split(server_end);
        let session = run_session(sr, sw, &ctx);
        let feed = async {
            // The server may hang up before reading everything: a failed write is fine.
            let _ = to_server.write_all(client).await;
            if close_at_end {
                // Let the session catch up with what it was sent, but never wait unboundedly:
                // a session waiting for more input would not get there.
                for _ in 0..256 {
                    if ctx.clients.load(Ordering::SeqCst) > 0 {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                tx.send_replace(ExportState::Closed(CLOSED.into()));
            }
            let _ = to_server.shutdown().await;
        };
        let drain = async {
            let mut head = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = from_server.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let want = 18usize.saturating_sub(head.len()).min(n);
                head.extend_from_slice(&buf[..want]);
            }
            head
        };
        tokio::time::timeout(DEADLINE, async { tokio::join!(session, feed, drain) }).await
    });
    let Ok((result, (), head)) = outcome else {
        panic!(
            "NBD session still running {DEADLINE:?} after the client sent its last byte \
             and shut its side"
        );
    };
    let mut greeting = Vec::new();
    encode_greeting(&mut greeting);
    assert_eq!(head, greeting, "the server must greet first");
    assert_eq!(
        ctx.clients.load(Ordering::SeqCst),
        0,
        "a finished session left the client count raised"
    );
    match result {
        Ok(()) => note(format_args!("nbd session: ended cleanly")),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            note(format_args!("nbd session: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------
// NBD: the pure codec
// ---------------------------------------------------------------------------

/// The NBD codec without IO. Input: a selector byte, then (selector mod 3)
/// 0: 4 bytes of client flags, the rest used as text for the reply encoders;
/// 1: an option header (16 bytes) and its payload;
/// 2: the export's limits (size u64, transmission flags u16, largest payload u32, structured
///    replies u8: 15 bytes), then request headers of 28 bytes each.
pub fn nbd_request(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => nbd_flags_and_replies(rest),
        1 => nbd_option(rest),
        _ => nbd_requests(rest),
    }
}

fn nbd_flags_and_replies(rest: &[u8]) {
    if let Some(b) = rest.first_chunk::<4>() {
        let raw = u32::from_be_bytes(*b);
        let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        match decode_client_flags(*b) {
            Ok(f) => {
                assert!(raw & FLAG_C_FIXED_NEWSTYLE != 0 && raw & !known == 0);
                assert_eq!(f.no_zeroes, raw & FLAG_C_NO_ZEROES != 0);
            }
            Err(e) => {
                assert!(raw & FLAG_C_FIXED_NEWSTYLE == 0 || raw & !known != 0, "{e}");
            }
        }
    }
    let text = String::from_utf8_lossy(rest);

    // An error reply carries the message cut to the protocol's limit at a character boundary.
    let mut out = Vec::new();
    encode_option_error(&mut out, OPT_GO, REP_ERR_POLICY, &text);
    let len = be_u32(&out[16..20]) as usize;
    assert_eq!(out.len(), 20 + len);
    assert!(len <= MAX_STRING);
    assert!(text.as_bytes().starts_with(&out[20..]));
    assert!(std::str::from_utf8(&out[20..]).is_ok());

    out.clear();
    encode_structured_error(&mut out, 7, EIO, &text);
    let len = be_u32(&out[16..20]) as usize;
    assert_eq!(out.len(), 20 + len);
    assert_eq!(len, 6 + usize::from(be_u16(&out[24..26])));
    assert!(std::str::from_utf8(&out[26..]).is_ok());

    // Info replies for names and requests taken from the input: a well-formed reply sequence.
    let requests: Vec<u16> = rest.chunks_exact(2).take(16).map(be_u16).collect();
    let info = ExportInfo {
        name: text.to_string(),
        description: text.chars().rev().collect(),
        size: rest.get(..8).map_or(0, be_u64),
        flags: rest.get(..2).map_or(0, be_u16),
        min_block: 1,
        preferred_block: 4096,
        max_block: 32 << 20,
    };
    out.clear();
    encode_info_replies(&mut out, OPT_INFO, &info, &requests);
    encode_server_entry(&mut out, &info.name, &info.description);
    let mut at = 0;
    let mut replies = 0;
    while at < out.len() {
        assert!(out.len() - at >= 20, "truncated option reply");
        assert_eq!(be_u64(&out[at..]), OPTION_REPLY_MAGIC);
        let len = be_u32(&out[at + 16..]) as usize;
        at += 20 + len;
        replies += 1;
    }
    assert_eq!(at, out.len());
    assert!((3..=5).contains(&replies));
}

fn nbd_option(rest: &[u8]) {
    let Some((hdr, payload)) = rest.split_first_chunk::<OPTION_HEADER_LEN>() else {
        return;
    };
    match decode_option_header(hdr) {
        Ok(h) => {
            assert_eq!(be_u64(hdr), IHAVEOPT);
            assert_eq!((h.option, h.len), (be_u32(&hdr[8..]), be_u32(&hdr[12..])));
            if h.len <= MAX_OPTION_LEN {
                let n = payload.len().min(h.len as usize);
                check_option(h.option, &payload[..n]);
            }
        }
        Err(ProtoError::BadMagic { found, .. }) => assert_ne!(found, IHAVEOPT),
        Err(e) => panic!("option header: unexpected error {e}"),
    }
    // The payload as every option that carries data.
    for option in [
        OPT_EXPORT_NAME,
        OPT_LIST,
        OPT_INFO,
        OPT_GO,
        OPT_STRUCTURED_REPLY,
    ] {
        check_option(option, payload);
    }
}

const KNOWN_OPTIONS: [u32; 6] = [
    OPT_EXPORT_NAME,
    OPT_ABORT,
    OPT_LIST,
    OPT_INFO,
    OPT_GO,
    OPT_STRUCTURED_REPLY,
];

fn check_option(option: u32, data: &[u8]) {
    match decode_option(option, data) {
        Ok(ClientOption::ExportName(name)) => {
            assert_eq!(option, OPT_EXPORT_NAME);
            assert_eq!(name.as_bytes(), data);
            assert!(name.len() <= MAX_STRING && !name.contains('\0'));
        }
        Ok(ClientOption::Abort) => assert_eq!(option, OPT_ABORT),
        Ok(ClientOption::List) => assert!(option == OPT_LIST && data.is_empty()),
        Ok(ClientOption::StructuredReply) => {
            assert!(option == OPT_STRUCTURED_REPLY && data.is_empty())
        }
        Ok(ClientOption::Info { go, name, requests }) => {
            assert!(option == OPT_INFO || option == OPT_GO);
            assert_eq!(go, option == OPT_GO);
            assert!(name.len() <= MAX_STRING && !name.contains('\0'));
            // The payload is exactly what a client sends for these values.
            let mut again = (name.len() as u32).to_be_bytes().to_vec();
            again.extend_from_slice(name.as_bytes());
            again.extend_from_slice(&(requests.len() as u16).to_be_bytes());
            for r in &requests {
                again.extend_from_slice(&r.to_be_bytes());
            }
            assert_eq!(again, data, "NBD_OPT_INFO/GO payload does not round-trip");
        }
        Ok(ClientOption::Unsupported(o)) => {
            assert_eq!(o, option);
            assert!(!KNOWN_OPTIONS.contains(&option));
        }
        Err(InvalidOption(msg)) => {
            assert!(!msg.is_empty());
            assert!(KNOWN_OPTIONS.contains(&option) && option != OPT_ABORT);
        }
    }
}

fn nbd_requests(rest: &[u8]) {
    let Some((l, reqs)) = rest.split_first_chunk::<15>() else {
        return;
    };
    let lim = Limits {
        size: be_u64(&l[0..]),
        flags: be_u16(&l[8..]),
        max_payload: be_u32(&l[10..]),
        structured: l[14] & 1 != 0,
    };
    for chunk in reqs.chunks_exact(REQUEST_LEN) {
        let buf: &[u8; REQUEST_LEN] = chunk.try_into().expect("chunks_exact");
        let fields = Request {
            flags: be_u16(&buf[4..]),
            command: be_u16(&buf[6..]),
            cookie: be_u64(&buf[8..]),
            offset: be_u64(&buf[16..]),
            len: be_u32(&buf[24..]),
        };
        match decode_request(buf) {
            Ok(req) => {
                assert_eq!(req, fields);
                let mut again = Vec::new();
                encode_request(&mut again, &req);
                assert_eq!(again, buf, "request header does not round-trip");
            }
            Err(ProtoError::BadMagic { found, .. }) => assert_ne!(found, u64::from(REQUEST_MAGIC)),
            Err(e) => panic!("request header: unexpected error {e}"),
        }
        // Judge the fields whatever the magic, so every header exercises the checks.
        judge(&fields, &lim);
    }
}

/// Checks the judgement of a request against everything `check_request` promises.
fn judge(req: &Request, lim: &Limits) {
    let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    match check_request(req, lim) {
        Ok(()) => {
            assert!(req.command <= CMD_WRITE_ZEROES, "unknown command accepted");
            assert_eq!(
                req.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF),
                0
            );
            if req.flags & CMD_FLAG_FUA != 0 {
                // Once advertised, FUA is accepted on any command (ignored where it means
                // nothing), as the protocol requires.
                assert!(lim.flags & TFLAG_SEND_FUA != 0);
            }
            if req.flags & CMD_FLAG_DF != 0 {
                assert!(req.command == CMD_READ && lim.structured);
            }
            if req.flags & CMD_FLAG_NO_HOLE != 0 {
                assert_eq!(req.command, CMD_WRITE_ZEROES);
            }
            let needs = match req.command {
                CMD_FLUSH => TFLAG_SEND_FLUSH,
                CMD_TRIM => TFLAG_SEND_TRIM,
                CMD_WRITE_ZEROES => TFLAG_SEND_WRITE_ZEROES,
                CMD_CACHE => TFLAG_SEND_CACHE,
                _ => 0,
            };
            assert_eq!(lim.flags & needs, needs, "unadvertised command accepted");
            if writes {
                assert_eq!(
                    lim.flags & TFLAG_READ_ONLY,
                    0,
                    "write to a read-only export"
                );
            }
            if matches!(req.command, CMD_READ | CMD_WRITE) {
                assert!(
                    req.len <= lim.max_payload,
                    "payload over the limit accepted"
                );
            }
            if !matches!(req.command, CMD_FLUSH | CMD_DISC) {
                let end = req.offset.checked_add(u64::from(req.len));
                assert!(
                    end.is_some_and(|e| e <= lim.size),
                    "request past the end of the export accepted"
                );
            }
        }
        Err(errno) => assert!([EINVAL, EPERM, ENOSPC].contains(&errno), "errno {errno}"),
    }
}

// ---------------------------------------------------------------------------
// Peer protocol
// ---------------------------------------------------------------------------

/// What every fuzzed peer connection of a thread shares: a runtime and a loopback listener.
struct PeerRig {
    rt: Runtime,
    listener: tokio::net::TcpListener,
}

impl PeerRig {
    fn new() -> PeerRig {
        let rt = runtime();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind a loopback listener");
        PeerRig { rt, listener }
    }

    /// A connected pair: (our end, the end the code under test gets).
    async fn pair(&self) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let addr = self.listener.local_addr().expect("listener address");
        let (ours, theirs) =
            tokio::join!(tokio::net::TcpStream::connect(addr), self.listener.accept());
        let ours = ours.expect("connect over loopback");
        let (theirs, _) = theirs.expect("accept over loopback");
        (ours, theirs)
    }
}

thread_local! {
    static PEER_RIG: PeerRig = PeerRig::new();
}

/// Peer frames. Input: a selector byte, then (bits 0-1)
/// 0: one frame (24-byte header, zero-padded if short, then the payload) whose magic, length
///    and CRC the harness repairs, so mutations reach the message decoders;
/// 1: one frame exactly as given;
/// 2: a stream of frames read by [`FrameReader`] from a loopback TCP connection; each frame's
///    magic, sequence number, length (cut to the bytes present) and CRC are repaired unless
///    bit 2 is set;
/// 3: the same stream sent as the dialing peer to [`link::accept`] (the handshake).
///
/// Checked: decoders return errors, never panic; whatever decodes re-encodes to the same bytes
/// (except the ignored header flags and boolean bytes above 1, which re-encode as 1);
/// `decode` and `decode_split` agree; the frame reader yields exactly the messages the codec
/// accepts, in order, and fails where the codec does; a handshake without the secret never
/// succeeds, and ends within its own timeout.
pub fn peer_frame(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel & 3 {
        0 => {
            let mut hb = [0u8; HEADER_LEN];
            let n = rest.len().min(HEADER_LEN);
            hb[..n].copy_from_slice(&rest[..n]);
            let payload = &rest[n..];
            repair_frame(&mut hb, payload, None);
            check_frame(&hb, payload);
        }
        1 => {
            if let Some((hb, payload)) = rest.split_first_chunk::<HEADER_LEN>() {
                check_frame(hb, payload);
            }
        }
        mode => {
            let stream = frame_stream(rest, sel & 4 == 0);
            PEER_RIG.with(|rig| {
                if mode == 2 {
                    read_frames(rig, &stream);
                } else {
                    handshake(rig, &stream);
                }
            });
        }
    }
}

/// Makes a frame header well-formed for `payload`: magic, length, CRC (and `seq` if given).
fn repair_frame(hb: &mut [u8; HEADER_LEN], payload: &[u8], seq: Option<u64>) {
    hb[0..4].copy_from_slice(&wire::MAGIC.to_be_bytes());
    if let Some(seq) = seq {
        hb[8..16].copy_from_slice(&seq.to_be_bytes());
    }
    hb[16..20].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&hb[..20]), payload);
    hb[20..24].copy_from_slice(&crc.to_be_bytes());
}

/// Cuts `bytes` into frames (each header's length field says how much payload follows, cut to
/// what is left) and, with `repair`, makes each one well-formed with sequence numbers from 0.
fn frame_stream(bytes: &[u8], repair: bool) -> Vec<u8> {
    if !repair {
        return bytes.to_vec();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    let mut seq = 0u64;
    while let Some((hb, tail)) = rest.split_first_chunk::<HEADER_LEN>() {
        let mut hb = *hb;
        let n = (be_u32(&hb[16..]) as usize).min(tail.len());
        let (payload, next) = tail.split_at(n);
        repair_frame(&mut hb, payload, Some(seq));
        out.extend_from_slice(&hb);
        out.extend_from_slice(payload);
        rest = next;
        seq += 1;
    }
    // A trailing partial header stays: the reader must wait for the rest, then see the end.
    out.extend_from_slice(rest);
    out
}

/// Decodes one frame and checks everything the codec promises; returns the message if the
/// frame is acceptable.
fn check_frame(hb: &[u8; HEADER_LEN], payload: &[u8]) -> Option<Msg> {
    let h = match wire::decode_header(hb) {
        Ok(h) => h,
        Err(WireError::BadMagic(m)) => {
            assert_ne!(m, wire::MAGIC);
            return None;
        }
        Err(WireError::TooLong(n)) => {
            assert!(n > wire::MAX_PAYLOAD);
            return None;
        }
        Err(e) => panic!("decode_header: unexpected error {e}"),
    };
    assert_eq!(
        (h.kind, h.seq, h.len, h.crc),
        (
            be_u16(&hb[4..]),
            be_u64(&hb[8..]),
            be_u32(&hb[16..]),
            be_u32(&hb[20..])
        )
    );
    let whole = wire::decode(&h, IoBuf::from(payload));
    // The receive path splits a data-bearing frame before its data: same verdict either way.
    let prefix = wire::data_prefix_len(h.kind);
    let (fixed, data) = match prefix {
        Some(n) if payload.len() >= n => payload.split_at(n),
        _ => (payload, &[][..]),
    };
    let split = wire::decode_split(&h, fixed, IoBuf::from(data));
    assert_eq!(whole, split, "decode and decode_split disagree");
    // A kind that carries no data refuses data, even under a valid CRC.
    if prefix.is_none() && whole.is_ok() && !payload.is_empty() {
        let cut = payload.len() / 2;
        let res = wire::decode_split(&h, &payload[..cut], IoBuf::from(&payload[cut..]));
        assert!(res.is_err(), "data accepted on a kind that carries none");
    }
    let msg = match whole {
        Ok(m) => m,
        Err(e) => {
            note(format_args!("frame: {e}"));
            return None;
        }
    };
    note(format_args!("frame: {}", msg.name()));
    check_reencode(hb, payload, &msg);
    Some(msg)
}

/// Anything that decodes re-encodes to the bytes it came from, but for the two things the
/// decoder reads loosely: the header's flags (ignored; sent as 0) and boolean bytes (any
/// non-zero value is true; sent as 1).
fn check_reencode(hb: &[u8; HEADER_LEN], payload: &[u8], msg: &Msg) {
    let mut again = wire::encode(msg, be_u64(&hb[8..]));
    again.extend_from_slice(msg.data());
    assert_eq!(
        again.len(),
        HEADER_LEN + payload.len(),
        "{} re-encodes to another length",
        msg.name()
    );
    assert_eq!(again[0..6], hb[0..6], "magic or kind changed");
    assert_eq!(again[8..20], hb[8..20], "sequence or length changed");
    let bool_at = match msg {
        Msg::State(_) => Some(0),
        Msg::Write { .. } => Some(16),
        Msg::Zeroes { .. } => Some(24),
        _ => None,
    };
    let mut canonical = hb[6..8] == [0, 0];
    for (i, (&a, &b)) in again[HEADER_LEN..].iter().zip(payload).enumerate() {
        if a != b {
            assert!(
                bool_at == Some(i) && b > 1 && a == 1,
                "{} re-encodes payload byte {i} as {a:#04x}, received {b:#04x}",
                msg.name()
            );
            canonical = false;
        }
    }
    if canonical {
        assert_eq!(again[..HEADER_LEN], hb[..], "{} header differs", msg.name());
    }
    let h2 = wire::decode_header(again[..HEADER_LEN].try_into().expect("header"))
        .expect("a re-encoded header decodes");
    let back = wire::decode(&h2, IoBuf::from(&again[HEADER_LEN..])).expect("re-encoded frame");
    assert_eq!(&back, msg, "re-encoded frame decodes to another message");
}

/// The messages a receiver must deliver from `stream`, in order: it stops at the first frame
/// that is incomplete, out of sequence or refused by the codec.
fn expected_messages(stream: &[u8]) -> Vec<Msg> {
    let mut msgs = Vec::new();
    let mut at = 0;
    while let Some(hb) = stream.get(at..at + HEADER_LEN) {
        let hb: &[u8; HEADER_LEN] = hb.try_into().expect("header");
        if be_u32(hb) != wire::MAGIC || be_u32(&hb[16..]) > wire::MAX_PAYLOAD {
            check_frame(hb, &[]);
            break;
        }
        if be_u64(&hb[8..]) != msgs.len() as u64 {
            break;
        }
        let end = at + HEADER_LEN + be_u32(&hb[16..]) as usize;
        let Some(payload) = stream.get(at + HEADER_LEN..end) else {
            break;
        };
        let Some(m) = check_frame(hb, payload) else {
            break;
        };
        msgs.push(m);
        at = end;
    }
    msgs
}

fn read_frames(rig: &PeerRig, stream: &[u8]) {
    let expected = expected_messages(stream);
    let done = rig.rt.block_on(async {
        tokio::time::timeout(DEADLINE, async {
            let (ours, theirs) = rig.pair().await;
            let (r, _w) = theirs.into_split();
            let mut reader = FrameReader::new(r);
            let (_from_reader, mut to_reader) = ours.into_split();
            let feed = async {
                // The reader drops the connection at the first bad frame: a failed write is fine.
                let _ = to_reader.write_all(stream).await;
                let _ = to_reader.shutdown().await;
            };
            let read = async {
                for (i, want) in expected.iter().enumerate() {
                    match reader.recv().await {
                        Ok(m) => assert_eq!(&m, want, "frame {i}: reader and codec disagree"),
                        Err(e) => {
                            panic!("frame {i}: the reader failed ({e}) where the codec accepts")
                        }
                    }
                }
                match reader.recv().await {
                    Ok(m) => panic!(
                        "the reader delivered {} after the {} frames the codec accepts",
                        m.name(),
                        expected.len()
                    ),
                    Err(e) => note(format_args!(
                        "frame reader: {} messages, then {e}",
                        expected.len()
                    )),
                }
                drop(reader);
            };
            tokio::join!(feed, read);
        })
        .await
    });
    assert!(
        done.is_ok(),
        "frame reader still running {DEADLINE:?} after its input ended"
    );
}

/// The acceptor's handshake against a dialer that does not know the secret.
fn handshake(rig: &PeerRig, stream: &[u8]) {
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("address");
    let params = LinkParams {
        resource: EXPORT_NAME.into(),
        secret: "fuzz-secret".into(),
        me: "beta".into(),
        node_id: 2,
        peer: "alpha".into(),
        size: EXPORT_SIZE,
        granularity: crate::bitmap::DEFAULT_GRANULARITY,
        listen: addr,
        peer_addr: addr,
    };
    let outcome = rig.rt.block_on(async {
        tokio::time::timeout(link::HANDSHAKE_TIMEOUT + DEADLINE, async {
            let (ours, theirs) = rig.pair().await;
            let (mut from_peer, mut to_peer) = ours.into_split();
            let accept = async {
                // Drop the connection (if any) here, so the dialer side sees the end.
                link::accept(theirs, &params)
                    .await
                    .map(|conn| conn.peer.node)
                    .map_err(|e| e.to_string())
            };
            let dial = async {
                let _ = to_peer.write_all(stream).await;
                let _ = to_peer.shutdown().await;
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = from_peer.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::join!(accept, dial).0
        })
        .await
    });
    match outcome {
        Err(_) => panic!("handshake still running past its own timeout"),
        Ok(Ok(node)) => panic!("handshake with {node:?} succeeded without the secret"),
        Ok(Err(e)) => {
            assert!(!e.is_empty());
            note(format_args!("handshake: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------

/// On-disk metadata. Input: a selector byte, then (bits 0-1)
/// 0: one superblock slot (cut or zero-padded to 4096 bytes; also decoded as given);
/// 1: the contents of an external metadata file, opened with [`MetaStore::open`];
/// 2: the contents of a data disk with internal metadata, opened likewise;
/// 3: a split-brain recovery file, read with [`recovery::read`].
///
/// Bit 2 set: the harness repairs checksums (of every 4 KiB block that starts with a slot or
/// locator magic, of the bitmap pages behind a slot pair unless bit 3 is set, and of a
/// recovery file's header and records), so mutations reach the checks behind them.
/// Bit 4 set (modes 1 and 2): the input is compact: each [`COMPACT_BLOCK`] bytes of it make
/// one 4 KiB block of the file, the rest of the block zero (the meaningful part of a slot, a
/// locator or a bitmap page comes first), so inputs stay small while files span many blocks.
///
/// Checked: errors, never panics; a decoded superblock re-encodes to the fields it was read
/// from; an opened store is consistent with its superblock and fits its file; recovery
/// records lie within the device.
pub fn metadata(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let repair = sel & 4 != 0;
    let pages = sel & 8 == 0;
    let file = || {
        if sel & 16 != 0 {
            expand_blocks(rest)
        } else {
            rest.to_vec()
        }
    };
    match sel & 3 {
        0 => superblock_slot(rest, repair),
        1 => meta_store(file(), repair, pages, false),
        2 => meta_store(file(), repair, pages, true),
        _ => recovery_file(rest, repair),
    }
}

/// Bytes of a compact metadata input that make one 4 KiB block (see [`metadata`]).
pub const COMPACT_BLOCK: usize = 512;

/// Expands a compact input: each [`COMPACT_BLOCK`] bytes (the last piece may be shorter)
/// become the start of a zero-filled 4 KiB block.
fn expand_blocks(compact: &[u8]) -> Vec<u8> {
    let mut file = Vec::with_capacity(compact.len().div_ceil(COMPACT_BLOCK) * SLOT_SIZE);
    for piece in compact.chunks(COMPACT_BLOCK) {
        let at = file.len();
        file.resize(at + SLOT_SIZE, 0);
        file[at..at + piece.len()].copy_from_slice(piece);
    }
    file
}

/// The inverse of [`expand_blocks`] for a file whose blocks are zero past their first
/// [`COMPACT_BLOCK`] bytes (as fresh metadata is); `None` otherwise.
fn compact_blocks(file: &[u8]) -> Option<Vec<u8>> {
    if file.len() % SLOT_SIZE != 0 {
        return None;
    }
    let mut out = Vec::new();
    for block in file.chunks(SLOT_SIZE) {
        if block[COMPACT_BLOCK..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&block[..COMPACT_BLOCK]);
    }
    Some(out)
}

/// CRC32C of a 4096-byte block with its CRC field (bytes 12..16) taken as zero.
fn block_crc(b: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&b[..12]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &b[16..])
}

fn fix_block_crc(b: &mut [u8]) {
    let crc = block_crc(b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Repairs what guards a metadata area so mutations get past it (see [`metadata`]).
fn repair_area(file: &mut [u8], pages: bool) {
    let blocks = file.len() / SLOT_SIZE;
    let magic_at = |file: &[u8], i: usize| -> Option<[u8; 8]> {
        file.get(i * SLOT_SIZE..i * SLOT_SIZE + 8)
            .map(|m| m.try_into().expect("8 bytes"))
    };
    let slot_pairs: Vec<usize> = (0..blocks.saturating_sub(1))
        .filter(|&i| {
            magic_at(file, i) == Some(meta::MAGIC) && magic_at(file, i + 1) == Some(meta::MAGIC)
        })
        .collect();
    for i in 0..blocks {
        let m = magic_at(file, i);
        if m == Some(meta::MAGIC) || m == Some(meta::LOCATOR_MAGIC) {
            fix_block_crc(&mut file[i * SLOT_SIZE..(i + 1) * SLOT_SIZE]);
        }
    }
    if !pages {
        return;
    }
    for first in slot_pairs {
        let count = le64(&file[first * SLOT_SIZE + 104..]);
        let start = first + 2;
        let avail = blocks.saturating_sub(start) as u64;
        for p in 0..count.min(avail) as usize {
            let at = (start + p) * SLOT_SIZE;
            let page = &mut file[at..at + SLOT_SIZE];
            let idx = (p as u32).to_le_bytes();
            page[4..8].copy_from_slice(&idx);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&idx), &page[8..]);
            page[0..4].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

fn superblock_slot(rest: &[u8], repair: bool) {
    let direct = Superblock::decode(rest);
    if rest.len() != SLOT_SIZE {
        assert_eq!(direct, Err(DecodeError::BadLength(rest.len())));
    }
    let mut slot = vec![0u8; SLOT_SIZE];
    let n = rest.len().min(SLOT_SIZE);
    slot[..n].copy_from_slice(&rest[..n]);
    if repair {
        slot[..8].copy_from_slice(&meta::MAGIC);
        fix_block_crc(&mut slot);
    }
    let (sb, seq) = match Superblock::decode(&slot) {
        Ok(decoded) => decoded,
        Err(e) => {
            note(format_args!("superblock: {e}"));
            return;
        }
    };
    note(format_args!("superblock: decoded, sequence {seq}"));
    let again = sb.encode(seq);
    assert_eq!(
        Superblock::decode(&again),
        Ok((sb.clone(), seq)),
        "superblock does not round-trip"
    );
    // Every field read is written back where it was read from; reserved bytes (ignored on
    // read) come back as zero.
    let n = sb.activity.len();
    let name_end = |at: usize| at + 1 + usize::from(slot[at]);
    for range in [
        0..57,
        64..120,
        256..260,
        264..264 + 8 * n,
        128..name_end(128),
        192..name_end(192),
    ] {
        if range.start <= 12 {
            // Magic and version, then the CRC (which also covers reserved bytes).
            assert_eq!(again[..12], slot[..12]);
            assert_eq!(again[16..range.end], slot[16..range.end], "{range:?}");
        } else {
            assert_eq!(again[range.clone()], slot[range.clone()], "{range:?}");
        }
    }
}

fn meta_store(mut bytes: Vec<u8>, repair: bool, pages: bool, internal: bool) {
    if repair {
        repair_area(&mut bytes, pages);
    }
    let file = file_with(&bytes);
    let loc = if internal {
        MetaLocation::Internal {
            disk: file.path().to_path_buf(),
        }
    } else {
        MetaLocation::External(file.path().to_path_buf())
    };
    match MetaStore::open(&loc) {
        Ok((store, report)) => {
            let sb = store.superblock();
            assert_eq!(store.data_size(), sb.data_size);
            assert_eq!(store.bitmap().device_size(), sb.data_size);
            assert_eq!(store.bitmap().granularity(), sb.granularity);
            assert!(store.active_slot() < 2);
            let end = store.area_offset().checked_add(sb.area_len());
            assert!(
                end.is_some_and(|e| e <= bytes.len() as u64),
                "metadata area past the end of its file"
            );
            if internal {
                assert!(
                    store.area_offset() >= sb.data_size,
                    "data overlaps metadata"
                );
            }
            assert!(store.bitmap().dirty_bytes() <= sb.data_size);
            assert!(report.warnings.iter().all(|w| !w.is_empty()));
            assert!(!format!("{store:?}").is_empty());
            note(format_args!(
                "metadata store opened: {} data bytes, {} warnings",
                sb.data_size,
                report.warnings.len()
            ));
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            note(format_args!("metadata store: {e}"));
        }
    }
}

fn recovery_file(rest: &[u8], repair: bool) {
    let mut bytes = rest.to_vec();
    if repair && bytes.len() >= 64 {
        bytes[..8].copy_from_slice(b"TWINBDRC");
        bytes[12..16].fill(0);
        let crc = crc32c::crc32c(&bytes[..64]);
        bytes[12..16].copy_from_slice(&crc.to_le_bytes());
        let mut at = 64;
        while bytes.len() - at >= 20 {
            let len = le32(&bytes[at + 16..]) as usize;
            let Some(end) = at.checked_add(20 + len).filter(|&e| e <= bytes.len()) else {
                break;
            };
            // The record magic 0x5242_5254, little-endian.
            bytes[at..at + 4].copy_from_slice(b"TRBR");
            let crc = crc32c::crc32c(&bytes[at + 8..end]);
            bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
            at = end;
        }
    }
    let file = file_with(&bytes);
    match recovery::read(file.path()) {
        Ok(c) => {
            let mut total = 64;
            for r in &c.records {
                let end = r.offset.checked_add(r.data.len() as u64);
                assert!(end.is_some_and(|e| e <= c.size), "record past the device");
                total += 20 + r.data.len();
            }
            assert!(total <= bytes.len());
            assert_eq!(c.torn_tail, total < bytes.len());
            note(format_args!(
                "recovery file: {} records, torn tail {}",
                c.records.len(),
                c.torn_tail
            ));
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            note(format_args!("recovery file: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------
// Resource file
// ---------------------------------------------------------------------------

/// The resource file. Input: its text (invalid UTF-8 is replaced, as a lossy reader would).
///
/// Checked: parse errors render without panicking; an accepted configuration has one or two
/// nodes with distinct names, each found by name, with the other as its peer. The text is also
/// fed to the duration parser the file's values go through.
pub fn resource_file(data: &[u8]) {
    let src = String::from_utf8_lossy(data);
    match Config::parse_str(&src, "fuzz.toml") {
        Ok(cfg) => {
            assert!(cfg.path.is_none());
            let names = cfg.node_names();
            assert!((1..=2).contains(&names.len()), "{} nodes", names.len());
            if names.len() == 2 {
                assert_ne!(names[0], names[1], "duplicate node names accepted");
            }
            for name in &names {
                let node = cfg.node(Some(name)).expect("a node is found by its name");
                assert_eq!(node.name, *name);
                let peer = cfg.peer_of(name).map(|p| p.name.as_str());
                let other = names.iter().find(|n| *n != name).copied();
                assert_eq!(peer, other);
            }
            assert!(cfg.node(Some("")).is_err() || names.contains(&""));
            assert!(!format!("{cfg:?}").is_empty());
            note(format_args!("resource file: {} nodes", names.len()));
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            note(format_args!("resource file: {e}"));
        }
    }
    for line in src.lines().take(8) {
        if let Ok(d) = config::parse_duration(line) {
            assert!(d.as_nanos() <= u128::from(u64::MAX));
        }
    }
}

// ---------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------

/// Meaningful starting inputs for `target`, named: valid handshakes and sessions, a frame of
/// every message kind, metadata as `MetaStore::create` writes it, a recovery file as the
/// writer makes it, resource files. (The resource-file fixtures are added by the caller.)
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "nbd_negotiation" => nbd_negotiation_seeds(),
        "nbd_request" => nbd_request_seeds(),
        "peer_frame" => peer_frame_seeds(),
        "metadata" => metadata_seeds(),
        "resource_file" => resource_file_seeds(),
        other => panic!("no fuzz target named {other:?}"),
    }
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn request(out: &mut Vec<u8>, command: u16, flags: u16, offset: u64, len: u32) {
    encode_request(
        out,
        &Request {
            flags,
            command,
            cookie: u64::from(command) + 1,
            offset,
            len,
        },
    );
    if command == CMD_WRITE {
        out.extend(std::iter::repeat_n(0xa5, len as usize));
    }
}

/// A session's worth of requests: every command, then a disconnect.
fn transmission(out: &mut Vec<u8>, structured: bool) {
    request(out, CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
    request(
        out,
        CMD_READ,
        if structured { CMD_FLAG_DF } else { 0 },
        4096,
        512,
    );
    request(out, CMD_FLUSH, 0, 0, 0);
    request(out, CMD_TRIM, 0, 8192, 4096);
    request(out, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1024);
    request(out, CMD_CACHE, 0, 0, 4096);
    request(out, CMD_READ, 0, EXPORT_SIZE - 1, 2);
    request(out, 9, 0, 0, 1);
    request(out, CMD_DISC, 0, 0, 0);
}

fn nbd_negotiation_seeds() -> Vec<(String, Vec<u8>)> {
    let flags = (u32::from(FLAG_FIXED_NEWSTYLE) | u32::from(FLAG_NO_ZEROES)).to_be_bytes();
    let start = |sel: u8| {
        let mut v = vec![sel];
        v.extend_from_slice(&flags);
        v
    };
    let mut seeds = Vec::new();
    for (name, structured, sel) in [
        ("go-simple", false, 0u8),
        ("go-structured", true, 0),
        ("go-then-close", false, 2),
    ] {
        let mut s = start(sel);
        if structured {
            option(&mut s, OPT_STRUCTURED_REPLY, &[]);
        }
        option(&mut s, OPT_LIST, &[]);
        option(
            &mut s,
            OPT_INFO,
            &go_payload(EXPORT_NAME, &[INFO_NAME, INFO_DESCRIPTION]),
        );
        option(&mut s, OPT_GO, &go_payload(EXPORT_NAME, &[INFO_BLOCK_SIZE]));
        transmission(&mut s, structured);
        seeds.push((name.to_string(), s));
    }
    let mut s = start(0);
    option(&mut s, OPT_EXPORT_NAME, EXPORT_NAME.as_bytes());
    transmission(&mut s, false);
    seeds.push(("export-name".into(), s));

    // A write large enough to be read straight into its buffer, then small requests: the
    // session reads what follows such a write with a short read.
    let mut s = start(0);
    option(&mut s, OPT_GO, &go_payload(EXPORT_NAME, &[]));
    request(&mut s, CMD_WRITE, 0, 0, EXPORT_SIZE as u32);
    request(&mut s, CMD_FLUSH, 0, 0, 0);
    request(&mut s, CMD_WRITE, 0, 4096, 512);
    request(&mut s, CMD_READ, 0, 0, 4096);
    request(&mut s, CMD_DISC, 0, 0, 0);
    seeds.push(("large-write-then-small".into(), s));

    let mut s = start(0);
    option(&mut s, OPT_STARTTLS, &[]);
    option(&mut s, 42, b"junk");
    option(&mut s, OPT_GO, &go_payload("other", &[]));
    option(&mut s, OPT_GO, &[0, 0, 0, 9]);
    option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, OPT_ABORT, &[]);
    seeds.push(("refusals-then-abort".into(), s));

    let mut s = start(1);
    option(&mut s, OPT_LIST, &[]);
    option(&mut s, OPT_GO, &go_payload("", &[]));
    option(&mut s, OPT_EXPORT_NAME, b"");
    seeds.push(("closed-export".into(), s));

    let mut s = start(0);
    s.extend_from_slice(&IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&OPT_GO.to_be_bytes());
    s.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    seeds.push(("option-too-big".into(), s));
    seeds
}

fn nbd_request_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut s = vec![0u8];
    s.extend_from_slice(&3u32.to_be_bytes());
    s.extend_from_slice("export r0 — описание".as_bytes());
    seeds.push(("flags-and-text".into(), s));

    for (name, opt, data) in [
        (
            "opt-go",
            OPT_GO,
            go_payload(EXPORT_NAME, &[INFO_BLOCK_SIZE]),
        ),
        ("opt-info", OPT_INFO, go_payload("", &[INFO_NAME])),
        ("opt-export-name", OPT_EXPORT_NAME, b"r0".to_vec()),
        ("opt-list", OPT_LIST, Vec::new()),
        ("opt-structured", OPT_STRUCTURED_REPLY, Vec::new()),
    ] {
        let mut s = vec![1u8];
        option(&mut s, opt, &data);
        seeds.push((name.to_string(), s));
    }

    let mut s = vec![2u8];
    s.extend_from_slice(&EXPORT_SIZE.to_be_bytes());
    let tflags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_DF
        | TFLAG_SEND_CACHE;
    s.extend_from_slice(&tflags.to_be_bytes());
    s.extend_from_slice(&(32u32 << 20).to_be_bytes());
    s.push(1);
    for (cmd, flags, offset, len) in [
        (CMD_READ, CMD_FLAG_DF, 0, 4096),
        (CMD_WRITE, CMD_FLAG_FUA, 4096, 4096),
        (CMD_FLUSH, 0, 0, 0),
        (CMD_TRIM, CMD_FLAG_FUA, 0, 65536),
        (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 512, 512),
        (CMD_CACHE, 0, 0, 1),
        (CMD_DISC, 0, 0, 0),
        (CMD_WRITE, 0, u64::MAX, 2),
    ] {
        encode_request(
            &mut s,
            &Request {
                flags,
                command: cmd,
                cookie: 1,
                offset,
                len,
            },
        );
    }
    seeds.push(("limits-and-requests".into(), s));
    seeds
}

/// One message of every kind (`tests/fuzz_corpus.rs` checks that none is missing).
pub fn sample_messages() -> Vec<Msg> {
    use wire::{Channel, Hello, PeerState};
    vec![
        Msg::Hello(Hello {
            version: wire::VERSION,
            channel: Channel::Data,
            session: 42,
            node_id: 1,
            size: 1 << 30,
            granularity: crate::bitmap::DEFAULT_GRANULARITY,
            resource: EXPORT_NAME.into(),
            node: "alpha".into(),
            challenge: [3; wire::CHALLENGE_LEN],
        }),
        Msg::Auth { mac: [5; 32] },
        Msg::Welcome,
        Msg::Refuse {
            reason: "wrong secret".into(),
        },
        Msg::State(PeerState {
            primary: true,
            disk: 2,
            current: 1,
            bitmap: 2,
            history: [3, 4],
            dirty_bytes: 4096,
            flags: wire::STATE_DISCARD_MY_DATA,
            promoted_at_ms: 1_700_000_000_000,
        }),
        Msg::BitmapChunk {
            first_word: 10,
            words: vec![1, u64::MAX],
        },
        Msg::BitmapDone,
        Msg::Write {
            id: 1,
            offset: 4096,
            fua: true,
            data: IoBuf::from(&[0x5a; 64][..]),
        },
        Msg::Received { id: 1 },
        Msg::Written { id: 1, errno: 5 },
        Msg::Trim {
            id: 2,
            offset: 0,
            len: 1 << 40,
        },
        Msg::Zeroes {
            id: 3,
            offset: 1,
            len: 2,
            may_trim: true,
        },
        Msg::Flush { id: 4 },
        Msg::Settle { id: 5 },
        Msg::Flushed { id: 4, errno: 0 },
        Msg::Ping { nonce: 77 },
        Msg::Pong { nonce: 77 },
        Msg::ResyncData {
            offset: 8192,
            data: IoBuf::from(&[9u8; 512][..]),
        },
        Msg::ResyncAck {
            offset: 8192,
            len: 512,
            errno: 0,
        },
        Msg::ResyncDone { current: 5 },
        Msg::Bye {
            reason: "shutdown".into(),
            stable: true,
        },
        Msg::VerifyRequest {
            id: 3,
            offset: 1 << 20,
            len: 1 << 20,
        },
        Msg::VerifyReply {
            id: 3,
            crcs: vec![1, 2, 0xffff_ffff],
        },
        Msg::ReadRequest {
            id: 4,
            offset: 512,
            len: 4096,
        },
        Msg::ReadReply {
            id: 4,
            errno: 0,
            data: IoBuf::from(&[7u8; 100][..]),
        },
    ]
}

fn frame(msg: &Msg, seq: u64) -> Vec<u8> {
    let mut f = wire::encode(msg, seq);
    f.extend_from_slice(msg.data());
    f
}

fn peer_frame_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let msgs = sample_messages();
    for m in &msgs {
        for sel in [0u8, 1] {
            let mut s = vec![sel];
            s.extend_from_slice(&frame(m, 7));
            seeds.push((format!("frame-{}-{sel}", m.name()), s));
        }
    }
    let mut s = vec![2u8];
    for (seq, m) in msgs.iter().enumerate() {
        s.extend_from_slice(&frame(m, seq as u64));
    }
    seeds.push(("stream-every-kind".into(), s));

    let hello = &msgs[0];
    let mut s = vec![3u8];
    s.extend_from_slice(&frame(hello, 0));
    s.extend_from_slice(&frame(&Msg::Auth { mac: [7; 32] }, 1));
    s.extend_from_slice(&frame(&Msg::Welcome, 2));
    seeds.push(("handshake-dialer".into(), s));
    let mut s = vec![3u8];
    s.extend_from_slice(&frame(
        &Msg::Refuse {
            reason: "no".into(),
        },
        0,
    ));
    seeds.push(("handshake-refused".into(), s));
    seeds
}

fn metadata_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let name = |s: &str, field| meta::Name::new(field, s).expect("name");
    let mut sb = Superblock::new(
        name(EXPORT_NAME, "resource"),
        name("alpha", "node"),
        0x1234,
        EXPORT_SIZE,
        4096,
    );
    sb.disk_state = meta::DiskState::UpToDate;
    sb.generations.current = 9;
    sb.activity = vec![0, 3];
    let slot = sb.encode(5);
    let used = slot.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    for (sel, bytes) in [(0u8, &slot[..]), (4, &slot[..used])] {
        let mut s = vec![sel];
        s.extend_from_slice(bytes);
        seeds.push((format!("slot-{sel}"), s));
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let ext = dir.path().join("r0.meta");
    let params = meta::CreateParams {
        resource: EXPORT_NAME.into(),
        node: "alpha".into(),
        data_size: EXPORT_SIZE,
        granularity: 4096,
    };
    let mut store = MetaStore::create(&MetaLocation::External(ext.clone()), params.clone(), false)
        .expect("create external metadata");
    store.set_dirty(8192, 4096).expect("mark dirty");
    store.flush_bitmap().expect("flush bitmap");
    drop(store);
    let bytes = std::fs::read(&ext).expect("read metadata");
    let compact = compact_blocks(&bytes).expect("fresh metadata is compact");
    for sel in [17u8, 21, 29] {
        let mut s = vec![sel];
        s.extend_from_slice(&compact);
        seeds.push((format!("external-compact-{sel}"), s));
    }

    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(24 * 1024))
        .expect("disk");
    let loc = MetaLocation::Internal { disk: disk.clone() };
    drop(MetaStore::create(&loc, params, false).expect("create internal metadata"));
    let bytes = std::fs::read(&disk).expect("read disk");
    let compact = compact_blocks(&bytes).expect("fresh metadata is compact");
    for sel in [18u8, 22] {
        let mut s = vec![sel];
        s.extend_from_slice(&compact);
        seeds.push((format!("internal-compact-{sel}"), s));
    }

    let mut w = recovery::RecoveryWriter::create(dir.path(), EXPORT_NAME, "beta", 1 << 20, 4096)
        .expect("recovery file");
    w.append(0, &[1u8; 512]).expect("append");
    w.append(8192, &[2u8; 64]).expect("append");
    let bytes = std::fs::read(w.path()).expect("read recovery file");
    for sel in [3u8, 7] {
        let mut s = vec![sel];
        s.extend_from_slice(&bytes);
        seeds.push((format!("recovery-{sel}"), s));
    }
    seeds
}

fn resource_file_seeds() -> Vec<(String, Vec<u8>)> {
    let inline =
        "[resource]\nname = \"r0\"\nsecret = \"s\"\n\n[heartbeat]\ninterval_ms = \"1.5s\"\n\
                  timeout_ms = 3000\n\n[[node]]\nname = \"alpha\"\ndisk = \"/dev/vdb\"\n\
                  meta = \"internal\"\nreplication = \"127.0.0.1:7789\"\n\
                  nbd = \"unix:/run/twinbd/r0.nbd\"\nadmin = \"/run/twinbd/r0.sock\"\n";
    vec![("inline-one-node".into(), inline.as_bytes().to_vec())]
}

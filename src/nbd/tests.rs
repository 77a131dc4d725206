//! Session tests over in-memory pipes, asserting raw bytes: handshake, requests, and hostile
//! input (truncated, oversized, garbage).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

use super::proto::*;
use super::server::*;
use crate::storage::{open_disk, Disk, EngineChoice};

const SIZE: u64 = 1 << 20;

struct Harness {
    _dir: tempfile::TempDir,
    tx: watch::Sender<ExportState<Disk>>,
    ctx: Arc<ServerCtx<Disk>>,
    export: Arc<Export<Disk>>,
}

fn harness(open: bool) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(SIZE))
        .expect("disk");
    let disk = open_disk(&path, None, EngineChoice::Auto).expect("open");
    let export = Arc::new(Export {
        backend: Arc::new(disk),
        size: SIZE,
    });
    let state = if open {
        ExportState::Open(Arc::clone(&export))
    } else {
        ExportState::Closed("twinbd node beta is secondary; only the primary serves r0".into())
    };
    let (tx, rx) = watch::channel(state);
    let ctx = Arc::new(ServerCtx::new("r0".into(), rx));
    Harness {
        _dir: dir,
        tx,
        ctx,
        export,
    }
}

/// Starts a session on one end of a pipe; returns the client end and the session's result.
fn connect(
    h: &Harness,
) -> (
    DuplexStream,
    tokio::task::JoinHandle<Result<(), SessionError>>,
) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let ctx = Arc::clone(&h.ctx);
    let task = tokio::spawn(async move {
        let (r, w) = tokio::io::split(server);
        run_session(r, w, &ctx).await
    });
    (client, task)
}

/// A client end: an in-memory pipe or a socket.
trait Conn: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Conn for T {}

async fn greet(c: &mut impl Conn) {
    let mut g = [0u8; 18];
    c.read_exact(&mut g).await.expect("greeting");
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    c.write_all(&3u32.to_be_bytes()).await.expect("flags");
}

async fn send_option(c: &mut impl Conn, option: u32, data: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).await.expect("option");
}

/// Reads one option reply: (option, type, data).
async fn option_reply(c: &mut impl Conn) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).await.expect("option reply");
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().unwrap()),
        OPTION_REPLY_MAGIC
    );
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    c.read_exact(&mut d).await.expect("option data");
    (opt, typ, d)
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Negotiates GO (optionally structured); returns the transmission flags.
async fn go(c: &mut impl Conn, structured: bool) -> u16 {
    greet(c).await;
    if structured {
        send_option(c, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(option_reply(c).await.1, REP_ACK);
    }
    send_option(c, OPT_GO, &go_data("r0", &[INFO_BLOCK_SIZE])).await;
    let mut flags = 0;
    loop {
        let (opt, typ, d) = option_reply(c).await;
        assert_eq!(opt, OPT_GO);
        match typ {
            REP_INFO => {
                let kind = u16::from_be_bytes([d[0], d[1]]);
                if kind == INFO_EXPORT {
                    assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), SIZE);
                    flags = u16::from_be_bytes([d[10], d[11]]);
                }
                if kind == INFO_BLOCK_SIZE {
                    assert_eq!(u32::from_be_bytes(d[2..6].try_into().unwrap()), 1);
                    assert_eq!(u32::from_be_bytes(d[10..14].try_into().unwrap()), 32 << 20);
                }
            }
            REP_ACK => return flags,
            other => panic!("unexpected reply {other:#x}"),
        }
    }
}

async fn request(
    c: &mut impl Conn,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) {
    let mut m = Vec::new();
    encode_request(
        &mut m,
        &Request {
            flags,
            command,
            cookie,
            offset,
            len,
        },
    );
    m.extend_from_slice(payload);
    c.write_all(&m).await.expect("request");
}

/// Reads a simple reply: (cookie, error).
async fn simple_reply(c: &mut impl Conn) -> (u64, u32) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).await.expect("reply");
    assert_eq!(
        u32::from_be_bytes(h[0..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    (
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
    )
}

#[tokio::test]
async fn go_then_simple_replies_read_write_flush() {
    let h = harness(true);
    let (mut c, task) = connect(&h);
    let flags = go(&mut c, false).await;
    for f in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} advertised");
    }
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(flags & TFLAG_SEND_DF, 0, "DF needs structured replies");
    let data = vec![0x5au8; 4096];
    request(&mut c, CMD_WRITE, CMD_FLAG_FUA, 1, SIZE - 4096, 4096, &data).await;
    assert_eq!(simple_reply(&mut c).await, (1, 0));
    request(&mut c, CMD_READ, 0, 2, SIZE - 4096, 4096, &[]).await;
    assert_eq!(simple_reply(&mut c).await, (2, 0));
    let mut back = vec![0u8; 4096];
    c.read_exact(&mut back).await.expect("data");
    assert_eq!(back, data);
    request(&mut c, CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    assert_eq!(simple_reply(&mut c).await, (3, 0));
    // A read past the end: error, and no data follows.
    request(&mut c, CMD_READ, 0, 4, SIZE, 512, &[]).await;
    assert_eq!(simple_reply(&mut c).await, (4, EINVAL));
    request(&mut c, CMD_DISC, 0, 5, 0, 0, &[]).await;
    task.await.expect("join").expect("clean end");
    assert_eq!(c.read(&mut [0u8; 1]).await.expect("eof"), 0);
}

#[tokio::test]
async fn structured_reads_and_errors() {
    let h = harness(true);
    let (mut c, task) = connect(&h);
    let flags = go(&mut c, true).await;
    assert_ne!(flags & TFLAG_SEND_DF, 0);
    // A successful write or flush has no payload: a simple reply, as the protocol
    // allows once structured replies are negotiated.
    request(&mut c, CMD_WRITE, 0, 1, 512, 3, b"abc").await;
    assert_eq!(simple_reply(&mut c).await, (1, 0));
    request(&mut c, CMD_FLUSH, 0, 4, 0, 0, &[]).await;
    assert_eq!(simple_reply(&mut c).await, (4, 0));
    let mut hdr = [0u8; 20];
    // A failed write keeps the structured error, whose message says why.
    request(&mut c, CMD_WRITE, 0, 5, SIZE - 1, 2, b"xy").await;
    c.read_exact(&mut hdr).await.expect("write error chunk");
    assert_eq!(
        u32::from_be_bytes(hdr[0..4].try_into().unwrap()),
        STRUCTURED_REPLY_MAGIC
    );
    assert_eq!(u64::from_be_bytes(hdr[8..16].try_into().unwrap()), 5);
    assert_eq!(u16::from_be_bytes([hdr[6], hdr[7]]), REPLY_TYPE_ERROR);
    let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap());
    let mut body = vec![0u8; len as usize];
    c.read_exact(&mut body).await.expect("write error body");
    assert_eq!(u32::from_be_bytes(body[0..4].try_into().unwrap()), ENOSPC);
    // A read of nothing still ends with a structured chunk, never a simple reply.
    request(&mut c, CMD_READ, 0, 6, 512, 0, &[]).await;
    c.read_exact(&mut hdr).await.expect("empty read chunk");
    assert_eq!(
        u32::from_be_bytes(hdr[0..4].try_into().unwrap()),
        STRUCTURED_REPLY_MAGIC
    );
    assert_eq!(u16::from_be_bytes([hdr[4], hdr[5]]), REPLY_FLAG_DONE);
    assert_eq!(u16::from_be_bytes([hdr[6], hdr[7]]), REPLY_TYPE_NONE);
    request(&mut c, CMD_READ, CMD_FLAG_DF, 2, 512, 3, &[]).await;
    let mut chunk = [0u8; 20 + 8 + 3];
    c.read_exact(&mut chunk).await.expect("read chunk");
    assert_eq!(u16::from_be_bytes([chunk[4], chunk[5]]), REPLY_FLAG_DONE);
    assert_eq!(
        u16::from_be_bytes([chunk[6], chunk[7]]),
        REPLY_TYPE_OFFSET_DATA
    );
    assert_eq!(u64::from_be_bytes(chunk[20..28].try_into().unwrap()), 512);
    assert_eq!(&chunk[28..], b"abc");
    request(&mut c, CMD_READ, 0, 3, SIZE - 1, 2, &[]).await;
    c.read_exact(&mut hdr).await.expect("error chunk");
    assert_eq!(u16::from_be_bytes([hdr[6], hdr[7]]), REPLY_TYPE_ERROR);
    let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap());
    let mut body = vec![0u8; len as usize];
    c.read_exact(&mut body).await.expect("error body");
    assert_eq!(u32::from_be_bytes(body[0..4].try_into().unwrap()), EINVAL);
    drop(c);
    let _ = task.await.expect("join");
}

#[tokio::test]
async fn secondary_refuses_with_a_message_that_says_so() {
    let h = harness(false);
    let (mut c, task) = connect(&h);
    greet(&mut c).await;
    send_option(&mut c, OPT_GO, &go_data("r0", &[])).await;
    let (_, typ, msg) = option_reply(&mut c).await;
    assert_eq!(typ, REP_ERR_POLICY);
    assert!(
        String::from_utf8_lossy(&msg).contains("secondary"),
        "{msg:?}"
    );
    // EXPORT_NAME has no error reply: the server hangs up.
    send_option(&mut c, OPT_EXPORT_NAME, b"r0").await;
    assert!(task.await.expect("join").is_err());
}

#[tokio::test]
async fn unknown_options_are_unsupported_and_negotiation_goes_on() {
    let h = harness(true);
    let (mut c, task) = connect(&h);
    greet(&mut c).await;
    // NBD_OPT_EXTENDED_HEADERS (11) and a made-up option.
    for o in [11u32, 0x7777] {
        send_option(&mut c, o, &[]).await;
        let (opt, typ, _) = option_reply(&mut c).await;
        assert_eq!((opt, typ), (o, REP_ERR_UNSUP));
    }
    send_option(&mut c, OPT_GO, &go_data("nope", &[])).await;
    assert_eq!(option_reply(&mut c).await.1, REP_ERR_UNKNOWN);
    send_option(&mut c, OPT_LIST, &[]).await;
    let (_, typ, d) = option_reply(&mut c).await;
    assert_eq!(typ, REP_SERVER);
    assert_eq!(&d[4..6], b"r0");
    assert_eq!(option_reply(&mut c).await.1, REP_ACK);
    // An option with more data than the server takes: its data is skipped, and it is
    // answered TOO_BIG; the negotiation goes on.
    send_option(&mut c, OPT_INFO, &vec![7u8; MAX_OPTION_LEN as usize + 1]).await;
    let (opt, typ, _) = option_reply(&mut c).await;
    assert_eq!((opt, typ), (OPT_INFO, REP_ERR_TOO_BIG));
    // Garbage inside a GO: invalid, and still negotiating.
    send_option(&mut c, OPT_GO, &[0xff, 0xff, 0xff]).await;
    assert_eq!(option_reply(&mut c).await.1, REP_ERR_INVALID);
    // EXPORT_NAME with the empty name ends the negotiation (no zeroes: client asked).
    send_option(&mut c, OPT_EXPORT_NAME, b"").await;
    let mut reply = [0u8; 10];
    c.read_exact(&mut reply).await.expect("export name reply");
    assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), SIZE);
    request(&mut c, CMD_DISC, 0, 1, 0, 0, &[]).await;
    task.await.expect("join").expect("clean");
}

#[tokio::test]
async fn hostile_negotiation_input_ends_the_session_cleanly() {
    let h = harness(true);
    // Each case: bytes after the greeting, then EOF. None may panic or hang.
    let mut over = Vec::new();
    over.extend_from_slice(&3u32.to_be_bytes());
    over.extend_from_slice(&IHAVEOPT.to_be_bytes());
    over.extend_from_slice(&OPT_GO.to_be_bytes());
    over.extend_from_slice(&u32::MAX.to_be_bytes());
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0],
        0u32.to_be_bytes().to_vec(), // not fixed newstyle
        [3u32.to_be_bytes().as_slice(), b"GARBAGE!GARBAGE!"].concat(), // bad option magic
        [3u32.to_be_bytes().as_slice(), &IHAVEOPT.to_be_bytes()[..5]].concat(), // truncated
        over,                        // 4 GiB option
    ];
    for (i, bytes) in cases.into_iter().enumerate() {
        let (mut c, task) = connect(&h);
        let mut g = [0u8; 18];
        c.read_exact(&mut g).await.expect("greeting");
        c.write_all(&bytes).await.expect("send");
        c.shutdown().await.expect("shutdown");
        let res = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .unwrap_or_else(|_| panic!("case {i} hung"))
            .expect("join");
        assert!(res.is_err(), "case {i} should end in an error");
    }
}

#[tokio::test]
async fn hostile_requests_get_errors_not_crashes() {
    let h = harness(true);
    let (mut c, task) = connect(&h);
    go(&mut c, false).await;
    // Oversized write: the payload is consumed and refused; the session goes on.
    let big = (32u32 << 20) + 4096;
    request(&mut c, CMD_WRITE, 0, 1, 0, big, &[]).await;
    let junk = vec![0u8; big as usize];
    let (mut rd, mut wr) = tokio::io::split(c);
    let writer = tokio::spawn(async move {
        wr.write_all(&junk).await.expect("junk");
        wr
    });
    let mut h16 = [0u8; 16];
    rd.read_exact(&mut h16).await.expect("reply");
    assert_eq!(u32::from_be_bytes(h16[4..8].try_into().unwrap()), EINVAL);
    let wr = writer.await.expect("writer");
    let mut c = rd.unsplit(wr);
    // Write past the end, unknown command, bad flags, huge offset.
    request(&mut c, CMD_WRITE, 0, 2, SIZE - 1, 2, b"xy").await;
    assert_eq!(simple_reply(&mut c).await, (2, ENOSPC));
    request(&mut c, 99, 0, 3, 0, 0, &[]).await;
    assert_eq!(simple_reply(&mut c).await, (3, EINVAL));
    request(&mut c, CMD_READ, 0x8000, 4, 0, 1, &[]).await;
    assert_eq!(simple_reply(&mut c).await, (4, EINVAL));
    request(&mut c, CMD_TRIM, 0, 5, u64::MAX, 1, &[]).await;
    assert_eq!(simple_reply(&mut c).await, (5, EINVAL));
    // Garbage request magic ends the session.
    c.write_all(&[0xde; 28]).await.expect("garbage");
    let res = task.await.expect("join");
    assert!(res.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_complete_and_reset_with_writes_in_flight_is_survived() {
    let h = harness(true);
    let (mut c, task) = connect(&h);
    go(&mut c, false).await;
    // 300 writes sent back to back before reading any reply.
    let mut batch = Vec::new();
    for i in 0..300u64 {
        let data = vec![(i % 251) as u8; 2048];
        encode_request(
            &mut batch,
            &Request {
                flags: 0,
                command: CMD_WRITE,
                cookie: i,
                offset: i * 2048 % SIZE,
                len: 2048,
            },
        );
        batch.extend_from_slice(&data);
    }
    let (mut rd, mut wr) = tokio::io::split(c);
    let writer = tokio::spawn(async move {
        wr.write_all(&batch).await.expect("batch");
        wr
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..300 {
        let mut h16 = [0u8; 16];
        rd.read_exact(&mut h16).await.expect("reply");
        assert_eq!(u32::from_be_bytes(h16[4..8].try_into().unwrap()), 0);
        seen.insert(u64::from_be_bytes(h16[8..16].try_into().unwrap()));
    }
    assert_eq!(seen.len(), 300);
    let c = rd.unsplit(writer.await.expect("writer"));
    drop(c);
    task.await
        .expect("join")
        .expect("EOF after complete requests is clean");

    // Now hang up with hundreds of writes in flight: the session ends, the server lives.
    let (mut c, task) = connect(&h);
    go(&mut c, false).await;
    let mut batch = Vec::new();
    for i in 0..400u64 {
        encode_request(
            &mut batch,
            &Request {
                flags: 0,
                command: CMD_WRITE,
                cookie: i,
                offset: 0,
                len: 4096,
            },
        );
        batch.extend_from_slice(&[7u8; 4096]);
    }
    c.write_all(&batch).await.expect("batch");
    drop(c);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), task)
        .await
        .expect("session must end")
        .expect("join");
    assert_eq!(h.ctx.clients.load(std::sync::atomic::Ordering::SeqCst), 0);

    // And the export still serves a new client.
    let (mut c, task) = connect(&h);
    go(&mut c, false).await;
    request(&mut c, CMD_READ, 0, 1, 0, 4096, &[]).await;
    assert_eq!(simple_reply(&mut c).await, (1, 0));
    let mut back = vec![0u8; 4096];
    c.read_exact(&mut back).await.expect("data");
    assert_eq!(back, vec![7u8; 4096]);
    request(&mut c, CMD_DISC, 0, 2, 0, 0, &[]).await;
    task.await.expect("join").expect("clean");
}

/// Large writes, small writes and flushes sent back to back in one stream: after a large
/// write the session reads the next request with a short read, then the rest of a large
/// payload straight into its buffer. Every request is answered and every byte lands.
#[tokio::test]
async fn large_and_small_requests_back_to_back_keep_their_data() {
    let h = harness(true);
    let (mut c, task) = connect(&h);
    go(&mut c, false).await;
    // (command, offset, length, fill byte)
    let plan: [(u16, u64, u32, u8); 8] = [
        (CMD_WRITE, 0, 256 << 10, 0xa1),
        (CMD_FLUSH, 0, 0, 0),
        (CMD_WRITE, 256 << 10, 4096, 0xb2),
        (CMD_WRITE, 260 << 10, 200 << 10, 0xc3),
        (CMD_WRITE, 460 << 10, 512, 0xd4),
        (CMD_WRITE, 600 << 10, 128 << 10, 0xe5),
        (CMD_WRITE, 728 << 10, 1000, 0xf6),
        (CMD_FLUSH, 0, 0, 0),
    ];
    let mut batch = Vec::new();
    for (cookie, &(command, offset, len, fill)) in plan.iter().enumerate() {
        encode_request(
            &mut batch,
            &Request {
                flags: 0,
                command,
                cookie: cookie as u64,
                offset,
                len,
            },
        );
        if command == CMD_WRITE {
            batch.extend(std::iter::repeat_n(fill, len as usize));
        }
    }
    let (mut rd, mut wr) = tokio::io::split(c);
    let writer = tokio::spawn(async move {
        wr.write_all(&batch).await.expect("batch");
        wr
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..plan.len() {
        let mut h16 = [0u8; 16];
        rd.read_exact(&mut h16).await.expect("reply");
        assert_eq!(u32::from_be_bytes(h16[4..8].try_into().unwrap()), 0);
        seen.insert(u64::from_be_bytes(h16[8..16].try_into().unwrap()));
    }
    assert_eq!(seen.len(), plan.len());
    let mut c = rd.unsplit(writer.await.expect("writer"));
    for (i, &(command, offset, len, fill)) in plan.iter().enumerate() {
        if command != CMD_WRITE {
            continue;
        }
        let cookie = 100 + i as u64;
        request(&mut c, CMD_READ, 0, cookie, offset, len, &[]).await;
        assert_eq!(simple_reply(&mut c).await, (cookie, 0));
        let mut back = vec![0u8; len as usize];
        c.read_exact(&mut back).await.expect("data");
        assert!(
            back.iter().all(|b| *b == fill),
            "write {i} ({len} bytes at {offset}) read back wrong"
        );
    }
    request(&mut c, CMD_DISC, 0, 999, 0, 0, &[]).await;
    task.await.expect("join").expect("clean");
}

#[tokio::test]
async fn closing_the_export_disconnects_clients() {
    let h = harness(true);
    let (mut c, task) = connect(&h);
    go(&mut c, false).await;
    assert_eq!(h.ctx.clients.load(std::sync::atomic::Ordering::SeqCst), 1);
    h.tx.send(ExportState::Closed("demoted".into()))
        .expect("send");
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("session ends")
        .expect("join")
        .expect("clean");
    assert_eq!(c.read(&mut [0u8; 1]).await.expect("eof"), 0);
    let _ = &h.export;
}

/// A client that stops reading its replies does not keep its session forever once the
/// export closes: with every request done, the session waits `reply_drain`, then drops it.
#[tokio::test]
async fn a_client_that_takes_no_replies_is_dropped_after_the_export_closes() {
    let h = harness(true);
    let mut ctx = ServerCtx::new("r0".into(), h.tx.subscribe());
    ctx.reply_drain = std::time::Duration::from_millis(300);
    let ctx = Arc::new(ctx);
    let (mut c, server) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        async move {
            let (r, w) = tokio::io::split(server);
            run_session(r, w, &ctx).await
        }
    });
    go(&mut c, false).await;
    // 8 MiB of read replies into a 64 KiB pipe nobody reads.
    for i in 0..128u64 {
        request(&mut c, CMD_READ, 0, i, (i % 16) * 65536, 65536, &[]).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    h.tx.send(ExportState::Closed("demoted".into()))
        .expect("send");
    let res = tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("the session ends though its client reads nothing")
        .expect("join");
    assert!(res.is_err(), "a session that dropped its client reports it");
    assert_eq!(ctx.clients.load(std::sync::atomic::Ordering::SeqCst), 0);
    let _ = &h.export;
}

/// When the export closes, every reply to a request the session took reaches the client,
/// followed by a clean end of stream, though the client sent more after the close: a TCP
/// socket closed with unread input is reset, and a reset drops the replies still queued
/// in the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_survive_the_close_of_a_connection_with_unread_requests() {
    let h = harness(true);
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("tcp listener");
    let mut c = tokio::net::TcpStream::connect(tcp.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (s, _) = tcp.accept().await.expect("accept");
    let ctx = Arc::clone(&h.ctx);
    let task = tokio::spawn(async move {
        let (r, w) = s.into_split();
        run_session(r, super::sink::SocketSink::new(w), &ctx).await
    });
    go(&mut c, false).await;
    // 48 MiB of replies: more than the kernel buffers of both ends hold, so the last ones are
    // still queued on the server's side when it has handed them all over and closes.
    const READS: u64 = 48;
    for cookie in 0..READS {
        request(&mut c, CMD_READ, 0, cookie, 0, SIZE as u32, &[]).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    h.tx.send(ExportState::Closed("demoted".into()))
        .expect("send");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // A request the session no longer reads.
    request(&mut c, CMD_FLUSH, 0, READS, 0, 0, &[]).await;
    let mut data = vec![0u8; SIZE as usize];
    for _ in 0..READS {
        let (cookie, err) = simple_reply(&mut c).await;
        assert!(cookie < READS && err == 0, "reply {cookie}: error {err}");
        c.read_exact(&mut data).await.expect("reply data");
    }
    assert_eq!(
        c.read(&mut [0u8; 1])
            .await
            .expect("a clean end, not a reset"),
        0
    );
    drop(c);
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("session ends")
        .expect("join")
        .expect("clean");
}

/// Large reads of cached data are spliced from the page cache on real sockets, interleaved
/// with small replies from memory, in both reply formats, also when the client reads slowly
/// (the socket fills and the sends are partial); every byte matches what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_cached_reads_are_sent_from_the_page_cache_over_sockets() {
    use std::sync::atomic::Ordering;
    let h = harness(true);
    let pattern: Vec<u8> = (0..SIZE as usize)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("nbd.sock");
    let unix = tokio::net::UnixListener::bind(&sock_path).expect("unix listener");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("tcp listener");
    let tcp_addr = tcp.local_addr().expect("addr");
    let rounds = [(true, false), (true, true), (false, false), (false, true)];
    for (round, (use_tcp, structured)) in rounds.into_iter().enumerate() {
        let ctx = Arc::clone(&h.ctx);
        let before = h.ctx.file_range_replies.load(Ordering::SeqCst);
        let (mut c, task): (Box<dyn ConnSend>, _) = if use_tcp {
            let c = tokio::net::TcpStream::connect(tcp_addr)
                .await
                .expect("connect");
            let (s, _) = tcp.accept().await.expect("accept");
            let task = tokio::spawn(async move {
                let (r, w) = s.into_split();
                run_session(r, super::sink::SocketSink::new(w), &ctx).await
            });
            (Box::new(c), task)
        } else {
            let c = tokio::net::UnixStream::connect(&sock_path)
                .await
                .expect("connect");
            let (s, _) = unix.accept().await.expect("accept");
            let task = tokio::spawn(async move {
                let (r, w) = s.into_split();
                run_session(r, super::sink::SocketSink::new(w), &ctx).await
            });
            (Box::new(c), task)
        };
        go(&mut c, structured).await;
        if round == 0 {
            // Never read nor written: not cached, so read into memory as before.
            let cold = [(256 * 1024, 256 * 1024)];
            request(&mut c, CMD_READ, 0, 100, cold[0].0, cold[0].1, &[]).await;
            let (_, got) = next_read_reply(&mut c, structured, &cold).await;
            assert!(got.iter().all(|b| *b == 0));
            assert_eq!(h.ctx.file_range_replies.load(Ordering::SeqCst), before);
        }
        // Each round writes the device with its own bytes, so stale data cannot pass.
        let data: Vec<u8> = pattern.iter().map(|b| b ^ round as u8).collect();
        request(&mut c, CMD_WRITE, 0, 1, 0, SIZE as u32, &data).await;
        assert_eq!(write_done(&mut c).await, 1);
        // Pipelined: whole-device reads, 64 KiB reads at odd offsets and small reads between.
        let reads: Vec<(u64, u32)> = (0..24u64)
            .map(|i| match i % 3 {
                0 => (0, SIZE as u32),
                1 => ((i * 12_345) % (SIZE / 2), 64 * 1024 + 7),
                _ => (SIZE - 512 - i, 512),
            })
            .collect();
        for (i, (off, len)) in reads.iter().enumerate() {
            request(&mut c, CMD_READ, 0, 100 + i as u64, *off, *len, &[]).await;
        }
        // Let the replies fill the socket before reading any.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        for _ in 0..reads.len() {
            let (cookie, got) = next_read_reply(&mut c, structured, &reads).await;
            let (off, len) = reads[(cookie - 100) as usize];
            assert_eq!(got.len(), len as usize);
            assert!(
                got == data[off as usize..(off + u64::from(len)) as usize],
                "read {cookie} ({len} bytes at {off}) returned other bytes"
            );
        }
        request(&mut c, CMD_DISC, 0, 2, 0, 0, &[]).await;
        task.await.expect("join").expect("clean end");
        let sent = h.ctx.file_range_replies.load(Ordering::SeqCst) - before;
        // The device was just written whole: every large read finds its pages cached.
        assert_eq!(
            sent, 16,
            "round {round}: {sent} of 16 large reads went out as file ranges"
        );
    }
}

/// Large write payloads that arrive in pieces, with pauses between them, over TCP (where
/// the session raises the socket's receive low-water mark while it reads one): the mark never
/// asks for more than the payload's unread bytes (still to come, or waiting in the socket),
/// every write completes once its last byte is sent, a small request after each is answered
/// at once, and a close in the middle of a payload still ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_arriving_in_pieces_never_wait_for_more_than_was_sent() {
    use crate::storage::Backend as _;
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    let h = harness(true);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let addr = l.local_addr().expect("addr");
    let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
    let (mut c, s) = (c.expect("connect"), s.expect("accept").0);
    let fd = s.as_raw_fd();
    let ctx = Arc::clone(&h.ctx);
    let task = tokio::spawn(async move {
        let (r, w) = s.into_split();
        run_session(r, super::sink::SocketSink::new(w), &ctx).await
    });
    go(&mut c, false).await;
    let bounded = Duration::from_secs(10);
    // (offset, length, pieces): the whole device, just above the direct-read size, and
    // sizes between.
    let writes: [(u64, usize, usize); 4] = [
        (0, SIZE as usize, 4),
        (4096, 64 * 1024 + 1, 2),
        (SIZE - 300_000, 300_000, 3),
        (12_345, 700_001, 5),
    ];
    let mut image = vec![0u8; SIZE as usize];
    for (i, (off, len, pieces)) in writes.into_iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| (j * 31 + i * 7) as u8).collect();
        let mut m = Vec::new();
        encode_request(
            &mut m,
            &Request {
                flags: 0,
                command: CMD_WRITE,
                cookie: i as u64,
                offset: off,
                len: len as u32,
            },
        );
        let step = len.div_ceil(pieces);
        let mut sent = 0;
        for piece in data.chunks(step) {
            if sent == 0 {
                m.extend_from_slice(piece);
                c.write_all(&m).await.expect("header and first piece");
            } else {
                c.write_all(piece).await.expect("piece");
            }
            sent += piece.len();
            tokio::time::sleep(Duration::from_millis(40)).await;
            let mark = crate::tcp::receive_low_water(&fd).expect("low-water mark");
            // What of this payload the session has not read yet: still to come, or waiting
            // in the socket. The mark must never ask for more.
            let unread = len - sent + waiting_bytes(fd);
            assert!(
                mark <= unread.max(1),
                "write {i}: mark {mark} with {unread} bytes of the payload unread"
            );
        }
        let (cookie, err) = tokio::time::timeout(bounded, simple_reply(&mut c))
            .await
            .expect("write answered");
        assert_eq!((cookie, err), (i as u64, 0));
        image[off as usize..off as usize + len].copy_from_slice(&data);
        request(&mut c, CMD_FLUSH, 0, 200 + i as u64, 0, 0, &[]).await;
        let (cookie, err) = tokio::time::timeout(bounded, simple_reply(&mut c))
            .await
            .expect("flush answered");
        assert_eq!((cookie, err), (200 + i as u64, 0));
    }
    assert_eq!(crate::tcp::receive_low_water(&fd).expect("mark"), 1);
    request(&mut c, CMD_READ, 0, 100, 0, SIZE as u32, &[]).await;
    let (_, got) =
        tokio::time::timeout(bounded, next_read_reply(&mut c, false, &[(0, SIZE as u32)]))
            .await
            .expect("read answered");
    assert!(got == image, "the device does not hold what was written");
    // A client that closes in the middle of a large payload, the mark raised above what it
    // sent: the session still sees the close, ends, and writes nothing of that payload.
    request(&mut c, CMD_WRITE, 0, 9, 0, SIZE as u32, &[0xee; 200_000]).await;
    let raised = tokio::time::timeout(bounded, async {
        while crate::tcp::receive_low_water(&fd).expect("mark") <= 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    raised
        .await
        .expect("the mark is raised while the payload is read");
    c.shutdown().await.expect("close");
    let _ = tokio::time::timeout(bounded, task)
        .await
        .expect("the session ends after a close mid-payload")
        .expect("join");
    let disk = h.export.backend.read(0, SIZE as usize).await.expect("read");
    assert!(disk[..] == image[..], "a partial payload reached the disk");
}

/// Bytes received on socket `fd` and not read yet.
fn waiting_bytes(fd: std::os::fd::RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int; `fd` is a socket the test keeps open.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    usize::try_from(n).expect("byte count")
}

trait ConnSend: Conn + Send {}
impl<T: Conn + Send> ConnSend for T {}

/// Reads a successful write's reply, a simple reply in both modes; returns its cookie.
async fn write_done(c: &mut impl Conn) -> u64 {
    let (cookie, err) = simple_reply(c).await;
    assert_eq!(err, 0);
    cookie
}

/// Reads the next read reply, whatever its cookie (replies of one connection may come in
/// any order), using the cookie to learn its length; returns (cookie, data).
async fn next_read_reply(
    c: &mut impl Conn,
    structured: bool,
    reads: &[(u64, u32)],
) -> (u64, Vec<u8>) {
    let hlen = if structured { 20 + 8 } else { 16 };
    let mut hdr = vec![0u8; hlen];
    c.read_exact(&mut hdr).await.expect("reply header");
    let cookie = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
    let (off, len) = reads[(cookie - 100) as usize];
    if structured {
        assert_eq!(u16::from_be_bytes([hdr[6], hdr[7]]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(u64::from_be_bytes(hdr[20..28].try_into().unwrap()), off);
    } else {
        assert_eq!(u32::from_be_bytes(hdr[4..8].try_into().unwrap()), 0);
    }
    let mut data = vec![0u8; len as usize];
    c.read_exact(&mut data).await.expect("reply data");
    (cookie, data)
}

/// The idle poll (tested itself in `sockpoll`) is offered the sockets of both kinds of
/// listener, and not an in-memory pipe.
#[tokio::test]
async fn idle_poll_gets_the_socket_of_socket_sources_only() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let _c = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (s, _) = l.accept().await.expect("accept");
    let (r, _w) = s.into_split();
    assert!(r.socket_fd().is_some());
    let dir = tempfile::tempdir().expect("tempdir");
    let ul = tokio::net::UnixListener::bind(dir.path().join("s")).expect("unix listener");
    let _uc = tokio::net::UnixStream::connect(dir.path().join("s"))
        .await
        .expect("connect");
    let (us, _) = ul.accept().await.expect("accept");
    let (ur, _uw) = us.into_split();
    assert!(ur.socket_fd().is_some());
    let (a, _b) = tokio::io::duplex(64);
    let (pr, _pw) = tokio::io::split(a);
    assert!(pr.socket_fd().is_none());
}

/// Which addresses are this machine is `crate::tcp::same_machine`'s test (other machines'
/// included); here, that the splice choice follows it for a real loopback connection.
#[tokio::test]
async fn clients_on_this_machine_get_copied_reads() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("address");
    let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
    let (c, s) = (c.expect("connect"), s.expect("accept").0);
    assert!(crate::tcp::is_local(&s));
    assert!(!super::sink::splice_pays(&s));
    assert!(!super::sink::splice_pays(&c));
}

#!/usr/bin/env python3
"""nbd-trace: a logging NBD proxy for finding out what a real client sends.

It sits between an NBD client and an NBD server, forwards every byte
unchanged, and decodes both directions on the way:

  * handshake: server greeting flags, client flags, every option the client
    sends (with the NBD_INFO_* requests of NBD_OPT_INFO / NBD_OPT_GO and the
    meta-context queries), and every option reply of the server;
  * transmission: counts of each command type and flag combination, request
    size range, the highest number of requests in flight at once, the reply
    kinds the server used, and the first few requests of each type verbatim.

It is meant for writing down which protocol features a client relies on
(see docs/client-recipes.md), and for checking twinbd against the same
clients later.  It is a debugging tool, not a fast proxy: a Python thread
per direction, a copy of every byte.

Usage:
  tools/nbd-trace.py --listen 127.0.0.1:10999 --upstream 127.0.0.1:10809 \
      [--log trace.log] [--show 5] [--exit-after N] [--max-seconds S]

--listen / --upstream take HOST:PORT or unix:/path.  The summary of each
connection is written when it closes; SIGTERM/SIGINT stop the proxy.
"""

import argparse
import os
import signal
import socket
import struct
import sys
import threading
import time

# ---------------------------------------------------------------- constants

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

OPTS = {
    1: "EXPORT_NAME", 2: "ABORT", 3: "LIST", 4: "PEEK_EXPORT", 5: "STARTTLS",
    6: "INFO", 7: "GO", 8: "STRUCTURED_REPLY", 9: "LIST_META_CONTEXT",
    10: "SET_META_CONTEXT", 11: "EXTENDED_HEADERS",
}
REPS = {
    1: "ACK", 2: "SERVER", 3: "INFO", 4: "META_CONTEXT",
    0x80000001: "ERR_UNSUP", 0x80000002: "ERR_POLICY",
    0x80000003: "ERR_INVALID", 0x80000004: "ERR_PLATFORM",
    0x80000005: "ERR_TLS_REQD", 0x80000006: "ERR_UNKNOWN",
    0x80000007: "ERR_SHUTDOWN", 0x80000008: "ERR_BLOCK_SIZE_REQD",
    0x80000009: "ERR_TOO_BIG", 0x8000000A: "ERR_EXT_HEADER_REQD",
}
INFOS = {0: "EXPORT", 1: "NAME", 2: "DESCRIPTION", 3: "BLOCK_SIZE"}
CMDS = {
    0: "READ", 1: "WRITE", 2: "DISC", 3: "FLUSH", 4: "TRIM", 5: "CACHE",
    6: "WRITE_ZEROES", 7: "BLOCK_STATUS", 8: "RESIZE",
}
CMD_FLAGS = {1: "FUA", 2: "NO_HOLE", 4: "DF", 8: "REQ_ONE", 16: "FAST_ZERO",
             32: "PAYLOAD_LEN"}
TX_FLAGS = {
    1: "HAS_FLAGS", 2: "READ_ONLY", 4: "SEND_FLUSH", 8: "SEND_FUA",
    16: "ROTATIONAL", 32: "SEND_TRIM", 64: "SEND_WRITE_ZEROES", 128: "SEND_DF",
    256: "CAN_MULTI_CONN", 512: "SEND_RESIZE", 1024: "SEND_CACHE",
    2048: "SEND_FAST_ZERO", 4096: "BLOCK_STATUS_PAYLOAD",
}
HS_FLAGS = {1: "FIXED_NEWSTYLE", 2: "NO_ZEROES"}
CHUNKS = {0: "NONE", 1: "OFFSET_DATA", 2: "OFFSET_HOLE", 5: "BLOCK_STATUS",
          6: "BLOCK_STATUS_EXT", 0x8001: "ERROR", 0x8002: "ERROR_OFFSET"}


def flagnames(value, table):
    names = [n for bit, n in sorted(table.items()) if value & bit]
    rest = value & ~sum(table)
    if rest:
        names.append("0x%x" % rest)
    return "|".join(names) if names else "0"


class Closed(Exception):
    pass


class Pipe:
    """Reads exact byte counts from one socket and forwards them to another."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst

    def take(self, n, forward=True):
        """Read exactly n bytes; forward them now unless forward=False (the
        caller then records what they mean first and calls send())."""
        buf = bytearray()
        while len(buf) < n:
            chunk = self.src.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise Closed()
            buf += chunk
        if forward:
            self.dst.sendall(buf)
        return bytes(buf)

    def send(self, data):
        self.dst.sendall(data)

    def skip(self, n):
        while n > 0:
            chunk = self.src.recv(min(n, 1 << 20))
            if not chunk:
                raise Closed()
            self.dst.sendall(chunk)
            n -= len(chunk)

    def peek(self, n):
        while True:
            data = self.src.recv(n, socket.MSG_PEEK | socket.MSG_WAITALL)
            if not data:
                raise Closed()
            if len(data) >= n:
                return data

    def raw(self):
        while True:
            chunk = self.src.recv(1 << 20)
            if not chunk:
                raise Closed()
            self.dst.sendall(chunk)


def parse_name_and_rest(data):
    if len(data) < 4:
        return None, data
    (nlen,) = struct.unpack(">I", data[:4])
    return data[4:4 + nlen].decode("utf-8", "replace"), data[4 + nlen:]


# ---------------------------------------------------------------- session

class Session:
    def __init__(self, cid, log, show):
        self.cid, self.log_fn, self.show = cid, log, show
        self.lock = threading.Lock()
        self.pending_opts = []          # options sent, waiting for final reply
        self.structured = False
        self.extended = False
        self.no_zeroes = False
        self.in_flight = {}             # cookie -> (cmd, length)
        self.max_in_flight = 0
        self.cmd_counts = {}            # (cmd, flags) -> [count, min_len, max_len]
        self.shown = {}
        self.reply_kinds = {}
        self.errors = {}
        self.options = []               # one line per client option (summary)
        self.started = time.monotonic()

    def log(self, msg):
        self.log_fn("[conn %d] %s" % (self.cid, msg))

    # ---- client -> server
    def client_stream(self, p):
        cflags = struct.unpack(">I", p.take(4))[0]
        self.no_zeroes = bool(cflags & 2)
        self.log("client flags: %s" % flagnames(cflags, HS_FLAGS))
        while True:
            head = p.peek(4)
            if head == IHAVEOPT[:4]:
                # Record the option before the server can see it, so the
                # server side always knows which option a reply answers.
                hdr = p.take(16, forward=False)
                opt, length = struct.unpack(">II", hdr[8:16])
                data = p.take(length, forward=False) if length else b""
                self.describe_option(opt, data)
                p.send(hdr + data)
                if opt == 5:       # STARTTLS: the rest is encrypted
                    self.log("STARTTLS: no further decoding")
                    p.raw()
                if opt in (1, 2):  # EXPORT_NAME / ABORT end option haggling
                    if opt == 2:
                        p.raw()
                    break
                continue
            break
        self.transmission_requests(p)

    def describe_option(self, opt, data):
        name = OPTS.get(opt, "unknown(%d)" % opt)
        text = name
        if opt in (6, 7):
            export, rest = parse_name_and_rest(data)
            infos = []
            if len(rest) >= 2:
                (n,) = struct.unpack(">H", rest[:2])
                for i in range(n):
                    (t,) = struct.unpack(">H", rest[2 + 2 * i:4 + 2 * i])
                    infos.append(INFOS.get(t, str(t)))
            text += " export=%r info_requests=[%s]" % (export, ",".join(infos))
        elif opt in (9, 10):
            export, rest = parse_name_and_rest(data)
            queries = []
            if len(rest) >= 4:
                (n,) = struct.unpack(">I", rest[:4])
                off = 4
                for _ in range(n):
                    (ql,) = struct.unpack(">I", rest[off:off + 4])
                    queries.append(rest[off + 4:off + 4 + ql].decode())
                    off += 4 + ql
            text += " export=%r queries=%s" % (export, queries)
        elif opt == 1:
            text += " export=%r" % data.decode("utf-8", "replace")
        elif data:
            text += " (%d bytes of data)" % len(data)
        with self.lock:
            self.pending_opts.append(opt)
        self.options.append(text)
        self.log("C> NBD_OPT_%s" % text)

    def transmission_requests(self, p):
        while True:
            (magic,) = struct.unpack(">I", p.peek(4))
            # Requests are registered before they are forwarded: a reply
            # can never overtake the bookkeeping of its request.
            if magic == REQUEST_MAGIC:
                hdr = p.take(28, forward=False)
                _, flags, cmd, cookie, offset, length = struct.unpack(
                    ">IHHQQI", hdr)
            elif magic == EXT_REQUEST_MAGIC:
                hdr = p.take(32, forward=False)
                _, flags, cmd, cookie, offset, length = struct.unpack(
                    ">IHHQQQ", hdr)
            else:
                self.log("C> unexpected magic 0x%08x, passing through" % magic)
                p.raw()
            with self.lock:
                if cmd != 2:
                    self.in_flight[cookie] = (cmd, length)
                    self.max_in_flight = max(self.max_in_flight,
                                             len(self.in_flight))
                key = (CMDS.get(cmd, str(cmd)), flagnames(flags, CMD_FLAGS))
                entry = self.cmd_counts.setdefault(key, [0, length, length])
                entry[0] += 1
                entry[1] = min(entry[1], length)
                entry[2] = max(entry[2], length)
                n = self.shown.get(cmd, 0)
                self.shown[cmd] = n + 1
            p.send(hdr)
            if n < self.show:
                self.log("C> %s flags=%s offset=%d length=%d" %
                         (key[0], key[1], offset, length))
            has_payload = cmd == 1 or (
                magic == EXT_REQUEST_MAGIC and flags & 32)
            if has_payload:
                p.skip(length)
            if cmd == 2:
                p.raw()

    # ---- server -> client
    def server_stream(self, p):
        greet = p.take(16)
        if greet[:8] != NBDMAGIC:
            self.log("S> not an NBD server greeting; passing through")
            p.raw()
        (second,) = struct.unpack(">Q", greet[8:16])
        if second == OLDSTYLE_MAGIC:
            self.log("S> oldstyle handshake; not decoded")
            p.raw()
        (hflags,) = struct.unpack(">H", p.take(2))
        self.log("S> newstyle greeting, handshake flags: %s" %
                 flagnames(hflags, HS_FLAGS))
        while True:
            with self.lock:
                front = self.pending_opts[0] if self.pending_opts else None
            if front == 1:   # EXPORT_NAME: bare size + flags
                data = p.take(10)
                size, tflags = struct.unpack(">QH", data)
                self.log("S> export size=%d transmission flags=%s" %
                         (size, flagnames(tflags, TX_FLAGS)))
                if not self.no_zeroes:
                    p.take(124)
                break
            hdr = p.take(20)
            magic, opt, rtype, length = struct.unpack(">QIII", hdr)
            if magic != OPT_REPLY_MAGIC:
                self.log("S> bad option reply magic; passing through")
                p.raw()
            data = p.take(length) if length else b""
            self.describe_reply(opt, rtype, data)
            final = rtype == 1 or rtype & 0x80000000
            if final:
                with self.lock:
                    if self.pending_opts:
                        self.pending_opts.pop(0)
                if opt == 8 and rtype == 1:
                    self.structured = True
                if opt == 11 and rtype == 1:
                    self.extended = True
                if opt == 7 and rtype == 1:
                    break
        self.transmission_replies(p)

    def describe_reply(self, opt, rtype, data):
        oname = OPTS.get(opt, "unknown(%d)" % opt)
        rname = REPS.get(rtype, "0x%x" % rtype)
        extra = ""
        if rtype == 3 and len(data) >= 2:
            (itype,) = struct.unpack(">H", data[:2])
            iname = INFOS.get(itype, str(itype))
            if itype == 0 and len(data) >= 12:
                size, tflags = struct.unpack(">QH", data[2:12])
                extra = " %s size=%d flags=%s" % (
                    iname, size, flagnames(tflags, TX_FLAGS))
            elif itype == 3 and len(data) >= 14:
                mn, pref, mx = struct.unpack(">III", data[2:14])
                extra = " %s min=%d preferred=%d max=%d" % (iname, mn, pref, mx)
            else:
                extra = " %s %r" % (iname, data[2:].decode("utf-8", "replace"))
        elif rtype == 4 and len(data) >= 4:
            (ctx,) = struct.unpack(">I", data[:4])
            extra = " id=%d %s" % (ctx, data[4:].decode("utf-8", "replace"))
        elif rtype == 2:
            name, _ = parse_name_and_rest(data)
            extra = " %r" % name
        elif rtype & 0x80000000 and data:
            extra = " %r" % data.decode("utf-8", "replace")
        self.log("S> reply to %s: %s%s" % (oname, rname, extra))

    def finish_request(self, cookie, err, kind):
        with self.lock:
            self.reply_kinds[kind] = self.reply_kinds.get(kind, 0) + 1
            entry = self.in_flight.pop(cookie, None)
            if err:
                name = CMDS.get(entry[0], "?") if entry else "?"
                k = "%s errno=%d" % (name, err)
                self.errors[k] = self.errors.get(k, 0) + 1

    def transmission_replies(self, p):
        # A request stops counting as in flight when the server starts its
        # final reply: the bookkeeping happens before the header is
        # forwarded, so the client cannot send the next request first.
        self.log("transmission phase (structured=%s extended=%s)" %
                 (self.structured, self.extended))
        while True:
            (magic,) = struct.unpack(">I", p.peek(4))
            if magic == SIMPLE_REPLY_MAGIC:
                hdr = p.take(16, forward=False)
                _, err, cookie = struct.unpack(">IIQ", hdr)
                with self.lock:
                    entry = self.in_flight.get(cookie)
                self.finish_request(cookie, err, "simple")
                p.send(hdr)
                if entry and entry[0] == 0 and err == 0:
                    p.skip(entry[1])
            elif magic in (STRUCTURED_REPLY_MAGIC, EXT_REPLY_MAGIC):
                if magic == STRUCTURED_REPLY_MAGIC:
                    hdr = p.take(20, forward=False)
                    _, flags, ctype, cookie, length = struct.unpack(
                        ">IHHQI", hdr)
                else:
                    hdr = p.take(32, forward=False)
                    _, flags, ctype, cookie, _off, length = struct.unpack(
                        ">IHHQQQ", hdr)
                payload_head = b""
                if ctype & 0x8000 and length >= 4:
                    payload_head = p.take(4, forward=False)
                kind = "chunk:" + CHUNKS.get(ctype, str(ctype))
                with self.lock:
                    self.reply_kinds[kind] = self.reply_kinds.get(kind, 0) + 1
                if flags & 1:
                    err = struct.unpack(">I", payload_head)[0] if payload_head else 0
                    self.finish_request(cookie, err, "structured-done")
                p.send(hdr + payload_head)
                p.skip(length - len(payload_head))
            else:
                self.log("S> unexpected reply magic 0x%08x; passing through" %
                         magic)
                p.raw()

    def summary(self):
        secs = time.monotonic() - self.started
        lines = ["summary (%.1f s):" % secs,
                 "  options sent: " + " ; ".join(self.options),
                 "  structured replies: %s, extended headers: %s" %
                 (self.structured, self.extended),
                 "  max requests in flight: %d" % self.max_in_flight]
        for (cmd, flags), (count, lo, hi) in sorted(self.cmd_counts.items()):
            lines.append("  %-13s flags=%-12s count=%-8d length %d..%d" %
                         (cmd, flags, count, lo, hi))
        if self.reply_kinds:
            lines.append("  server reply kinds: " + ", ".join(
                "%s=%d" % kv for kv in sorted(self.reply_kinds.items())))
        if self.errors:
            lines.append("  errors: " + ", ".join(
                "%s x%d" % kv for kv in sorted(self.errors.items())))
        self.log("\n".join(lines))


# ---------------------------------------------------------------- plumbing

def parse_addr(text):
    if text.startswith("unix:"):
        return socket.AF_UNIX, text[5:]
    host, _, port = text.rpartition(":")
    return socket.AF_INET, (host or "127.0.0.1", int(port))


def main():
    ap = argparse.ArgumentParser(description="logging NBD proxy")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--log", help="append to this file instead of stderr")
    ap.add_argument("--show", type=int, default=3,
                    help="requests of each command type to print verbatim")
    ap.add_argument("--exit-after", type=int, default=0,
                    help="exit after this many connections have closed")
    ap.add_argument("--max-seconds", type=float, default=3600,
                    help="exit after this long whatever happens")
    args = ap.parse_args()

    out = open(args.log, "a", buffering=1) if args.log else sys.stderr
    out_lock = threading.Lock()

    def log(msg):
        with out_lock:
            out.write(msg + "\n")
            out.flush()

    fam, addr = parse_addr(args.listen)
    lsock = socket.socket(fam, socket.SOCK_STREAM)
    if fam == socket.AF_UNIX:
        if os.path.exists(addr):
            os.unlink(addr)
    else:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(addr)
    lsock.listen(16)
    ufam, uaddr = parse_addr(args.upstream)
    log("nbd-trace: listening on %s, forwarding to %s" %
        (args.listen, args.upstream))

    done = threading.Semaphore(0)
    closed = [0]

    def stop(*_):
        log("nbd-trace: stopping")
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    timer = threading.Timer(args.max_seconds, stop)
    timer.daemon = True
    timer.start()

    def handle(cid, csock):
        try:
            usock = socket.socket(ufam, socket.SOCK_STREAM)
            usock.connect(uaddr)
        except OSError as exc:
            log("[conn %d] upstream connect failed: %s" % (cid, exc))
            csock.close()
            return
        for s in (csock, usock):
            if s.family == socket.AF_INET:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sess = Session(cid, log, args.show)

        def run(fn, pipe, other):
            try:
                fn(pipe)
            except (Closed, OSError, struct.error):
                pass
            finally:
                for s in other:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t1 = threading.Thread(target=run, daemon=True, args=(
            sess.client_stream, Pipe(csock, usock), (csock, usock)))
        t2 = threading.Thread(target=run, daemon=True, args=(
            sess.server_stream, Pipe(usock, csock), (csock, usock)))
        t1.start()
        t2.start()
        t1.join()
        t2.join()
        csock.close()
        usock.close()
        sess.summary()
        closed[0] += 1
        if args.exit_after and closed[0] >= args.exit_after:
            done.release()

    def acceptor():
        cid = 0
        while True:
            csock, _ = lsock.accept()
            cid += 1
            log("[conn %d] accepted" % cid)
            threading.Thread(target=handle, args=(cid, csock),
                             daemon=True).start()

    threading.Thread(target=acceptor, daemon=True).start()
    done.acquire()
    log("nbd-trace: %d connection(s) closed, exiting" % closed[0])
    out.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

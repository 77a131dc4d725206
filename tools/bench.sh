#!/usr/bin/env bash
# tools/bench.sh — one fio matrix against several NBD servers in the same run.
#
# Every server gets a fresh disk image with identical contents, is started,
# measured with the same fio jobs (ioengine=nbd) and stopped before the next
# one starts: servers never run at the same time.  The first server of the
# list is the reference (nbdkit's file plugin by default); the final markdown
# table gives every figure and its ratio to the reference, ready to paste into
# docs/benchmarks.md, followed by the exact command line that produced it.
#
# Usage: tools/bench.sh [options]
#   --only LIST        servers to run, comma separated, in order (default:
#                      nbdkit,twinbd).  Built-in servers: nbdkit, twinbd
#                      (one node, promoted by force), pair (two twinbd nodes
#                      on loopback, alpha primary replicating to beta, both
#                      on SERVER_CPUS; best with --order matrix since each
#                      start waits for a full initial sync), alone (alpha of a
#                      two-node resource whose peer never starts: every write
#                      is marked out of sync for the peer).  The first one
#                      is the reference unless --ref says otherwise.
#   --server NAME=URI  also measure an NBD server that is already running at
#                      URI (not started/stopped here; its disk is filled by
#                      writing through it).  May be repeated.
#   --ref NAME         reference server for the ratio column (default: first)
#   --size SIZE        disk image size, e.g. 1G, 512M (env SIZE, default 1G)
#   --runtime SEC      seconds per fio job (env RUNTIME, default 10)
#   --ramp SEC         fio ramp_time before measuring (env RAMP, default 1)
#   --repeat N         measure everything N times, report the median and
#                      list every run (env REPEAT, default 1)
#   --dir DIR          where disk images go (env BENCH_DIR, default /var/tmp);
#                      all servers' images live on this one filesystem
#   --transport T      tcp (default) or unix (env TRANSPORT)
#   --fill MODE        copy: copy one deterministic pseudo-random seed file
#                      into each fresh image (default); server: create a
#                      sparse image and fill it by a sequential fio write
#                      through the server before the matrix (env FILL)
#   --tests LIST       subset of: rw4k_qd1,rw4k_qd32,rr4k_qd32,sw1m_qd8,sr1m_qd8
#   --order MODE       test (default): for each test, every server in turn,
#                      each on a fresh image and freshly started, so that the
#                      figures compared were measured seconds apart;
#                      matrix: each server runs the whole matrix on one image
#                      (fewer restarts; use it for slow-to-start servers such
#                      as pair).  Either way repeats alternate the server order
#                      (A B, B A, ...).  (env ORDER)
#   --no-drop-caches   do not drop the page cache before each server
#   --no-pin           do not pin (see PIN below)
#   --keep             keep the work directory (fio JSON, server logs)
#   --out FILE         also write the report (markdown) to FILE
#   -h, --help
#
# Environment:
#   TWINBD               twinbd binary (default: <repo>/target/release/twinbd,
#                        built with `cargo build --release` if missing)
#   TWINBD_CMD_OVERRIDE  shell command run (bash -c) instead of the twinbd
#                        CLI for the "twinbd" slot, to test this script
#                        without the daemon.  It must stay in the foreground
#                        and serve NBD at $NBD_ADDR; it gets DISK, PORT (empty
#                        for unix), SOCK (empty for tcp), NBD_ADDR, WORKDIR.
#                        Example (tcp):
#                        'exec nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$PORT" file "$DISK"'
#   NBDKIT_THREADS       nbdkit --threads value (default: nbdkit's own, 16)
#   NBDKIT_PLUGIN_ARGS   extra file-plugin arguments, e.g. "cache=none"
#   PAIR_SYNC_TIMEOUT    seconds to wait for the pair's initial sync (600)
#   PIN                  1 (default with 2+ CPUs): servers run on SERVER_CPUS
#                        (default: all but CPU 0), fio on CLIENT_CPUS (default
#                        0), via taskset, so client and server never fight for
#                        one CPU and every server gets the same CPUs; 0 = off
#
# Numbers: IOPS and MB/s (10^6 bytes/s) from fio's JSON; latency is fio's
# total latency (lat_ns, submission + completion) 50th percentile in µs.
# The ratio is server ÷ reference: above 1 is better for IOPS and MB/s,
# worse for latency.  A second table gives the CPU each request cost, in µs:
# the machine's busy time (/proc/stat) and the user+system time of fio and of
# each server process (/proc/PID/stat, every thread) over the measured window
# (from the end of the ramp to half a second before the end), divided by
# fio's IOPS times the window.  Interrupt and softirq work is charged to
# whichever process it ran in (loopback TCP receives run in the sender's), so
# read the machine column first.
#
# Comparability: fio's random offsets use its fixed default seed
# (randrepeat=1); the seed image is the same bytes on every run (AES-CTR
# keystream of a fixed key); every server starts on a fresh copy with the
# page cache dropped (when /proc/sys/vm/drop_caches is writable; the pair
# drops it again once its initial sync is done); with
# --order test the two figures of a row are measured seconds apart.
#
# Noise: on the project's 2-vCPU machine two identical nbdkit servers differ
# by up to 20-30% on a single 10 s run, and whole runs drift by a third from
# one minute to the next (shared host).  Use REPEAT=3 or more, read the
# "every run" lines, and do not read much into ratios within 0.8-1.2.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

# The command line, exactly as given, with the settings that came from the
# environment, so the report says how to reproduce it.
ORIG_ARGS=("$@")
shquote() {                 # quote for a shell only when needed
    if [[ "$1" =~ ^[A-Za-z0-9_./:,=+@%-]+$ ]]; then
        printf '%s' "$1"
    else
        local sq="'" rep="'\\''"
        printf "'%s'" "${1//$sq/$rep}"
    fi
}
env_prefix=""
for v in RUNTIME SIZE REPEAT RAMP BENCH_DIR TRANSPORT FILL ORDER TESTS TWINBD \
         TWINBD_CMD_OVERRIDE NBDKIT_THREADS NBDKIT_PLUGIN_ARGS PIN SERVER_CPUS \
         CLIENT_CPUS; do
    if [ -n "${!v:-}" ]; then
        env_prefix+="$v=$(shquote "${!v}") "
    fi
done

RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1G}
REPEAT=${REPEAT:-1}
RAMP=${RAMP:-1}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
TRANSPORT=${TRANSPORT:-tcp}
FILL=${FILL:-copy}
ORDER=${ORDER:-test}
TESTS=${TESTS:-rw4k_qd1,rw4k_qd32,rr4k_qd32,sw1m_qd8,sr1m_qd8}
DROP_CACHES=1
NCPU=$(nproc)
if [ "$NCPU" -ge 2 ]; then PIN=${PIN:-1}; else PIN=0; fi
if [ "$NCPU" -gt 2 ]; then SERVER_CPUS=${SERVER_CPUS:-1-$((NCPU - 1))}; else SERVER_CPUS=${SERVER_CPUS:-1}; fi
CLIENT_CPUS=${CLIENT_CPUS:-0}
KEEP=0
OUT=""
REF=""
SERVERS=(nbdkit twinbd)
declare -A EXTERNAL_URI=()

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "bench: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --only) IFS=, read -r -a SERVERS <<<"$2"; shift 2 ;;
        --server)
            [[ "$2" == *=* ]] || die "--server wants NAME=URI"
            name=${2%%=*}; EXTERNAL_URI[$name]=${2#*=}
            SERVERS+=("$name"); shift 2 ;;
        --ref) REF=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --ramp) RAMP=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --dir) BENCH_DIR=$2; shift 2 ;;
        --transport) TRANSPORT=$2; shift 2 ;;
        --fill) FILL=$2; shift 2 ;;
        --order) ORDER=$2; shift 2 ;;
        --tests) TESTS=$2; shift 2 ;;
        --no-drop-caches) DROP_CACHES=0; shift ;;
        --no-pin) PIN=0; shift ;;
        --keep) KEEP=1; shift ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

# --only may name an external server given by a later --server: keep order,
# drop duplicates.
declare -A seen=()
uniq_servers=()
for s in "${SERVERS[@]}"; do
    [ -n "$s" ] || continue
    if [ -z "${seen[$s]:-}" ]; then seen[$s]=1; uniq_servers+=("$s"); fi
done
SERVERS=("${uniq_servers[@]}")
[ ${#SERVERS[@]} -gt 0 ] || die "no server to measure"
REF=${REF:-${SERVERS[0]}}
[ -n "${seen[$REF]:-}" ] || die "reference server '$REF' is not in the server list"

[[ "$RUNTIME" =~ ^[0-9]+$ && "$RUNTIME" -gt 0 ]] || die "bad runtime: $RUNTIME"
[[ "$RAMP" =~ ^[0-9]+$ ]] || die "bad ramp: $RAMP"
[[ "$REPEAT" =~ ^[0-9]+$ && "$REPEAT" -gt 0 ]] || die "bad repeat: $REPEAT"
case "$TRANSPORT" in tcp|unix) ;; *) die "transport must be tcp or unix" ;; esac
case "$FILL" in copy|server) ;; *) die "fill must be copy or server" ;; esac
case "$ORDER" in test|matrix) ;; *) die "order must be test or matrix" ;; esac
SIZE_BYTES=$(numfmt --from=iec "$SIZE" 2>/dev/null) || die "bad size: $SIZE"
[ "$SIZE_BYTES" -ge $((16 << 20)) ] || die "size must be at least 16M"

# ---------------------------------------------------------------- the matrix
# id | fio rw | bs | iodepth | title used in the table
declare -A T_RW=([rw4k_qd1]=randwrite [rw4k_qd32]=randwrite [rr4k_qd32]=randread
                 [sw1m_qd8]=write [sr1m_qd8]=read)
declare -A T_BS=([rw4k_qd1]=4k [rw4k_qd32]=4k [rr4k_qd32]=4k [sw1m_qd8]=1M [sr1m_qd8]=1M)
declare -A T_QD=([rw4k_qd1]=1 [rw4k_qd32]=32 [rr4k_qd32]=32 [sw1m_qd8]=8 [sr1m_qd8]=8)
IFS=, read -r -a TEST_LIST <<<"$TESTS"
for t in "${TEST_LIST[@]}"; do
    [ -n "${T_RW[$t]:-}" ] || die "unknown test '$t' (known: ${!T_RW[*]})"
done

for tool in fio python3 numfmt timeout nbdinfo; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
# on_server_cpus / on_client_cpus CMD...: run CMD pinned (exec, same pid).
SERVER_PIN=(); CLIENT_PIN=()
if [ "$PIN" = 1 ]; then
    command -v taskset >/dev/null || die "taskset is required for pinning (or --no-pin)"
    SERVER_PIN=(taskset -c "$SERVER_CPUS"); CLIENT_PIN=(taskset -c "$CLIENT_CPUS")
    PIN_NOTE="servers pinned to CPU $SERVER_CPUS, fio to CPU $CLIENT_CPUS"
else
    PIN_NOTE="no CPU pinning"
fi

# ---------------------------------------------------------------- bookkeeping
WORK=$(mktemp -d "$BENCH_DIR/twinbd-bench.XXXXXX")
declare -A PIDS=()          # pid -> label, every process started here
NBDKIT_PID=""; TWINBD_PIDS=(); PAIR_PIDS=()
SERVER_PIDS=()              # the processes of the server being measured

stop_pid() {                # stop_pid PID LABEL [SECONDS]: TERM, bounded wait, KILL
    local pid=$1 label=$2 secs=${3:-15} i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; unset "PIDS[$pid]"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$label (pid $pid) ignored SIGTERM for ${secs}s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$pid]"
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${!PIDS[@]}"; do
        stop_pid "$pid" "${PIDS[$pid]}" 10
    done
    if [ "$KEEP" = 1 ]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# nbd_endpoint DIR NAME: sets EP_PORT/EP_SOCK, EP_ADDR (twinbd's "nbd" key
# syntax) and EP_URI (for fio/nbdinfo).
nbd_endpoint() {
    if [ "$TRANSPORT" = tcp ]; then
        EP_PORT=$(free_port); EP_SOCK=""
        EP_ADDR="127.0.0.1:$EP_PORT"; EP_URI="nbd://127.0.0.1:$EP_PORT/"
    else
        EP_PORT=""; EP_SOCK="$1/$2.nbd.sock"
        EP_ADDR="unix:$EP_SOCK"; EP_URI="nbd+unix:///?socket=$EP_SOCK"
    fi
}

# wait_nbd URI PID SECONDS: until a full NBD handshake succeeds.
wait_nbd() {
    local uri=$1 pid=$2 secs=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            log "server (pid $pid) exited before serving $uri"; return 1
        fi
        if timeout 5 nbdinfo --size "$uri" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    log "no NBD service at $uri after ${secs}s"; return 1
}

# ---------------------------------------------------------------- servers
# A server NAME is a pair of functions:
#   start_server_NAME DIR DISK   start it on DISK (a fresh image), set
#                                SERVER_URI, register pids in PIDS; non-zero
#                                on failure
#   stop_server_NAME DIR         stop it (bounded), leaving nothing behind
# Adding a server is adding these two functions.

# -- nbdkit, the reference: nbdkit's file plugin, default settings.
start_server_nbdkit() {
    local dir=$1 disk=$2 args=(-f --exit-with-parent) pid
    nbd_endpoint "$dir" nbdkit
    if [ -n "$EP_PORT" ]; then args+=(-i 127.0.0.1 -p "$EP_PORT"); else args+=(-U "$EP_SOCK"); fi
    [ -n "${NBDKIT_THREADS:-}" ] && args+=(--threads "$NBDKIT_THREADS")
    # shellcheck disable=SC2086  # NBDKIT_PLUGIN_ARGS is a word list on purpose
    "${SERVER_PIN[@]}" nbdkit "${args[@]}" file "$disk" ${NBDKIT_PLUGIN_ARGS:-} 2>"$dir/nbdkit.log" &
    pid=$!; PIDS[$pid]=nbdkit; NBDKIT_PID=$pid
    SERVER_URI=$EP_URI
    wait_nbd "$SERVER_URI" "$pid" 20
}
stop_server_nbdkit() { stop_pid "$NBDKIT_PID" nbdkit 10; }

# -- twinbd, one node, promoted by force (no peer).
twinbd_bin() {
    local bin=${TWINBD:-$REPO_DIR/target/release/twinbd}
    if [ ! -x "$bin" ]; then
        if [ -n "${TWINBD:-}" ]; then die "TWINBD=$bin is not executable"; fi
        log "building twinbd (cargo build --release) ..."
        (cd "$REPO_DIR" && cargo build --release >&2) || die "cargo build failed"
    fi
    echo "$bin"
}

# twinbd_resource FILE NAME DIR NODE:DISK:NBD_ADDR:REPL_PORT ...
# (NBD_ADDR may itself hold a colon; fields are split from the left/right.)
twinbd_resource() {
    local file=$1 rname=$2 dir=$3; shift 3
    {
        printf '[resource]\nname = "%s"\nsecret = "bench-secret"\n' "$rname"
        local spec node disk rest nbd repl
        for spec in "$@"; do
            node=${spec%%:*}; rest=${spec#*:}
            disk=${rest%%:*}; rest=${rest#*:}
            repl=${rest##*:}; nbd=${rest%:*}
            printf '\n[[node]]\nname = "%s"\ndisk = "%s"\nmeta = "%s"\n' \
                "$node" "$disk" "$dir/$node.meta"
            printf 'replication = "127.0.0.1:%s"\nnbd = "%s"\nadmin = "%s"\n' \
                "$repl" "$nbd" "$dir/$node.admin.sock"
        done
    } >"$file"
}

# twinbd_start_node BIN CONF NODE DIR LABEL: create-md, run in background,
# wait for its admin socket.  Sets NODE_PID.
twinbd_start_node() {
    local bin=$1 conf=$2 node=$3 dir=$4 label=$5 i pid
    timeout 60 "$bin" create-md -c "$conf" -n "$node" >"$dir/$node.create-md.log" 2>&1 \
        || { log "create-md failed:"; cat "$dir/$node.create-md.log" >&2; return 1; }
    "${SERVER_PIN[@]}" "$bin" run -c "$conf" -n "$node" 2>"$dir/$node.log" &
    pid=$!; PIDS[$pid]=$label; NODE_PID=$pid
    for ((i = 0; i < 300; i++)); do
        [ -S "$dir/$node.admin.sock" ] && return 0
        kill -0 "$pid" 2>/dev/null || { log "$label exited:"; tail -20 "$dir/$node.log" >&2; return 1; }
        sleep 0.1
    done
    log "$label: no admin socket after 30s"; return 1
}

start_server_twinbd() {
    local dir=$1 disk=$2 pid
    nbd_endpoint "$dir" twinbd
    if [ -n "${TWINBD_CMD_OVERRIDE:-}" ]; then
        DISK=$disk PORT=$EP_PORT SOCK=$EP_SOCK NBD_ADDR=$EP_ADDR WORKDIR=$dir \
            "${SERVER_PIN[@]}" bash -c "$TWINBD_CMD_OVERRIDE" 2>"$dir/twinbd-override.log" &
        pid=$!; PIDS[$pid]="twinbd (override)"; TWINBD_PIDS=($pid)
        SERVER_URI=$EP_URI
        wait_nbd "$SERVER_URI" "$pid" 20
        return
    fi
    local bin=$TWINBD_BIN conf=$dir/bench.toml
    twinbd_resource "$conf" bench "$dir" "alpha:$disk:$EP_ADDR:$(free_port)"
    twinbd_start_node "$bin" "$conf" alpha "$dir" twinbd || return 1
    TWINBD_PIDS=("$NODE_PID")
    timeout 30 "$bin" promote -c "$conf" -n alpha --force >"$dir/promote.log" 2>&1 \
        || { log "promote failed:"; cat "$dir/promote.log" >&2; return 1; }
    SERVER_URI=$EP_URI
    wait_nbd "$SERVER_URI" "$NODE_PID" 30
}
stop_server_twinbd() {
    local pid
    for pid in "${TWINBD_PIDS[@]}"; do stop_pid "$pid" twinbd 30; done
    TWINBD_PIDS=()
}

# -- pair: two twinbd nodes on loopback, alpha primary, beta replicating
# (protocol C, the default).  Waits for the initial sync to finish before
# the matrix runs (status --json: connected, peer up_to_date, nothing out of
# sync).
start_server_pair() {
    local dir=$1 disk=$2 bin=$TWINBD_BIN i state
    local conf=$dir/pair.toml
    cp --sparse=always "$disk" "$dir/beta.img" 2>/dev/null || truncate -s "$SIZE_BYTES" "$dir/beta.img"
    nbd_endpoint "$dir" alpha; local alpha_addr=$EP_ADDR alpha_uri=$EP_URI
    nbd_endpoint "$dir" beta; local beta_addr=$EP_ADDR
    twinbd_resource "$conf" bench "$dir" \
        "alpha:$disk:$alpha_addr:$(free_port)" "beta:$dir/beta.img:$beta_addr:$(free_port)"
    PAIR_PIDS=()
    twinbd_start_node "$bin" "$conf" alpha "$dir" "twinbd alpha" || return 1
    PAIR_PIDS+=("$NODE_PID")
    twinbd_start_node "$bin" "$conf" beta "$dir" "twinbd beta" || return 1
    PAIR_PIDS+=("$NODE_PID")
    timeout 30 "$bin" promote -c "$conf" -n alpha --force >"$dir/promote.log" 2>&1 \
        || { log "promote failed:"; cat "$dir/promote.log" >&2; return 1; }
    local limit=${PAIR_SYNC_TIMEOUT:-600}
    for ((i = 0; i < limit; i++)); do
        state=$(timeout 10 "$bin" status -c "$conf" -n alpha --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
ok = (s["role"] == "primary" and s["connection"] == "connected"
      and s["peer"]["disk"] == "up_to_date" and s["out_of_sync_bytes"] == 0)
print("ready" if ok else "%s/%s oos=%s" % (s["connection"], s["peer"]["disk"], s["out_of_sync_bytes"]))
' 2>/dev/null || echo "no status")
        [ "$state" = ready ] && break
        [ $((i % 10)) = 0 ] && log "pair: waiting for sync ($state)"
        sleep 1
    done
    [ "$state" = ready ] || { log "pair not in sync after ${limit}s ($state)"; return 1; }
    # The initial sync read the whole source and wrote the whole target through the page
    # cache, leaving both files cached in large folios, where small random writes cost about
    # twice what they cost on a cold cache (measured: one node after `cat disk >/dev/null`,
    # 4K QD32 0.5x). Every other server starts cold; so does the pair's measurement.
    drop_caches
    SERVER_URI=$alpha_uri
    wait_nbd "$SERVER_URI" "${PAIR_PIDS[0]}" 30
}
stop_server_pair() {
    local pid
    for pid in "${PAIR_PIDS[@]}"; do stop_pid "$pid" "twinbd pair node" 30; done
    PAIR_PIDS=()
}

# -- alone: a primary whose configured peer never comes (disconnected operation:
# every write is marked out of sync for the peer's eventual return).
start_server_alone() {
    local dir=$1 disk=$2 bin=$TWINBD_BIN
    local conf=$dir/alone.toml
    nbd_endpoint "$dir" alpha; local alpha_addr=$EP_ADDR alpha_uri=$EP_URI
    nbd_endpoint "$dir" beta; local beta_addr=$EP_ADDR
    twinbd_resource "$conf" bench "$dir" \
        "alpha:$disk:$alpha_addr:$(free_port)" "beta:$dir/beta.img:$beta_addr:$(free_port)"
    twinbd_start_node "$bin" "$conf" alpha "$dir" "twinbd alpha (peer absent)" || return 1
    TWINBD_PIDS=("$NODE_PID")
    timeout 30 "$bin" promote -c "$conf" -n alpha --force >"$dir/promote.log" 2>&1 \
        || { log "promote failed:"; cat "$dir/promote.log" >&2; return 1; }
    SERVER_URI=$alpha_uri
    wait_nbd "$SERVER_URI" "$NODE_PID" 30
}
stop_server_alone() { stop_server_twinbd "$@"; }

# -- external servers (--server NAME=URI): already running, not ours to stop.
start_server_external() { SERVER_URI=${EXTERNAL_URI[$3]}; wait_nbd "$SERVER_URI" "" 10; }
stop_server_external() { :; }

for s in "${SERVERS[@]}"; do
    if [ -z "${EXTERNAL_URI[$s]:-}" ] && ! declare -F "start_server_$s" >/dev/null; then
        die "unknown server '$s' (built in: nbdkit twinbd pair alone; or --server NAME=URI)"
    fi
done

# The daemon's binary is found (or built) before anything is measured.
TWINBD_BIN=""
for s in "${SERVERS[@]}"; do
    if [ -z "${EXTERNAL_URI[$s]:-}" ] && { [ "$s" = pair ] || [ "$s" = alone ] ||
        { [ "$s" = twinbd ] && [ -z "${TWINBD_CMD_OVERRIDE:-}" ]; }; }; then
        TWINBD_BIN=$(twinbd_bin) || exit 1
        break
    fi
done

# ---------------------------------------------------------------- disks

SEED=""
make_seed() {               # deterministic pseudo-random bytes, made once
    SEED=$WORK/seed.img
    log "writing the $SIZE seed image"
    if command -v openssl >/dev/null; then
        openssl enc -aes-128-ctr -K 74776962656e6368736565640000000a \
            -iv 00000000000000000000000000000000 -in /dev/zero 2>/dev/null \
            | head -c "$SIZE_BYTES" >"$SEED" || true
    fi
    if [ "$(stat -c %s "$SEED" 2>/dev/null || echo 0)" != "$SIZE_BYTES" ]; then
        python3 - "$SEED" "$SIZE_BYTES" <<'EOF'
import random, sys
rng, left = random.Random(0x7477696E), int(sys.argv[2])
with open(sys.argv[1], "wb") as f:
    while left:
        n = min(left, 1 << 24)
        f.write(rng.randbytes(n))
        left -= n
EOF
    fi
}

drop_caches() {
    [ "$DROP_CACHES" = 1 ] || return 0
    sync
    if [ -w /proc/sys/vm/drop_caches ] && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        CACHES_NOTE="page cache dropped before each server"
    else
        CACHES_NOTE="page cache NOT dropped (no permission)"
    fi
}
CACHES_NOTE="page cache not dropped (--no-drop-caches)"

# cpu_ticks "PID..." PID...: one line, the machine's busy ticks (all CPUs:
# user, nice, system, irq, softirq, steal), then the user+system ticks of
# each argument (all threads, io_uring workers included; an argument of
# several pids is their sum; a process that is gone counts 0).
cpu_ticks() {
    local u n s irq sirq steal line group p t sum
    read -r _ u n s _ _ irq sirq steal _ </proc/stat
    line=$((u + n + s + irq + sirq + steal))
    for group in "$@"; do
        sum=0
        for p in $group; do
            t=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null) || t=0
            sum=$((sum + ${t:-0}))
        done
        line+=" $sum"
    done
    echo "$line"
}

# cpu_window FIO_PARENT OUTPUT: CPU ticks over the measured part of a timed
# fio run (after the ramp, until just before the end), for the machine, fio
# and the servers of SERVER_PIDS.  Writes three lines: start end CLK_TCK,
# then cpu_ticks at start and at the end.
cpu_window() {
    local parent=$1 out=$2 fpid p t0 t1 a b span
    sleep "$RAMP"
    # fio, and the processes it forks for its jobs
    fpid=$(pgrep -P "$parent" | tr '\n' ' ')
    for p in $fpid; do fpid+=" $(pgrep -P "$p" | tr '\n' ' ')"; done
    span=$(awk -v r="$RUNTIME" 'BEGIN { print (r > 2 ? r - 0.5 : r * 0.75) }')
    t0=$(date +%s.%N); a=$(cpu_ticks "${fpid:-0}" "${SERVER_PIDS[@]}")
    sleep "$span"
    t1=$(date +%s.%N); b=$(cpu_ticks "${fpid:-0}" "${SERVER_PIDS[@]}")
    printf '%s %s %s\n%s\n%s\n' "$t0" "$t1" "$(getconf CLK_TCK)" "$a" "$b" >"$out"
}

# run_fio URI NAME OUTPUT RW BS QD [timed]
run_fio() {
    local uri=$1 name=$2 out=$3 rw=$4 bs=$5 qd=$6 timed=${7:-1} args
    args=(--name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs"
          --iodepth="$qd" --numjobs=1 --randrepeat=1 --lat_percentiles=1
          --output-format=json --output="$out")
    local limit=1800 pid rc=0
    if [ "$timed" = 1 ]; then
        args+=(--time_based=1 --runtime="$RUNTIME" --ramp_time="$RAMP")
        limit=$((RUNTIME + RAMP + 120))
    fi
    # In the background so that SIGTERM/SIGINT reach the trap at once.
    timeout "$limit" "${CLIENT_PIN[@]}" fio "${args[@]}" >/dev/null 2>"$out.err" &
    pid=$!; PIDS[$pid]=fio
    local sampler=""
    if [ "$timed" = 1 ]; then
        cpu_window "$pid" "$out.cpu" &
        sampler=$!; PIDS[$sampler]="cpu sampler"
    fi
    wait "$pid" || rc=$?
    unset "PIDS[$pid]"
    if [ -n "$sampler" ]; then
        wait "$sampler" 2>/dev/null || rm -f "$out.cpu"
        unset "PIDS[$sampler]"
    fi
    return "$rc"
}

# ---------------------------------------------------------------- run

log "servers: ${SERVERS[*]} (reference: $REF); tests: ${TEST_LIST[*]}"
log "size $SIZE, runtime ${RUNTIME}s + ${RAMP}s ramp, repeat $REPEAT, transport $TRANSPORT, fill $FILL, order $ORDER; work dir $WORK"
[ "$FILL" = copy ] && make_seed
mkdir -p "$WORK/results"

# session SERVER REP TEST...: one server, fresh image, started, the tests
# run in order, stopped, image removed.
session() {
    local s=$1 rep=$2; shift 2
    local sdir=$WORK/run-$s-$rep-$1 kind=$s disk="" t out
    mkdir -p "$sdir" "$WORK/results/$s"
    if [ -n "${EXTERNAL_URI[$s]:-}" ]; then
        kind=external
    else
        disk=$sdir/disk.img
        if [ "$FILL" = copy ]; then
            cp --sparse=never "$SEED" "$disk"
        else
            truncate -s "$SIZE_BYTES" "$disk"
        fi
    fi
    drop_caches
    SERVER_URI=""
    if ! "start_server_$kind" "$sdir" "$disk" "$s"; then
        "stop_server_$kind" "$sdir" || true
        die "$s did not start; logs in $sdir (use --keep to keep them)"
    fi
    case $kind in
        nbdkit) SERVER_PIDS=("$NBDKIT_PID") ;;
        pair) SERVER_PIDS=("${PAIR_PIDS[@]}") ;;
        external) SERVER_PIDS=() ;;
        *) SERVER_PIDS=("${TWINBD_PIDS[@]}") ;;
    esac
    log "[$rep/$REPEAT] $s: serving at $SERVER_URI"
    if [ "$FILL" = server ] || [ "$kind" = external ]; then
        log "[$rep/$REPEAT] $s: filling the disk through the server"
        run_fio "$SERVER_URI" fill "$sdir/fill.json" write 1M 8 0 \
            || die "$s: fill failed: $(tail -3 "$sdir/fill.json.err")"
    fi
    for t in "$@"; do
        out=$WORK/results/$s/$t.$rep.json
        if run_fio "$SERVER_URI" "$t" "$out" "${T_RW[$t]}" "${T_BS[$t]}" "${T_QD[$t]}"; then
            log "[$rep/$REPEAT] $s: $t done"
        else
            log "[$rep/$REPEAT] $s: $t FAILED: $(tail -3 "$out.err" | tr '\n' ' ')"
            rm -f "$out"
        fi
    done
    "stop_server_$kind" "$sdir"
    # keep logs, drop the image: the next session gets a fresh one
    rm -f "$disk" "$sdir/beta.img"
}

for ((rep = 1; rep <= REPEAT; rep++)); do
    # every other repeat runs the servers in reverse order, so that neither
    # always goes first
    order=("${SERVERS[@]}")
    if [ $((rep % 2)) = 0 ]; then
        order=()
        for ((i = ${#SERVERS[@]} - 1; i >= 0; i--)); do order+=("${SERVERS[$i]}"); done
    fi
    if [ "$ORDER" = matrix ]; then
        for s in "${order[@]}"; do session "$s" "$rep" "${TEST_LIST[@]}"; done
    else
        for t in "${TEST_LIST[@]}"; do
            for s in "${order[@]}"; do session "$s" "$rep" "$t"; done
        done
    fi
done

# ---------------------------------------------------------------- report

cmdline="${env_prefix}tools/bench.sh"
for a in "${ORIG_ARGS[@]}"; do cmdline+=" $(shquote "$a")"; done
override_note=""
if [ -n "${TWINBD_CMD_OVERRIDE:-}" ]; then
    override_note="NOTE: the twinbd slot ran TWINBD_CMD_OVERRIDE, not twinbd: $TWINBD_CMD_OVERRIDE"
fi
setup="size $SIZE, fio time_based ${RUNTIME}s after ${RAMP}s ramp, median of $REPEAT, order $ORDER, transport $TRANSPORT, fill $FILL, $CACHES_NOTE, $PIN_NOTE; $(fio --version), $(nbdkit --version 2>/dev/null || echo 'nbdkit ?'); $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r); disks on $(df -P "$BENCH_DIR" | awk 'NR==2{print $1}')"

report=$(python3 - "$WORK/results" "$REF" "$cmdline" "$setup" "$override_note" \
    "$(IFS=,; echo "${SERVERS[*]}")" "$(IFS=,; echo "${TEST_LIST[*]}")" <<'EOF'
import json, os, statistics, sys, datetime

results, ref, cmdline, setup, note, servers, tests = sys.argv[1:8]
servers, tests = servers.split(","), tests.split(",")

TITLES = {
    "rw4k_qd1": [("randwrite 4k QD1, IOPS", "write", "iops"),
                 ("randwrite 4k QD1, p50 latency µs", "write", "p50")],
    "rw4k_qd32": [("randwrite 4k QD32, IOPS", "write", "iops")],
    "rr4k_qd32": [("randread 4k QD32, IOPS", "read", "iops")],
    "sw1m_qd8": [("seq write 1M QD8, MB/s", "write", "mbs")],
    "sr1m_qd8": [("seq read 1M QD8, MB/s", "read", "mbs")],
}

def figure(path, direction, what):
    with open(path) as f:
        job = json.load(f)["jobs"][0][direction]
    if what == "iops":
        return job["iops"]
    if what == "mbs":
        return job["bw_bytes"] / 1e6
    return job["lat_ns"]["percentile"]["50.000000"] / 1000.0

def cpu_per_request(path, direction):
    """(machine, fio, servers, each server...) CPU µs per request, or None."""
    try:
        with open(path + ".cpu") as f:
            lines = f.read().split("\n")
        t0, t1, hz = (float(x) for x in lines[0].split())
        a = [int(x) for x in lines[1].split()]
        b = [int(x) for x in lines[2].split()]
        with open(path) as f:
            iops = json.load(f)["jobs"][0][direction]["iops"]
    except (OSError, ValueError, IndexError, KeyError, json.JSONDecodeError):
        return None
    requests = iops * (t1 - t0)
    if requests <= 0 or len(a) != len(b) or len(a) < 2:
        return None
    us = [(y - x) / hz / requests * 1e6 for x, y in zip(a, b)]
    machine, fio, procs = us[0], us[1], us[2:]
    return [machine, fio, sum(procs)] + procs

def fmt(value, what):
    if value is None:
        return "FAIL"
    return "%.0f" % value if what == "iops" else "%.1f" % value

rows, details = [], []
for t in tests:
    for title, direction, what in TITLES[t]:
        med, raw = {}, {}
        for s in servers:
            d = os.path.join(results, s)
            vals = []
            for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                if name.startswith(t + ".") and name.endswith(".json"):
                    try:
                        vals.append(figure(os.path.join(d, name), direction, what))
                    except (KeyError, ValueError, IndexError, json.JSONDecodeError):
                        pass
            raw[s] = vals
            med[s] = statistics.median(vals) if vals else None
        row = [title] + [fmt(med[s], what) for s in servers]
        for s in servers:
            if s == ref:
                continue
            if med[s] is None or not med[ref]:
                row.append("—")
            else:
                row.append("%.2f" % (med[s] / med[ref]))
        rows.append(row)
        details.append((title, raw, what))

others = [s for s in servers if s != ref]
head = ["test"] + servers + ["%s/%s" % (s, ref) for s in others]
out = []
out.append("### fio over NBD, %s" % datetime.date.today().isoformat())
out.append("")
out.append("| " + " | ".join(head) + " |")
out.append("|" + "---|" + "---:|" * (len(head) - 1))
for r in rows:
    out.append("| " + " | ".join(r) + " |")
out.append("")
out.append("Ratio = server ÷ %s (above 1 is better, except for latency)." % ref)
out.append("Setup: %s." % setup)
if note:
    out.append("")
    out.append(note)
if any(len(v) > 1 for _, raw, _ in details for v in raw.values()):
    out.append("")
    out.append("Every run (median shown above):")
    out.append("")
    for title, raw, what in details:
        out.append("- %s: %s" % (title, "; ".join(
            "%s %s" % (s, " ".join(fmt(v, what) for v in raw[s])) for s in servers)))
cpu_rows = []
for t in tests:
    title, direction, what = TITLES[t][0]
    unit = title.split(",")[0]
    for s in servers:
        d = os.path.join(results, s)
        per = []
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if not (name.startswith(t + ".") and name.endswith(".json")):
                continue
            c = cpu_per_request(os.path.join(d, name), direction)
            if c:
                per.append(c)
        if per:
            cols = list(zip(*per))
            cpu_rows.append([unit, s] + ["%.1f" % statistics.median(c) for c in cols[:3]]
                            + ["/".join("%.1f" % statistics.median(c) for c in cols[3:]) or "—"])
if cpu_rows:
    out.append("")
    out.append("CPU per request, µs (medians; over the measured window, from /proc: the whole")
    out.append("machine, fio, all server processes together and each one):")
    out.append("")
    out.append("| test | server | machine | fio | server | each server process |")
    out.append("|---|---|---:|---:|---:|---:|")
    for r in cpu_rows:
        out.append("| " + " | ".join(r) + " |")
out.append("")
out.append("Command:")
out.append("")
out.append("    " + cmdline)
print("\n".join(out))
EOF
)
echo "$report"
if [ -n "$OUT" ]; then
    printf '%s\n' "$report" >"$OUT"
    log "report written to $OUT"
fi

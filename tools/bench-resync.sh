#!/usr/bin/env bash
# tools/bench-resync.sh — resync throughput against the slower of disk and link, same run.
#
# Measures, one after the other on this machine:
#   disk   sequential 1 MiB direct reads of the source's image and, at the same time,
#          direct writes of another file (fio libaio, 16 in flight each); the slower counts.
#          A resync reads the source's disk and writes the target's, with direct IO; here
#          both nodes' disks are files on one filesystem, so the disk does both at once
#   link   TCP throughput over loopback (iperf3, one stream)
#   full   the first full sync of a two-node pair (SIZE bytes, random data on the source,
#          flushed to its disk and dropped from the page cache first)
#   bitmap a bitmap resync after the secondary was away while the primary wrote CHANGED bytes
# and prints each resync rate with its ratio to min(disk, link).
#
# Usage: tools/bench-resync.sh            (env: SIZE=1G CHANGED=256M DIR=/var/tmp TWINBD=...)
# Needs: fio, iperf3, a release build (target/release/twinbd, built if missing).
set -euo pipefail

SIZE=${SIZE:-1G}
CHANGED=${CHANGED:-256M}
DIR=${DIR:-/var/tmp}
root=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TWINBD:-$root/target/release/twinbd}
[ -x "$BIN" ] || (cd "$root" && cargo build --release --quiet)

work=$(mktemp -d "$DIR/twinbd-resync.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

bytes() { numfmt --from=iec "$1"; }
size_b=$(bytes "$SIZE")
changed_b=$(bytes "$CHANGED")

drop_caches() {
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
}

# --- references -------------------------------------------------------------------------
# The source's image, random data, on the disk and out of the cache.
head -c "$size_b" /dev/urandom > "$work/alpha.img"
drop_caches
# A resync reads the source's disk and writes the target's, both with direct IO (the page
# cache would make the reference depend on whether the guest's pages were touched before).
# Both disks are on this filesystem: the reference reads and writes at once.
read -r disk_r disk_w < <(fio --output-format=json --direct=1 --bs=1M --size="$SIZE" \
    --ioengine=libaio --iodepth=16 \
    --name=read --rw=read --filename="$work/alpha.img" \
    --name=write --rw=write --filename="$work/ref.img" 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.index("{"):])["jobs"]; print(round(j[0]["read"]["bw_bytes"]/1e6), round(j[1]["write"]["bw_bytes"]/1e6))')
disk_mbs=$(( disk_w < disk_r ? disk_w : disk_r ))
rm -f "$work/ref.img"
iperf3 -s -1 -p 25201 >/dev/null 2>&1 &
pids+=($!)
sleep 0.3
link_mbs=$(iperf3 -c 127.0.0.1 -p 25201 -t 5 -J 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(round(j["end"]["sum_received"]["bits_per_second"]/8e6))')
ref=$(( disk_mbs < link_mbs ? disk_mbs : link_mbs ))

# --- the pair ---------------------------------------------------------------------------
conf=$work/r0.toml
cat > "$conf" <<EOF
[resource]
name = "r0"
secret = "bench"
[[node]]
name = "alpha"
disk = "$work/alpha.img"
meta = "$work/alpha.meta"
replication = "127.0.0.1:25789"
nbd = "127.0.0.1:25809"
admin = "$work/alpha.sock"
[[node]]
name = "beta"
disk = "$work/beta.img"
meta = "$work/beta.meta"
replication = "127.0.0.1:25790"
nbd = "127.0.0.1:25810"
admin = "$work/beta.sock"
EOF
chmod 600 "$conf"
truncate -s "$size_b" "$work/beta.img"
# The source's data is on its disk, not in flight to it, when the sync starts.
drop_caches
"$BIN" create-md -c "$conf" -n alpha >/dev/null
"$BIN" create-md -c "$conf" -n beta >/dev/null

start() {
    "$BIN" run -c "$conf" -n "$1" 2>>"$work/$1.log" &
    pids+=($!)
    eval "pid_$1=$!"
    for _ in $(seq 200); do [ -S "$work/$1.sock" ] && return 0; sleep 0.05; done
    echo "node $1 did not start" >&2; cat "$work/$1.log" >&2; exit 1
}
in_sync() {
    "$BIN" status -c "$conf" -n beta --json 2>/dev/null |
        python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["connection"]=="connected" and s["disk"]=="up_to_date" and s["resync"] is None else 1)'
}
resynced() {
    "$BIN" status -c "$conf" -n alpha --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["stats"]["resynced_bytes_total"])'
}
wait_sync() {
    for _ in $(seq 6000); do in_sync && return 0; sleep 0.01; done
    echo "no sync" >&2; exit 1
}

start alpha; start beta
sleep 0.5
t0=$(date +%s.%N)
"$BIN" promote -c "$conf" -n alpha --force >/dev/null
wait_sync
t1=$(date +%s.%N)
# The source logs each finished resync with its bytes and duration.
last_rate() {
    sed 's/\x1b\[[0-9;]*m//g' "$work/alpha.log" | grep 'resync finished' | tail -1 |
        sed -n 's/.*mb_per_s=\([0-9.]*\).*/\1/p'
}
full_mbs=$(last_rate)
full_wall=$(python3 -c "print(round($size_b/($t1-$t0)/1e6))")

# Bitmap resync: beta away, CHANGED bytes written in 1 MiB pieces spread over the device.
kill "$pid_beta"; wait "$pid_beta" 2>/dev/null || true
before=$(resynced)
fio --name=change --ioengine=nbd --uri=nbd://127.0.0.1:25809/r0 --rw=randwrite --bs=1M \
    --size="$SIZE" --io_size="$CHANGED" --randrepeat=0 --norandommap=0 >/dev/null 2>&1
start beta
t0=$(date +%s.%N)
sleep 0.05
wait_sync
t1=$(date +%s.%N)
after=$(resynced)
copied=$(( after - before ))
bitmap_mbs=$(last_rate)

echo "## resync throughput ($(date -u +%F), SIZE=$SIZE CHANGED=$CHANGED, files in $DIR)"
echo
echo "| measure | MB/s | ratio to min(disk, link) |"
echo "|---|---:|---:|"
echo "| disk: sequential 1 MiB direct writes / reads at once (fio libaio, 16 in flight) | $disk_w / $disk_r | |"
echo "| link: loopback TCP (iperf3, 1 stream) | $link_mbs | |"
echo "| full sync of $SIZE (from promote to up to date: $full_wall MB/s) | $full_mbs | $(python3 -c "print(round($full_mbs/$ref,2))") |"
echo "| bitmap resync: $copied bytes copied for $changed_b written | $bitmap_mbs | $(python3 -c "print(round($bitmap_mbs/$ref,2))") |"
echo
echo "command: SIZE=$SIZE CHANGED=$CHANGED DIR=$DIR tools/bench-resync.sh"

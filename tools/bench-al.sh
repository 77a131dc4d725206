#!/usr/bin/env bash
# tools/bench-al.sh — what the activity log costs on the replicated write path, same run.
#
# For each activity-log size in AL (in 4 MiB extents), a fresh pair (protocol C, loopback)
# is fully synced, then fio writes 4 KiB blocks at random over the whole device (QD32),
# twice: "cold" right after the sync (the log starts empty: the first write to each extent
# costs a metadata write), then "warm". A device of SIZE has SIZE/4 MiB extents; a log
# smaller than that keeps evicting, and most writes to an extent not in the log pay one
# metadata write + fdatasync before they go out. The report gives IOPS, metadata writes
# (`stats.activity_log_writes_total`) and each IOPS figure against the largest log's warm run.
#
# Usage: tools/bench-al.sh        (env: SIZE=1G AL="479 64 16" RUNTIME=10 DIR=/var/tmp TWINBD=...)
# Needs: fio, python3, a release build (target/release/twinbd, built if missing).
set -euo pipefail

SIZE=${SIZE:-1G}
AL=${AL:-479 64 16}
RUNTIME=${RUNTIME:-10}
DIR=${DIR:-/var/tmp}
root=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TWINBD:-$root/target/release/twinbd}
[ -x "$BIN" ] || (cd "$root" && cargo build --release --quiet)

work=$(mktemp -d "$DIR/twinbd-al.XXXXXX")
pids=()
stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
cleanup() {
    stop_all
    rm -rf "$work"
}
trap cleanup EXIT

size_b=$(numfmt --from=iec "$SIZE")
extents=$(( (size_b + (4 << 20) - 1) / (4 << 20) ))
head -c "$size_b" /dev/urandom > "$work/seed.img"
conf=$work/r0.toml

status_field() { # NODE PYTHON-EXPRESSION-ON-s
    "$BIN" status -c "$conf" -n "$1" --json 2>/dev/null |
        python3 -c "import json,sys; s=json.load(sys.stdin); print($2)"
}
start() {
    "$BIN" run -c "$conf" -n "$1" 2>>"$work/$1.log" &
    pids+=($!)
    for _ in $(seq 200); do [ -S "$work/$1.sock" ] && return 0; sleep 0.05; done
    echo "node $1 did not start" >&2; cat "$work/$1.log" >&2; exit 1
}
wait_sync() {
    for _ in $(seq 1200); do
        [ "$(status_field alpha 's["connection"]=="connected" and s["peer"]["disk"]=="up_to_date" and s["out_of_sync_bytes"]==0')" = True ] && return 0
        sleep 0.1
    done
    echo "pair did not sync" >&2; tail -5 "$work/alpha.log" "$work/beta.log" >&2; exit 1
}
run_fio() { # prints IOPS
    fio --name=al --ioengine=nbd --uri=nbd://127.0.0.1:25909/r0 --rw=randwrite --bs=4k \
        --iodepth=32 --size="$SIZE" --time_based --runtime="$RUNTIME" --randrepeat=0 \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.index("{"):]); print(round(j["jobs"][0]["write"]["iops"]))'
}

rows=()
ref=""
for al in $AL; do
    rm -f "$work"/*.meta "$work"/*.sock "$work"/*.log
    cat > "$conf" <<EOF
[resource]
name = "r0"
secret = "bench"
[sync]
al_extents = $al
[[node]]
name = "alpha"
disk = "$work/alpha.img"
meta = "$work/alpha.meta"
replication = "127.0.0.1:25889"
nbd = "127.0.0.1:25909"
admin = "$work/alpha.sock"
[[node]]
name = "beta"
disk = "$work/beta.img"
meta = "$work/beta.meta"
replication = "127.0.0.1:25890"
nbd = "127.0.0.1:25910"
admin = "$work/beta.sock"
EOF
    chmod 600 "$conf"
    cp "$work/seed.img" "$work/alpha.img"
    cp "$work/seed.img" "$work/beta.img"
    "$BIN" create-md -c "$conf" -n alpha >/dev/null
    "$BIN" create-md -c "$conf" -n beta >/dev/null
    start alpha; start beta
    "$BIN" promote -c "$conf" -n alpha --force >/dev/null
    wait_sync
    for pass in cold warm; do
        before=$(status_field alpha 's["stats"]["activity_log_writes_total"]')
        iops=$(run_fio)
        after=$(status_field alpha 's["stats"]["activity_log_writes_total"]')
        writes=$(( after - before ))
        [ -z "$ref" ] && [ "$pass" = warm ] && ref=$iops
        rows+=("$al|$pass|$iops|$writes|$(python3 -c "print(round($writes/($iops*$RUNTIME)*1000, 1))")")
    done
    stop_all
done

echo "## activity log cost ($(date -u +%F), SIZE=$SIZE = $extents extents, 4 KiB random writes QD32, ${RUNTIME}s per pass)"
echo
echo "| al_extents | pass | IOPS | ratio to al_extents=${AL%% *} warm | metadata writes | per 1000 writes |"
echo "|---:|---|---:|---:|---:|---:|"
for r in "${rows[@]}"; do
    IFS='|' read -r al pass iops writes per <<<"$r"
    echo "| $al | $pass | $iops | $(python3 -c "print(round($iops/$ref, 2))") | $writes | $per |"
done
echo
echo "command: SIZE=$SIZE AL=\"$AL\" RUNTIME=$RUNTIME DIR=$DIR tools/bench-al.sh"

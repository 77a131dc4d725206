#!/usr/bin/env bash
# tools/nbd-ext4-check.sh — a real filesystem on an NBD export, end to end.
#
# Usage: tools/nbd-ext4-check.sh URI [BACKING_DISK]
#
#   URI           the export, e.g. nbd://127.0.0.1:10809/ or
#                 nbd+unix:///?socket=/run/x.sock (anything nbdfuse takes)
#   BACKING_DISK  optional: the server's disk image (a file on this machine).
#                 When given, the final e2fsck and checksum check read it
#                 directly; otherwise they go through a fresh read-only
#                 nbdfuse mount of URI.
#
# What it does, each step under its own timeout:
#   1. nbdfuse exposes the export as a file DIR/fuse/disk
#   2. a loop device is attached to that file
#   3. mkfs.ext4 (no lazy init, so every write happens now), mount
#   4. writes FILES files of FILE_MIB MiB of random data, each fsync'ed,
#      plus a directory fsync and syncfs; records their sha256 sums
#   5. unmount, drop caches, mount again, verify the sums, unmount
#   6. detach the loop device, unmount nbdfuse cleanly (fusermount3 -u) and
#      wait for nbdfuse to exit, which makes it flush and disconnect
#   7. e2fsck -fn and the sums again, on BACKING_DISK or on a fresh
#      read-only nbdfuse mount — data that only ever lived in a cache on
#      this side would fail here
# Exit status 0 only if every step passed.  Whatever happens (failure,
# timeout, Ctrl-C, SIGTERM), the trap unmounts, detaches and stops what it
# started, with bounded waits.
#
# Environment: FILES (default 4), FILE_MIB (default 8), STEP_TIMEOUT seconds
# (default 120), NBDFUSE_CONNECTIONS (nbdfuse -C; default: nbdfuse's own,
# which is 4 connections when the server advertises multi-conn, else 1),
# LOOP_DIRECT_IO (on|off, default on; see pitfalls), KEEP=1 keeps the work dir.
#
# Needs root (loop devices, mount), /dev/fuse, nbdfuse, fusermount3,
# losetup, mkfs.ext4, e2fsck, sha256sum.  The export must be at least 16 MiB
# and everything on it is destroyed.
#
# Pitfalls found on this machine (Debian 12, libnbd 1.14 nbdfuse, fuse3):
#  * nbdfuse stays in the foreground: start it with '&' and wait for its -P
#    pidfile, which it writes only once the mount is ready.  The mount point
#    DIR must exist; the file name after it (DIR/disk) is created by nbdfuse.
#  * Never kill nbdfuse to stop it: 'fusermount3 -u DIR' makes it flush and
#    exit by itself.  A killed nbdfuse can leave the mount behind
#    ("Transport endpoint is not connected"); 'fusermount3 -uz DIR' (lazy)
#    removes it, and writing to /sys/fs/fuse/connections/N/abort unsticks
#    anything blocked on it (fusectl may need mounting first; N is the minor
#    number of the mount's device in /proc/self/mountinfo).  Such a dead mount
#    fails stat(), so 'mountpoint' calls it unmounted: check the mount table.
#  * Loop over a FUSE file: both 'losetup --direct-io=on' and the buffered
#    default work here (kernel 6.x FUSE accepts O_DIRECT; losetup --list -O DIO
#    shows 1).  Direct IO is the default of this script: no second page cache
#    (the FUSE file's) between loop and the server, so the remount of step 5
#    reads from the server, and the buffered loop-over-FUSE memory-pressure
#    deadlock that nbdfuse's manual warns about cannot happen.  With direct IO
#    the server sees requests as small as 512 bytes (e.g. 1 KiB superblock
#    reads at offset 1024); buffered, reads are 4 KiB multiples.  Where the
#    kernel refuses direct IO, losetup keeps the device buffered: the script
#    logs which one is in use.
#  * The loop device must be detached (losetup -d) before fusermount3 -u,
#    or the unmount fails with "Device or resource busy".  losetup -d is
#    asynchronous; wait until 'losetup -j FILE' no longer lists the device.
#  * fsync on ext4 reaches the server: ext4 sends a flush -> loop fsyncs its
#    backing file -> FUSE fsync -> nbdfuse sends NBD_CMD_FLUSH (seen in traces:
#    one FLUSH per fsync, direct IO or not).
#  * mkfs.ext4 discards the whole device by default: loop turns that into
#    fallocate(PUNCH_HOLE) on the FUSE file and nbdfuse into NBD_CMD_TRIM;
#    a server without TRIM support makes mkfs skip it (not an error).
#  * The remount in step 5 may be served from this machine's page caches;
#    step 7 is what proves the data reached the server.
set -euo pipefail

URI=${1:-}
BACKING=${2:-}
if [ -z "$URI" ] || [ "$URI" = -h ] || [ "$URI" = --help ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    [ -n "$URI" ]; exit $?
fi
FILES=${FILES:-4}
FILE_MIB=${FILE_MIB:-8}
STEP_TIMEOUT=${STEP_TIMEOUT:-120}
LOOP_DIRECT_IO=${LOOP_DIRECT_IO:-on}
KEEP=${KEEP:-0}

say() { echo "ext4-check: $*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

for tool in nbdfuse fusermount3 losetup mkfs.ext4 e2fsck mount umount sha256sum timeout; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done
[ "$(id -u)" = 0 ] || fail "must run as root (loop devices, mount)"
[ -c /dev/fuse ] || fail "/dev/fuse is missing (modprobe fuse)"
if [ -n "$BACKING" ] && [ ! -f "$BACKING" ] && [ ! -b "$BACKING" ]; then
    fail "backing disk $BACKING does not exist"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nbd-ext4-check.XXXXXX")
FUSE_DIR=$WORK/fuse          # nbdfuse mount point (directory)
MNT=$WORK/mnt                # ext4 mount point
SUMS=$WORK/sha256sums        # outside the filesystem under test
mkdir -p "$FUSE_DIR" "$MNT"

# What is live right now, so the trap knows what to undo.
NBDFUSE_PID=""
FUSE_MOUNTED=""              # a directory nbdfuse is mounted on
LOOP_DEV=""
EXT4_MOUNTED=""

# step DESCRIPTION CMD...: run CMD under STEP_TIMEOUT, fail loudly.  CMD
# runs in the background so that a signal reaches the trap at once; the trap
# stops it first.
STEP_PID=""
step() {
    local what=$1 rc=0; shift
    say "$what"
    timeout "$STEP_TIMEOUT" "$@" &
    STEP_PID=$!
    wait "$STEP_PID" || rc=$?
    STEP_PID=""
    if [ "$rc" = 124 ]; then fail "$what: timed out after ${STEP_TIMEOUT}s"; fi
    [ "$rc" = 0 ] || fail "$what: exit status $rc"
}

mount_dev() {                # "major:minor" of the mount at DIR, from mountinfo
    awk -v m="$1" '$5 == m { print $3 }' /proc/self/mountinfo | tail -1
}

fuse_abort() {               # abort the FUSE connection behind DIR
    local dev
    dev=$(mount_dev "$1")
    [ -n "$dev" ] && [ -d /sys/fs/fuse/connections ] || return 0
    if [ -z "$(ls -A /sys/fs/fuse/connections 2>/dev/null)" ]; then
        mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || true
    fi
    # a FUSE mount's device is 0:N and connections/N is its control directory
    if [ -w "/sys/fs/fuse/connections/${dev#0:}/abort" ]; then
        echo 1 >"/sys/fs/fuse/connections/${dev#0:}/abort" 2>/dev/null || true
    fi
}

# From the mount table, not stat(): a dead FUSE mount fails stat() with
# "Transport endpoint is not connected" but is still mounted.
is_mounted() { [ -n "$(mount_dev "$1")" ]; }

wait_gone() {                # wait_gone PID SECONDS
    local pid=$1 i
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    if [ -n "$STEP_PID" ]; then   # interrupted in the middle of a step
        kill -TERM "$STEP_PID" 2>/dev/null || true
        wait_gone "$STEP_PID" 10 || kill -KILL "$STEP_PID" 2>/dev/null || true
    fi
    if [ -n "$EXT4_MOUNTED" ] && is_mounted "$EXT4_MOUNTED"; then
        timeout 30 umount "$EXT4_MOUNTED" 2>/dev/null || umount -l "$EXT4_MOUNTED" 2>/dev/null || true
    fi
    if [ -n "$LOOP_DEV" ]; then
        timeout 30 losetup -d "$LOOP_DEV" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            losetup "$LOOP_DEV" >/dev/null 2>&1 || break
            sleep 0.1
        done
    fi
    if [ -n "$FUSE_MOUNTED" ] && is_mounted "$FUSE_MOUNTED"; then
        if ! timeout 20 fusermount3 -u "$FUSE_MOUNTED" 2>/dev/null; then
            say "cleanup: fusermount3 -u failed, aborting the FUSE connection"
            fuse_abort "$FUSE_MOUNTED"
            timeout 10 fusermount3 -uz "$FUSE_MOUNTED" 2>/dev/null \
                || umount -l "$FUSE_MOUNTED" 2>/dev/null || true
        fi
    fi
    if [ -n "$NBDFUSE_PID" ] && ! wait_gone "$NBDFUSE_PID" 10; then
        say "cleanup: nbdfuse (pid $NBDFUSE_PID) still running, killing it"
        kill -TERM "$NBDFUSE_PID" 2>/dev/null || true
        wait_gone "$NBDFUSE_PID" 5 || kill -KILL "$NBDFUSE_PID" 2>/dev/null || true
    fi
    if [ "$rc" != 0 ] && [ -s "$WORK/nbdfuse.log" ]; then
        say "last lines of nbdfuse's log:"; tail -20 "$WORK/nbdfuse.log" >&2
    fi
    if [ "$KEEP" = 1 ]; then
        say "work directory kept: $WORK"
    else
        # only remove it if nothing is mounted below it any more
        if ! grep -q " $WORK/" /proc/mounts; then rm -rf "$WORK"; fi
    fi
    if [ "$rc" = 0 ]; then say "PASS"; else say "FAIL (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# nbdfuse_start DIR FLAGS...: mount URI as DIR/disk, wait until ready.
nbdfuse_start() {
    local dir=$1 i; shift
    local args=(-P "$WORK/nbdfuse.pid")
    [ -n "${NBDFUSE_CONNECTIONS:-}" ] && args+=(-C "$NBDFUSE_CONNECTIONS")
    rm -f "$WORK/nbdfuse.pid"
    nbdfuse "${args[@]}" "$@" "$dir/disk" "$URI" 2>>"$WORK/nbdfuse.log" &
    NBDFUSE_PID=$!
    FUSE_MOUNTED=$dir
    for ((i = 0; i < STEP_TIMEOUT * 10; i++)); do
        if [ -s "$WORK/nbdfuse.pid" ] && [ -f "$dir/disk" ]; then return 0; fi
        if ! kill -0 "$NBDFUSE_PID" 2>/dev/null; then
            cat "$WORK/nbdfuse.log" >&2
            fail "nbdfuse exited before the mount was ready"
        fi
        sleep 0.1
    done
    fail "nbdfuse not ready after ${STEP_TIMEOUT}s"
}

# nbdfuse_stop DIR: clean unmount, nbdfuse exits by itself (flush + NBD_CMD_DISC).
nbdfuse_stop() {
    local dir=$1
    step "unmount nbdfuse ($dir)" fusermount3 -u "$dir"
    wait_gone "$NBDFUSE_PID" "$STEP_TIMEOUT" || fail "nbdfuse did not exit after unmount"
    local rc=0
    wait "$NBDFUSE_PID" || rc=$?
    [ "$rc" = 0 ] || fail "nbdfuse exited with status $rc"
    NBDFUSE_PID=""
    FUSE_MOUNTED=""
}

loop_attach() {              # loop_attach FILE [losetup flags...]: sets LOOP_DEV
    local file=$1 dio; shift
    LOOP_DEV=$(timeout "$STEP_TIMEOUT" losetup --find --show "$@" "$file") \
        || fail "losetup on $file failed"
    dio=$(losetup --noheadings --list -O DIO "$LOOP_DEV" | tr -d ' ')
    say "loop device $LOOP_DEV attached to $file ($*; direct IO in use: $dio)"
}

loop_detach() {
    local i
    step "detach $LOOP_DEV" losetup -d "$LOOP_DEV"
    for ((i = 0; i < STEP_TIMEOUT * 10; i++)); do
        losetup "$LOOP_DEV" >/dev/null 2>&1 || { LOOP_DEV=""; return 0; }
        sleep 0.1
    done
    fail "$LOOP_DEV still attached after ${STEP_TIMEOUT}s"
}

drop_caches() {
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; fi
}

write_files() {              # runs in a child bash (step ... bash -c)
    set -euo pipefail
    local i
    for ((i = 1; i <= FILES; i++)); do
        mkdir -p "$MNT/dir$((i % 2))"
        dd if=/dev/urandom of="$MNT/dir$((i % 2))/file$i.bin" bs=1M count="$FILE_MIB" \
            conv=fsync status=none
    done
    # a small file too, and the directories' own fsync, then syncfs
    date >"$MNT/small.txt"
    sync "$MNT/small.txt" "$MNT/dir0" "$MNT/dir1" "$MNT"
    sync -f "$MNT"
    (cd "$MNT" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$SUMS"
}
verify_files() {             # verify_files ROOT
    set -euo pipefail
    (cd "$1" && sha256sum --quiet -c "$SUMS")
    local want have
    want=$(wc -l <"$SUMS")
    have=$(cd "$1" && find . -type f | wc -l)
    [ "$want" = "$have" ] || { echo "expected $want files, found $have" >&2; return 1; }
}
export -f write_files verify_files
export MNT SUMS FILES FILE_MIB

# ---------------------------------------------------------------- 1-3
say "export: $URI"
nbdfuse_start "$FUSE_DIR"
SIZE=$(stat -c %s "$FUSE_DIR/disk")
say "nbdfuse file $FUSE_DIR/disk, $SIZE bytes (nbdfuse pid $NBDFUSE_PID)"
[ "$SIZE" -ge $((16 << 20)) ] || fail "export too small ($SIZE bytes), need 16 MiB"
need=$(( FILES * FILE_MIB * 1024 * 1024 * 12 / 10 + (8 << 20) ))
[ "$SIZE" -ge "$need" ] || fail "export too small for $FILES x $FILE_MIB MiB (lower FILES/FILE_MIB)"

loop_attach "$FUSE_DIR/disk" --direct-io="$LOOP_DIRECT_IO"
step "mkfs.ext4 on $LOOP_DEV" mkfs.ext4 -F -q -L twinbd-check \
    -E lazy_itable_init=0,lazy_journal_init=0 "$LOOP_DEV"
step "mount $LOOP_DEV" mount -t ext4 "$LOOP_DEV" "$MNT"
EXT4_MOUNTED=$MNT

# ---------------------------------------------------------------- 4-5
step "write $FILES x $FILE_MIB MiB with fsync" bash -c write_files
step "unmount ext4" umount "$MNT"; EXT4_MOUNTED=""
drop_caches
step "mount again" mount -t ext4 "$LOOP_DEV" "$MNT"; EXT4_MOUNTED=$MNT
step "verify sha256 sums after remount" bash -c "verify_files $MNT"
step "unmount ext4" umount "$MNT"; EXT4_MOUNTED=""

# ---------------------------------------------------------------- 6
loop_detach
nbdfuse_stop "$FUSE_DIR"

# ---------------------------------------------------------------- 7
drop_caches
if [ -n "$BACKING" ]; then
    CHECK_FILE=$BACKING
    say "final checks on the backing disk $BACKING"
else
    say "final checks through a fresh read-only nbdfuse mount"
    nbdfuse_start "$FUSE_DIR" -r
    CHECK_FILE=$FUSE_DIR/disk
fi
step "e2fsck -fn $CHECK_FILE" e2fsck -fn "$CHECK_FILE"
loop_attach "$CHECK_FILE" --read-only --direct-io="$LOOP_DIRECT_IO"
step "mount read-only" mount -t ext4 -o ro,noload "$LOOP_DEV" "$MNT"; EXT4_MOUNTED=$MNT
step "verify sha256 sums on the server's copy" bash -c "verify_files $MNT"
step "unmount ext4" umount "$MNT"; EXT4_MOUNTED=""
loop_detach
if [ -z "$BACKING" ]; then nbdfuse_stop "$FUSE_DIR"; fi
say "all steps passed ($FILES files x $FILE_MIB MiB, export $SIZE bytes)"

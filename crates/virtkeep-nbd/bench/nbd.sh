#!/bin/sh
# Benchmark: read a fully allocated qcow2 export through qemu-nbd with the virtkeep
# NBD client (several in-flight depths), against `cat` of the equivalent raw file.
# Usage: crates/virtkeep-nbd/bench/nbd.sh [SIZE_MIB]   (from the workspace root)
set -eu
SIZE_MIB=${1:-1024}
DIR=$(mktemp -d /tmp/vk-nbd-bench.XXXXXX)
PID=""
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; fi
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

cargo build -q --release -p virtkeep-nbd --example nbd_read
BIN=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/examples/nbd_read

head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$DIR/disk.raw"
qemu-img convert -f raw -O qcow2 "$DIR/disk.raw" "$DIR/disk.qcow2"
qemu-nbd -r --persistent --fork --socket="$DIR/nbd.sock" --pid-file="$DIR/nbd.pid" \
    -f qcow2 "$DIR/disk.qcow2" </dev/null >/dev/null 2>"$DIR/nbd.err"
PID=$(cat "$DIR/nbd.pid")

echo "qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}'), ${SIZE_MIB} MiB of random data"
# Warm the page cache for both files, then measure.
cat "$DIR/disk.raw" "$DIR/disk.qcow2" > /dev/null
START=$(date +%s.%N)
cat "$DIR/disk.raw" > /dev/null
END=$(date +%s.%N)
echo "cat raw file: $(echo "$SIZE_MIB / ($END - $START)" | bc -l | xargs printf '%.1f') MiB/s"
for N in 1 4 16; do
    for REQ in 256 2048; do
        "$BIN" "$DIR/nbd.sock" "" "$N" "$REQ"
    done
done

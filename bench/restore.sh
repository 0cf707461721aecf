#!/usr/bin/env bash
# Restore benchmark (issue 16, "Benchmark"): an in-place restore (`--force`: written
# into a temporary beside the disk, then renamed over it) against a restore of the same
# backup under a new name, in one run, interleaved.
#
#  1. workload: a qcow2 (v3) in $VK_POOL_DIR with random data in a few pieces and holes
#     (SIZE=full: 8 GiB virtual, 2 GiB data; small: 1 GiB, 256 MiB), in a shut-off
#     domain (an in-place restore of a running domain's disk is refused);
#  2. one full backup into a fresh local repository;
#  3. REPS times: restore --name NEW --storage file:$VK_POOL_DIR --define, then restore
#     in place --force; wall time, throughput (allocated bytes / wall), peak RSS
#     (/usr/bin/time -v); the in-place result is compared with the source's copy;
#  4. targets: in-place throughput ≥ 0.9 × the new-name one (the swap costs no second
#     copy), peak RSS ≤ 128 MiB; writes bench/results/restore-<date>[-small].md.
# Everything created is removed on exit, also on failure or Ctrl-C.
#
# Env: SIZE=full|small, REPS (default 3), PARALLEL (default 2), BUILD (default 1:
#      cargo build --release -p virtkeep).
# shellcheck disable=SC2086 # the space-separated lists of figures split on purpose
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
export PATH="$HOME/.cargo/bin:$PATH"

SIZE=${SIZE:-full}
REPS=${REPS:-3}
PARALLEL=${PARALLEL:-2}
BUILD=${BUILD:-1}
MIB=1048576
case $SIZE in
  full) DISK=$((8192 * MIB)) ;;
  small) DISK=$((1024 * MIB)) ;;
  *) bdie "SIZE must be full or small" ;;
esac
U=$((DISK / 32)) # piece size: 256 MiB (full), 32 MiB (small)

[[ $(id -u) -eq 0 ]] || bdie "run as root (the lab needs it)"
[[ -x /usr/bin/time ]] || apt-get install -y -q time >/dev/null
for t in qemu-img qemu-io virsh python3 jq bc; do
  command -v "$t" >/dev/null || bdie "$t is missing"
done

START_EPOCH=$(date +%s)
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=/var/tmp/vkt-rbench-$$
RUN_DIR=$WORK/runs
NODE=$WORK/node
DOM=vkt-rbench-$$-1
RESTORED_NAMES=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $SAMPLER_PID ]] && kill -TERM "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
  if [[ -n ${VK_LIBVIRT_URI:-} ]]; then
    local d pid
    for d in "$DOM" "${RESTORED_NAMES[@]}"; do
      virsh -q -c "$VK_LIBVIRT_URI" destroy --domain "$d" >/dev/null 2>&1
      virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$d" >/dev/null 2>&1
    done
    for pid in $(pgrep -x qemu-nbd 2>/dev/null); do
      if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -e "vkt-rbench-$$-"; then
        kill "$pid" 2>/dev/null
      fi
    done
    rm -f -- "$VK_POOL_DIR"/vkt-rbench-$$-* "$VK_POOL_DIR"/.vkt-rbench-$$-*
  fi
  rm -rf -- "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $BUILD == 1 ]]; then
  blog "cargo build --release -p virtkeep"
  (cd "$ROOT" && cargo build --release -q -p virtkeep)
fi
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/virtkeep
[[ -x $BIN ]] || bdie "no release binary at $BIN"
blog "lab/up.sh"
bash "$ROOT/lab/up.sh"
load_lab_env /tmp/virtkeep-lab/env
mkdir -p "$WORK/data" "$RUN_DIR" "$NODE"
BIN_INFO="$(stat -c '%y' "$BIN" | cut -d. -f1), sha256 $(sha256sum "$BIN" | cut -c1-12)"
cp "$BIN" "$WORK/virtkeep"
BIN=$WORK/virtkeep
IMG=$VK_POOL_DIR/$DOM-vda.qcow2

# ------------------------------------------------------------------ workload
blog "workload: $((DISK / MIB)) MiB qcow2, 8 random pieces of $((U / MIB)) MiB"
io_args=()
for i in 0 3 7 11 16 20 25 31; do
  head -c "$U" /dev/urandom >"$WORK/data/p$i"
  io_args+=(-c "write -s $WORK/data/p$i $((i * U)) $U")
done
qemu-img create -q -f qcow2 -o compat=1.1 "$IMG" "$DISK"
qemu-io -f qcow2 "${io_args[@]}" "$IMG" >"$RUN_DIR/qemu-io.log" || bdie "qemu-io failed"
rm -rf -- "$WORK/data"
chown "$VK_QEMU_USER:$VK_QEMU_GROUP" "$IMG"
ALLOC=$(qemu-img map --output=json -f qcow2 "$IMG" | jq '[.[] | select(.data == true and .zero == false) | .length] | add')
ALLOC_MIB=$(calc "$ALLOC / $MIB")
SRC=$WORK/source.qcow2
cp --sparse=always "$IMG" "$SRC"
cat >"$WORK/dom.xml" <<XML
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$IMG'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
virsh -q -c "$VK_LIBVIRT_URI" define --file "$WORK/dom.xml" >/dev/null

VK=(env -u XDG_CONFIG_HOME -u XDG_DATA_HOME HOME="$NODE" VIRTKEEP_LOG=info "$BIN" --config "$NODE/config.toml")
"${VK[@]}" host add lab --ssh "$VK_SSH_USER@$VK_SSH_HOST:$VK_SSH_PORT" --identity "$VK_SSH_KEY" \
  --known-hosts "$VK_SSH_KNOWN_HOSTS" >"$RUN_DIR/host-add.out" 2>&1 || bdie "host add: $(cat "$RUN_DIR/host-add.out")"
REPO=$WORK/repo
"${VK[@]}" repo init "$REPO" --encryption none >/dev/null 2>&1 || bdie "repo init"
blog "backup"
timed backup "${VK[@]}" --json backup "lab/$DOM" --repo "$REPO" --mode full || bdie "backup: $(tail -5 "$RUN_DIR/backup.err")"
ID=$(jq -r '.[0].id' "$RUN_DIR/backup.out")

# ------------------------------------------------------------------ restores
declare -A WALL RSS
add() { eval "$1[\$2]+=\"\$3 \""; }
med() { local -n arr=$1; printf '%s\n' ${arr[$2]:-} | median; }
VERIFIED=no
for ((r = 1; r <= REPS; r++)); do
  new=vkt-rbench-$$-n$r
  RESTORED_NAMES+=("$new")
  blog "rep $r/$REPS: restore --name $new"
  timed "new-r$r" "${VK[@]}" --json restore "$ID" --to lab --repo "$REPO" --name "$new" \
    --storage "file:$VK_POOL_DIR" --define --parallel "$PARALLEL" ||
    bdie "restore --name: $(tail -n 20 "$RUN_DIR/new-r$r.err")"
  add WALL new "$T_WALL"
  add RSS new "$T_RSS_KB"
  virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$new" >/dev/null 2>&1 || true
  rm -f -- "$(jq -r '.disks[0].path' "$RUN_DIR/new-r$r.out")"

  blog "rep $r/$REPS: restore in place --force"
  qemu-io -f qcow2 -c "write -P 0x5a 0 $MIB" "$IMG" >/dev/null # the restore must undo this
  timed "inplace-r$r" "${VK[@]}" --json restore "$ID" --to lab --repo "$REPO" --force \
    --parallel "$PARALLEL" || bdie "restore in place: $(tail -n 20 "$RUN_DIR/inplace-r$r.err")"
  add WALL inplace "$T_WALL"
  add RSS inplace "$T_RSS_KB"
  qemu-img compare -U -f qcow2 -F qcow2 "$SRC" "$IMG" >"$RUN_DIR/compare-$r.out" 2>&1 ||
    bdie "in-place result differs from the source: $(cat "$RUN_DIR/compare-$r.out")"
  VERIFIED=yes
done

# ------------------------------------------------------------------ report
W_NEW=$(med WALL new)
W_IN=$(med WALL inplace)
T_NEW=$(calc "$ALLOC_MIB / $W_NEW")
T_IN=$(calc "$ALLOC_MIB / $W_IN")
RATIO=$(calc "$T_IN / $T_NEW")
RSS_MAX=0
for v in ${RSS[new]} ${RSS[inplace]}; do ((v > RSS_MAX)) && RSS_MAX=$v; done
RSS_MIB=$(calc "$RSS_MAX / 1024")
verdict() { if (($(bc <<<"$1"))); then echo PASS; else echo FAIL; fi; }
REPORT="# virtkeep restore benchmark ($SIZE, $STAMP)

- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), SIZE=$SIZE, REPS=$REPS, --parallel $PARALLEL, run took $(($(date +%s) - START_EPOCH)) s
- machine: nproc=$(nproc), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo); **shared** with other people's builds and tests (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))
- binary: $BIN_INFO, tree $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'); $(qemu-img --version | head -1)
- workload: qcow2 $((DISK / MIB)) MiB virtual, $ALLOC_MIB MiB of random data; shut-off domain; lab sshd on 127.0.0.1; repository on local disk
- throughput = allocated bytes / wall time of the whole command; in place = \`restore ID --to lab --force\` (temporary beside the disk, renamed over it); new name = \`restore ID --to lab --name NEW --storage file:POOL --define\`
- in-place result compared with the source (qemu-img compare): $VERIFIED

| case | wall s (median) | MiB/s | peak RSS MiB (median) | walls |
|---|---|---|---|---|
| restore under a new name | $W_NEW | $T_NEW | $(calc "$(med RSS new) / 1024") | $(printf '%s\n' ${WALL[new]} | minmax) |
| restore in place --force | $W_IN | $T_IN | $(calc "$(med RSS inplace) / 1024") | $(printf '%s\n' ${WALL[inplace]} | minmax) |

| target | measured | verdict |
|---|---|---|
| in place ≥ 0.9 × new name (throughput) | $RATIO | $(verdict "$RATIO >= 0.9") |
| peak RSS ≤ 128 MiB | $RSS_MIB MiB | $(verdict "$RSS_MAX <= 131072") |
"
mkdir -p "$BENCH_DIR/results"
suffix=""
[[ $SIZE == small ]] && suffix="-small"
OUT=$BENCH_DIR/results/restore-$STAMP$suffix.md
printf '%s\n' "$REPORT" >"$OUT"
printf '%s\n' "$REPORT"
echo "report: $OUT"

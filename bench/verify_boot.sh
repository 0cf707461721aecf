#!/usr/bin/env bash
# `verify --boot` end to end on the marker guest (issue 20, "Benchmark": ≤ 15 s).
#
# In one run, against the lab (lab/up.sh):
#  1. workload: a 1 MiB raw disk whose boot sector prints a marker to COM1 (SeaBIOS
#     boots it under TCG in well under a second), a shut-off domain vkt-vbench-PID, one
#     full backup into a fresh local repository;
#  2. baselines in the same run: `virsh create` + `destroy` of the same disk directly
#     (the floor of starting a guest), and `virtkeep snapshots` (CLI start + repository
#     open);
#  3. REPS times `virtkeep verify ID --boot --to lab --timeout $TIMEOUT --expect-serial
#     MARKER --json`: wall time, the report's time_to_running and ran_secs, overhead =
#     wall - ran_secs;
#  4. prints a table with the medians, the load average before and after, and writes
#     bench/results/verify-boot-<date>.md.
# Everything created is removed on exit, also on failure or Ctrl-C.
#
# Env: REPS (default 5), TIMEOUT (seconds the guest must keep running, default 5),
#      BIN (default target/debug/virtkeep; build it first), KEEP=1 keeps the work dir.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
REPS=${REPS:-5}
TIMEOUT=${TIMEOUT:-5}
BIN=${BIN:-$ROOT/target/debug/virtkeep}
[[ -x $BIN ]] || bdie "no $BIN (cargo build --workspace, or BIN=…)"
[[ -f /tmp/virtkeep-lab/env ]] || bdie "the lab is not up (lab/up.sh)"
load_lab_env /tmp/virtkeep-lab/env
WORK=$(mktemp -d /var/tmp/vkt-vbench-XXXXXX)
RUN_DIR=$WORK/run
NODE=$WORK/node
mkdir -p "$RUN_DIR" "$NODE"
DOM=vkt-vbench-$$
IMG=$VK_POOL_DIR/$DOM.raw
cleanup() {
  virsh -q -c "$VK_LIBVIRT_URI" destroy "$DOM-direct" >/dev/null 2>&1 || true
  virsh -q -c "$VK_LIBVIRT_URI" undefine "$DOM" >/dev/null 2>&1 || true
  rm -f -- "$IMG"
  [[ ${KEEP:-0} == 1 ]] || rm -rf -- "$WORK"
}
trap cleanup EXIT INT TERM

MARKER=VK-BENCH-$$
# xor ax,ax; mov ds,ax; mov dx,0x3f8; mov si,0x7c17; cld; lodsb; test al,al; jz +3;
# out dx,al; jmp -8; cli; hlt; jmp -3; then the marker, NUL, padding, 55 AA.
python3 - "$IMG" "$MARKER" <<'PY'
import sys
code = bytes([0x31,0xC0,0x8E,0xD8,0xBA,0xF8,0x03,0xBE,0x17,0x7C,0xFC,0xAC,0x84,0xC0,
              0x74,0x03,0xEE,0xEB,0xF8,0xFA,0xF4,0xEB,0xFD])
s = code + sys.argv[2].encode() + b"\0"
s = s.ljust(510, b"\0") + b"\x55\xaa"
with open(sys.argv[1], "wb") as f:
    f.write(s.ljust(1 << 20, b"\0"))
PY
chown "$VK_QEMU_USER:$VK_QEMU_GROUP" "$IMG"
domxml() {
  cat <<XML
<domain type='qemu'>
  <name>$1</name>
  <memory unit='KiB'>32768</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$IMG'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='$2'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
}
domxml "$DOM" "$WORK/define-serial.log" >"$WORK/dom.xml"
virsh -q -c "$VK_LIBVIRT_URI" define --file "$WORK/dom.xml" >/dev/null

VK=(env -u XDG_CONFIG_HOME -u XDG_DATA_HOME HOME="$NODE" VIRTKEEP_LOG=warn "$BIN" --config "$NODE/config.toml")
"${VK[@]}" host add lab --ssh "$VK_SSH_USER@$VK_SSH_HOST:$VK_SSH_PORT" --identity "$VK_SSH_KEY" \
  --known-hosts "$VK_SSH_KNOWN_HOSTS" >"$RUN_DIR/host-add.out" 2>&1 || bdie "host add: $(cat "$RUN_DIR/host-add.out")"
REPO=$WORK/repo
KEY=$WORK/repo.key
"${VK[@]}" repo init "$REPO" --key-file "$KEY" >/dev/null 2>&1 || bdie "repo init"
R=(--repo "$REPO" --key-file "$KEY")
"${VK[@]}" --json backup "lab/$DOM" "${R[@]}" --mode full >"$RUN_DIR/backup.out" 2>"$RUN_DIR/backup.err" ||
  bdie "backup: $(tail -5 "$RUN_DIR/backup.err")"
ID=$(jq -r '.[0].id' "$RUN_DIR/backup.out")
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

declare -A WALL
add() { WALL[$1]+="$2 "; }
med() { printf '%s\n' ${WALL[$1]:-} | median; }
EXTRA_SAMPLER=0
domxml "$DOM-direct" "$WORK/direct-serial.log" >"$WORK/direct.xml"
for ((r = 1; r <= REPS; r++)); do
  blog "rep $r/$REPS: direct boot (virsh create until the marker, destroy)"
  rm -f -- "$WORK/direct-serial.log"
  t0=$EPOCHREALTIME
  virsh -q -c "$VK_LIBVIRT_URI" create --file "$WORK/direct.xml" >/dev/null
  for _ in $(seq 1 200); do grep -q "$MARKER" "$WORK/direct-serial.log" 2>/dev/null && break; sleep 0.05; done
  virsh -q -c "$VK_LIBVIRT_URI" destroy "$DOM-direct" >/dev/null
  add direct "$(calc "$EPOCHREALTIME - $t0")"

  blog "rep $r/$REPS: virtkeep snapshots"
  timed "snapshots-r$r" "${VK[@]}" --json snapshots "${R[@]}" || bdie "snapshots"
  add snapshots "$T_WALL"

  blog "rep $r/$REPS: verify --boot --timeout $TIMEOUT"
  timed "verify-r$r" "${VK[@]}" --json verify "$ID" --boot --to lab --timeout "$TIMEOUT" \
    --expect-serial "$MARKER" "${R[@]}" || bdie "verify: $(tail -5 "$RUN_DIR/verify-r$r.err") $(cat "$RUN_DIR/verify-r$r.out")"
  [[ $(jq -r .passed "$RUN_DIR/verify-r$r.out") == true ]] || bdie "verify did not pass"
  add verify "$T_WALL"
  add running "$(jq -r .time_to_running_secs "$RUN_DIR/verify-r$r.out")"
  add ran "$(jq -r .ran_secs "$RUN_DIR/verify-r$r.out")"
  add overhead "$(calc "$T_WALL - $(jq -r .ran_secs "$RUN_DIR/verify-r$r.out")")"
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p "$BENCH_DIR/results"
OUT=$BENCH_DIR/results/verify-boot-$(date +%Y%m%d-%H%M).md
{
  echo "# verify --boot of the marker guest ($(date -u +%FT%TZ))"
  echo
  echo "binary: $BIN; reps: $REPS (medians); --timeout $TIMEOUT; load average before: $LOAD_BEFORE, after: $LOAD_AFTER; $(nproc) CPUs"
  echo
  echo "| what | median s | all |"
  echo "|---|---|---|"
  for k in direct snapshots verify running ran overhead; do
    echo "| $k | $(med $k) | ${WALL[$k]} |"
  done
  echo
  echo "direct = virsh create of the same disk until the marker is on serial, then destroy;"
  echo "snapshots = CLI start + repository open; verify = verify --boot end to end (target ≤ 15 s);"
  echo "running = report's time_to_running_secs; ran = the guest watched running (≈ timeout);"
  echo "overhead = verify - ran (NBD forward, overlays, domain create/destroy, clean-up)."
} | tee "$OUT"

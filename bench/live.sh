#!/usr/bin/env bash
# Instant recovery (issue 20, "Benchmark"): `restore --live` of the marker guest until its
# boot sector ran, and until the copy is complete, against a normal `restore` of the same
# backup in the same run; an 8 GiB and a 64 GiB virtual disk holding the same data.
#
# Against the lab (lab/up.sh):
#  1. workload: two qcow2 (v3) images in $VK_POOL_DIR, 8 GiB and 64 GiB virtual, each with
#     the pieces of bench/floor.sh at the same offsets (~2 GiB of data: random, a repeated
#     4 MiB block, log-like text; holes elsewhere) and, in sector 0, a boot sector that
#     prints a marker to COM1 and halts (tests/e2e/live.rs marker_sector); two shut-off
#     domains vkt-lbench-PID-8g / -64g on them; one full backup of each into a fresh local
#     repository (unencrypted, 4 MiB chunks).
#  2. REPS rounds, the order reversed every other round, per size: (l) `virtkeep --json
#     restore ID --to lab --live --name NEW` — wall, the report's time_to_running_secs
#     and time_to_copied_secs, and the time from the command's start until the new guest
#     ran its boot sector: the CPU halted right after printing the marker (HMP `info
#     registers`: EIP=00007c15, HLT=1, polled every ~0.1 s; the restored serial port is a
#     pty, so the marker itself is not read), peak RSS; (r) `virtkeep --json restore ID
#     --to lab --name NEW` (a normal restore of the same backup: the disk written, no
#     domain) — wall, peak RSS. Each restored domain and image is removed before the next
#     case. Data MiB/s = allocated bytes / seconds.
#  3. tables with the issue's targets (marker ≤ 10 s; 64 GiB within 1.2 × of 8 GiB; the
#     copy ≥ 0.8 × the throughput of the normal restore) on stdout and in
#     bench/results/live-<date>.md, every run's files in …-runs.tar.gz.
# Everything it created is removed on exit, also on failure or Ctrl-C.
#
# Env: REPS (rounds, 2), VK (the virtkeep binary; default target/release/virtkeep),
#      SIZES ("8 64": virtual sizes in GiB, the first is the reference for the 1.2×),
#      PIECE_MIB (size of each workload piece, 256; e.g. 16 for a quick check of the
#      script), VK_LOG (virtkeep's log filter, info), KEEP=1 keeps the work dir.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

REPS=${REPS:-2}
SIZES=${SIZES:-"8 64"}
MIB=1048576
GIB=$((1024 * MIB))
U=$((8 * GIB / 32)) # the layout unit of the 8 GiB workload: 256 MiB
PIECE=$((${PIECE_MIB:-256} * MIB)) # the pieces' size (256 MiB: the workload's ~2 GiB of data)
[[ $REPS =~ ^[1-9][0-9]*$ ]] || bdie "REPS must be a positive integer"
read -r -a SIZE_LIST <<<"$SIZES"
for s in "${SIZE_LIST[@]}"; do [[ $s =~ ^[0-9]+$ && $s -ge 8 ]] || bdie "SIZES: whole GiB, at least 8"; done
BIN=${VK:-${CARGO_TARGET_DIR:-$ROOT/target}/release/virtkeep}
[[ -x $BIN ]] || bdie "no virtkeep binary at $BIN (build it, or set VK)"
[[ $(id -u) -eq 0 ]] || bdie "run as root (the lab needs it)"
[[ -x /usr/bin/time ]] || apt-get install -y -q time >/dev/null
for t in qemu-img qemu-io virsh python3 jq bc; do
  command -v "$t" >/dev/null || bdie "$t is missing"
done

START_EPOCH=$(date +%s)
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=/var/tmp/vkt-lbench-$$
RUN_DIR=$WORK/runs
NODE=$WORK/node
P=vkt-lbench-$$
LOAD_START=$(loadavg)

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $SAMPLER_PID ]] && kill -TERM "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
  [[ -n ${WATCH_PID:-} ]] && kill "$WATCH_PID" 2>/dev/null && wait "$WATCH_PID" 2>/dev/null
  if [[ -n ${VK_LIBVIRT_URI:-} ]]; then
    local d
    for d in $(virsh -q -c "$VK_LIBVIRT_URI" list --all --name 2>/dev/null | grep -e "^$P-"); do
      virsh -q -c "$VK_LIBVIRT_URI" destroy --domain "$d" >/dev/null 2>&1
      virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$d" --checkpoints-metadata >/dev/null 2>&1
    done
    rm -f -- "$VK_POOL_DIR/$P"-* "$VK_POOL_DIR"/."$P"-*
  fi
  if [[ ${KEEP:-0} == 1 ]]; then
    blog "KEEP=1: work dir kept at $WORK (repository removed)"
    rm -rf -- "$WORK/repo" "$WORK/data"
  else
    rm -rf -- "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

blog "lab/up.sh"
bash "$ROOT/lab/up.sh"
load_lab_env /tmp/virtkeep-lab/env
mkdir -p "$WORK/data" "$RUN_DIR" "$NODE"
BIN_INFO="$BIN, built $(stat -c '%y' "$BIN" | cut -d. -f1), sha256 $(sha256sum "$BIN" | cut -c1-12)"
cp "$BIN" "$WORK/virtkeep" # others' builds may replace the binary during the run
BIN=$WORK/virtkeep

# ------------------------------------------------------------------ workload
MARKER=VK-LBENCH-$$
python3 - "$WORK/data/mbr.bin" "$MARKER" <<'PY'
import sys
# xor ax,ax; mov ds,ax; mov dx,0x3f8; mov si,0x7c17; cld; lodsb; test al,al; jz +3;
# out dx,al; jmp -8; cli; hlt; jmp -3; the marker, NUL, padding, 55 AA
code = bytes([0x31,0xC0,0x8E,0xD8,0xBA,0xF8,0x03,0xBE,0x17,0x7C,0xFC,0xAC,0x84,0xC0,
              0x74,0x03,0xEE,0xEB,0xF8,0xFA,0xF4,0xEB,0xFD])
s = code + sys.argv[2].encode() + b"\0"
open(sys.argv[1], "wb").write(s.ljust(510, b"\0") + b"\x55\xaa")
PY
blog "workload: pieces of $((PIECE / MIB)) MiB"
workload_files "$WORK/data" "$PIECE"
workload_layout $((8 * GIB)) "$U" "$PIECE"
io_args=()
for l in "${WL_LAYOUT[@]}"; do
  read -r f off <<<"$l"
  io_args+=(-c "write -s $WORK/data/$f $off $(stat -c %s "$WORK/data/$f")")
done
io_args+=(-c "write -s $WORK/data/mbr.bin 0 512")
define_domain() { # NAME IMAGE
  cat >"$WORK/$1.xml" <<XML
<domain type='qemu'>
  <name>$1</name>
  <memory unit='KiB'>32768</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='$WORK/$1-serial.log'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
  virsh -q -c "$VK_LIBVIRT_URI" define --file "$WORK/$1.xml" >/dev/null
}
declare -A ALLOC ID
for s in "${SIZE_LIST[@]}"; do
  img=$VK_POOL_DIR/$P-${s}g-vda.qcow2
  qemu-img create -q -f qcow2 -o compat=1.1 "$img" $((s * GIB))
  qemu-io -f qcow2 "${io_args[@]}" "$img" >"$RUN_DIR/qemu-io-${s}g.log" || bdie "qemu-io failed: $(tail -5 "$RUN_DIR/qemu-io-${s}g.log")"
  ALLOC[$s]=$(qemu-img map --output=json -f qcow2 "$img" | jq '[.[] | select(.data == true and .zero == false) | .length] | add')
  chown "$VK_QEMU_USER:$VK_QEMU_GROUP" "$img"
  define_domain "$P-${s}g" "$img"
done
rm -rf -- "$WORK/data"

VKC=(env -u XDG_CONFIG_HOME -u XDG_DATA_HOME HOME="$NODE" VIRTKEEP_LOG="${VK_LOG:-info}" "$BIN" --config "$NODE/config.toml")
"${VKC[@]}" host add lab --ssh "$VK_SSH_USER@$VK_SSH_HOST:$VK_SSH_PORT" --identity "$VK_SSH_KEY" \
  --known-hosts "$VK_SSH_KNOWN_HOSTS" >"$RUN_DIR/host-add.out" 2>&1 || bdie "host add: $(cat "$RUN_DIR/host-add.out")"
REPO=$WORK/repo
R=(--repo "$REPO" --key-file "$REPO.key")
"${VKC[@]}" repo init "$REPO" --encryption none --key-file "$REPO.key" >"$RUN_DIR/init.out" 2>&1 || bdie "repo init: $(cat "$RUN_DIR/init.out")"
for s in "${SIZE_LIST[@]}"; do
  blog "full backup of $P-${s}g (${ALLOC[$s]} bytes allocated)"
  timed "backup-${s}g" "${VKC[@]}" --json backup "lab/$P-${s}g" "${R[@]}" --mode full ||
    bdie "backup: $(tail -5 "$RUN_DIR/backup-${s}g.err")"
  ID[$s]=$(jq -r '.[0].id' "$RUN_DIR/backup-${s}g.out")
  blog "  backup ${ID[$s]}: $T_WALL s"
done
cat "$REPO"/chunks/*/* >/dev/null 2>&1 || true # page cache: every restore starts from memory

# ------------------------------------------------------------------ cases
# shellcheck disable=SC2034 # read through med()'s nameref
declare -A WALL RSS
# shellcheck disable=SC2086 # the values are a space-separated list
maxof() { local -n arr=$1; printf '%s\n' ${arr[$2]:-} | sort -g | tail -n 1; }
# The first time, from T0 (EPOCHREALTIME), that domain $1's CPU sits halted right after
# the marker sector's hlt, into file $2; polls until killed.
watch_marker() {
  local dom=$1 out=$2 t0=$3 regs
  while :; do
    regs=$(virsh -q -c "$VK_LIBVIRT_URI" qemu-monitor-command --domain "$dom" --hmp "info registers" 2>/dev/null || true)
    if [[ $regs == *EIP=00007c15* && $regs == *HLT=1* ]]; then
      calc "$EPOCHREALTIME - $t0" >"$out"
      return 0
    fi
    sleep 0.1
  done
}
remove_restored() { # NAME
  virsh -q -c "$VK_LIBVIRT_URI" destroy --domain "$1" >/dev/null 2>&1 || true
  virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$1" >/dev/null 2>&1 || true
  rm -f -- "$VK_POOL_DIR/$1"-* "$VK_POOL_DIR/.$1"-*
  sync
}
run_live() { # SIZE ROUND
  local s=$1 r=$2 name=$P-live${1}g-r$2 f t0
  f=$RUN_DIR/live-${s}g-r$r
  sync
  t0=$EPOCHREALTIME
  watch_marker "$name" "$f.marker" "$t0" &
  WATCH_PID=$!
  timed "live-${s}g-r$r" "${VKC[@]}" --json restore "${ID[$s]}" "${R[@]}" --to lab --live --name "$name" ||
    bdie "restore --live: $(tail -5 "$f.err")"
  for _ in $(seq 1 50); do [[ -s $f.marker ]] && break; sleep 0.1; done
  kill "$WATCH_PID" 2>/dev/null || true
  wait "$WATCH_PID" 2>/dev/null || true
  WATCH_PID=
  [[ -s $f.marker ]] || bdie "the live-restored guest $name never halted after its marker"
  add WALL "live$s" "$T_WALL"
  add RSS "live$s" "$T_RSS_KB"
  add WALL "marker$s" "$(cat "$f.marker")"
  add WALL "running$s" "$(jq -r .time_to_running_secs "$f.out")"
  add WALL "copied$s" "$(jq -r .time_to_copied_secs "$f.out")"
  blog "  live ${s}g r$r: marker $(cat "$f.marker") s, running $(jq -r .time_to_running_secs "$f.out") s, copied $(jq -r .time_to_copied_secs "$f.out") s, served $(jq -r '.served_bytes // "-"' "$f.out") B, wall $T_WALL s, RSS $((T_RSS_KB / 1024)) MiB"
  remove_restored "$name"
}
run_plain() { # SIZE ROUND
  local s=$1 r=$2 name=$P-plain${1}g-r$2
  sync
  timed "plain-${s}g-r$r" "${VKC[@]}" --json restore "${ID[$s]}" "${R[@]}" --to lab --name "$name" ||
    bdie "restore: $(tail -5 "$RUN_DIR/plain-${s}g-r$r.err")"
  add WALL "plain$s" "$T_WALL"
  add RSS "plain$s" "$T_RSS_KB"
  blog "  restore ${s}g r$r: $T_WALL s, RSS $((T_RSS_KB / 1024)) MiB"
  remove_restored "$name"
}
for ((r = 1; r <= REPS; r++)); do
  cases=()
  for s in "${SIZE_LIST[@]}"; do cases+=("live $s" "plain $s"); done
  if ((r % 2 == 0)); then
    rev=()
    for ((i = ${#cases[@]} - 1; i >= 0; i--)); do rev+=("${cases[i]}"); done
    cases=("${rev[@]}")
  fi
  for c in "${cases[@]}"; do
    read -r kind s <<<"$c"
    blog "round $r/$REPS: $kind ${s}g"
    "run_$kind" "$s" "$r"
  done
done
LOAD_END=$(loadavg)

# ------------------------------------------------------------------ report
REF=${SIZE_LIST[0]}
rows=""
checks=""
for s in "${SIZE_LIST[@]}"; do
  mib=$(calc "${ALLOC[$s]} / $MIB")
  rows+="$(md_row "${s} GiB" "restore --live: marker" "$(med WALL "marker$s")" "-" "-" "$(mm WALL "marker$s")")"$'\n'
  rows+="$(md_row "${s} GiB" "restore --live: running (report)" "$(med WALL "running$s")" "-" "-" "$(mm WALL "running$s")")"$'\n'
  rows+="$(md_row "${s} GiB" "restore --live: copied (report)" "$(med WALL "copied$s")" "$(calc "$mib / $(med WALL "copied$s")")" "-" "$(mm WALL "copied$s")")"$'\n'
  rows+="$(md_row "${s} GiB" "restore --live: wall" "$(med WALL "live$s")" "$(calc "$mib / $(med WALL "live$s")")" "$(calc "$(maxof RSS "live$s") / 1024")" "$(mm WALL "live$s")")"$'\n'
  rows+="$(md_row "${s} GiB" "restore (normal): wall" "$(med WALL "plain$s")" "$(calc "$mib / $(med WALL "plain$s")")" "$(calc "$(maxof RSS "plain$s") / 1024")" "$(mm WALL "plain$s")")"$'\n'
  m=$(med WALL "marker$s")
  checks+="$(md_row "${s} GiB: marker ≤ 10 s" "$m s" "$(verdict "$m <= 10")")"$'\n'
  ratio=$(calc "$(med WALL "plain$s") / $(med WALL "copied$s")")
  checks+="$(md_row "${s} GiB: copy throughput ≥ 0.8 × the normal restore's (normal wall ÷ copied)" "$(med WALL "plain$s") s / $(med WALL "copied$s") s = $ratio" "$(verdict "$ratio >= 0.8")")"$'\n'
  if [[ $s != "$REF" ]]; then
    q=$(calc "$m / $(med WALL "marker$REF")")
    checks+="$(md_row "marker ${s} GiB within 1.2 × of ${REF} GiB" "$m s / $(med WALL "marker$REF") s = $q" "$(verdict "$q <= 1.2")")"$'\n'
  fi
done
OUT=$BENCH_DIR/results/live-$STAMP.md
mkdir -p "$BENCH_DIR/results"
{
  echo "# restore --live of the marker guest vs a normal restore ($STAMP)"
  echo
  echo "## Machine and method"
  echo "- date: $(date -u +%FT%TZ), REPS=$REPS, sizes ${SIZE_LIST[*]} GiB, run took $(($(date +%s) - START_EPOCH)) s"
  echo "- machine: $(machine_facts); load average at the start $LOAD_START, at the end $LOAD_END (shared machine)"
  echo "- virtkeep: $BIN_INFO"
  echo "- workload: qcow2 v3, the pieces of bench/floor.sh at the 8 GiB workload's offsets, the marker boot sector in sector 0; allocated bytes: $(for s in "${SIZE_LIST[@]}"; do printf '%s GiB %s; ' "$s" "${ALLOC[$s]}"; done)shut-off domains, one full backup each into an unencrypted local repository (4 MiB chunks) whose chunks are in the page cache"
  echo "- marker = seconds from the command's start until the new guest's CPU halted right after printing the marker (HMP info registers EIP=00007c15 HLT=1, polled every ~0.1 s + one virsh call); running/copied = the report's time_to_running_secs / time_to_copied_secs; normal = \`restore ID --to lab --name NEW\` (disk only); MiB/s = allocated bytes / seconds; every case starts after a \`sync\`; order reversed every other round"
  echo
  echo "## Results (median of $REPS)"
  echo "| disk | case | s | MiB/s | peak RSS MiB | range |"
  echo "|---|---|---|---|---|---|"
  printf '%s' "$rows"
  echo
  echo "| target (issue 20) | measured | verdict |"
  echo "|---|---|---|"
  printf '%s' "$checks"
  echo
  echo "Full backups (duration_secs): $(for s in "${SIZE_LIST[@]}"; do printf '%s GiB %s; ' "$s" "$(jq -r '.[0].duration_secs' "$RUN_DIR/backup-${s}g.out")"; done)"
} | tee "$OUT"
tar -C "$WORK" -czf "$BENCH_DIR/results/live-$STAMP-runs.tar.gz" runs
blog "report: $OUT"

#!/usr/bin/env bash
# Incremental backup benchmark, qcow2 + libvirt backup API (issue 6, "Benchmark"):
# "1 % of the workload disk changed: incremental wall time <= 5 % of the full's, bytes
# over SSH <= 1.2 x the changed bytes; both in one run."
#
# In one run, against the lab (lab/up.sh: private sshd on 127.0.0.1 stands for the host):
#  1. workload: a qcow2 (v3) in $VK_POOL_DIR, 2 GiB virtual (SIZE=large: 16 GiB) with
#     ~1/4 of it data (random, a repeated 4 MiB block, log-like text) spread over the
#     disk, holes elsewhere, in a running TCG domain vkt-bench-PID-1 (no OS: nothing
#     writes but us);
#  2. per round ($REPS rounds): a fresh repository; full backup with --mode auto (the
#     first backup of the VM in that repository: a full that keeps a checkpoint); 1 %
#     of the disk rewritten through the running QEMU (qemu-io via HMP, 82 pieces of
#     disk/8192 bytes at 64 KiB-aligned random places, one per 82nd of the disk); then
#     the incremental (--mode incremental). Wall time, virtkeep's bytes_read, and the
#     bytes over SSH measured independently: the lab sshd's per-connection
#     "Transferred: sent/received" log lines, and the loopback interface's byte counter
#     minus its idle rate;
#  3. one more incremental after 1 % of unaligned writes (4 KiB units, sizes 1/2..3/2 of
#     a piece): the dirty bitmap marks whole 64 KiB granules, so more than the written
#     bytes must travel; reported with the 64 KiB-rounded figure;
#  4. restore of that last incremental (VERIFY=1) compared with the source image
#     (qemu-img compare -U);
#  5. a table, the targets with verdicts, bench/results/incremental-<date>-<size>.md and
#     a ...-runs.tar.gz with every run's JSON output, virtkeep debug log, time -v, CPU.
# Everything created (domain, image, repositories, temp files) is removed on exit, also
# on failure or Ctrl-C.
#
# Env: SIZE=small|workload|large (2 GiB disk / ~514 MiB data, 8 GiB / ~2 GiB, or 16 GiB / ~4 GiB), REPS (rounds,
#      default 3 small, 2 large), PARALLEL (backup --parallel, default 2), VERIFY (1),
#      BUILD (1: cargo build --release -p virtkeep), VK_LOG (virtkeep's log filter,
#      default info,virtkeep_engine=debug), KEEP=1 keeps the work dir.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
export PATH="$HOME/.cargo/bin:$PATH"

SIZE=${SIZE:-small}
MIB=1048576
case $SIZE in
  small) DISK=$((2048 * MIB)) REPS=${REPS:-3} ;;
  workload) DISK=$((8192 * MIB)) REPS=${REPS:-2} ;; # issue 5's workload: 8 GiB, ~2 GiB data
  large) DISK=$((16384 * MIB)) REPS=${REPS:-2} ;;
  *) bdie "SIZE must be small, workload or large" ;;
esac
U=$((DISK / 32)) # layout unit and piece size: 64 MiB (small), 512 MiB (large)
NCHG=82          # pieces of DISK/8192: 82 x DISK/8192 = 1.001 % of the disk
PARALLEL=${PARALLEL:-2}
VERIFY=${VERIFY:-1}
BUILD=${BUILD:-1}
VK_LOG=${VK_LOG:-info,virtkeep_engine=debug}

[[ $(id -u) -eq 0 ]] || bdie "run as root (the lab needs it)"
if [[ ! -x /usr/bin/time ]]; then
  blog "installing GNU time"
  apt-get install -y -q time >/dev/null
fi
for t in qemu-img qemu-io virsh ssh python3 jq bc shuf; do
  command -v "$t" >/dev/null || bdie "$t is missing"
done

START_EPOCH=$(date +%s)
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=/var/tmp/vkt-bench-$$
RUN_DIR=$WORK/runs
NODE=$WORK/node
DOM=vkt-bench-$$-1
RESTORED=vkt-benchr-$$-1
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $SAMPLER_PID ]] && kill -TERM "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
  port_watch_stop
  if [[ -n ${VK_LIBVIRT_URI:-} ]]; then
    local d pid
    for d in "$DOM" "$RESTORED"; do
      virsh -q -c "$VK_LIBVIRT_URI" destroy --domain "$d" >/dev/null 2>&1
      virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$d" --snapshots-metadata --checkpoints-metadata >/dev/null 2>&1
    done
    for pid in $(pgrep -x qemu-nbd 2>/dev/null); do
      if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -e "vkt-bench-$$-" -e "vkt-benchr-$$-"; then
        kill "$pid" 2>/dev/null
      fi
    done
    rm -f -- "$VK_POOL_DIR"/vkt-bench-$$-* "$VK_POOL_DIR"/vkt-benchr-$$-*
  fi
  if [[ ${KEEP:-0} == 1 ]]; then
    blog "KEEP=1: work dir kept at $WORK (repositories removed)"
    rm -rf -- "$WORK"/repo-* "$WORK"/data
  else
    rm -rf -- "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ build + lab
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
BIN_SRC=$BIN
BIN_INFO="$(stat -c '%y' "$BIN" | cut -d. -f1), sha256 $(sha256sum "$BIN" | cut -c1-12)"
cp "$BIN" "$WORK/virtkeep" # others' builds may replace target/release/virtkeep meanwhile
BIN=$WORK/virtkeep
IMG=$VK_POOL_DIR/$DOM-vda.qcow2

# ------------------------------------------------------------------ workload
blog "workload: $((DISK / MIB)) MiB qcow2, pieces of $((U / MIB)) MiB"
D=$WORK/data
workload_files "$D" "$U"
workload_layout "$DISK" "$U" "$U"
rm -f "$IMG"
qemu-img create -q -f qcow2 -o compat=1.1 "$IMG" "$DISK"
io_args=()
LAYOUT_MD=""
for l in "${WL_LAYOUT[@]}"; do
  read -r f off <<<"$l"
  len=$(stat -c %s "$D/$f")
  io_args+=(-c "write -s $D/$f $off $len")
  LAYOUT_MD+="| $f | $off | $len |"$'\n'
done
qemu-io -f qcow2 "${io_args[@]}" "$IMG" >"$RUN_DIR/qemu-io.log" || bdie "qemu-io failed: $(tail -5 "$RUN_DIR/qemu-io.log")"
chown "$VK_QEMU_USER:$VK_QEMU_GROUP" "$IMG"
rm -rf -- "$D"
ALLOC=$(qemu-img map --output=json -f qcow2 "$IMG" | jq '[.[] | select(.data == true and .zero == false) | .length] | add')
[[ $ALLOC -eq $WL_DATA ]] || blog "note: qemu-img map says $ALLOC allocated (whole clusters), the pieces hold $WL_DATA"
ALLOC_MIB=$(calc "$ALLOC / $MIB")
blog "allocated data: $ALLOC bytes ($ALLOC_MIB MiB)"

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
      <alias name='ua-vda'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
virsh -q -c "$VK_LIBVIRT_URI" define --file "$WORK/dom.xml" >/dev/null
virsh -q -c "$VK_LIBVIRT_URI" start --domain "$DOM" >/dev/null
blog "domain $DOM running"
cat "$IMG" >/dev/null # page cache

# ------------------------------------------------------------------ node
NET_MATCH=$WORK/virtkeep # our connections: those of this binary copy
VK=(env -u XDG_CONFIG_HOME -u XDG_DATA_HOME HOME="$NODE" VIRTKEEP_LOG="$VK_LOG" "$BIN" --config "$NODE/config.toml")
"${VK[@]}" host add lab --ssh "$VK_SSH_USER@$VK_SSH_HOST:$VK_SSH_PORT" --identity "$VK_SSH_KEY" \
  --known-hosts "$VK_SSH_KNOWN_HOSTS" >"$RUN_DIR/host-add.out" 2>&1 || bdie "host add: $(cat "$RUN_DIR/host-add.out")"
"${VK[@]}" --json host check lab >"$RUN_DIR/host-check.json" 2>"$RUN_DIR/host-check.err" || true

SSH=(ssh -q -F /dev/null -c aes128-gcm@openssh.com -p "$VK_SSH_PORT" -i "$VK_SSH_KEY" -o BatchMode=yes
  -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$VK_SSH_KNOWN_HOSTS"
  -o GlobalKnownHostsFile=/dev/null -o ControlPath=none "$VK_SSH_USER@$VK_SSH_HOST")
# The floor of any incremental through libvirt's backup API from this node, measured
# in the same round: the changed bytes alone over one SSH session (`ssh … head -c N
# IMG >/dev/null`), and libvirt's own job (checkpoint + pull-mode backup-begin +
# domjobabort + checkpoint-delete, run on the host in one SSH command, no data read).
floor_runs() { # ROUND BYTES
  local r=$1 bytes=$2 t0 t1
  t0=$EPOCHREALTIME
  "${SSH[@]}" "head -c $bytes $(printf %q "$IMG") >/dev/null" || bdie "ssh head failed"
  t1=$EPOCHREALTIME
  add WALL floorssh "$(calc "$t1 - $t0")"
  local d=/run/vkt-floor-$$-$r
  t0=$EPOCHREALTIME
  "${SSH[@]}" "set -e; mkdir -p $d; chmod 0777 $d
    printf '%s' \"<domaincheckpoint><name>vkt-floor-$$-$r</name></domaincheckpoint>\" >$d/cp.xml
    printf '%s' \"<domainbackup mode='pull'><server transport='unix' socket='$d/nbd.sock'/><disks><disk name='vda' backup='yes' type='file'><scratch file='$d/s.qcow2'/></disk></disks></domainbackup>\" >$d/b.xml
    virsh -q -c $VK_LIBVIRT_URI backup-begin --domain $DOM --backupxml $d/b.xml --checkpointxml $d/cp.xml >/dev/null
    virsh -q -c $VK_LIBVIRT_URI domjobabort --domain $DOM
    virsh -q -c $VK_LIBVIRT_URI checkpoint-delete --domain $DOM --checkpointname vkt-floor-$$-$r >/dev/null
    rm -rf $d" || bdie "libvirt floor job failed"
  t1=$EPOCHREALTIME
  add WALL floorlv "$(calc "$t1 - $t0")"
}

# ------------------------------------------------------------------ measurements
blog "loopback idle rate (5 s)"
LO_IDLE=$(lo_idle_rate 5)
# shellcheck disable=SC2034 # read through med()'s nameref
declare -A WALL DATA_S READ SSHD SSHCONN SSHALL LOB CPUV BUSY OTHER
# shellcheck disable=SC2086 # the values are a space-separated list
# shellcheck disable=SC2086
# record CASE NAME: the figures of run NAME (timed with net_timed) under CASE
record() {
  local c=$1 f=$RUN_DIR/$2
  add WALL "$c" "$T_WALL"
  add DATA_S "$c" "$(log_span "$f.err" 'disk transfer starts' 'disk done')"
  add READ "$c" "$(jq '[.[0].disks[].bytes_read] | add' "$f.out")"
  add SSHD "$c" "$((NET_SENT + NET_RECV))"
  add SSHCONN "$c" "$NET_CONNS"
  add LOB "$c" "$(calc "$LO_RAW - $LO_IDLE * $LO_WIN")"
  add SSHALL "$c" "$((NET_ALL_SENT + NET_ALL_RECV))"
  add CPUV "$c" "$(calc "$T_USER + $T_SYS")"
  add BUSY "$c" "$(jq -r .cores_busy "$f.cpu.json" 2>/dev/null || echo nan)"
  add OTHER "$c" "$(cpu_other "$f.cpu.json" virtkeep sshd qemu-system-x86 qemu-nbd python3 time)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$2" "$T_WALL" "$(jq -c '[.[0].mode, .[0].method, .[0].reason]' "$f.out")" \
    "$(jq '[.[0].disks[].bytes_read] | add' "$f.out")" "$NET_CONNS" "$NET_SENT" "$NET_RECV" \
    "$NET_ALL_CONNS:$NET_ALL_SENT:$NET_ALL_RECV" "$LO_RAW" >>"$RUN_DIR/runs.tsv"
}
# backup NAME REPO MODE EXPECTED_MODE
backup() {
  local name=$1 repo=$2 mode=$3 want=$4
  net_timed "$name" "${VK[@]}" --json backup "lab/$DOM" --repo "$repo" --mode "$mode" --parallel "$PARALLEL" ||
    bdie "backup $name failed: $(tail -c 2000 "$RUN_DIR/$name.out") $(tail -n 20 "$RUN_DIR/$name.err")"
  jq -e '.[0].error == null' "$RUN_DIR/$name.out" >/dev/null || bdie "backup $name: $(cat "$RUN_DIR/$name.out")"
  local got method
  got=$(jq -r '.[0].mode' "$RUN_DIR/$name.out")
  method=$(jq -r '.[0].method' "$RUN_DIR/$name.out")
  [[ $got == "$want" ]] || bdie "backup $name: mode $got, expected $want (reason: $(jq -r '.[0].reason' "$RUN_DIR/$name.out"))"
  [[ $method == backup_api ]] || bdie "backup $name: method $method, expected backup_api (host check: $(jq -c . "$RUN_DIR/host-check.json" 2>/dev/null))"
  blog "  $name: $T_WALL s, mode $got, bytes_read $(jq '[.[0].disks[].bytes_read] | add' "$RUN_DIR/$name.out"), sshd sent+recv $((NET_SENT + NET_RECV))"
}
checkpoints() { virsh -q -c "$VK_LIBVIRT_URI" checkpoint-list --domain "$DOM" --name 2>/dev/null | grep -c . || true; }

CHANGED_A="" DIRTY_A=""
CP_COUNTS=""
for ((r = 1; r <= REPS; r++)); do
  repo=$WORK/repo-r$r
  "${VK[@]}" repo init "$repo" --encryption none >"$RUN_DIR/init-r$r.out" 2>&1 || bdie "repo init: $(cat "$RUN_DIR/init-r$r.out")"
  blog "round $r/$REPS: full backup (--mode auto, first in a fresh repository)"
  backup "full-r$r" "$repo" auto full
  record full "full-r$r"
  CP_COUNTS+="after full r$r: $(checkpoints); "
  gen_changes aligned "$r" "$DISK" "$NCHG" >"$RUN_DIR/changes-r$r.txt"
  read -r _ _ CHANGED_A _ DIRTY_A < <(tail -n 1 "$RUN_DIR/changes-r$r.txt")
  blog "round $r/$REPS: writing $CHANGED_A bytes (1 %) in $NCHG pieces through QEMU"
  hmp_writes "$DOM" ua-vda "0x$(printf '%02x' $((0x40 + r)))" "$RUN_DIR/changes-r$r.txt"
  blog "round $r/$REPS: incremental backup"
  backup "incr-r$r" "$repo" incremental incremental
  record incr "incr-r$r"
  CP_COUNTS+="after incremental r$r: $(checkpoints); "
  floor_runs "$r" "$CHANGED_A"
  blog "  floor: ssh head -c $CHANGED_A: $(med WALL floorssh) s, libvirt job alone: $(med WALL floorlv) s (medians so far)"
  ((r == REPS)) || rm -rf -- "$repo"
done

# unaligned writes: the 64 KiB dirty-bitmap granularity
gen_changes unaligned 99 "$DISK" "$NCHG" >"$RUN_DIR/changes-unaligned.txt"
read -r _ _ CHANGED_U _ DIRTY_U < <(tail -n 1 "$RUN_DIR/changes-unaligned.txt")
blog "unaligned: writing $CHANGED_U bytes ($DIRTY_U in 64 KiB granules) through QEMU"
hmp_writes "$DOM" ua-vda 0x5a "$RUN_DIR/changes-unaligned.txt"
backup incr-unaligned "$repo" incremental incremental
record incru incr-unaligned
CP_COUNTS+="after the unaligned incremental: $(checkpoints)"

VERIFIED="not run (VERIFY=0)"
if [[ $VERIFY == 1 ]]; then
  id=$(jq -r '.[0].id' "$RUN_DIR/incr-unaligned.out")
  blog "restore of the last incremental ($id) as $RESTORED, compare with the source"
  timed restore "${VK[@]}" --json restore "$id" --to lab --repo "$repo" --name "$RESTORED" \
    --storage "file:$VK_POOL_DIR" --parallel "$PARALLEL" ||
    bdie "restore failed: $(tail -c 2000 "$RUN_DIR/restore.out") $(tail -n 20 "$RUN_DIR/restore.err")"
  RESTORE_WALL=$T_WALL
  rpath=$(jq -r '.disks[0].path' "$RUN_DIR/restore.out")
  if qemu-img compare -U -f qcow2 -F "$(jq -r '.disks[0].format' "$RUN_DIR/restore.out")" "$IMG" "$rpath" >"$RUN_DIR/compare.out" 2>&1; then
    VERIFIED="yes: restored image of the last incremental equals the source (qemu-img compare -U; restore took $RESTORE_WALL s)"
  else
    VERIFIED="NO: $(cat "$RUN_DIR/compare.out")"
    blog "WARNING: restored image differs from the source: $(cat "$RUN_DIR/compare.out")"
  fi
  rm -f -- "$rpath"
fi

# ------------------------------------------------------------------ report
FULL_W=$(med WALL full)
FLOOR=$(calc "$(med WALL floorssh) + $(med WALL floorlv)")
INCR_W=$(med WALL incr)
WALL_RATIO=$(calc "$INCR_W / $FULL_W")
READ_I=$(med READ incr)
SSHD_I=$(med SSHD incr)
LOB_I=$(med LOB incr)
R_READ=$(calc "$READ_I / $CHANGED_A")
R_SSHD=$(calc "$SSHD_I / $CHANGED_A")
R_LO=$(calc "$LOB_I / $CHANGED_A")
row() { # CASE LABEL CHANGED
  local c=$1 w
  w=$(med WALL "$c")
  printf '| %-28s | %7s | %7s | %12s | %12s | %12s | %5s / %s | %s | %s | %s |\n' "$2" "$w" "$(med DATA_S "$c")" \
    "$(med READ "$c")" "$(med SSHD "$c")" "$(printf '%.0f' "$(med LOB "$c")")" \
    "$(calc "$(med CPUV "$c")")" "$(calc "$(med OTHER "$c")")" "$(calc "$(med BUSY "$c")")" \
    "$(mm WALL "$c")" "$3"
}
TABLE="| case | wall s | data s | bytes_read (virtkeep) | SSH bytes (sshd log, our connections, sent+recv) | lo bytes − idle | CPU s virtkeep / other | busy cores | wall range | changed bytes |
|---|---|---|---|---|---|---|---|---|---|
$(row full "full (--mode auto, 1st)" "-")
$(row incr "incremental, 1 % aligned" "$CHANGED_A (dirty 64K: $DIRTY_A)")
$(row incru "incremental, 1 % unaligned (×1)" "$CHANGED_U (dirty 64K: $DIRTY_U)")
"
SSHD_U=$(med SSHD incru)
TARGETS="| target (issue 6) | measured (medians of $REPS rounds) | verdict |
|---|---|---|
| incremental wall ≤ 5 % of the full's | $INCR_W s / $FULL_W s = $(calc "100 * $WALL_RATIO") % | $(verdict "$WALL_RATIO <= 0.05") |
| bytes over SSH ≤ 1.2 × changed (sshd log: SSH-layer bytes, both directions) | $SSHD_I / $CHANGED_A = $R_SSHD | $(verdict "$R_SSHD <= 1.2") |
| same, virtkeep's bytes_read (NBD payload only) | $READ_I / $CHANGED_A = $R_READ | $(verdict "$R_READ <= 1.2") |
| (loopback counter minus idle rate: all of lo, other people's lab tests included — not a verdict) | $(printf '%.0f' "$LOB_I") / $CHANGED_A = $R_LO | - |
| floor: changed bytes over ssh + libvirt's job alone, vs the full | $FLOOR s / $FULL_W s = $(calc "100 * $FLOOR / $FULL_W") % (no tool using the backup API from the node can go below this) | $(verdict "$(calc "$FLOOR / $FULL_W") <= 0.05") |
| incremental wall vs that floor | $INCR_W s / $FLOOR s = $(calc "$INCR_W / $FLOOR") | - |
| unaligned writes: sshd bytes / written bytes | $SSHD_U / $CHANGED_U = $(calc "$SSHD_U / $CHANGED_U") (bitmap bound: $DIRTY_U / $CHANGED_U = $(calc "$DIRTY_U / $CHANGED_U")) | $(verdict "$SSHD_U <= 1.2 * $CHANGED_U") |
"
GAPS=$(log_gaps "$RUN_DIR/incr-r$REPS.err" 12)
END_EPOCH=$(date +%s)
CPU_MODEL=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
FACTS="- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), SIZE=$SIZE, REPS=$REPS, --parallel $PARALLEL, run took $((END_EPOCH - START_EPOCH)) s
- machine: nproc=$(nproc), CPU \"$CPU_MODEL\", $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r); load average at the start $LOAD_START, at the end $(cut -d' ' -f1-3 /proc/loadavg) (shared machine: \"other\" CPU = every process not ours during the run)
- $("$BIN" --version 2>/dev/null | head -1): $BIN_SRC built $BIN_INFO (tree at $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') + uncommitted edits of others), $(rustc --version 2>/dev/null)
- $(qemu-img --version | head -1); $(virsh --version 2>/dev/null | sed 's/^/libvirt /'); $(ssh -V 2>&1); lab sshd on 127.0.0.1; repository on local disk ($(df -T "$WORK" | awk 'NR==2 {print $2}'))
- workload: qcow2 v3 $((DISK / MIB)) MiB virtual, $ALLOC B ($ALLOC_MIB MiB) allocated; running TCG domain $DOM (64 MiB RAM, no OS)
- changes: $NCHG writes of $((DISK / 8192)) B (1.001 % of the disk), one at a random 64 KiB-aligned place in each 82nd of the disk, byte pattern 0x41+round, through the running QEMU (HMP qemu-io + flush); unaligned round: 4 KiB-aligned places, lengths 1/2..3/2 of a piece
- wall = the whole \`virtkeep backup\` command (SSH connect, lock, heal, backup-begin, export, publish, job end, checkpoint housekeeping); data s = first \"disk transfer starts\" to last \"disk done\" in its log
- bytes over SSH, three ways: virtkeep's \`bytes_read\` (NBD read payload it counted); the lab sshd's \"Transferred: sent S, received R bytes\" lines of our virtkeep's connections (client ports from ss -tnp polled every 0.1 s; other people's tests use the same sshd) (SSH packets incl. key exchange, auth, NBD framing, MACs; independent of virtkeep); /proc/net/dev rx of lo during the run minus ${LO_IDLE} B/s idle rate × window (IP+TCP headers; everything on lo, Ceph's chatter too)
- checkpoints on the domain: $CP_COUNTS"

REPORT="# virtkeep incremental backup benchmark, qcow2 + backup API ($SIZE, $STAMP)

## Machine and method
$FACTS

## Results (median of $REPS rounds; each round: fresh repository, full, 1 % written, incremental)
$TABLE
## Targets (issue 6)
$TARGETS
Restore check: $VERIFIED.

## Where the incremental's time goes (last round: longest gaps between log lines)
\`\`\`
$GAPS
\`\`\`

## Runs
\`\`\`
$(cat "$RUN_DIR/runs.tsv")
\`\`\`
(name, wall s, [mode, method, reason], bytes_read, our SSH connections, their sshd sent, received, all connections closed in the window conns:sent:received (others' tests included), lo raw bytes)

## Workload layout (qcow2 offsets)
| piece | offset | length |
|---|---|---|
$LAYOUT_MD"

mkdir -p "$BENCH_DIR/results"
OUT=$BENCH_DIR/results/incremental-$STAMP-$SIZE.md
printf '%s\n' "$REPORT" >"$OUT"
tar -C "$RUN_DIR" -czf "$BENCH_DIR/results/incremental-$STAMP-$SIZE-runs.tar.gz" . 2>/dev/null || true
printf '\n%s\n%s\n' "$TABLE" "$TARGETS"
echo "restore check: $VERIFIED"
echo "report: $OUT"

#!/usr/bin/env bash
# Ceph RBD backup benchmark (issue 7, "Benchmark"): "Full and 1 %-changed incremental
# against `rbd export-diff … - >/dev/null` run on the host, in the same run."
#
# In one run, against the lab (lab/up.sh: private sshd on 127.0.0.1 stands for the host,
# single-node Ceph with a memstore OSD of 2 GiB):
#  1. workload: an RBD image rbd/vkt-rbdbench-PID-1-vda, 2 GiB (SIZE=large: 16 GiB) with
#     ~1/4 of it data (random, a repeated 4 MiB block, log-like text; large: ~1 GiB,
#     the memstore OSD holds 2 GiB in all) written with qemu-io through librbd, in a
#     running TCG domain (<disk type='network'> with the lab's ceph secret, as the lab's
#     TestVmBuilder::rbd_disk);
#  2. per round ($REPS rounds): a fresh repository; a bench snapshot A and
#     `ssh … rbd … export-diff --no-progress rbd/IMG@A - >/dev/null` (the physical limit:
#     the same command virtkeep runs, the same sshd, the stream thrown away on the node);
#     virtkeep's full backup (--mode auto: the first in that repository, keeps its
#     snapshot); 1 % of the disk rewritten through the running QEMU (qemu-io via HMP:
#     82 pieces of disk/8192 bytes at 64 KiB-aligned random places, one per 82nd of the
#     disk); snapshot B and `export-diff --from-snap A rbd/IMG@B`; virtkeep's
#     incremental (--mode incremental). The order of baseline and virtkeep alternates
#     between rounds. Wall time, bytes (virtkeep's bytes_read; the sshd log's SSH bytes
#     for both sides), snapshot housekeeping (virtkeep-* snapshots left on the image);
#  3. restore of the last incremental to a new RBD image (VERIFY=1, default for small),
#     compared with the source by sha256 of `rbd export`;
#  4. a table, the ratios, bench/results/rbd-<date>-<size>.md and a …-runs.tar.gz.
# Everything created (domain, RBD images and snapshots, repositories, temp files) is
# removed on exit, also on failure or Ctrl-C.
#
# Env: SIZE=small|large (2 GiB image / ~514 MiB data, or 16 GiB / ~1 GiB), REPS (rounds,
#      default 2), VERIFY (1 small, 0 large), BUILD (1: cargo build --release -p
#      virtkeep), VK_LOG (default info,virtkeep_engine=debug), KEEP=1 keeps the work dir.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
export PATH="$HOME/.cargo/bin:$PATH"

SIZE=${SIZE:-small}
MIB=1048576
case $SIZE in
  small) DISK=$((2048 * MIB)) PIECE=$((64 * MIB)) VERIFY=${VERIFY:-1} ;;
  large) DISK=$((16384 * MIB)) PIECE=$((128 * MIB)) VERIFY=${VERIFY:-0} ;;
  *) bdie "SIZE must be small or large" ;;
esac
U=$((DISK / 32))
REPS=${REPS:-2}
NCHG=82 # pieces of DISK/8192: 1.001 % of the disk
BUILD=${BUILD:-1}
VK_LOG=${VK_LOG:-info,virtkeep_engine=debug}

[[ $(id -u) -eq 0 ]] || bdie "run as root (the lab needs it)"
if [[ ! -x /usr/bin/time ]]; then
  blog "installing GNU time"
  apt-get install -y -q time >/dev/null
fi
for t in qemu-img qemu-io virsh ssh rbd ceph python3 jq bc shuf sha256sum; do
  command -v "$t" >/dev/null || bdie "$t is missing"
done

START_EPOCH=$(date +%s)
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=/var/tmp/vkt-rbdbench-$$
RUN_DIR=$WORK/runs
NODE=$WORK/node
DOM=vkt-rbdbench-$$-1
IMGNAME=$DOM-vda
RESTORED=vkt-rbdbenchr-$$-1
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
RBDC=() # rbd -c CONF --id ID --keyring KEYRING, once the lab env is loaded

rbd_remove() { # IMAGE: snapshots and image, quietly
  "${RBDC[@]}" snap purge --no-progress "rbd/$1" >/dev/null 2>&1
  "${RBDC[@]}" rm --no-progress "rbd/$1" >/dev/null 2>&1
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $SAMPLER_PID ]] && kill -TERM "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
  port_watch_stop
  if [[ -n ${VK_LIBVIRT_URI:-} ]]; then
    virsh -q -c "$VK_LIBVIRT_URI" destroy --domain "$DOM" >/dev/null 2>&1
    virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$DOM" --snapshots-metadata --checkpoints-metadata >/dev/null 2>&1
  fi
  if ((${#RBDC[@]})); then
    local img
    for img in $("${RBDC[@]}" ls rbd 2>/dev/null | grep -e "^vkt-rbdbench-$$-" -e "^vkt-rbdbenchr-$$-"); do
      rbd_remove "$img"
    done
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
RBDC=(rbd -c "$VK_CEPH_CONF" --id "$VK_CEPH_ID" --keyring "$VK_CEPH_KEYRING")
mkdir -p "$WORK/data" "$RUN_DIR" "$NODE"
BIN_SRC=$BIN
BIN_INFO="$(stat -c '%y' "$BIN" | cut -d. -f1), sha256 $(sha256sum "$BIN" | cut -c1-12)"
cp "$BIN" "$WORK/virtkeep"
BIN=$WORK/virtkeep

# the memstore OSD keeps everything in RAM, 2 GiB in all: refuse to fill it up
CEPH_AVAIL=$(timeout 30 ceph -c "$VK_CEPH_CONF" --id "$VK_CEPH_ID" --keyring "$VK_CEPH_KEYRING" df --format json 2>/dev/null |
  jq -r '.stats.total_avail_bytes // 0' || echo 0)
CEPH_USED=$(timeout 30 ceph -c "$VK_CEPH_CONF" --id "$VK_CEPH_ID" --keyring "$VK_CEPH_KEYRING" df --format json 2>/dev/null |
  jq -r '.stats.total_used_raw_bytes // 0' || echo 0)
# data (twice with the restore) + per round the 1 % written and copy-on-write clones of
# the 4 MiB objects it touches that held data (~1/4 of 82)
NEED=$((8 * PIECE * (VERIFY == 1 ? 2 : 1) + 6 * DISK / 100))
if ((CEPH_AVAIL > 0 && CEPH_AVAIL < NEED)); then
  bdie "Ceph has $CEPH_AVAIL bytes available, this run needs ~$NEED (others' RBD images fill the memstore OSD?)"
fi
blog "ceph: $CEPH_USED bytes used, $CEPH_AVAIL available"

# ------------------------------------------------------------------ workload
blog "workload: $((DISK / MIB)) MiB RBD image rbd/$IMGNAME, pieces of $((PIECE / MIB)) MiB"
D=$WORK/data
workload_files "$D" "$PIECE"
workload_layout "$DISK" "$U" "$PIECE"
"${RBDC[@]}" create --size "${DISK}B" "rbd/$IMGNAME"
io_args=()
LAYOUT_MD=""
for l in "${WL_LAYOUT[@]}"; do
  read -r f off <<<"$l"
  len=$(stat -c %s "$D/$f")
  io_args+=(-c "write -s $D/$f $off $len")
  LAYOUT_MD+="| $f | $off | $len |"$'\n'
done
qemu-io --image-opts "${io_args[@]}" \
  "driver=raw,file.driver=rbd,file.pool=rbd,file.image=$IMGNAME,file.conf=$VK_CEPH_CONF,file.user=$VK_CEPH_ID" \
  >"$RUN_DIR/qemu-io.log" 2>&1 || bdie "qemu-io failed: $(tail -5 "$RUN_DIR/qemu-io.log")"
rm -rf -- "$D"
ALLOC=$WL_DATA
ALLOC_MIB=$(calc "$ALLOC / $MIB")
RBD_DU=$("${RBDC[@]}" du --format json "rbd/$IMGNAME" 2>/dev/null | jq -r '.images[0].used_size // "?"' || echo "?")
blog "data written: $ALLOC bytes ($ALLOC_MIB MiB); rbd du: $RBD_DU"

MON_HOST=${VK_CEPH_MON%:*}
MON_PORT=${VK_CEPH_MON##*:}
cat >"$WORK/dom.xml" <<XML
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='rbd/$IMGNAME'>
        <host name='$MON_HOST' port='$MON_PORT'/>
      </source>
      <auth username='$VK_CEPH_ID'>
        <secret type='ceph' uuid='$VK_CEPH_SECRET_UUID'/>
      </auth>
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
blog "domain $DOM running on rbd/$IMGNAME"

# ------------------------------------------------------------------ node
VK=(env -u XDG_CONFIG_HOME -u XDG_DATA_HOME HOME="$NODE" VIRTKEEP_LOG="$VK_LOG" "$BIN" --config "$NODE/config.toml")
"${VK[@]}" host add lab --ssh "$VK_SSH_USER@$VK_SSH_HOST:$VK_SSH_PORT" --identity "$VK_SSH_KEY" \
  --known-hosts "$VK_SSH_KNOWN_HOSTS" --ceph-conf "$VK_CEPH_CONF" --ceph-id "$VK_CEPH_ID" \
  --ceph-keyring "$VK_CEPH_KEYRING" >"$RUN_DIR/host-add.out" 2>&1 || bdie "host add: $(cat "$RUN_DIR/host-add.out")"
"${VK[@]}" --json host check lab >"$RUN_DIR/host-check.json" 2>"$RUN_DIR/host-check.err" || true
SSH=(ssh -q -F /dev/null -c aes128-gcm@openssh.com -p "$VK_SSH_PORT" -i "$VK_SSH_KEY" -o BatchMode=yes
  -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$VK_SSH_KNOWN_HOSTS"
  -o GlobalKnownHostsFile=/dev/null -o ControlPath=none "$VK_SSH_USER@$VK_SSH_HOST")
# the baseline's client logs its byte counts ("Transferred: sent S, received R bytes", the
# SSH-layer counters sshd logs for virtkeep's connections): sshd itself logs nothing of
# the kind for a client that disconnects cleanly, as OpenSSH's does
SSHV=("${SSH[@]/#-q/-oLogLevel=VERBOSE}")
# the remote side of the baseline: the command virtkeep runs (rbd_diff), stream to our /dev/null
REMOTE_RBD="rbd -c $VK_CEPH_CONF --id $VK_CEPH_ID --keyring $VK_CEPH_KEYRING"
TO_NULL=(bash -c 'exec "$@" >/dev/null' to-null) # /usr/bin/time runs programs, not functions

# ------------------------------------------------------------------ measurements
# shellcheck disable=SC2034 # read through med()'s nameref
declare -A WALL DATA_S BYTES SSHD CPUV OTHER BUSY
# shellcheck disable=SC2086 # the values are a space-separated list
# shellcheck disable=SC2086
record() { # CASE NAME [virtkeep]
  local c=$1 f=$RUN_DIR/$2
  add WALL "$c" "$T_WALL"
  add SSHD "$c" "$((NET_SENT + NET_RECV))"
  add BUSY "$c" "$(jq -r .cores_busy "$f.cpu.json" 2>/dev/null || echo nan)"
  add OTHER "$c" "$(cpu_other "$f.cpu.json" virtkeep sshd ssh rbd ceph-osd ceph-mon qemu-system-x86 python3 time)"
  if [[ ${3:-} == virtkeep ]]; then
    add DATA_S "$c" "$(log_span "$f.err" 'disk transfer starts' 'disk done')"
    add BYTES "$c" "$(jq '[.[0].disks[].bytes_read] | add' "$f.out")"
    add CPUV "$c" "$(calc "$T_USER + $T_SYS")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$2" "$T_WALL" "$(jq -c '[.[0].mode, .[0].method, .[0].reason]' "$f.out")" \
      "$(jq '[.[0].disks[].bytes_read] | add' "$f.out")" "$NET_CONNS" "$NET_SENT" "$NET_RECV" \
      "$NET_ALL_CONNS:$NET_ALL_SENT:$NET_ALL_RECV" >>"$RUN_DIR/runs.tsv"
  else
    add CPUV "$c" 0
    printf '%s\t%s\t-\t-\t%s\t%s\t%s\t%s\n' "$2" "$T_WALL" "$NET_CONNS" "$NET_SENT" "$NET_RECV" \
      "$NET_ALL_CONNS:$NET_ALL_SENT:$NET_ALL_RECV" >>"$RUN_DIR/runs.tsv"
  fi
}
baseline() { # NAME CASE SNAP [FROM]
  local name=$1 c=$2 snap=$3 from=${4:-} extra=""
  [[ -n $from ]] && extra="--from-snap $from "
  NET_MATCH="$IMGNAME@" net_timed "$name" "${TO_NULL[@]}" "${SSHV[@]}" "$REMOTE_RBD export-diff --no-progress ${extra}rbd/$IMGNAME@$snap -" ||
    bdie "export-diff $name failed: $(cat "$RUN_DIR/$name.err")"
  read -r NET_SENT NET_RECV < <(tr -d '\r' <"$RUN_DIR/$name.err" |
    awk '/Transferred: sent [0-9]+, received [0-9]+ bytes/ {gsub(",", "", $3); print $5 + 0, $3 + 0}')
  NET_CONNS=1
  record "$c" "$name"
  blog "  $name: $T_WALL s, sshd sent+recv $((NET_SENT + NET_RECV))"
}
backup() { # NAME CASE REPO MODE EXPECTED_MODE
  local name=$1 c=$2 repo=$3 mode=$4 want=$5 got
  NET_MATCH=$WORK/virtkeep net_timed "$name" "${VK[@]}" --json backup "lab/$DOM" --repo "$repo" --mode "$mode" ||
    bdie "backup $name failed: $(tail -c 2000 "$RUN_DIR/$name.out") $(tail -n 20 "$RUN_DIR/$name.err")"
  jq -e '.[0].error == null' "$RUN_DIR/$name.out" >/dev/null || bdie "backup $name: $(cat "$RUN_DIR/$name.out")"
  got=$(jq -r '.[0].mode' "$RUN_DIR/$name.out")
  [[ $got == "$want" ]] || bdie "backup $name: mode $got, expected $want (reason: $(jq -r '.[0].reason' "$RUN_DIR/$name.out"))"
  record "$c" "$name" virtkeep
  blog "  $name: $T_WALL s, mode $got, bytes_read $(jq '[.[0].disks[].bytes_read] | add' "$RUN_DIR/$name.out"), sshd sent+recv $((NET_SENT + NET_RECV))"
}
vk_snaps() { "${RBDC[@]}" snap ls --format json "rbd/$IMGNAME" | jq -r '[.[] | select(.name | startswith("virtkeep-")) | .name] | join(",")'; }

SNAPS_LOG=""
for ((r = 1; r <= REPS; r++)); do
  repo=$WORK/repo-r$r
  "${VK[@]}" repo init "$repo" --encryption none >"$RUN_DIR/init-r$r.out" 2>&1 || bdie "repo init: $(cat "$RUN_DIR/init-r$r.out")"
  "${RBDC[@]}" snap create --no-progress "rbd/$IMGNAME@vkbench-r$r-a" >/dev/null
  blog "round $r/$REPS: full"
  if ((r % 2)); then
    baseline "xdiff-full-r$r" xfull "vkbench-r$r-a"
    backup "full-r$r" full "$repo" auto full
  else
    backup "full-r$r" full "$repo" auto full
    baseline "xdiff-full-r$r" xfull "vkbench-r$r-a"
  fi
  SNAPS_LOG+="after full r$r: [$(vk_snaps)]; "
  gen_changes aligned "$r" "$DISK" "$NCHG" >"$RUN_DIR/changes-r$r.txt"
  read -r _ _ CHANGED _ _ < <(tail -n 1 "$RUN_DIR/changes-r$r.txt")
  blog "round $r/$REPS: writing $CHANGED bytes (1 %) in $NCHG pieces through QEMU"
  hmp_writes "$DOM" ua-vda "0x$(printf '%02x' $((0x40 + r)))" "$RUN_DIR/changes-r$r.txt"
  "${RBDC[@]}" snap create --no-progress "rbd/$IMGNAME@vkbench-r$r-b" >/dev/null
  blog "round $r/$REPS: incremental"
  if ((r % 2)); then
    baseline "xdiff-incr-r$r" xincr "vkbench-r$r-b" "vkbench-r$r-a"
    backup "incr-r$r" incr "$repo" incremental incremental
  else
    backup "incr-r$r" incr "$repo" incremental incremental
    baseline "xdiff-incr-r$r" xincr "vkbench-r$r-b" "vkbench-r$r-a"
  fi
  SNAPS_LOG+="after incremental r$r: [$(vk_snaps)]; "
  "${RBDC[@]}" snap rm --no-progress "rbd/$IMGNAME@vkbench-r$r-a" >/dev/null 2>&1
  "${RBDC[@]}" snap rm --no-progress "rbd/$IMGNAME@vkbench-r$r-b" >/dev/null 2>&1
  ((r == REPS)) || rm -rf -- "$repo"
done
ALL_SNAPS=$("${RBDC[@]}" snap ls --format json "rbd/$IMGNAME" | jq -r '[.[].name] | join(",")')
BASE_META=$("${RBDC[@]}" image-meta get "rbd/$IMGNAME" virtkeep.base 2>/dev/null || echo "-")

VERIFIED="not run (VERIFY=0)"
if [[ $VERIFY == 1 ]]; then
  id=$(jq -r '.[0].id' "$RUN_DIR/incr-r$REPS.out")
  blog "restore of the last incremental ($id) to rbd:rbd as $RESTORED, compare with the source"
  timed restore "${VK[@]}" --json restore "$id" --to lab --repo "$repo" --name "$RESTORED" --storage rbd:rbd ||
    bdie "restore failed: $(tail -c 2000 "$RUN_DIR/restore.out") $(tail -n 20 "$RUN_DIR/restore.err")"
  RESTORE_WALL=$T_WALL
  rspec=$(jq -r '.disks[0].path' "$RUN_DIR/restore.out")
  rspec=${rspec#rbd:}
  # the guest never writes by itself: the image now equals the last incremental's instant
  a=$("${RBDC[@]}" export --no-progress "rbd/$IMGNAME" - | sha256sum | cut -c1-64)
  b=$("${RBDC[@]}" export --no-progress "$rspec" - | sha256sum | cut -c1-64)
  if [[ $a == "$b" ]]; then
    VERIFIED="yes: the restored image $rspec equals the source (sha256 of rbd export; restore took $RESTORE_WALL s)"
  else
    VERIFIED="NO: sha256 $a (source) vs $b (restored $rspec)"
    blog "WARNING: restored image differs: $VERIFIED"
  fi
  rbd_remove "${rspec#*/}"
fi

# ------------------------------------------------------------------ report
W_XF=$(med WALL xfull) W_F=$(med WALL full) W_XI=$(med WALL xincr) W_I=$(med WALL incr)
row() { # CASE LABEL REFCASE
  local c=$1 w b
  w=$(med WALL "$c")
  b=$(med BYTES "$c")
  [[ $b == nan ]] && b="-"
  printf '| %-34s | %7s | %7s | %8s | %5s | %12s | %12s | %5s / %s | %s | %s |\n' "$2" "$w" "$(med DATA_S "$c")" \
    "$(calc "$ALLOC_MIB / $w")" "$(calc "$w / $(med WALL "$3")")" "$b" "$(med SSHD "$c")" \
    "$(calc "$(med CPUV "$c")")" "$(calc "$(med OTHER "$c")")" "$(calc "$(med BUSY "$c")")" "$(mm WALL "$c")"
}
TABLE="| case | wall s | data s | data MiB/s (allocated ÷ wall) | wall ÷ export-diff | bytes_read (virtkeep) | SSH bytes (sshd log) | CPU s virtkeep / other | busy cores | wall range |
|---|---|---|---|---|---|---|---|---|---|
$(row xfull "ssh rbd export-diff (full) >/dev/null" xfull)
$(row full "virtkeep full (--mode auto, 1st)" xfull)
$(row xincr "ssh rbd export-diff --from-snap (1 %)" xincr)
$(row incr "virtkeep incremental (1 %)" xincr)
"
RATIOS="| ratio (medians of $REPS rounds) | value |
|---|---|
| virtkeep full ÷ export-diff full (wall) | $(calc "$W_F / $W_XF") ($W_F s vs $W_XF s) |
| virtkeep incremental ÷ export-diff --from-snap (wall) | $(calc "$W_I / $W_XI") ($W_I s vs $W_XI s) |
| virtkeep incremental ÷ virtkeep full (wall; issue 6's bar is ≤ 5 %) | $(calc "100 * $W_I / $W_F") % |
| virtkeep incremental SSH bytes ÷ changed bytes | $(calc "$(med SSHD incr) / $CHANGED") ($(med SSHD incr) / $CHANGED) |
| export-diff --from-snap SSH bytes ÷ changed bytes | $(calc "$(med SSHD xincr) / $CHANGED") |
| virtkeep full SSH bytes ÷ export-diff full SSH bytes | $(calc "$(med SSHD full) / $(med SSHD xfull)") |
"
GAPS=$(log_gaps "$RUN_DIR/incr-r$REPS.err" 12)
GAPS_F=$(log_gaps "$RUN_DIR/full-r$REPS.err" 8)
END_EPOCH=$(date +%s)
CPU_MODEL=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
FACTS="- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), SIZE=$SIZE, REPS=$REPS, run took $((END_EPOCH - START_EPOCH)) s
- machine: nproc=$(nproc), CPU \"$CPU_MODEL\", $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r); load average at the start $LOAD_START, at the end $(cut -d' ' -f1-3 /proc/loadavg) (shared machine: \"other\" CPU = every process that is not virtkeep/ssh(d)/rbd/ceph/qemu during the run)
- $("$BIN" --version 2>/dev/null | head -1): $BIN_SRC built $BIN_INFO (tree at $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') + uncommitted edits of others), $(rustc --version 2>/dev/null)
- $("${RBDC[@]}" --version 2>/dev/null | head -1); lab Ceph: 1 mon, 1 memstore OSD (2 GiB, RAM), pool rbd size 1, all on 127.0.0.1; $(virsh --version 2>/dev/null | sed 's/^/libvirt /'); $(ssh -V 2>&1); repository on local disk ($(df -T "$WORK" | awk 'NR==2 {print $2}'))
- workload: RBD image rbd/$IMGNAME $((DISK / MIB)) MiB, $ALLOC B ($ALLOC_MIB MiB) written (rbd du: $RBD_DU), in running TCG domain $DOM (64 MiB RAM, no OS); Ceph before the run: $CEPH_USED B used, $CEPH_AVAIL B available
- changes: $NCHG writes of $((DISK / 8192)) B (1.001 % of the disk; $CHANGED B) at random 64 KiB-aligned places, one in each 82nd of the disk, through the running QEMU (HMP qemu-io + flush, librbd)
- baseline: \`ssh -c aes128-gcm@openssh.com … '$REMOTE_RBD export-diff --no-progress [--from-snap A] rbd/IMG@SNAP -' >/dev/null\` on the same sshd, with snapshots the script takes next to virtkeep's (the guest does not write, so both see the same data); the snapshot creation is outside the baseline's time, inside virtkeep's
- wall = the whole command; data s = first \"disk transfer starts\" to last \"disk done\" in virtkeep's log; SSH bytes = for virtkeep the lab sshd's \"Transferred: sent+received\" of our processes' connections, for the baseline the ssh client's own \"Transferred:\" line (LogLevel VERBOSE; the same SSH-layer counters seen from the other end) (client ports from ss -tnp polled every 0.1 s; SSH layer, independent of virtkeep; other people's tests use the same sshd); MiB/s = allocated data ÷ wall (also for the incrementals, where it only says how fast relative to the disk)
- virtkeep snapshot housekeeping (virtkeep-* snapshots on the image, issue 7: exactly one with --mode auto|incremental): $SNAPS_LOG at the end all snapshots: [$ALL_SNAPS], image-meta virtkeep.base = $BASE_META"

REPORT="# virtkeep RBD backup benchmark ($SIZE, $STAMP)

## Machine and method
$FACTS

## Results (median of $REPS rounds; each round: fresh repository, full, 1 % written, incremental)
$TABLE
## Ratios (issue 7: full and 1 %-changed incremental against rbd export-diff)
$RATIOS
Restore check: $VERIFIED.

## Where the time goes (last round, longest gaps between virtkeep log lines)
Incremental:
\`\`\`
$GAPS
\`\`\`
Full:
\`\`\`
$GAPS_F
\`\`\`

## Runs
\`\`\`
$(cat "$RUN_DIR/runs.tsv")
\`\`\`
(name, wall s, [mode, method, reason], bytes_read, our SSH connections, their sshd sent, received, all connections closed in the window conns:sent:received (others' tests included))

## Workload layout (image offsets)
| piece | offset | length |
|---|---|---|
$LAYOUT_MD"

mkdir -p "$BENCH_DIR/results"
OUT=$BENCH_DIR/results/rbd-$STAMP-$SIZE.md
printf '%s\n' "$REPORT" >"$OUT"
tar -C "$RUN_DIR" -czf "$BENCH_DIR/results/rbd-$STAMP-$SIZE-runs.tar.gz" . 2>/dev/null || true
printf '\n%s\n%s\n' "$TABLE" "$RATIOS"
echo "restore check: $VERIFIED"
echo "report: $OUT"

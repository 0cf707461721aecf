#!/usr/bin/env bash
# Backups at the floor (issue 14, "Benchmark"): fulls against the wire and the
# compressing limit, incrementals against the floor, virtnbdbackup alongside, in one run.
#
# Against the lab (lab/up.sh: the private sshd on 127.0.0.1 stands for the host):
#  1. workload: a qcow2 (v3) in $VK_POOL_DIR, 8 GiB virtual with ~2 GiB of data
#     (SIZE=small: 2 GiB / ~514 MiB; the pieces of bench/incremental.sh: random, a
#     repeated 4 MiB block, log-like text, holes elsewhere) in a running TCG domain
#     vkt-bench-PID-1 for virtkeep, and a copy of the image in a second running domain
#     vkt-bench-PID-2 for virtnbdbackup: virtnbdbackup refuses a domain that carries
#     checkpoints it did not make ("foreign checkpoint"), and a full of its own deletes
#     its checkpoints, so each tool keeps its own chain on its own domain. A raw file of
#     exactly the allocated bytes for the wire baselines.
#  2. fulls, $REPS rounds, the order reversed every other round: (a) the bare wire
#     `ssh -c aes128-gcm@openssh.com host cat RAW >/dev/null`, (b) the compressing
#     limit `… cat RAW | zstd -1 -T0 >/dev/null`, (c) `virtkeep --json backup --mode
#     full` into a fresh local repository, (d) `virtnbdbackup -l full` into a fresh
#     directory (it reads locally over a unix socket, unencrypted, uncompressed: a
#     generous peer). Wall, MiB/s = allocated bytes / wall, peak RSS, virtkeep's phases.
#  3. incrementals, two change patterns of 64 MiB written through the running QEMUs
#     (qemu-io via HMP, the same writes on both domains): A = 8 ranges of 8 MiB, one in
#     each eighth of the disk; B = 64 writes of 1 MiB, each in a different 4 MiB-aligned
#     chunk, one chunk in each 64th of the disk. Per pattern: a virtkeep full
#     (--mode $FULL_MODE, fresh repository) and a virtnbdbackup full, then $REPS rounds
#     of change → virtkeep --mode incremental and virtnbdbackup -l inc (alternating
#     order) → the floor: the changed bytes over one OpenSSH session (`ssh … head -c N
#     IMG >/dev/null`) plus libvirt's job alone on the host (checkpoint + pull-mode
#     backup-begin + domjobabort + checkpoint-delete, as bench/incremental.sh).
#  4. tables with the issue's targets and verdicts on stdout and in
#     bench/results/floor-<date>-<size>.md, every run's files in …-runs.tar.gz.
# Everything it created (domains, images, repositories, the raw file, the work dir) is
# removed on exit, also on failure or Ctrl-C.
#
# Env: SIZE=workload|small (8 GiB / ~2 GiB data, or 2 GiB / ~514 MiB), REPS (rounds, 3),
#      BUILD (1: cargo build --release -p virtkeep first; 0 by default when VK is set),
#      VK (path of the virtkeep binary; default target/release/virtkeep), PARALLEL
#      (backup --parallel, 2), FULL_MODE (mode of the full that starts each incremental
#      chain, default full: issue 14 requires it to leave the base; auto for a binary
#      from before that fix), VK_LOG (virtkeep's log filter), KEEP=1 keeps the work dir,
#      CHUNK_MIB (the repositories' chunk size in MiB, 4 = the default; the report's
#      name ends in -cN for another size, to compare the spread pattern B).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
export PATH="$HOME/.cargo/bin:$PATH"

SIZE=${SIZE:-workload}
REPS=${REPS:-3}
MIB=1048576
case $SIZE in
  workload) DISK=$((8192 * MIB)) ;;
  small) DISK=$((2048 * MIB)) ;;
  *) bdie "SIZE must be workload or small" ;;
esac
[[ $REPS =~ ^[1-9][0-9]*$ ]] || bdie "REPS must be a positive integer"
U=$((DISK / 32)) # layout unit and piece size: 256 MiB (workload), 64 MiB (small)
CHANGE=$((64 * MIB))
if [[ -n ${VK:-} ]]; then BUILD=${BUILD:-0}; else BUILD=${BUILD:-1}; fi
PARALLEL=${PARALLEL:-2}
FULL_MODE=${FULL_MODE:-full}
CHUNK_MIB=${CHUNK_MIB:-4}
[[ $CHUNK_MIB =~ ^(1|2|4|8|16)$ ]] || bdie "CHUNK_MIB must be 1, 2, 4, 8 or 16"
VK_LOG=${VK_LOG:-info,virtkeep_engine=debug}
RSS_MAX_KB=$((128 * 1024))

[[ $(id -u) -eq 0 ]] || bdie "run as root (the lab needs it)"
if [[ ! -x /usr/bin/time ]]; then
  blog "installing GNU time"
  apt-get install -y -q time >/dev/null
fi
if ! command -v virtnbdbackup >/dev/null; then
  blog "installing virtnbdbackup"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q virtnbdbackup >/dev/null
fi
if ! command -v zstd >/dev/null; then
  blog "installing zstd"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q zstd >/dev/null
fi
for t in qemu-img qemu-io virsh ssh python3 jq bc shuf zstd virtnbdbackup; do
  command -v "$t" >/dev/null || bdie "$t is missing"
done

START_EPOCH=$(date +%s)
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=/var/tmp/vkt-bench-$$
RUN_DIR=$WORK/runs
NODE=$WORK/node
DOM=vkt-bench-$$-1  # virtkeep's
DOM2=vkt-bench-$$-2 # virtnbdbackup's
FLOOR_DIR=/run/vkt-floor-$$
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $SAMPLER_PID ]] && kill -TERM "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
  if [[ -n ${VK_LIBVIRT_URI:-} ]]; then
    local d pid
    for d in "$DOM" "$DOM2"; do
      virsh -q -c "$VK_LIBVIRT_URI" destroy --domain "$d" >/dev/null 2>&1
      virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$d" --snapshots-metadata --checkpoints-metadata >/dev/null 2>&1
    done
    # qemu-nbd exports a killed virtkeep may have left, found by our unique image names
    for pid in $(pgrep -x qemu-nbd 2>/dev/null); do
      if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -e "vkt-bench-$$-"; then
        kill "$pid" 2>/dev/null
      fi
    done
    rm -f -- "$VK_POOL_DIR"/vkt-bench-$$-*
  fi
  rm -rf -- "$FLOOR_DIR"-*
  if [[ ${KEEP:-0} == 1 ]]; then
    blog "KEEP=1: work dir kept at $WORK (repositories, backups and data removed)"
    rm -rf -- "$WORK"/repo-* "$WORK"/nbd-* "$WORK"/data "$WORK"/alloc.raw
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
BIN=${VK:-${CARGO_TARGET_DIR:-$ROOT/target}/release/virtkeep}
if [[ -n ${VK:-} ]]; then
  BIN_TREE="given as VK"
else
  BIN_TREE="tree at $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted edits')"
fi
[[ -x $BIN ]] || bdie "no virtkeep binary at $BIN (set VK or BUILD=1)"

blog "lab/up.sh"
bash "$ROOT/lab/up.sh"
load_lab_env /tmp/virtkeep-lab/env
mkdir -p "$WORK/data" "$RUN_DIR" "$NODE"
# virtnbdbackup's NBD socket and scratch files: QEMU (another user) creates them here
mkdir -p "$WORK/nbdtmp"
chmod 1777 "$WORK/nbdtmp"
BIN_SRC=$BIN
BIN_INFO="$(stat -c '%y' "$BIN" | cut -d. -f1), sha256 $(sha256sum "$BIN" | cut -c1-12)"
cp "$BIN" "$WORK/virtkeep" # others' builds may replace the binary during the run
BIN=$WORK/virtkeep
IMG=$VK_POOL_DIR/$DOM-vda.qcow2
IMG2=$VK_POOL_DIR/$DOM2-vda.qcow2

# ------------------------------------------------------------------ workload
blog "workload: $((DISK / MIB)) MiB qcow2, pieces of $((U / MIB)) MiB"
D=$WORK/data
workload_files "$D" "$U"
workload_layout "$DISK" "$U" "$U"
rm -f "$IMG" "$IMG2"
qemu-img create -q -f qcow2 -o compat=1.1 "$IMG" "$DISK"
io_args=()
for l in "${WL_LAYOUT[@]}"; do
  read -r f off <<<"$l"
  io_args+=(-c "write -s $D/$f $off $(stat -c %s "$D/$f")")
done
qemu-io -f qcow2 "${io_args[@]}" "$IMG" >"$RUN_DIR/qemu-io.log" || bdie "qemu-io failed: $(tail -5 "$RUN_DIR/qemu-io.log")"
ALLOC=$(qemu-img map --output=json -f qcow2 "$IMG" | jq '[.[] | select(.data == true and .zero == false) | .length] | add')
# The raw file for the wire baselines: the pieces in disk order, then the zero bytes that
# share a 64 KiB cluster with a piece (an unaligned piece allocates whole clusters):
# exactly the allocated bytes.
RAW=$WORK/alloc.raw
((ALLOC >= WL_DATA && ALLOC - WL_DATA < 1024 * 1024)) || bdie "qemu-img map says $ALLOC allocated, the pieces hold $WL_DATA"
for l in "${WL_LAYOUT[@]}"; do
  read -r f _ <<<"$l"
  cat "$D/$f"
done >"$RAW"
head -c $((ALLOC - WL_DATA)) /dev/zero >>"$RAW"
[[ $(stat -c %s "$RAW") -eq $ALLOC ]] || bdie "raw file has $(stat -c %s "$RAW") bytes, $ALLOC allocated"
rm -rf -- "$D"
cp "$IMG" "$IMG2"
chown "$VK_QEMU_USER:$VK_QEMU_GROUP" "$IMG" "$IMG2"
ALLOC_MIB=$(calc "$ALLOC / $MIB")
blog "allocated data: $ALLOC bytes ($ALLOC_MIB MiB); raw file $RAW"

define_domain() { # NAME IMAGE
  cat >"$WORK/$1.xml" <<XML
<domain type='qemu'>
  <name>$1</name>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$2'/>
      <target dev='vda' bus='virtio'/>
      <alias name='ua-vda'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
  virsh -q -c "$VK_LIBVIRT_URI" define --file "$WORK/$1.xml" >/dev/null
  virsh -q -c "$VK_LIBVIRT_URI" start --domain "$1" >/dev/null
}
define_domain "$DOM" "$IMG"
define_domain "$DOM2" "$IMG2"
blog "domains $DOM (virtkeep) and $DOM2 (virtnbdbackup) running"
cat "$IMG" "$IMG2" "$RAW" >/dev/null # page cache: every reader starts from memory

# ------------------------------------------------------------------ node, tools
VKC=(env -u XDG_CONFIG_HOME -u XDG_DATA_HOME HOME="$NODE" VIRTKEEP_LOG="$VK_LOG" "$BIN" --config "$NODE/config.toml")
"${VKC[@]}" host add lab --ssh "$VK_SSH_USER@$VK_SSH_HOST:$VK_SSH_PORT" --identity "$VK_SSH_KEY" \
  --known-hosts "$VK_SSH_KNOWN_HOSTS" >"$RUN_DIR/host-add.out" 2>&1 || bdie "host add: $(cat "$RUN_DIR/host-add.out")"
SSH=(ssh -q -F /dev/null -c aes128-gcm@openssh.com -p "$VK_SSH_PORT" -i "$VK_SSH_KEY" -o BatchMode=yes
  -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$VK_SSH_KNOWN_HOSTS"
  -o GlobalKnownHostsFile=/dev/null -o ControlPath=none "$VK_SSH_USER@$VK_SSH_HOST")
NBD=(virtnbdbackup -U "$VK_LIBVIRT_URI" -d "$DOM2" -n -S "$WORK/nbdtmp" -f "$WORK/nbdtmp/nbd.sock")

# shellcheck disable=SC2034 # read through med()'s nameref
declare -A WALL RSS CPU SSHD OTHER BUSY READ
# shellcheck disable=SC2086 # the values are a space-separated list
# shellcheck disable=SC2086
# shellcheck disable=SC2086
maxof() { local -n arr=$1; printf '%s\n' ${arr[$2]:-} | sort -g | tail -n 1; }
# record CASE NAME: the figures of the timed run NAME under CASE
record() {
  local c=$1 f=$RUN_DIR/$2
  add WALL "$c" "$T_WALL"
  add RSS "$c" "$T_RSS_KB"
  add CPU "$c" "$(calc "$T_USER + $T_SYS")"
  add SSHD "$c" "$(cpu_of "$f.cpu.json" sshd)"
  add OTHER "$c" "$(cpu_other "$f.cpu.json" virtkeep sshd ssh zstd cat head bash virtnbdbackup qemu-system-x86 python3 time)"
  add BUSY "$c" "$(jq -r .cores_busy "$f.cpu.json" 2>/dev/null || echo nan)"
  printf '%s\t%s\t%s\n' "$2" "$T_WALL" "$T_RSS_KB" >>"$RUN_DIR/runs.tsv"
}
# Quiet start for every timed case: the previous case's repository or backup files are
# on disk, not in dirty pages that would be written back during the next measurement.
settle() { sync; }

# --- the cases (each: NAME, then case-specific arguments)
# The wire baselines discard their output inside the timed command (`>/dev/null` in a
# `bash -c`): `timed` sends a command's stdout to a file on disk, and writing the 2 GiB
# there is what made the earlier "ssh cat" baseline slower than the wire (issue 14).
run_wire() { # NAME
  settle
  timed "$1" bash -c '"$@" >/dev/null' _ "${SSH[@]}" cat "$RAW" || bdie "ssh cat failed: $(cat "$RUN_DIR/$1.err")"
  record wire "$1"
}
run_zstd() { # NAME
  settle
  timed "$1" bash -c 'set -o pipefail; "$@" | zstd -q -1 -T0 >/dev/null' _ "${SSH[@]}" cat "$RAW" ||
    bdie "ssh cat | zstd failed: $(cat "$RUN_DIR/$1.err")"
  record zstd "$1"
}
# vk_backup CASE NAME REPO MODE EXPECTED_MODE
vk_backup() {
  local c=$1 name=$2 repo=$3 mode=$4 want=$5 f=$RUN_DIR/$2 got method
  settle
  timed "$name" "${VKC[@]}" --json backup "lab/$DOM" --repo "$repo" --key-file "$repo.key" --mode "$mode" --parallel "$PARALLEL" ||
    bdie "virtkeep backup $name failed: $(tail -c 2000 "$f.out") $(tail -n 20 "$f.err")"
  jq -e '.[0].error == null' "$f.out" >/dev/null || bdie "virtkeep backup $name: $(cat "$f.out")"
  got=$(jq -r '.[0].mode' "$f.out")
  method=$(jq -r '.[0].method' "$f.out")
  [[ $got == "$want" ]] || bdie "virtkeep backup $name: mode $got, expected $want (reason: $(jq -r '.[0].reason' "$f.out"))"
  [[ $method == backup_api ]] || bdie "virtkeep backup $name: method $method, expected backup_api"
  record "$c" "$name"
  add READ "$c" "$(jq '[.[0].disks[].bytes_read] | add' "$f.out")"
  jq -c '.[0].phases // null' "$f.out" >>"$RUN_DIR/phases-$c.jsonl"
  printf '%s\t%s\n' "$name" "$(jq -c '[.[0].mode, .[0].reason, ([.[0].disks[].bytes_read] | add), .[0].phases]' "$f.out")" \
    >>"$RUN_DIR/virtkeep.tsv"
  blog "  $name: $T_WALL s, mode $got, bytes_read $(jq '[.[0].disks[].bytes_read] | add' "$f.out"), RSS $((T_RSS_KB / 1024)) MiB"
}
# nbd_backup CASE NAME DIR LEVEL: virtnbdbackup; bytes = its "bytes of data extents to backup"
nbd_backup() {
  local c=$1 name=$2 dir=$3 level=$4 f=$RUN_DIR/$2 bytes
  settle
  timed "$name" "${NBD[@]}" -l "$level" -o "$dir" ||
    bdie "virtnbdbackup $name failed: $(tail -n 20 "$f.err")"
  bytes=$(grep -o '[0-9]* bytes of data extents to backup' "$f.err" | awk '{s += $1} END {print s + 0}')
  record "$c" "$name"
  add READ "$c" "$bytes"
  blog "  $name: $T_WALL s, data extents $bytes B, RSS $((T_RSS_KB / 1024)) MiB"
}
# The floor of any incremental through libvirt's backup API from this node (as in
# bench/incremental.sh): the changed bytes alone over one SSH session, and libvirt's own
# job (checkpoint + pull-mode backup-begin + domjobabort + checkpoint-delete, run on the
# host in one SSH command, no data read). Run on virtkeep's domain after its incremental:
# deleting the floor's checkpoint merges its (empty) bitmap into virtkeep's checkpoint.
floor_runs() { # CASE TAG BYTES
  local c=$1 tag=$2 bytes=$3 t0 t1 ssh_s lv_s
  local d=$FLOOR_DIR-$tag cp=vkt-floor-$$-$tag
  settle
  t0=$EPOCHREALTIME
  "${SSH[@]}" "head -c $bytes $(printf %q "$IMG") >/dev/null" || bdie "ssh head failed"
  t1=$EPOCHREALTIME
  ssh_s=$(calc "$t1 - $t0")
  t0=$EPOCHREALTIME
  "${SSH[@]}" "set -e; mkdir -p $d; chmod 0777 $d
    printf '%s' \"<domaincheckpoint><name>$cp</name></domaincheckpoint>\" >$d/cp.xml
    printf '%s' \"<domainbackup mode='pull'><server transport='unix' socket='$d/nbd.sock'/><disks><disk name='vda' backup='yes' type='file'><scratch file='$d/s.qcow2'/></disk></disks></domainbackup>\" >$d/b.xml
    virsh -q -c $VK_LIBVIRT_URI backup-begin --domain $DOM --backupxml $d/b.xml --checkpointxml $d/cp.xml >/dev/null
    virsh -q -c $VK_LIBVIRT_URI domjobabort --domain $DOM
    virsh -q -c $VK_LIBVIRT_URI checkpoint-delete --domain $DOM --checkpointname $cp >/dev/null
    rm -rf $d" || bdie "libvirt floor job failed"
  t1=$EPOCHREALTIME
  lv_s=$(calc "$t1 - $t0")
  add WALL "$c-floorssh" "$ssh_s"
  add WALL "$c-floorlv" "$lv_s"
  add WALL "$c-floor" "$(calc "$ssh_s + $lv_s")"
  printf 'floor-%s\t%s\t%s\n' "$tag" "$ssh_s" "$lv_s" >>"$RUN_DIR/runs.tsv"
  blog "  floor-$tag: ssh head -c $bytes $ssh_s s + libvirt job $lv_s s"
}

# gen_floor_changes A|B SEED DISK: the 64 MiB of one round, "offset length" lines, and a
# last line "# changed BYTES chunks4m N" (N = distinct 4 MiB chunks touched).
# A: 8 writes of 8 MiB, one in each eighth of the disk at a random 64 KiB-aligned place;
# B: 64 writes of 1 MiB, one in each 64th of the disk, in a random 4 MiB-aligned chunk
#    there, at a random 64 KiB-aligned place inside that chunk (never crossing it).
gen_floor_changes() {
  python3 - "$@" <<'PY'
import random, sys
pat, seed, disk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed * 7919 + ord(pat))
K64, M1, M4 = 65536, 1 << 20, 4 << 20
out = []
if pat == "A":
    slot = disk // 8
    for i in range(8):
        out.append((i * slot + rnd.randrange(0, (slot - 8 * M1) // K64 + 1) * K64, 8 * M1))
else:
    per = disk // M4 // 64  # chunks per 64th of the disk
    for i in range(64):
        chunk = i * per + rnd.randrange(per)
        out.append((chunk * M4 + rnd.randrange(0, (M4 - M1) // K64 + 1) * K64, M1))
chunks = {c for off, n in out for c in range(off // M4, (off + n - 1) // M4 + 1)}
for off, n in out:
    print(off, n)
print(f"# changed {sum(n for _, n in out)} chunks4m {len(chunks)}")
PY
}

# ------------------------------------------------------------------ fulls
for ((r = 1; r <= REPS; r++)); do
  order=(wire zstd vk nbd)
  ((r % 2)) || order=(nbd vk zstd wire)
  for c in "${order[@]}"; do
    blog "full round $r/$REPS: $c"
    case $c in
      wire) run_wire "wire-r$r" ;;
      zstd) run_zstd "zstd-r$r" ;;
      vk)
        repo=$WORK/repo-full-r$r
        "${VKC[@]}" repo init "$repo" --encryption none --chunk-size-mib "$CHUNK_MIB" --key-file "$repo.key" >"$RUN_DIR/init-full-r$r.out" 2>&1 || bdie "repo init: $(cat "$RUN_DIR/init-full-r$r.out")"
        vk_backup vkfull "vkfull-r$r" "$repo" full full
        rm -rf -- "$repo" "$repo.key"
        ;;
      nbd)
        nbd_backup nbdfull "nbdfull-r$r" "$WORK/nbd-full-r$r" full
        rm -rf -- "$WORK/nbd-full-r$r"
        ;;
    esac
  done
done

# ------------------------------------------------------------------ incrementals
CHANGES_MD=""
for pat in A B; do
  repo=$WORK/repo-inc-$pat
  ndir=$WORK/nbd-inc-$pat
  "${VKC[@]}" repo init "$repo" --encryption none --chunk-size-mib "$CHUNK_MIB" --key-file "$repo.key" >"$RUN_DIR/init-inc-$pat.out" 2>&1 || bdie "repo init: $(cat "$RUN_DIR/init-inc-$pat.out")"
  blog "pattern $pat: virtkeep full (--mode $FULL_MODE) and virtnbdbackup full"
  vk_backup "vkbase$pat" "vkbase-$pat" "$repo" "$FULL_MODE" full
  nbd_backup "nbdbase$pat" "nbdbase-$pat" "$ndir" full
  for ((r = 1; r <= REPS; r++)); do
    chg=$RUN_DIR/changes-$pat-r$r.txt
    gen_floor_changes "$pat" "$r" "$DISK" >"$chg"
    read -r _ _ changed _ chunks < <(tail -n 1 "$chg")
    [[ $changed -eq $CHANGE ]] || bdie "pattern $pat changes $changed bytes, not $CHANGE"
    CHANGES_MD+="| $pat | $r | $(grep -vc '^#' "$chg") | $changed | $chunks |"$'\n'
    if [[ $pat == A ]]; then byte=$(printf '0x%02x' $((0x40 + r))); else byte=$(printf '0x%02x' $((0x60 + r))); fi
    blog "pattern $pat round $r/$REPS: writing $changed bytes ($chunks 4 MiB chunks) through both QEMUs"
    hmp_writes "$DOM" ua-vda "$byte" "$chg"
    hmp_writes "$DOM2" ua-vda "$byte" "$chg"
    if ((r % 2)); then
      vk_backup "vkinc$pat" "vkinc-$pat-r$r" "$repo" incremental incremental
      nbd_backup "nbdinc$pat" "nbdinc-$pat-r$r" "$ndir" inc
    else
      nbd_backup "nbdinc$pat" "nbdinc-$pat-r$r" "$ndir" inc
      vk_backup "vkinc$pat" "vkinc-$pat-r$r" "$repo" incremental incremental
    fi
    floor_runs "inc$pat" "$pat-$r" "$changed"
  done
  rm -rf -- "$repo" "$ndir"
done

# ------------------------------------------------------------------ report
mib() { calc "$1 / 1024"; } # KiB -> MiB
PHASE_FIELDS=(connect_secs lock_load_secs plan_secs freeze_secs data_secs publish_secs heal_secs)
phase_med() { # CASE FIELD: median of that phase over the case's runs, "-" when absent
  local v
  v=$(jq -r --arg k "$2" 'select(type == "object") | .[$k] // empty' "$RUN_DIR/phases-$1.jsonl" 2>/dev/null || true)
  if [[ -z $v ]]; then echo "-"; else printf '%s\n' "$v" | median; fi
}

frow() { # CASE LABEL
  local c=$1 w
  w=$(med WALL "$c")
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$2" "$w" "$(calc "$ALLOC_MIB / $w")" \
    "$(mib "$(maxof RSS "$c")")" "$(med CPU "$c")" "$(med SSHD "$c")" "$(med OTHER "$c")" \
    "$(med BUSY "$c")" "$(mm WALL "$c")"
}
FULL_TABLE="| case | wall s | MiB/s | peak RSS MiB | CPU s (command) | CPU s sshd | CPU s other | busy cores | wall range |
|---|---|---|---|---|---|---|---|---|
$(frow wire "(a) ssh -c aes128-gcm cat RAW >/dev/null")
$(frow zstd "(b) ssh -c aes128-gcm cat RAW \\| zstd -1 -T0 >/dev/null")
$(frow vkfull "(c) virtkeep backup --mode full")
$(frow nbdfull "(d) virtnbdbackup -l full")
"
W_A=$(med WALL wire)
W_B=$(med WALL zstd)
W_C=$(med WALL vkfull)
W_D=$(med WALL nbdfull)
R_B=$(calc "$W_B / $W_C")
R_D=$(calc "$W_D / $W_C")
R_A=$(calc "$W_A / $W_C")
RSS_FULL=$(maxof RSS vkfull)
FULL_TARGETS="| target (issue 14) | measured (medians of $REPS) | verdict |
|---|---|---|
| virtkeep full ≥ 0.9 × the compressing limit (b), throughput | $W_B s / $W_C s = $R_B | $(verdict "$R_B >= 0.9") |
| virtkeep full ≥ 1.5 × virtnbdbackup's full, throughput | $W_D s / $W_C s = $R_D | $(verdict "$R_D >= 1.5") |
| virtkeep full vs the bare wire (a), throughput (no target) | $W_A s / $W_C s = $R_A | - |
| peak RSS ≤ 128 MiB (largest of the virtkeep fulls) | $(mib "$RSS_FULL") MiB | $(verdict "$RSS_FULL <= $RSS_MAX_KB") |
"

PHASE_TABLE="| phase (virtkeep --json .phases, median s) | full (step 2) | incremental A | incremental B |
|---|---|---|---|
"
for f in "${PHASE_FIELDS[@]}"; do
  PHASE_TABLE+="| $f | $(phase_med vkfull "$f") | $(phase_med vkincA "$f") | $(phase_med vkincB "$f") |"$'\n'
done
LAST_PHASES=$(tail -n 1 "$RUN_DIR/phases-vkfull.jsonl")
[[ $LAST_PHASES == null ]] && LAST_PHASES="-"

INC_TABLE="| pattern | case | wall s | bytes read | peak RSS MiB | CPU s (command) | busy cores | wall range |
|---|---|---|---|---|---|---|---|
"
INC_TARGETS="| target (issue 14) | measured (medians of $REPS) | verdict |
|---|---|---|
"
for pat in A B; do
  lim=1.2
  [[ $pat == B ]] && lim=1.5
  fl=$(med WALL "inc$pat-floor")
  vw=$(med WALL "vkinc$pat")
  nw=$(med WALL "nbdinc$pat")
  vr=$(med READ "vkinc$pat")
  vrss=$(maxof RSS "vkinc$pat")
  INC_TABLE+="| $pat | floor: ssh head -c $CHANGE | $(med WALL "inc$pat-floorssh") | $CHANGE | - | - | - | $(mm WALL "inc$pat-floorssh") |
| $pat | floor: libvirt job alone | $(med WALL "inc$pat-floorlv") | 0 | - | - | - | $(mm WALL "inc$pat-floorlv") |
| $pat | **floor** (sum, per round) | $fl | $CHANGE | - | - | - | $(mm WALL "inc$pat-floor") |
| $pat | virtnbdbackup -l inc | $nw | $(med READ "nbdinc$pat") | $(mib "$(maxof RSS "nbdinc$pat")") | $(med CPU "nbdinc$pat") | $(med BUSY "nbdinc$pat") | $(mm WALL "nbdinc$pat") |
| $pat | virtkeep --mode incremental | $vw | $vr | $(mib "$vrss") | $(med CPU "vkinc$pat") | $(med BUSY "vkinc$pat") | $(mm WALL "vkinc$pat") |
"
  INC_TARGETS+="| $pat: virtkeep ≤ $lim × the floor | $vw s / $fl s = $(calc "$vw / $fl") | $(verdict "$vw <= $lim * $fl") |
| $pat: virtkeep ≤ virtnbdbackup | $vw s / $nw s = $(calc "$vw / $nw") | $(verdict "$vw <= $nw") |
| $pat: virtkeep bytes_read ≤ 1.2 × changed | $vr / $CHANGE = $(calc "$vr / $CHANGE") | $(verdict "$vr <= 1.2 * $CHANGE") |
| $pat: peak RSS ≤ 128 MiB (largest run) | $(mib "$vrss") MiB | $(verdict "$vrss <= $RSS_MAX_KB") |
"
done
BASE_LINE="Fulls that start each chain: virtkeep (--mode $FULL_MODE) A $(med WALL vkbaseA) s, B $(med WALL vkbaseB) s; virtnbdbackup A $(med WALL nbdbaseA) s, B $(med WALL nbdbaseB) s."

END_EPOCH=$(date +%s)
CPU_MODEL=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
FACTS="- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), SIZE=$SIZE, REPS=$REPS, --parallel $PARALLEL, FULL_MODE=$FULL_MODE, chunk size $CHUNK_MIB MiB, run took $((END_EPOCH - START_EPOCH)) s
- machine: nproc=$(nproc), CPU \"$CPU_MODEL\", $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r); load average at the start $LOAD_START, at the end $(cut -d' ' -f1-3 /proc/loadavg) (**shared machine**: \"CPU s other\" = every process not part of the measured case)
- $("$BIN" --version 2>/dev/null | head -1): $BIN_SRC built $BIN_INFO ($BIN_TREE), $(rustc --version 2>/dev/null || true)
- $(virtnbdbackup -V 2>&1 | head -1 | sed 's/^/virtnbdbackup /'); $(qemu-img --version | head -1); $(virsh --version 2>/dev/null | sed 's/^/libvirt /'); $(zstd -V | sed -e "s/^[* ]*//" -e "s/, by .*//"); $(ssh -V 2>&1); lab sshd on 127.0.0.1; repositories and virtnbdbackup's output on local disk ($(df -T "$WORK" | awk 'NR==2 {print $2}'))
- workload: qcow2 v3 $((DISK / MIB)) MiB virtual, $ALLOC B ($ALLOC_MIB MiB) allocated (random, a repeated 4 MiB block, log-like text; holes elsewhere); running TCG domains $DOM (virtkeep) and $DOM2 (virtnbdbackup, a copy of the image), 64 MiB RAM, no OS; the raw file of the wire baselines holds exactly the allocated bytes; all in the page cache
- MiB/s = allocated bytes / wall of the whole command (virtkeep: SSH connect, lock, plan, backup job, publish; virtnbdbackup: local libvirt job, NBD over a unix socket, no encryption, no compression, no fsync); every case starts after a \`sync\`; wire baselines discard their output inside the timed command (never to a file); peak RSS from \`/usr/bin/time -v\` (for a pipeline: its largest process)
- incrementals: per pattern one chain (virtkeep full --mode $FULL_MODE into a fresh repository, virtnbdbackup full into a fresh directory), then $REPS rounds of 64 MiB written through both running QEMUs (HMP qemu-io + flush, byte 0x41+round for A, 0x61+round for B) → both incrementals (order alternating) → the floor on virtkeep's domain; virtkeep's bytes read = its bytes_read, virtnbdbackup's = its \"bytes of data extents to backup\""

REPORT="# Backups at the floor: fulls and incrementals vs the limits and virtnbdbackup ($SIZE, $STAMP)

## Machine and method
$FACTS

## Fulls (median of $REPS rounds, order reversed every other round)
$FULL_TABLE
$FULL_TARGETS
virtkeep's bytes_read per full: $(med READ vkfull) (allocated: $ALLOC); virtnbdbackup's data extents: $(med READ nbdfull).

### virtkeep's phases
$PHASE_TABLE
Last full's \`phases\` object: \`$LAST_PHASES\`

## Incrementals, 64 MiB changed (A: 8 × 8 MiB; B: 64 × 1 MiB in 64 different 4 MiB chunks)
$INC_TABLE
$INC_TARGETS
$BASE_LINE

| pattern | round | writes | changed bytes | 4 MiB chunks touched |
|---|---|---|---|---|
$CHANGES_MD
## Runs
\`\`\`
$(cat "$RUN_DIR/runs.tsv")
\`\`\`
(name, wall s, peak RSS KiB; floor rows: ssh head s, libvirt job s)

\`\`\`
$(cat "$RUN_DIR/virtkeep.tsv")
\`\`\`
(virtkeep runs: name, [mode, reason, bytes_read, phases])"

mkdir -p "$BENCH_DIR/results"
TAG=$SIZE
[[ $CHUNK_MIB == 4 ]] || TAG=$SIZE-c$CHUNK_MIB
OUT=$BENCH_DIR/results/floor-$STAMP-$TAG.md
printf '%s\n' "$REPORT" >"$OUT"
tar -C "$RUN_DIR" -czf "$BENCH_DIR/results/floor-$STAMP-$TAG-runs.tar.gz" . 2>/dev/null || true
printf '\n%s\n%s\n%s\n%s\n%s\n' "$FULL_TABLE" "$FULL_TARGETS" "$PHASE_TABLE" "$INC_TABLE" "$INC_TARGETS"
echo "report: $OUT (run took $((END_EPOCH - START_EPOCH)) s)"

#!/usr/bin/env bash
# File-level restore benchmark (issue 19, "Benchmark"): `files ls`, `files get` of a
# 512 MiB file and `dd bs=4M` of DISK.img through `mount`, against `restore --to-file`
# of the same backup, in one run, each from a cold page cache.
#
#  1. workload: a raw disk (SIZE=full: 8 GiB, small: 2 GiB) with a GPT (sgdisk) and one
#     ext4 partition (mkfs.ext4 -d) holding big.bin (512 MiB of random data), filler.bin
#     (random: the rest of the data, 2 GiB full / 256 MiB small) and many/ (2000 small
#     files), in a shut-off domain;
#  2. one full backup into a fresh encrypted repository on local disk;
#  3. REPS times, each after `sync; echo 3 > /proc/sys/vm/drop_caches`:
#     files ls ID vda:1:/many; files get ID vda:1:/big.bin; restore ID --disk vda
#     --to-file; mount ID DIR + dd if=DIR/vda.img bs=4M of=/dev/null; wall time,
#     throughput, peak RSS (/usr/bin/time -v; for dd, of the mount process);
#     the copies are compared with the sources (cmp);
#  4. targets: files ls < 1 s; files get ≥ 0.8 × restore --to-file throughput; dd via
#     mount ≥ 0.7 × restore --to-file throughput; peak RSS ≤ 256 MiB for all three;
#     writes bench/results/files-<date>[-small].md.
# Throughput: files get = file bytes / wall; restore --to-file = the disk's allocated
# bytes / wall (qemu-img map); dd = the same allocated bytes / wall (holes cost no
# chunk reads; dd reads them as zeros from the view).
# Everything created is removed on exit, also on failure or Ctrl-C.
#
# Env: SIZE=full|small, REPS (default 2), BIN (default target/release/virtkeep; BUILD=1
#      builds it first), PROFILE=1: one more `files get` under `perf record -g`, its
#      top symbols appended to the report.
# shellcheck disable=SC2086 # the space-separated lists of figures split on purpose
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
export PATH="$HOME/.cargo/bin:$PATH"

SIZE=${SIZE:-full}
REPS=${REPS:-2}
BUILD=${BUILD:-0}
MIB=1048576
case $SIZE in
  full) DISK_MIB=8192 FILLER_MIB=2048 ;;
  small) DISK_MIB=2048 FILLER_MIB=256 ;;
  *) bdie "SIZE must be full or small" ;;
esac
BIG_MIB=512

[[ $(id -u) -eq 0 ]] || bdie "run as root (drop_caches, FUSE and the lab need it)"
[[ -x /usr/bin/time ]] || apt-get install -y -q time >/dev/null
for t in sgdisk mkfs.ext4 qemu-img virsh python3 jq bc cmp fusermount3; do
  command -v "$t" >/dev/null || command -v "${t%3}" >/dev/null || bdie "$t is missing"
done

START_EPOCH=$(date +%s)
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=/var/tmp/vkt-fbench-$$
RUN_DIR=$WORK/runs
NODE=$WORK/node
MNT=$WORK/mnt
DOM=vkt-fbench-$$-1
MOUNT_PID=

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $SAMPLER_PID ]] && kill -TERM "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
  if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT"; fi
  [[ -n $MOUNT_PID ]] && kill -TERM "$MOUNT_PID" 2>/dev/null && wait "$MOUNT_PID" 2>/dev/null
  if [[ -n ${VK_LIBVIRT_URI:-} ]]; then
    virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$DOM" >/dev/null 2>&1
    rm -f -- "$VK_POOL_DIR"/vkt-fbench-$$-*
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
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/virtkeep}
[[ -x $BIN ]] || bdie "no binary at $BIN (BUILD=1 or BIN=...)"
blog "lab/up.sh"
bash "$ROOT/lab/up.sh"
load_lab_env /tmp/virtkeep-lab/env
mkdir -p "$WORK/content/many" "$RUN_DIR" "$NODE" "$MNT"
BIN_INFO="$(stat -c '%y' "$BIN" | cut -d. -f1), sha256 $(sha256sum "$BIN" | cut -c1-12)"
cp "$BIN" "$WORK/virtkeep"
BIN=$WORK/virtkeep
IMG=$VK_POOL_DIR/$DOM-vda.raw
LOAD_START=$(loadavg)

# ------------------------------------------------------------------ workload
blog "workload: $DISK_MIB MiB disk, ext4 with big.bin ($BIG_MIB MiB), filler ($FILLER_MIB MiB), many/ (2000 files)"
head -c $((BIG_MIB * MIB)) /dev/urandom >"$WORK/content/big.bin"
head -c $((FILLER_MIB * MIB)) /dev/urandom >"$WORK/content/filler.bin"
for i in $(seq 1 2000); do echo "file $i" >"$WORK/content/many/f$i.txt"; done
truncate -s $((DISK_MIB * MIB)) "$IMG"
sgdisk -n 1:2048:0 -t 1:8300 -c 1:data "$IMG" >/dev/null
PART_MIB=$((DISK_MIB - 2))
truncate -s $((PART_MIB * MIB)) "$WORK/fs.img"
mkfs.ext4 -q -F -L data -d "$WORK/content" "$WORK/fs.img"
dd if="$WORK/fs.img" of="$IMG" bs=4M oflag=seek_bytes seek=$MIB conv=notrunc,sparse status=none
rm -f -- "$WORK/fs.img" "$WORK/content/filler.bin"
chown "$VK_QEMU_USER:$VK_QEMU_GROUP" "$IMG"
ALLOC=$(qemu-img map --output=json -f raw "$IMG" | jq '[.[] | select(.data == true and .zero == false) | .length] | add')
ALLOC_MIB=$(calc "$ALLOC / $MIB")
cat >"$WORK/dom.xml" <<XML
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$IMG'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
virsh -q -c "$VK_LIBVIRT_URI" define --file "$WORK/dom.xml" >/dev/null

VK=(env -u XDG_CONFIG_HOME -u XDG_DATA_HOME HOME="$NODE" VIRTKEEP_LOG=warn "$BIN" --config "$NODE/config.toml")
"${VK[@]}" host add lab --ssh "$VK_SSH_USER@$VK_SSH_HOST:$VK_SSH_PORT" --identity "$VK_SSH_KEY" \
  --known-hosts "$VK_SSH_KNOWN_HOSTS" >"$RUN_DIR/host-add.out" 2>&1 || bdie "host add: $(cat "$RUN_DIR/host-add.out")"
REPO=$WORK/repo
KEY=$WORK/repo.key
"${VK[@]}" repo init "$REPO" --key-file "$KEY" >/dev/null 2>&1 || bdie "repo init"
R=(--repo "$REPO" --key-file "$KEY")
blog "backup"
timed backup "${VK[@]}" --json backup "lab/$DOM" "${R[@]}" --mode full || bdie "backup: $(tail -5 "$RUN_DIR/backup.err")"
ID=$(jq -r '.[0].id' "$RUN_DIR/backup.out")

# ------------------------------------------------------------------ runs
# shellcheck disable=SC2034 # read through med()'s nameref
declare -A WALL RSS
VERIFIED=no
for ((r = 1; r <= REPS; r++)); do
  blog "rep $r/$REPS: files ls"
  drop_caches
  timed "ls-r$r" "${VK[@]}" files ls "$ID" vda:1:/many "${R[@]}" || bdie "files ls: $(tail -5 "$RUN_DIR/ls-r$r.err")"
  [[ $(wc -l <"$RUN_DIR/ls-r$r.out") == 2000 ]] || bdie "files ls listed $(wc -l <"$RUN_DIR/ls-r$r.out") names"
  add WALL ls "$T_WALL"
  add RSS ls "$T_RSS_KB"

  blog "rep $r/$REPS: files get big.bin"
  rm -rf -- "$WORK/get"
  drop_caches
  timed "get-r$r" "${VK[@]}" files get "$ID" vda:1:/big.bin --to "$WORK/get" "${R[@]}" || bdie "files get: $(tail -5 "$RUN_DIR/get-r$r.err")"
  add WALL get "$T_WALL"
  add RSS get "$T_RSS_KB"
  cmp "$WORK/content/big.bin" "$WORK/get/big.bin" || bdie "files get copy differs"
  rm -rf -- "$WORK/get"

  blog "rep $r/$REPS: restore --to-file"
  rm -f -- "$WORK/restored.raw"
  drop_caches
  timed "restore-r$r" "${VK[@]}" restore "$ID" --disk vda --to-file "$WORK/restored.raw" "${R[@]}" || bdie "restore: $(tail -5 "$RUN_DIR/restore-r$r.err")"
  add WALL restore "$T_WALL"
  add RSS restore "$T_RSS_KB"
  cmp "$IMG" "$WORK/restored.raw" || bdie "restored file differs"
  rm -f -- "$WORK/restored.raw"

  blog "rep $r/$REPS: mount + dd"
  /usr/bin/time -v -o "$RUN_DIR/mount-r$r.time" "${VK[@]}" --json mount "$ID" "$MNT" "${R[@]}" \
    >"$RUN_DIR/mount-r$r.out" 2>"$RUN_DIR/mount-r$r.err" &
  MOUNT_PID=$!
  for _ in $(seq 1 300); do
    [[ -s $RUN_DIR/mount-r$r.out ]] && break
    kill -0 "$MOUNT_PID" 2>/dev/null || bdie "mount: $(tail -5 "$RUN_DIR/mount-r$r.err")"
    sleep 0.1
  done
  drop_caches
  timed "dd-r$r" dd if="$MNT/vda.img" of=/dev/null bs=4M || bdie "dd: $(cat "$RUN_DIR/dd-r$r.err")"
  add WALL dd "$T_WALL"
  [[ $r == 1 ]] && { cmp "$IMG" "$MNT/vda.img" || bdie "DISK.img differs"; }
  umount "$MNT"
  wait "$MOUNT_PID" || bdie "mount exited $?"
  MOUNT_PID=
  add RSS dd "$(awk -F': ' '/Maximum resident set size/ {print $2}' "$RUN_DIR/mount-r$r.time")"
  VERIFIED=yes
done

PROFILE_TEXT=""
if [[ ${PROFILE:-0} == 1 ]] && command -v perf >/dev/null; then
  blog "profile: files get under perf record"
  rm -rf -- "$WORK/get"
  drop_caches
  perf record -q -F 499 -g -o "$RUN_DIR/get.perf" -- "${VK[@]}" files get "$ID" vda:1:/big.bin \
    --to "$WORK/get" "${R[@]}" >"$RUN_DIR/perf.out" 2>&1 || bdie "perf record: $(tail -5 "$RUN_DIR/perf.out")"
  rm -rf -- "$WORK/get"
  perf report -i "$RUN_DIR/get.perf" --stdio --no-children --sort comm,symbol -g none \
    >"$RUN_DIR/get.report" 2>/dev/null || true
  PROFILE_TEXT="
## Profile of \`files get\` (perf record -F 499 -g, self time, top 25)

\`\`\`
$(grep -v -e '^#' -e '^$' "$RUN_DIR/get.report" | sed -n 1,25p || true)
\`\`\`
"
fi

# ------------------------------------------------------------------ report
W_LS=$(med WALL ls)
W_GET=$(med WALL get)
W_RES=$(med WALL restore)
W_DD=$(med WALL dd)
T_GET=$(calc "$BIG_MIB / $W_GET")
T_RES=$(calc "$ALLOC_MIB / $W_RES")
T_DD=$(calc "$ALLOC_MIB / $W_DD")
R_GET=$(calc "$T_GET / $T_RES")
R_DD=$(calc "$T_DD / $T_RES")
RSS_MAX=0
for v in ${RSS[ls]} ${RSS[get]} ${RSS[dd]}; do ((v > RSS_MAX)) && RSS_MAX=$v; done
rss() { calc "$(med RSS "$1") / 1024"; }
REPORT="# virtkeep file-level restore benchmark ($SIZE, $STAMP)

- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), SIZE=$SIZE, REPS=$REPS, run took $(($(date +%s) - START_EPOCH)) s
- machine: $(machine_facts); **shared** with other people's builds and tests (load average at the start: $LOAD_START, at the end: $(loadavg))
- binary: $BIN_INFO; bench script tree $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo "?")
- workload: raw $DISK_MIB MiB, GPT, ext4 with big.bin ($BIG_MIB MiB random), filler ($FILLER_MIB MiB random), many/ (2000 files); $ALLOC_MIB MiB allocated; encrypted repository on local disk; page cache dropped before each command
- files get throughput = $BIG_MIB MiB / wall; restore --to-file and dd throughput = $ALLOC_MIB MiB allocated / wall; dd RSS = the mount process's peak
- copies compared with the sources (cmp): $VERIFIED

| case | wall s (median) | MiB/s | peak RSS MiB (median) | walls |
|---|---|---|---|---|
$(md_row "files ls vda:1:/many (2000 entries)" "$W_LS" - "$(rss ls)" "$(mm WALL ls)")
$(md_row "files get big.bin" "$W_GET" "$T_GET" "$(rss get)" "$(mm WALL get)")
$(md_row "restore --disk vda --to-file" "$W_RES" "$T_RES" "$(rss restore)" "$(mm WALL restore)")
$(md_row "mount + dd bs=4M of vda.img" "$W_DD" "$T_DD" "$(rss dd)" "$(mm WALL dd)")

| target | measured | verdict |
|---|---|---|
| files ls < 1 s | $W_LS s | $(verdict "$W_LS < 1") |
| files get ≥ 0.8 × restore --to-file | $R_GET | $(verdict "$R_GET >= 0.8") |
| dd via mount ≥ 0.7 × restore --to-file | $R_DD | $(verdict "$R_DD >= 0.7") |
| peak RSS ≤ 256 MiB (ls, get, mount) | $(calc "$RSS_MAX / 1024") MiB | $(verdict "$RSS_MAX <= 262144") |
$PROFILE_TEXT"
mkdir -p "$BENCH_DIR/results"
suffix=""
[[ $SIZE == small ]] && suffix="-small"
OUT=$BENCH_DIR/results/files-$STAMP$suffix.md
printf '%s\n' "$REPORT" >"$OUT"
printf '%s\n' "$REPORT"
echo "report: $OUT"

#!/usr/bin/env bash
# Backup/restore benchmark of the SSH transfer path (issue 5, "Benchmark").
#
# In one run, against the lab (lab/up.sh: private sshd on 127.0.0.1 stands for the host):
#  1. workload: a qcow2 (v3) in $VK_POOL_DIR, 8 GiB virtual with ~2 GiB of data spread
#     over the disk (random, a repeated 4 MiB block, compressible text, real zero bytes,
#     `write -z` zeros, holes elsewhere), in a running TCG domain vkt-bench-PID-1;
#  2. physical limit: `ssh -c aes128-gcm@openssh.com ... cat RAW >/dev/null` of a raw file
#     holding exactly the allocated data (same bytes, same sshd);
#  3. full backups with target/release/virtkeep into fresh local repositories, for each
#     --parallel in $PARALLELS: wall time, bytes read, throughput = allocated bytes /
#     wall time, ratio to ssh cat, peak RSS (/usr/bin/time -v);
#  4. restores of one backup under a new name (--storage file:$VK_POOL_DIR --define),
#     same figures; the restored image is compared with the source (qemu-img compare -U;
#     the guest has no OS and never writes, so the source now equals the snapshot);
#     then second backups into the same repository (dedup: bytes_new should be ~0);
#  5. prints a table and writes bench/results/backup-<date>[-small].md.
# Each case runs $REPS times, interleaved; medians are reported. A per-process CPU
# sampler (bench/cpusample.py) runs during every timed command, and with PROFILE=1 one
# extra backup and restore run under `perf record -a` (system-wide profile).
# Everything created (domains, images, repositories, temp files) is removed on exit,
# also on failure or Ctrl-C.
#
# Env: SIZE=full|small (8 GiB/~2 GiB data, or 1 GiB/~256 MiB), REPS (default 2 full,
#      3 small), PARALLELS (default "1 2 4"), RESTORE_PARALLELS (default "2 4"),
#      PROFILE (default 1), BUILD (default 1: cargo build --release -p virtkeep),
#      KEEP=1 keeps the work dir (/var/tmp/vkt-bench-PID) for inspection.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
export PATH="$HOME/.cargo/bin:$PATH"

SIZE=${SIZE:-full}
if [[ ${SIZE:-full} == small ]]; then REPS=${REPS:-3}; else REPS=${REPS:-2}; fi
PARALLELS=${PARALLELS:-"1 2 4"}
RESTORE_PARALLELS=${RESTORE_PARALLELS:-"2 4"}
# engine debug logs carry every remote command with a timestamp (overhead analysis)
VK_LOG=${VK_LOG:-info,virtkeep_engine=debug}
PROFILE=${PROFILE:-1}
BUILD=${BUILD:-1}
MIB=1048576
case $SIZE in
  full) DISK=$((8192 * MIB)) ;;
  small) DISK=$((1024 * MIB)) ;;
  *) bdie "SIZE must be full or small" ;;
esac
U=$((DISK / 32)) # layout unit and piece size: 256 MiB (full), 32 MiB (small)

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
RESTORED_NAMES=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $SAMPLER_PID ]] && kill -TERM "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
  [[ -n $PERF_PID ]] && kill -INT "$PERF_PID" 2>/dev/null && wait "$PERF_PID" 2>/dev/null
  if [[ -n ${VK_LIBVIRT_URI:-} ]]; then
    local d
    for d in "$DOM" "${RESTORED_NAMES[@]}"; do
      virsh -q -c "$VK_LIBVIRT_URI" destroy --domain "$d" >/dev/null 2>&1
      virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$d" --snapshots-metadata --checkpoints-metadata >/dev/null 2>&1
    done
    # qemu-nbd exports a killed virtkeep may have left, found by our unique image names
    local pid
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
# a private copy: others' builds may replace target/release/virtkeep during the run
BIN_SRC=$BIN
BIN_INFO="$(stat -c '%y' "$BIN" | cut -d. -f1), sha256 $(sha256sum "$BIN" | cut -c1-12)"
cp "$BIN" "$WORK/virtkeep"
BIN=$WORK/virtkeep
IMG=$VK_POOL_DIR/$DOM-vda.qcow2

# ------------------------------------------------------------------ workload
blog "workload: $((DISK / MIB)) MiB qcow2, pieces of $((U / MIB)) MiB"
D=$WORK/data
head -c $MIB /dev/urandom >"$D/head.bin"
head -c $MIB /dev/urandom >"$D/tail.bin"
head -c "$U" /dev/urandom >"$D/rand1.bin"
head -c "$U" /dev/urandom >"$D/rand2.bin"
head -c $((4 * MIB)) /dev/urandom >"$D/block4m"
for ((i = 0; i < U / (4 * MIB); i++)); do cat "$D/block4m"; done >"$D/rep.bin"
head -c "$U" /dev/zero >"$D/zero.bin"
# text-like: log lines (timestamps, hosts, words, hex ids) from a pool of 200k lines,
# drawn at random with replacement: every chunk differs, zstd -1 gets ~2.7x
python3 - "$D/pool.txt" <<'PY'
import random, sys
random.seed(20240501)
words = ("the of and to in is was for on are as with his they at be this from have or by one had not but what all "
         "were when we there can an your which their said if do will each about how up out them then she many some so "
         "these would other into has more her two like him see time could no make than first been its who now people "
         "my made over did down only way find use may water long little very after words called just where most know "
         "get through back much before go good new write our used me man too any day same right look think also "
         "around another came come work three word must because does part request response cache error warning").split()
hosts = [f"node-{i:02d}.example.net" for i in range(40)]
svcs = ["nginx", "sshd", "kernel", "systemd", "postgres", "app", "cron", "dockerd"]
r = random.randint
with open(sys.argv[1], "w") as f:
    for _ in range(200000):
        f.write(f"2025-{r(1,12):02d}-{r(1,28):02d}T{r(0,23):02d}:{r(0,59):02d}:{r(0,59):02d}.{r(0,999):03d}Z "
                f"{random.choice(hosts)} {random.choice(svcs)}[{r(100,32000)}]: "
                + " ".join(random.choices(words, k=r(4, 14)))
                + f" id={random.getrandbits(48):012x} status={random.choice((200,200,200,204,301,404,500))} ms={r(0,2000)}\n")
PY
shuf -r -n $((2 * U / 80)) "$D/pool.txt" | head -c $((2 * U)) >"$D/text.bin" || true
[[ $(stat -c %s "$D/text.bin") -eq $((2 * U)) ]] || bdie "text generation produced $(stat -c %s "$D/text.bin") bytes"
head -c "$U" "$D/text.bin" >"$D/text1.bin"
tail -c "$U" "$D/text.bin" >"$D/text2.bin"
rm -f "$D/text.bin" "$D/pool.txt" "$D/block4m"

# layout: "file offset" (file=ZERO means `write -z`), holes everywhere else
LAYOUT=(
  "head.bin 0"
  "rand1.bin $((1 * U))"
  "rep.bin $((3 * U + MIB))"
  "text1.bin $((6 * U))"
  "zero.bin $((9 * U))"
  "rand2.bin $((13 * U + MIB + 65536))"
  "rep.bin $((17 * U))"
  "ZERO $((20 * U))"
  "text2.bin $((24 * U + 3 * MIB))"
  "tail.bin $((DISK - MIB))"
)
rm -f "$IMG"
qemu-img create -q -f qcow2 -o compat=1.1 "$IMG" "$DISK"
io_args=()
LAYOUT_MD=""
for l in "${LAYOUT[@]}"; do
  read -r f off <<<"$l"
  if [[ $f == ZERO ]]; then
    io_args+=(-c "write -z $off $U")
    LAYOUT_MD+="| write -z (zero clusters) | $off | $U |"$'\n'
  else
    len=$(stat -c %s "$D/$f")
    io_args+=(-c "write -s $D/$f $off $len")
    LAYOUT_MD+="| $f | $off | $len |"$'\n'
  fi
done
qemu-io -f qcow2 "${io_args[@]}" "$IMG" >"$RUN_DIR/qemu-io.log" || bdie "qemu-io failed: $(tail -5 "$RUN_DIR/qemu-io.log")"
chown "$VK_QEMU_USER:$VK_QEMU_GROUP" "$IMG"
ALLOC=$(qemu-img map --output=json -f qcow2 "$IMG" | jq '[.[] | select(.data == true and .zero == false) | .length] | add')
# the same allocated bytes, in disk order, as one raw file for `ssh cat`
RAW=$WORK/alloc.raw
for l in "${LAYOUT[@]}"; do
  read -r f _ <<<"$l"
  [[ $f == ZERO ]] || cat "$D/$f"
done >"$RAW"
RAWSIZE=$(stat -c %s "$RAW")
[[ $RAWSIZE -eq $ALLOC ]] || bdie "raw file has $RAWSIZE bytes, qemu-img map says $ALLOC allocated"
ALLOC_MIB=$(calc "$ALLOC / $MIB")
blog "allocated data: $ALLOC bytes ($ALLOC_MIB MiB), raw file $RAW"

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
# page cache: the source image and the raw file are both read from memory
cat "$IMG" "$RAW" >/dev/null

# ------------------------------------------------------------------ node
VK=(env -u XDG_CONFIG_HOME -u XDG_DATA_HOME HOME="$NODE" VIRTKEEP_LOG="$VK_LOG" "$BIN" --config "$NODE/config.toml")
"${VK[@]}" host add lab --ssh "$VK_SSH_USER@$VK_SSH_HOST:$VK_SSH_PORT" --identity "$VK_SSH_KEY" \
  --known-hosts "$VK_SSH_KNOWN_HOSTS" >"$RUN_DIR/host-add.out" 2>&1 || bdie "host add: $(cat "$RUN_DIR/host-add.out")"
SSH=(ssh -q -F /dev/null -c aes128-gcm@openssh.com -p "$VK_SSH_PORT" -i "$VK_SSH_KEY" -o BatchMode=yes
  -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$VK_SSH_KNOWN_HOSTS"
  -o GlobalKnownHostsFile=/dev/null -o ControlPath=none "$VK_SSH_USER@$VK_SSH_HOST")

# ------------------------------------------------------------------ measurements
# results: R[case]="v1 v2 ..." per metric
declare -A WALL RSS CPUV CPUSSHD CPUNBD CPUOTHER BUSY EXPORT
sample_add() { # CASE NAME: collect CPU figures of run NAME into CASE
  local f=$RUN_DIR/$2.cpu.json
  # virtkeep's own CPU from time -v (others' tests run virtkeep binaries too)
  if [[ $1 == sshcat ]]; then add CPUV "$1" 0; else add CPUV "$1" "$(calc "$T_USER + $T_SYS")"; fi
  add CPUSSHD "$1" "$(cpu_of "$f" sshd ssh)"
  add CPUNBD "$1" "$(cpu_of "$f" qemu-nbd)"
  add CPUOTHER "$1" "$(cpu_other "$f" virtkeep sshd ssh qemu-nbd cat qemu-system-x86 python3 time)"
  add BUSY "$1" "$(jq -r .cores_busy "$f")"
}

KEEP_REPO=""
KEEP_ID=""
declare -A BYTES_READ BYTES_NEW
for ((r = 1; r <= REPS; r++)); do
  blog "rep $r/$REPS: ssh cat"
  timed "sshcat-r$r" "${SSH[@]}" cat "$RAW" || bdie "ssh cat failed: $(cat "$RUN_DIR/sshcat-r$r.err")"
  add WALL sshcat "$T_WALL"
  sample_add sshcat "sshcat-r$r"
  for p in $PARALLELS; do
    repo=$WORK/repo-p$p-r$r
    "${VK[@]}" repo init "$repo" --encryption none >"$RUN_DIR/init-p$p-r$r.out" 2>&1 || bdie "repo init: $(cat "$RUN_DIR/init-p$p-r$r.out")"
    blog "rep $r/$REPS: backup --parallel $p"
    name=backup-p$p-r$r
    timed "$name" "${VK[@]}" --json backup "lab/$DOM" --repo "$repo" --mode full --parallel "$p" ||
      bdie "backup failed: $(tail -c 2000 "$RUN_DIR/$name.out") $(tail -n 20 "$RUN_DIR/$name.err")"
    jq -e '.[0].error == null' "$RUN_DIR/$name.out" >/dev/null || bdie "backup error: $(cat "$RUN_DIR/$name.out")"
    add WALL "backup-p$p" "$T_WALL"
    add RSS "backup-p$p" "$T_RSS_KB"
    add EXPORT "backup-p$p" "$(log_span "$RUN_DIR/$name.err" 'disk transfer starts' 'disk done')"
    sample_add "backup-p$p" "$name"
    BYTES_READ[backup-p$p]=$(jq '[.[0].disks[].bytes_read] | add' "$RUN_DIR/$name.out")
    BYTES_NEW[backup-p$p]=$(jq '[.[0].disks[].bytes_new] | add' "$RUN_DIR/$name.out")
    if [[ -z $KEEP_REPO && ($p == 2 || $p == "${PARALLELS##* }") ]]; then
      KEEP_REPO=$repo
      KEEP_ID=$(jq -r '.[0].id' "$RUN_DIR/$name.out")
      cp "$RUN_DIR/$name.out" "$RUN_DIR/backup-kept.json"
    else
      rm -rf -- "$repo"
    fi
  done
done
STORED=$(du -sb "$KEEP_REPO" | cut -f1)

# restores of the kept backup
VERIFIED="no"
n=0
for ((r = 1; r <= REPS; r++)); do
  for p in $RESTORE_PARALLELS; do
    n=$((n + 1))
    new=vkt-benchr-$$-$n
    RESTORED_NAMES+=("$new")
    blog "rep $r/$REPS: restore --parallel $p as $new"
    name=restore-p$p-r$r
    timed "$name" "${VK[@]}" --json restore "$KEEP_ID" --to lab --repo "$KEEP_REPO" --name "$new" \
      --storage "file:$VK_POOL_DIR" --define --parallel "$p" ||
      bdie "restore failed: $(tail -c 2000 "$RUN_DIR/$name.out") $(tail -n 20 "$RUN_DIR/$name.err")"
    add WALL "restore-p$p" "$T_WALL"
    add RSS "restore-p$p" "$T_RSS_KB"
    add EXPORT "restore-p$p" "$(log_span "$RUN_DIR/$name.err" 'disk transfer starts' 'disk done')"
    sample_add "restore-p$p" "$name"
    rpath=$(jq -r '.disks[0].path' "$RUN_DIR/$name.out")
    if [[ $r == 1 || $r == "$REPS" ]]; then
      if qemu-img compare -U -f qcow2 -F "$(jq -r '.disks[0].format' "$RUN_DIR/$name.out")" "$IMG" "$rpath" >"$RUN_DIR/compare-$n.out" 2>&1; then
        VERIFIED="yes"
      else
        bdie "restored image $rpath differs from the source: $(cat "$RUN_DIR/compare-$n.out")"
      fi
      RESTORED_INFO=$(qemu-img info -U --output=json "$rpath" | jq -c '{format, "virtual-size", "actual-size"}')
    fi
    virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$new" >/dev/null 2>&1 || true
    rm -f -- "$rpath"
  done
done

# second backups into the repository that already holds the data: dedup
for ((r = 1; r <= REPS; r++)); do
  blog "rep $r/$REPS: second backup (dedup) --parallel 2"
  name=backup2-r$r
  timed "$name" "${VK[@]}" --json backup "lab/$DOM" --repo "$KEEP_REPO" --mode full --parallel 2 ||
    bdie "second backup failed: $(tail -n 20 "$RUN_DIR/$name.err")"
  add WALL backup2 "$T_WALL"
  add RSS backup2 "$T_RSS_KB"
  add EXPORT backup2 "$(log_span "$RUN_DIR/$name.err" 'disk transfer starts' 'disk done')"
  sample_add backup2 "$name"
  BYTES_READ[backup2]=$(jq '[.[0].disks[].bytes_read] | add' "$RUN_DIR/$name.out")
  BYTES_NEW[backup2]=$(jq '[.[0].disks[].bytes_new] | add' "$RUN_DIR/$name.out")
  DEDUP_JSON=$(jq -c '.[0].disks[0] | {bytes_read, bytes_new, chunks_new, chunks_reused, chunks_zero}' "$RUN_DIR/$name.out")
done

# ------------------------------------------------------------------ profile
PERF_TXT=""
if [[ $PROFILE == 1 ]] && command -v perf >/dev/null; then
  profile_run() { # NAME CMD...
    local name=$1
    shift
    perf record -a -F 499 -o "$RUN_DIR/$name.perf" -- sleep 3600 >"$RUN_DIR/$name.perf.log" 2>&1 &
    PERF_PID=$!
    sleep 1
    EXTRA_SAMPLER=1 timed "$name" "$@" || blog "WARNING: profiled run $name failed"
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    PERF_PID=
    {
      echo "### $name: perf record -a -F 499 (whole machine, others' builds included)"
      echo '```'
      perf report -i "$RUN_DIR/$name.perf" --no-children --sort comm --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15 || true
      echo
      perf report -i "$RUN_DIR/$name.perf" --no-children --comm virtkeep,sshd,qemu-nbd,tokio-rt-worker --sort comm,dso,sym --stdio 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -45 || true
      echo '```'
    } >"$RUN_DIR/$name.perf.txt"
    PERF_TXT+=$(cat "$RUN_DIR/$name.perf.txt")$'\n\n'
  }
  repo=$WORK/repo-profile
  "${VK[@]}" repo init "$repo" --encryption none >/dev/null 2>&1
  blog "profile: backup --parallel 2 under perf"
  profile_run profile-backup "${VK[@]}" --json backup "lab/$DOM" --repo "$repo" --mode full --parallel 2
  pid_=$(jq -r '.[0].id' "$RUN_DIR/profile-backup.out" 2>/dev/null || echo "")
  if [[ -n $pid_ && $pid_ != null ]]; then
    new=vkt-benchr-$$-profile
    RESTORED_NAMES+=("$new")
    blog "profile: restore --parallel 2 under perf"
    profile_run profile-restore "${VK[@]}" --json restore "$pid_" --to lab --repo "$repo" --name "$new" \
      --storage "file:$VK_POOL_DIR" --define --parallel 2
    virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$new" >/dev/null 2>&1 || true
    rm -f -- "$(jq -r '.disks[0].path' "$RUN_DIR/profile-restore.out" 2>/dev/null)"
  fi
  rm -rf -- "$repo"
fi

# ------------------------------------------------------------------ report
SSH_WALL=$(med WALL sshcat)
SSH_MIBS=$(calc "$ALLOC_MIB / $SSH_WALL")
row() { # CASE LABEL
  local c=$1 w mibs ratio rss ex exm cpu
  w=$(med WALL "$c")
  mibs=$(calc "$ALLOC_MIB / $w")
  ratio=$(calc "$mibs / $SSH_MIBS")
  if [[ -n ${RSS[$c]:-} ]]; then rss=$(calc "$(med RSS "$c") / 1024"); else rss="-"; fi
  ex=$(med EXPORT "$c")
  if [[ $ex != nan && -n $ex && $c != sshcat ]]; then exm=$(calc "$ALLOC_MIB / $ex"); else ex="-" exm="-"; fi
  cpu="$(calc "$(med CPUV "$c")") / $(calc "$(med CPUSSHD "$c")") / $(calc "$(med CPUNBD "$c")") / $(calc "$(med CPUOTHER "$c")")"
  printf '| %-22s | %7s | %8s | %5s | %9s | %9s | %8s | %-28s | %5s | %s |\n' "$2" "$w" "$mibs" "$ratio" "$ex" "$exm" "$rss" \
    "$cpu" "$(calc "$(med BUSY "$c")")" "$(printf '%s\n' ${WALL[$c]} | minmax)"
}
TABLE="| case | wall s | MiB/s | ratio | data s | data MiB/s | RSS MiB | CPU s virtkeep/ssh(d)/nbd/other | busy cores | wall range |
|---|---|---|---|---|---|---|---|---|---|
"
TABLE+=$(row sshcat "ssh cat (aes128-gcm)")$'\n'
for p in $PARALLELS; do TABLE+=$(row "backup-p$p" "backup --parallel $p")$'\n'; done
for p in $RESTORE_PARALLELS; do TABLE+=$(row "restore-p$p" "restore --parallel $p")$'\n'; done
TABLE+=$(row backup2 "2nd backup (dedup) -p 2")$'\n'

best_backup=0 best_restore=0 max_rss=0
for p in $PARALLELS; do
  v=$(calc "$ALLOC_MIB / $(med WALL "backup-p$p") / $SSH_MIBS")
  (($(bc <<<"$v > $best_backup"))) && best_backup=$v
  k=$(med RSS "backup-p$p"); ((${k%.*} > max_rss)) && max_rss=${k%.*}
done
for p in $RESTORE_PARALLELS; do
  v=$(calc "$ALLOC_MIB / $(med WALL "restore-p$p") / $SSH_MIBS")
  (($(bc <<<"$v > $best_restore"))) && best_restore=$v
  k=$(med RSS "restore-p$p"); ((${k%.*} > max_rss)) && max_rss=${k%.*}
done
k=$(med RSS backup2); ((${k%.*} > max_rss)) && max_rss=${k%.*}
TARGETS="| target | measured (best --parallel, medians) | verdict |
|---|---|---|
| backup ≥ 0.9 × ssh cat | $best_backup | $(verdict "$best_backup >= 0.9") |
| restore ≥ 0.8 × ssh cat | $best_restore | $(verdict "$best_restore >= 0.8") |
| peak RSS < 256 MiB | $(calc "$max_rss / 1024") MiB | $(verdict "$max_rss < 262144") |
| 2nd backup bytes_new ≈ 0 | ${BYTES_NEW[backup2]} B | $(verdict "${BYTES_NEW[backup2]} < 4 * $MIB") |
"

END_EPOCH=$(date +%s)
CPU_MODEL=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
FACTS="- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), SIZE=$SIZE, REPS=$REPS, run took $((END_EPOCH - START_EPOCH)) s
- machine: nproc=$(nproc), CPU \"$CPU_MODEL\", $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)
- **shared machine**: the cores are shared with other people's cargo builds/tests running at the same time; \"other\" CPU and busy cores in the table show how much. Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)
- $("$BIN" --version 2>/dev/null | head -1): $BIN_SRC built $BIN_INFO (tree at $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') + uncommitted edits of others), $(rustc --version 2>/dev/null)
- $(qemu-img --version | head -1); $(virsh --version 2>/dev/null | sed 's/^/libvirt /'); $(ssh -V 2>&1); sshd on 127.0.0.1 (lab), repository on local disk ($(df -T "$WORK" | awk 'NR==2 {print $2}'), fsync on: default)
- workload: qcow2 v3 $((DISK / MIB)) MiB virtual, allocated data $ALLOC B ($ALLOC_MIB MiB) + $((U / MIB)) MiB \`write -z\` zero clusters; running TCG domain $DOM (64 MiB, no OS)
- throughput = allocated bytes / wall time of the whole command (backup includes SSH connect, snapshot, blockcommit; restore includes qemu-img create, define); \"data s\" = first \"disk transfer starts\" to last \"disk done\" in virtkeep's log (the data path alone)
- CPU s: virtkeep = user+sys of our process (time -v); ssh(d) = all sshd processes (+ ssh client for ssh cat), nbd = all qemu-nbd, other = everything else on the machine, from bench/cpusample.py (/proc). On a shared lab the sshd/qemu-nbd figures include other people's tests using the same lab sshd."

REPORT="# virtkeep backup/restore benchmark ($SIZE, $STAMP)

## Machine
$FACTS

## Results (median of $REPS; ratio = MiB/s ÷ ssh cat MiB/s)
$TABLE
ssh cat: $SSH_MIBS MiB/s (median of $REPS). Bytes read by the backup: ${BYTES_READ[backup-p${PARALLELS%% *}]} (allocated: $ALLOC).
Stored in the repository after one full backup: $STORED B ($(calc "$STORED / $MIB") MiB) for $ALLOC_MIB MiB of data (dedup of the repeated block, zero chunks, zstd).
Second backup into the same repository: $DEDUP_JSON.
Restore verified with \`qemu-img compare -U\` against the source: $VERIFIED; restored image: ${RESTORED_INFO:-?}.

## Targets (issue 5)
$TARGETS
## Workload layout (qcow2 offsets)
| piece | offset | length |
|---|---|---|
$LAYOUT_MD
## Profiles
$PERF_TXT"

mkdir -p "$BENCH_DIR/results"
suffix=""
[[ $SIZE == small ]] && suffix="-small"
OUT=$BENCH_DIR/results/backup-$STAMP$suffix.md
printf '%s\n' "$REPORT" >"$OUT"
# raw per-run data next to it (JSON results, time -v, CPU samples)
tar -C "$RUN_DIR" -czf "$BENCH_DIR/results/backup-$STAMP$suffix-runs.tar.gz" . 2>/dev/null || true

printf '\n%s\n\n%s\n' "$TABLE" "$TARGETS"
echo "ssh cat: $SSH_MIBS MiB/s; allocated $ALLOC_MIB MiB; report: $OUT"
echo "NOTE: 2 cores shared with other people's builds; see 'other' CPU / busy cores columns."

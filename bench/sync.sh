#!/usr/bin/env bash
# Repository sync benchmark (issue 21, "Benchmark"): `virtkeep sync` of a backup from a
# local repository to RGW, against a plain copy of the same objects with an S3 client
# (`aws s3 cp --recursive` of the repository directory), in one run.
#
#  1. workload: a raw disk (SIZE=full: 4 GiB disk, ~1 GiB data; small: 2 GiB, ~514 MiB)
#     with bench/lib.sh's incremental pieces (random, a repeated 4 MiB block, log-like
#     text, holes) in a shut-off domain; one full backup into a fresh encrypted local
#     repository;
#  2. REPS rounds, the order alternating per round: sync into a fresh s3:// prefix made
#     with `repo init --copy-keys-from LOCAL` (chunks copied as stored); `aws s3 cp
#     --recursive` of the local repository directory into a fresh prefix (the aws cli's
#     default concurrency, 10 requests); with KEYS=both (default) also sync into a fresh
#     prefix with its own keys (chunks decrypted and re-encoded);
#  3. throughput = the local repository's bytes (du -sb) / wall; targets: shared-key
#     sync ≥ 0.8 × the aws copy's throughput; virtkeep's peak RSS ≤ 128 MiB
#     (/usr/bin/time -v); writes bench/results/sync-<date>[-small].md.
# Each prefix is removed once measured, and all on exit, also on failure or Ctrl-C: the
# lab's Ceph OSD is a 2 GiB memstore (SIZE=full's repository is ~700 MiB; never run two
# of these at once).
#
# Env: SIZE=full|small (default small), REPS (default 2), KEYS=both|shared, BIN (default
#      target/release/virtkeep), NOTE (a line for the report).
# shellcheck disable=SC2086 # the space-separated lists of figures split on purpose
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

SIZE=${SIZE:-small}
REPS=${REPS:-2}
KEYS=${KEYS:-both}
MIB=1048576
case $SIZE in
  full) DISK_MIB=4096 ;;
  small) DISK_MIB=2048 ;;
  *) bdie "SIZE must be full or small" ;;
esac
U=$((DISK_MIB * MIB / 32))

[[ $(id -u) -eq 0 ]] || bdie "run as root (the lab needs it)"
for t in qemu-img virsh python3 jq bc aws du; do command -v "$t" >/dev/null || bdie "$t is missing"; done

START_EPOCH=$(date +%s)
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=/var/tmp/vkt-sbench-$$
RUN_DIR=$WORK/runs
NODE=$WORK/node
DOM=vkt-sbench-$$-1
PREFIXES=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $SAMPLER_PID ]] && kill -TERM "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
  for p in "${PREFIXES[@]}"; do "${AWS[@]}" s3 rm --recursive --quiet "s3://$VK_S3_BUCKET/$p/" >/dev/null 2>&1; done
  if [[ -n ${VK_LIBVIRT_URI:-} ]]; then
    virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$DOM" >/dev/null 2>&1
    rm -f -- "$VK_POOL_DIR"/vkt-sbench-$$-*
  fi
  rm -rf -- "$WORK"
  exit $rc
}
AWS=(true)
trap cleanup EXIT
trap 'exit 130' INT TERM

BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/virtkeep}
[[ -x $BIN ]] || bdie "no binary at $BIN (BIN=...)"
[[ -f /tmp/virtkeep-lab/env ]] || { blog "lab/up.sh"; bash "$ROOT/lab/up.sh"; }
load_lab_env /tmp/virtkeep-lab/env
export AWS_ACCESS_KEY_ID=$VK_S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$VK_S3_SECRET_KEY
export AWS_REGION=$VK_S3_REGION AWS_DEFAULT_REGION=$VK_S3_REGION AWS_ENDPOINT_URL=$VK_S3_ENDPOINT
AWS=(aws --endpoint-url "$VK_S3_ENDPOINT")
mkdir -p "$WORK/pieces" "$RUN_DIR" "$NODE"
BIN_INFO="$(stat -c '%y' "$BIN" | cut -d. -f1), sha256 $(sha256sum "$BIN" | cut -c1-12), $("$BIN" --version 2>/dev/null || echo '?')"
cp "$BIN" "$WORK/virtkeep"
BIN=$WORK/virtkeep
IMG=$VK_POOL_DIR/$DOM-vda.raw
LOAD_START=$(loadavg)

# ------------------------------------------------------------------ workload + backup
blog "workload: $DISK_MIB MiB disk, pieces of $((U / MIB)) MiB"
workload_files "$WORK/pieces" "$U"
workload_layout $((DISK_MIB * MIB)) "$U" "$U"
truncate -s $((DISK_MIB * MIB)) "$IMG"
for e in "${WL_LAYOUT[@]}"; do
  read -r f off <<<"$e"
  dd if="$WORK/pieces/$f" of="$IMG" bs=1M oflag=seek_bytes seek="$off" conv=notrunc status=none
done
rm -rf -- "$WORK/pieces"
chown "$VK_QEMU_USER:$VK_QEMU_GROUP" "$IMG"
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
blog "backup"
timed backup "${VK[@]}" --json backup "lab/$DOM" --repo "$REPO" --key-file "$KEY" --mode full ||
  bdie "backup: $(tail -5 "$RUN_DIR/backup.err")"
virsh -q -c "$VK_LIBVIRT_URI" undefine --domain "$DOM" >/dev/null 2>&1 || true
rm -f -- "$IMG"
REPO_BYTES=$(du -sb "$REPO" | cut -f1)
REPO_OBJECTS=$(find "$REPO" -type f | wc -l)
REPO_MIB=$(calc "$REPO_BYTES / $MIB")

# ------------------------------------------------------------------ runs
# The lab's Ceph is a 2 GiB memstore OSD shared with everyone's tests: each prefix is
# removed as soon as its case is measured (drop_prefix), and on exit.
# fresh_prefix TAG: sets P to a new prefix name (not in $(...): PREFIXES must grow here)
fresh_prefix() {
  P=vkt-sbench-$$-$1-$RANDOM
  PREFIXES+=("$P")
}
drop_prefix() {
  "${AWS[@]}" s3 rm --recursive --only-show-errors "s3://$VK_S3_BUCKET/$1/" >/dev/null 2>&1 ||
    blog "could not remove s3://$VK_S3_BUCKET/$1/"
}
run_sync() { # run_sync shared|own ROUND
  local mode=$1 r=$2 p k
  fresh_prefix "$mode-r$r"
  p=$P
  k=$WORK/$p.key
  if [[ $mode == shared ]]; then
    "${VK[@]}" repo init "s3://$VK_S3_BUCKET/$p" --key-file "$k" --copy-keys-from "$REPO" \
      --copy-keys-key-file "$KEY" >"$RUN_DIR/init-$p.out" 2>&1 || bdie "repo init: $(tail -5 "$RUN_DIR/init-$p.out")"
  else
    "${VK[@]}" repo init "s3://$VK_S3_BUCKET/$p" --key-file "$k" >"$RUN_DIR/init-$p.out" 2>&1 ||
      bdie "repo init: $(tail -5 "$RUN_DIR/init-$p.out")"
  fi
  blog "round $r: sync ($mode keys) -> $p"
  timed "sync-$mode-r$r" "${VK[@]}" --json sync --from "$REPO" --from-key-file "$KEY" \
    --to "s3://$VK_S3_BUCKET/$p" --to-key-file "$k" || bdie "sync: $(tail -5 "$RUN_DIR/sync-$mode-r$r.err")"
  add WALL "$mode" "$T_WALL"
  add RSS "$mode" "$T_RSS_KB"
  [[ -s $RUN_DIR/sync-$mode.json ]] || cp "$RUN_DIR/sync-$mode-r$r.out" "$RUN_DIR/sync-$mode.json"
  drop_prefix "$p"
}
run_aws() {
  local r=$1 p n
  fresh_prefix "aws-r$r"
  p=$P
  blog "round $r: aws s3 cp --recursive -> $p"
  timed "aws-r$r" "${AWS[@]}" s3 cp --recursive --only-show-errors "$REPO" "s3://$VK_S3_BUCKET/$p/" ||
    bdie "aws s3 cp: $(tail -5 "$RUN_DIR/aws-r$r.err")"
  add WALL aws "$T_WALL"
  n=$("${AWS[@]}" s3 ls --recursive "s3://$VK_S3_BUCKET/$p/" | wc -l)
  [[ $n == "$REPO_OBJECTS" ]] || bdie "aws copied $n of $REPO_OBJECTS objects"
  drop_prefix "$p"
}
# shellcheck disable=SC2034 # read through med()'s nameref
declare -A WALL RSS
for ((r = 1; r <= REPS; r++)); do
  if ((r % 2)); then
    run_sync shared "$r"
    run_aws "$r"
  else
    run_aws "$r"
    run_sync shared "$r"
  fi
  [[ $KEYS == both ]] && run_sync own "$r"
done
SENT=$(jq -r '"\(.chunks_sent) chunks, \(.bytes_sent) stored bytes (raw: \(.raw))"' "$RUN_DIR/sync-shared.json" 2>/dev/null || echo "?")

# ------------------------------------------------------------------ report
W_AWS=$(med WALL aws)
W_SH=$(med WALL shared)
T_AWS=$(calc "$REPO_MIB / $W_AWS")
T_SH=$(calc "$REPO_MIB / $W_SH")
R_SH=$(calc "$T_SH / $T_AWS")
RSS_MAX=0
for v in ${RSS[shared]} ${RSS[own]:-}; do ((v > RSS_MAX)) && RSS_MAX=$v; done
rss() { calc "$(med RSS "$1") / 1024"; }
OWN_ROW=""
if [[ $KEYS == both ]]; then
  W_OWN=$(med WALL own)
  OWN_ROW=$(md_row "virtkeep sync, own keys (re-encode)" "$W_OWN" "$(calc "$REPO_MIB / $W_OWN")" \
    "$(calc "$REPO_MIB / $W_OWN / $T_AWS")" "$(rss own)" "$(mm WALL own)")
fi
REPORT="# virtkeep sync benchmark ($SIZE, $STAMP)

- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), SIZE=$SIZE, REPS=$REPS, KEYS=$KEYS, run took $(($(date +%s) - START_EPOCH)) s
- machine: $(machine_facts); **shared** with other people's builds and tests (load average at the start: $LOAD_START, at the end: $(loadavg))
- binary: $BIN_INFO; bench script tree $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo "?")
- client: $(aws --version 2>&1 | head -1) (default s3 settings: 10 concurrent requests, multipart above 8 MiB); RGW at $VK_S3_ENDPOINT (lab, same machine)
- workload: raw $DISK_MIB MiB, $((WL_DATA / MIB)) MiB of data (random, a repeated 4 MiB block, log-like text, holes); full backup into an encrypted local repository: $REPO_OBJECTS files, $REPO_MIB MiB (du -sb); shared-key sync round 1 sent $SENT
- throughput = the local repository's $REPO_MIB MiB / wall, every case into a fresh prefix; order alternates per round (odd: sync then aws; even: aws then sync)${NOTE:+
- note: $NOTE}

| case | wall s (median) | MiB/s | ratio to aws | peak RSS MiB (median) | walls |
|---|---|---|---|---|---|
$(md_row "aws s3 cp --recursive (plain copy)" "$W_AWS" "$T_AWS" 1 - "$(mm WALL aws)")
$(md_row "virtkeep sync, shared keys (--copy-keys-from)" "$W_SH" "$T_SH" "$R_SH" "$(rss shared)" "$(mm WALL shared)")
$OWN_ROW

| target | measured | verdict |
|---|---|---|
| shared-key sync ≥ 0.8 × plain copy | $R_SH | $(verdict "$R_SH >= 0.8") |
| peak RSS ≤ 128 MiB (every sync) | $(calc "$RSS_MAX / 1024") MiB | $(verdict "$RSS_MAX <= 131072") |
"
mkdir -p "$BENCH_DIR/results"
suffix=""
[[ $SIZE == small ]] && suffix="-small"
OUT=$BENCH_DIR/results/sync-$STAMP$suffix.md
printf '%s\n' "$REPORT" >"$OUT"
printf '%s\n' "$REPORT"
echo "report: $OUT"

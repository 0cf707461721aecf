#!/usr/bin/env bash
# LVM backup benchmark (issue 8, "Benchmark"): "Full backup of an LV with ~1 GiB of data
# vs `ssh host dd if=/dev/VG/SNAP bs=4M >/dev/null` in the same run."
#
# Against the LVM test hypervisor (lab/hvm: a Debian VM under TCG with LVM and libvirt,
# SSH on 127.0.0.1; everything through it is CPU-bound emulation, so the absolute numbers
# are those of this lab, the ratio is what carries over):
#  1. workload: a thick LV vg0/vkbench-PID of 1 GiB, all of it data (512 MiB random,
#     256 MiB of a repeated text block, 256 MiB of a repeated 4 MiB random block: nothing
#     the data path may skip), and a stopped domain on it;
#  2. per round ($REPS): `lvcreate -s` + `ssh root@hvm dd if=/dev/vg0/SNAP bs=4M
#     >/dev/null` (the physical limit: the same sshd, the same snapshot device, the
#     stream thrown away on the node) + `lvremove`; then virtkeep's full backup into a
#     fresh repository (snapshot, qemu-nbd on the snapshot, NBD over SSH, chunking,
#     compression, encryption, lvremove); the order alternates between rounds;
#  3. ratios (dd wall / virtkeep wall, and dd wall / virtkeep data phase from its log),
#     virtkeep's peak RSS, a table in bench/results/lvm-<date>.md.
# Everything created (domain, LV, snapshots, repositories) is removed on exit.
#
# Env: REPS (default 2), VK_BIN (default target/debug/virtkeep; the node's CPU is not the
#      limit here), KEEP=1 keeps the work dir.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

REPS=${REPS:-2}
VK_BIN=${VK_BIN:-$ROOT/target/debug/virtkeep}
MIB=1048576
[[ -x $VK_BIN ]] || bdie "$VK_BIN missing: cargo build -p virtkeep"
[[ -s /tmp/virtkeep-lab/hvm/env ]] || "$ROOT/lab/hvm/up.sh" >/dev/null
load_lab_env /tmp/virtkeep-lab/hvm/env

RUN_DIR=$(mktemp -d /tmp/vk-bench-lvm.XXXXXX)
NAME=vkbench-$$
LV=$VK_HVM_VG/$NAME
SSH=(ssh -p "$VK_HVM_PORT" -i "$VK_HVM_KEY" -F /dev/null -o IdentitiesOnly=yes -o BatchMode=yes
  -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$VK_HVM_KNOWN_HOSTS" "root@$VK_HVM_HOST")
hv() { "${SSH[@]}" "$@"; }

cleanup() {
  hv "virsh -q undefine $NAME >/dev/null 2>&1; for l in \$(lvs --noheadings -o lv_name $VK_HVM_VG | grep -F $NAME); do lvremove -f $VK_HVM_VG/\$l >/dev/null 2>&1; done" || true
  [[ ${KEEP:-0} == 1 ]] || rm -rf "$RUN_DIR"
}
trap cleanup EXIT

blog "workload: 1 GiB thick LV $LV, all data"
hv "set -e
lvcreate -q -y -L 1g -n $NAME $VK_HVM_VG >/dev/null
dev=/dev/$LV
head -c $((512 * MIB)) /dev/urandom | dd of=\$dev bs=4M iflag=fullblock oflag=direct status=none
yes 'virtkeep lvm benchmark: a line of compressible text, repeated' | head -c $((256 * MIB)) |
  dd of=\$dev bs=4M seek=128 iflag=fullblock oflag=direct status=none
head -c $((4 * MIB)) /dev/urandom >/tmp/$NAME.blk
for i in \$(seq 0 63); do cat /tmp/$NAME.blk; done | dd of=\$dev bs=4M seek=192 iflag=fullblock oflag=direct status=none
rm -f /tmp/$NAME.blk
cat >/tmp/$NAME.xml <<EOF
<domain type='qemu'><name>$NAME</name><memory unit='KiB'>65536</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/$LV'/><target dev='vda' bus='virtio'/></disk>
</devices></domain>
EOF
virsh -q define /tmp/$NAME.xml >/dev/null
rm -f /tmp/$NAME.xml"

CONFIG=$RUN_DIR/config.toml
"$VK_BIN" --config "$CONFIG" host add hvm --ssh "root@$VK_HVM_HOST:$VK_HVM_PORT" \
  --identity "$VK_HVM_KEY" --known-hosts "$VK_HVM_KNOWN_HOSTS" >/dev/null
# a 1 GiB origin: a 128 MiB copy-on-write area is plenty for a stopped VM
printf '[hosts.hvm.lvm]\nsnapshot_share = 0.1\nsnapshot_floor_mib = 64\n' >>"$CONFIG"

baseline() {
  hv "lvcreate -q -y -s -L 128m -n $NAME-ddsnap $LV >/dev/null"
  timed "dd-$1" "${SSH[@]}" "dd if=/dev/$VK_HVM_VG/$NAME-ddsnap bs=4M status=none" || bdie "dd failed"
  hv "lvremove -f $VK_HVM_VG/$NAME-ddsnap >/dev/null"
  DD_WALL=$T_WALL
}
run_virtkeep() {
  local repo=$RUN_DIR/repo-$1
  "$VK_BIN" --config "$CONFIG" repo init "$repo" --encryption none >/dev/null
  VIRTKEEP_LOG=info timed "vk-$1" "$VK_BIN" --config "$CONFIG" --json backup "hvm/$NAME" --repo "$repo" ||
    bdie "virtkeep backup failed: $(tail -5 "$RUN_DIR/vk-$1.err")"
  VK_WALL=$T_WALL
  VK_RSS=$T_RSS_KB
  # data phase: "disk transfer starts" → "disk done" in the log
  VK_DATA=$(python3 - "$RUN_DIR/vk-$1.err" <<'EOF'
import re, sys
from datetime import datetime
t = {}
for line in open(sys.argv[1]):
    m = re.match(r"(\S+Z)\s", line)
    if not m:
        continue
    ts = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
    if "disk transfer starts" in line:
        t.setdefault("start", ts)
    if "disk done" in line:
        t["end"] = ts
print(f"{t['end'] - t['start']:.3f}" if len(t) == 2 else "nan")
EOF
)
  VK_READ=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["disks"][0]["bytes_read"])' "$RUN_DIR/vk-$1.out")
  left=$(hv "lvs --noheadings -o lv_name $VK_HVM_VG | grep -c -- '$NAME-vksnap-' || true")
  [[ $left == 0 ]] || bdie "virtkeep left $left snapshot(s)"
}

ROWS=()
for r in $(seq 1 "$REPS"); do
  if ((r % 2)); then baseline "$r"; run_virtkeep "$r"; else run_virtkeep "$r"; baseline "$r"; fi
  ROWS+=("| $r | $DD_WALL | $VK_WALL | $VK_DATA | $(calc "$DD_WALL / $VK_WALL") | $(calc "$DD_WALL / $VK_DATA") | $((VK_RSS / 1024)) | $((VK_READ / MIB)) |")
  blog "round $r: dd $DD_WALL s, virtkeep $VK_WALL s (data phase $VK_DATA s), RSS $((VK_RSS / 1024)) MiB"
done

OUT=$ROOT/bench/results/lvm-$(date +%Y%m%d-%H%M%S).md
{
  echo "# LVM full backup vs ssh dd of the snapshot ($(date -u +%FT%TZ))"
  echo
  echo "1 GiB thick LV, all data, stopped domain, on the LVM test hypervisor (TCG; $(nproc) cores on the node, load $(cut -d' ' -f1-3 /proc/loadavg)); virtkeep binary: $VK_BIN."
  echo "Ratios are throughput ratios (dd wall / virtkeep wall): 1.0 = as fast as ssh dd of the same snapshot."
  echo
  echo "| round | ssh dd (s) | virtkeep wall (s) | virtkeep data phase (s) | ratio wall | ratio data phase | peak RSS (MiB) | read (MiB) |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} >"$OUT"
cat "$OUT"
blog "written $OUT"

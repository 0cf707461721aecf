#!/usr/bin/env bash
# Boots the LVM test hypervisor and writes /tmp/virtkeep-lab/hvm/env (and qemu.pid there;
# the VM's own state lives in /var/tmp/virtkeep-lab-hvm, see lib.sh):
#   VK_HVM_HOST=127.0.0.1 VK_HVM_PORT VK_HVM_USER=root VK_HVM_KEY VK_HVM_KNOWN_HOSTS
#   VK_HVM_VG=vg0 VK_HVM_THINPOOL=thinpool VK_HVM_PID VK_HVM_RUN_DIR VK_HVM_BOOT_MS ...
#
# This machine's kernel has no device-mapper, so LVM runs inside a small Debian VM under
# qemu TCG (image from lab/hvm/build.sh, built and cached on first use): a qcow2 overlay
# over the cached root image per boot, a sparse 2 GiB raw disk as the LVM PV (VG vg0 with
# the thin pool vg0/thinpool, the rest free for thick LVs and their snapshots), a tiny
# config disk with this boot's keys, SSH on 127.0.0.1:PORT through user-mode networking.
# libvirtd runs inside, so the VM is a real libvirt hypervisor for no-OS TCG domains.
#
# Idempotent and safe to call concurrently (flock): when the VM is up and answers SSH it
# only sweeps what dead test processes left inside (vkt-* domains and LVs) and exits.
# Env: VK_HVM_PV_SIZE (2G), VK_HVM_THINPOOL_SIZE (512M), VK_HVM_MEM (1024, MiB),
#      VK_HVM_IDLE_MINUTES (60; the VM powers itself off after that long without an SSH
#      session, 0 = never), VK_HVM_BOOT_TIMEOUT (300 s).
set -euo pipefail
LOG_TAG=up
# shellcheck source=lab/hvm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

[[ $(id -u) -eq 0 ]] || hdie "lab/hvm/up.sh must run as root"
for tool in qemu-system-x86_64 qemu-img ssh ssh-keygen tar flock timeout; do
  command -v "$tool" >/dev/null || hdie "'$tool' is missing: run lab/install-deps.sh first"
done

mkdir -p "$(dirname "$HVM_LOCK_FILE")"
exec 9>>"$HVM_LOCK_FILE"
flock -w 900 9 || hdie "could not lock $HVM_LOCK_FILE within 900 s (another lab/hvm/up.sh hangs?)"

env_get() { sed -n "s/^$1=//p" "$HVM_STATE_ENV" 2>/dev/null | head -n1; }

# (re)publish env and pid file where the tests look (lab/up.sh may have wiped them)
publish() {
  mkdir -p "$HVM_RUN_DIR"
  cp "$HVM_STATE_DIR/qemu.pid" "$HVM_RUN_DIR/qemu.pid.tmp" && mv "$HVM_RUN_DIR/qemu.pid.tmp" "$HVM_RUN_DIR/qemu.pid"
  cp "$HVM_STATE_ENV" "$HVM_ENV_FILE.tmp" && mv "$HVM_ENV_FILE.tmp" "$HVM_ENV_FILE"
}

SSH_OPTS=()
set_ssh_opts() { mapfile -t SSH_OPTS < <(hvm_ssh_opts "$1" "$2" "$3"); }
# gssh SECONDS CMD: ssh into the VM with a hard timeout
gssh() {
  local t=$1
  shift
  timeout -k 5 "$t" ssh "${SSH_OPTS[@]}" root@127.0.0.1 "$@" </dev/null 9>&-
}

healthy() {
  [[ -s $HVM_STATE_ENV ]] || return 1
  hvm_pid_alive "$(env_get VK_HVM_PID)" || return 1
  set_ssh_opts "$(env_get VK_HVM_PORT)" "$(env_get VK_HVM_KEY)" "$(env_get VK_HVM_KNOWN_HOSTS)"
  gssh 20 "vgs $HVM_VG >/dev/null 2>&1" 2>/dev/null
}

# owner_alive NAME: names from virtkeep_lab::unique_name are vkt-TAG-PID-COUNTER...; a
# resource is kept when any "-DIGITS-DIGITS" pair in its name names a live process here.
owner_alive() {
  local rest=$1 pid found=0
  while [[ $rest =~ -([0-9]+)-([0-9]+)(.*)$ ]]; do
    found=1
    pid=${BASH_REMATCH[1]}
    rest=-${BASH_REMATCH[2]}${BASH_REMATCH[3]}
    [[ -d /proc/$pid && $pid != 1 ]] && return 0
  done
  ((found)) || return 0
  return 1
}

# Remove vkt-* domains and LVs inside the VM whose test process is gone.
sweep_dead() {
  local listing name kind doms=() lvs=()
  listing=$(gssh 60 "virsh -q -c qemu:///system list --all --name | sed 's/^/dom /'; lvs --noheadings -o lv_name $HVM_VG 2>/dev/null | sed 's/^ */lv /'") || return 0
  while read -r kind name; do
    [[ $name =~ ^vkt-[A-Za-z0-9.+_-]+$ ]] || continue
    owner_alive "$name" && continue
    case $kind in
      dom) doms+=("$name") ;;
      lv) lvs+=("$name") ;;
    esac
  done <<<"$listing"
  ((${#doms[@]} + ${#lvs[@]})) || return 0
  hlog "sweep: domains ${doms[*]:-none}, LVs ${lvs[*]:-none}"
  local cmd=":" n
  # names are [A-Za-z0-9.+_-] (matched above): safe on a command line
  for n in "${doms[@]}"; do cmd+="; virsh -q -c qemu:///system destroy $n >/dev/null 2>&1; virsh -q -c qemu:///system undefine $n >/dev/null 2>&1"; done
  # snapshots first (an origin with snapshots needs them gone)
  for n in "${lvs[@]}"; do [[ $n == *-vksnap-* ]] && cmd+="; lvremove -q -f $HVM_VG/$n"; done
  for n in "${lvs[@]}"; do [[ $n == *-vksnap-* ]] || cmd+="; lvremove -q -f $HVM_VG/$n"; done
  gssh 180 "$cmd" >/dev/null 2>&1 || hlog "WARNING: sweep incomplete"
}

if healthy; then
  publish
  sweep_dead
  hlog "LVM hypervisor already up (env: $HVM_ENV_FILE)"
  exit 0
fi

# ------------------------------------------------------------------ fresh boot
"$HERE/down.sh" --locked >/dev/null 2>&1 || true
IMAGE_DIR=$("$HERE/build.sh" 9>&-) || hdie "lab/hvm/build.sh failed"
RUN=$HVM_STATE_DIR
rm -rf "$RUN" "$HVM_RUN_DIR"
mkdir -p "$RUN/cfg"
chmod 0700 "$RUN"

ssh-keygen -q -t ed25519 -N '' -C vkt-hvm-user -f "$RUN/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -C vkt-hvm-host -f "$RUN/cfg/ssh_host_ed25519_key"
cp "$RUN/id_ed25519.pub" "$RUN/cfg/authorized_keys"
echo "VK_IDLE_MINUTES=${VK_HVM_IDLE_MINUTES:-60}" >"$RUN/cfg/config"
tar -C "$RUN/cfg" -cf "$RUN/cfg.tar" --owner=0 --group=0 .
qemu-img create -q -f qcow2 -F raw -b "$IMAGE_DIR/root.img" "$RUN/root.qcow2"
truncate -s "${VK_HVM_PV_SIZE:-2G}" "$RUN/pv0.img"

pick_port() {
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 30000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
  hdie "no free port found"
}

started=0
for _try in 1 2 3; do
  PORT=$(pick_port)
  rm -f "$RUN/qemu.pid" "$RUN/console.log"
  T0=${EPOCHREALTIME/[.,]/}
  # A higher priority than the tests beside it: the LVM tests wait on this one emulated
  # machine and are the suite's critical path (.config/nextest.toml), while the other
  # tests mostly wait on I/O and fill the CPU it leaves.
  if nice -n "${VK_HVM_NICE:--5}" qemu-system-x86_64 -name "$HVM_QEMU_TAG,debug-threads=off" \
    -machine q35 -accel tcg,thread=multi,tb-size=256 -cpu qemu64,-svm \
    -m "${VK_HVM_MEM:-1024}" -smp 2 \
    -kernel "$IMAGE_DIR/vmlinuz" -initrd "$IMAGE_DIR/initrd.img" \
    -append "root=/dev/vda rootfstype=ext4 rw init=/sbin/hvm-init console=ttyS0 net.ifnames=0 panic=-1 quiet" \
    -drive "file=$RUN/root.qcow2,if=none,id=root,format=qcow2,cache=unsafe,discard=unmap" \
    -device virtio-blk-pci,drive=root,serial=vkroot \
    -drive "file=$RUN/pv0.img,if=none,id=pv0,format=raw,cache=unsafe,discard=unmap" \
    -device virtio-blk-pci,drive=pv0,serial=vkpv0 \
    -drive "file=$RUN/cfg.tar,if=none,id=cfg,format=raw,readonly=on" \
    -device virtio-blk-pci,drive=cfg,serial=vkcfg \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:22" -device virtio-net-pci,netdev=n0 \
    -device virtio-rng-pci \
    -display none -vga none -monitor none -no-reboot \
    -serial "file:$RUN/console.log" \
    -pidfile "$RUN/qemu.pid" -daemonize 2>"$RUN/qemu.err" 9>&-; then
    started=1
    break
  fi
  grep -qi 'forward' "$RUN/qemu.err" || break # only a port clash is worth a retry
done
((started)) || hdie "qemu did not start: $(head -c 400 "$RUN/qemu.err")"
PID=$(<"$RUN/qemu.pid")
hlog "qemu pid $PID, ssh on 127.0.0.1:$PORT"

printf '[127.0.0.1]:%s %s\n' "$PORT" "$(cut -d' ' -f1,2 "$RUN/cfg/ssh_host_ed25519_key.pub")" >"$RUN/known_hosts"
set_ssh_opts "$PORT" "$RUN/id_ed25519" "$RUN/known_hosts"
deadline=$((SECONDS + ${VK_HVM_BOOT_TIMEOUT:-300}))
until gssh 15 true 2>/dev/null; do
  if ! hvm_pid_alive "$PID"; then
    tail -20 "$RUN/console.log" >&2 || true
    hdie "qemu exited during boot"
  fi
  if ((SECONDS >= deadline)); then
    tail -20 "$RUN/console.log" >&2 || true
    hdie "no SSH after ${VK_HVM_BOOT_TIMEOUT:-300} s (console: $RUN/console.log)"
  fi
  sleep 1
done
T1=${EPOCHREALTIME/[.,]/}
hlog "SSH answers after $(((T1 - T0) / 1000000)) s"

gssh 240 "set -e
i=0; while [ ! -e /run/hvm-ready ] && [ \$i -lt 600 ]; do sleep 0.2; i=\$((i + 1)); done
pvcreate -q -y /dev/hvm-pv0
vgcreate -q $HVM_VG /dev/hvm-pv0
lvcreate -q -y --type thin-pool -L ${VK_HVM_THINPOOL_SIZE:-512M} -n $HVM_THINPOOL $HVM_VG
vgs --noheadings -o vg_name,vg_size,vg_free --units m $HVM_VG" >"$RUN/vg.txt" 2>"$RUN/vg.err" ||
  hdie "creating the VG failed: $(cat "$RUN/vg.err")"
T2=${EPOCHREALTIME/[.,]/}
hlog "VG ready: $(xargs <"$RUN/vg.txt")"

cat >"$HVM_STATE_ENV.tmp" <<EOF
VK_HVM_HOST=127.0.0.1
VK_HVM_PORT=$PORT
VK_HVM_USER=root
VK_HVM_KEY=$RUN/id_ed25519
VK_HVM_KNOWN_HOSTS=$RUN/known_hosts
VK_HVM_VG=$HVM_VG
VK_HVM_THINPOOL=$HVM_THINPOOL
VK_HVM_PID=$PID
VK_HVM_RUN_DIR=$RUN
VK_HVM_IMAGE_DIR=$IMAGE_DIR
VK_HVM_BOOT_MS=$(((T1 - T0) / 1000))
VK_HVM_VG_SETUP_MS=$(((T2 - T1) / 1000))
EOF
mv "$HVM_STATE_ENV.tmp" "$HVM_STATE_ENV"
publish
hlog "LVM hypervisor up (env: $HVM_ENV_FILE)"

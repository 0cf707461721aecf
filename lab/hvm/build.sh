#!/usr/bin/env bash
# Builds the image of the LVM test hypervisor (see lab/hvm/up.sh) once and caches it under
# /var/cache/virtkeep-lab/hvm/<hash of this script>/; prints that directory. Does nothing
# when the image is there already, so edit this script to force a rebuild.
#
# The image: Debian bookworm (mmdebstrap minbase) with openssh-server, lvm2,
# thin-provisioning-tools, qemu-utils and libvirt + qemu-system-x86 (a real hypervisor for
# no-OS TCG domains on LVs), the cloud kernel (has dm-snapshot and dm-thin-pool), and a
# shell script as PID 1. Files in the cache directory:
#   root.img              raw ext4 root filesystem (sparse; booted through a qcow2 overlay)
#   vmlinuz, initrd.img   kernel and initramfs copied out of the root filesystem
#   build.env             what was built and how long it took
# The image holds no keys: up.sh generates the client key and the VM's host key per boot
# and hands them over on a small config disk (a tar archive on a raw virtio disk with
# serial "vkcfg"; the PV disk has serial "vkpv0").
#
# Env: HVM_MIRROR (http://deb.debian.org/debian), HVM_ROOT_SIZE (4G, sparse),
#      VK_HVM_CACHE_ROOT (/var/cache/virtkeep-lab/hvm). .debs are kept in CACHE_ROOT/debs
#      so that a rebuild after an edit of this script downloads nothing.
set -euo pipefail
LOG_TAG=build
# shellcheck source=lab/hvm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) -eq 0 ]] || hdie "lab/hvm/build.sh must run as root (mmdebstrap chroots)"

IMAGE_DIR=$(hvm_image_dir)
image_complete() { [[ -s $IMAGE_DIR/build.env && -s $IMAGE_DIR/root.img && -s $IMAGE_DIR/vmlinuz && -s $IMAGE_DIR/initrd.img ]]; }
if image_complete; then
  echo "$IMAGE_DIR"
  exit 0
fi

mkdir -p "$HVM_CACHE_ROOT"
exec 8>>"$HVM_BUILD_LOCK"
flock -w 900 8 || hdie "could not lock $HVM_BUILD_LOCK within 900 s (another build hangs?)"
if image_complete; then # built by whoever held the lock
  echo "$IMAGE_DIR"
  exit 0
fi

# ------------------------------------------------------------------ tools
need_pkgs=()
command -v mmdebstrap >/dev/null || need_pkgs+=(mmdebstrap)
command -v eatmydata >/dev/null || need_pkgs+=(eatmydata)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
if ((${#need_pkgs[@]})); then
  hlog "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 "${need_pkgs[@]}" >&2 ||
    { timeout 300 apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 &&
      timeout 600 apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 "${need_pkgs[@]}" >&2; } ||
    hdie "cannot install ${need_pkgs[*]}"
fi

MIRROR=${HVM_MIRROR:-http://deb.debian.org/debian}
ROOT_SIZE=${HVM_ROOT_SIZE:-4G}
DEBS=$HVM_CACHE_ROOT/debs
WORK=$IMAGE_DIR.tmp.$$
ROOTFS=$WORK/rootfs
cleanup() {
  local m
  for m in proc sys dev/pts dev; do umount "$ROOTFS/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
rm -rf --one-file-system "$IMAGE_DIR" "$IMAGE_DIR".tmp.*
mkdir -p "$WORK" "$DEBS"
T0=${EPOCHREALTIME/[.,]/}

# ------------------------------------------------------------------ bootstrap
PKGS=usr-is-merged,openssh-server,lvm2,thin-provisioning-tools,qemu-utils,iproute2,kmod,udev,procps,util-linux
PKGS+=,linux-image-cloud-amd64
PKGS+=,libvirt-daemon-system,libvirt-clients,qemu-system-x86,dbus,libpam-systemd
MM=(mmdebstrap --variant=minbase --components=main --include="$PKGS"
  --hook-dir=/usr/share/mmdebstrap/hooks/eatmydata
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --skip=essential/unlink
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/'
  --setup-hook="sync-in $DEBS /var/cache/apt/archives/"
  --customize-hook="sync-out /var/cache/apt/archives $DEBS"
  # a small initramfs (only what mounts /dev/vda): much faster to unpack and run under TCG
  --customize-hook='echo MODULES=list >"$1/etc/initramfs-tools/conf.d/virtkeep-hvm"'
  --customize-hook='printf "virtio_pci\nvirtio_blk\n" >>"$1/etc/initramfs-tools/modules"'
  --customize-hook='chroot "$1" update-initramfs -u -k all')
hlog "mmdebstrap bookworm (log: $WORK/mmdebstrap.log)"
if ! timeout 1200 "${MM[@]}" bookworm "$ROOTFS" "$MIRROR" >"$WORK/mmdebstrap.log" 2>&1; then
  tail -40 "$WORK/mmdebstrap.log" >&2
  hdie "mmdebstrap failed"
fi
T1=${EPOCHREALTIME/[.,]/}

# ------------------------------------------------------------------ configure
echo hvm >"$ROOTFS/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 hvm\n' >"$ROOTFS/etc/hosts"
echo 'nameserver 10.0.2.3' >"$ROOTFS/etc/resolv.conf"
printf '/dev/vda / ext4 rw,relatime 0 1\n' >"$ROOTFS/etc/fstab"
rm -f "$ROOTFS"/etc/ssh/ssh_host_*
cat >"$ROOTFS/etc/ssh/sshd_config.d/hvm.conf" <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
MaxStartups 64:30:128
MaxSessions 64
ClientAliveInterval 15
EOF

# No udev coldplug at boot (see hvm-init): LVM lists devices itself instead of asking udev's
# database, which would otherwise make it wait for devices udev never processed.
sed -i 's/^\(\s*\)# obtain_device_list_from_udev = [01]$/\1obtain_device_list_from_udev = 0/' "$ROOTFS/etc/lvm/lvm.conf"
grep -q '^\s*obtain_device_list_from_udev = 0' "$ROOTFS/etc/lvm/lvm.conf" ||
  hdie "could not set obtain_device_list_from_udev = 0 in lvm.conf"

# PID 1: mounts, modules, udev, config disk (keys), network, LVM, libvirt, sshd; then
# reaps orphans and powers off after VK_IDLE_MINUTES without an SSH session.
cat >"$ROOTFS/sbin/hvm-init" <<'EOF'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "hvm-init: $*" >/dev/console; }
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mountpoint -q /dev/shm || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mountpoint -q /run || mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -o remount,rw / 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/sshd /run/lock /run/lvm /run/dbus
hostname hvm
ln -sf /proc/self/mounts /etc/mtab
modprobe -a virtio_net virtio_blk virtio_rng dm_mod dm_snapshot dm_thin_pool loop 2>/dev/null
# config disk: a tar archive on the virtio disk with serial vkcfg
CFG=/run/hvm-cfg
mkdir -p $CFG
for d in /sys/block/vd*; do
  [ "$(cat "$d/serial" 2>/dev/null)" = vkcfg ] && tar -xf "/dev/${d##*/}" -C $CFG 2>/dev/null
  [ "$(cat "$d/serial" 2>/dev/null)" = vkpv0 ] && ln -sf "/dev/${d##*/}" /dev/hvm-pv0
done
install -d -m 700 /root/.ssh
[ -s $CFG/authorized_keys ] && install -m 600 $CFG/authorized_keys /root/.ssh/authorized_keys
if [ -s $CFG/ssh_host_ed25519_key ]; then
  install -m 600 $CFG/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key
  install -m 644 $CFG/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ed25519_key.pub
else
  ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
fi
[ -s $CFG/config ] && . $CFG/config
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
# sshd first: the connection setup overlaps with the rest (up.sh waits for hvm-ready)
/usr/sbin/sshd
# udevd for the events LVM waits on (LV device nodes and /dev/VG/LV links); no coldplug:
# nothing here needs the existing devices' udev data, and it takes tens of seconds in TCG
[ -x /lib/systemd/systemd-udevd ] && /lib/systemd/systemd-udevd --daemon
vgchange -ay >/dev/null 2>&1
dbus-daemon --system --fork >/dev/null 2>&1
/usr/sbin/virtlogd -d
/usr/sbin/libvirtd -d
touch /run/hvm-ready
say "ready after $(cut -d' ' -f1 /proc/uptime) s"
# the first virsh call probes QEMU's capabilities (seconds under TCG): do it now
(sleep 1; virsh -c qemu:///system domcapabilities >/dev/null 2>&1) &
trap 'sync; echo o > /proc/sysrq-trigger' TERM USR2
last=$(cut -d. -f1 /proc/uptime)
while :; do
  sleep 30 &
  wait
  now=$(cut -d. -f1 /proc/uptime)
  # the listener plus at least one session process
  [ "$(pgrep -c -x sshd)" -gt 1 ] && last=$now
  if [ "${VK_IDLE_MINUTES:-0}" -gt 0 ] && [ $((now - last)) -ge $((VK_IDLE_MINUTES * 60)) ]; then
    say "no SSH session for $VK_IDLE_MINUTES minutes: powering off"
    sync
    echo o >/proc/sysrq-trigger
  fi
done
EOF
chmod 755 "$ROOTFS/sbin/hvm-init"

# slim: docs, man pages, locales, apt caches
rm -rf "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
  "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true

KVER=$(ls "$ROOTFS/lib/modules" | head -n1)
[[ -n $KVER && -s $ROOTFS/boot/vmlinuz-$KVER && -s $ROOTFS/boot/initrd.img-$KVER ]] ||
  hdie "no kernel/initrd in the root filesystem (see $WORK/mmdebstrap.log)"
cp "$ROOTFS/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cp "$ROOTFS/boot/initrd.img-$KVER" "$WORK/initrd.img"
T2=${EPOCHREALTIME/[.,]/}

# ------------------------------------------------------------------ pack
truncate -s "$ROOT_SIZE" "$WORK/root.img"
mkfs.ext4 -q -F -L hvmroot -d "$ROOTFS" "$WORK/root.img"
T3=${EPOCHREALTIME/[.,]/}
ROOTFS_MB=$(($(du -sk "$ROOTFS" | cut -f1) / 1024))
rm -rf --one-file-system "$ROOTFS"
ms() { echo $((($2 - $1) / 1000)); }
cat >"$WORK/build.env" <<EOF
HVM_KERNEL=$KVER
HVM_ROOTFS_MB=$ROOTFS_MB
HVM_T_BOOTSTRAP_MS=$(ms "$T0" "$T1")
HVM_T_CONFIGURE_MS=$(ms "$T1" "$T2")
HVM_T_MKFS_MS=$(ms "$T2" "$T3")
HVM_T_TOTAL_MS=$(ms "$T0" "$T3")
EOF
mv "$WORK/mmdebstrap.log" "$WORK/build.log"
mv -T "$WORK" "$IMAGE_DIR"
trap - EXIT
hlog "built $IMAGE_DIR in $(($(ms "$T0" "$T3") / 1000)) s (rootfs $ROOTFS_MB MB)"

# older images that no qemu of ours still boots from
for d in "$HVM_CACHE_ROOT"/*/; do
  d=${d%/}
  [[ $d == "$IMAGE_DIR" || ${d##*/} == debs ]] && continue
  [[ -e $d/build.env || $d == *.tmp.* ]] || continue
  in_use=0
  for pid in $(hvm_all_pids); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$d/" && in_use=1
  done
  ((in_use)) || rm -rf --one-file-system "$d"
done
echo "$IMAGE_DIR"

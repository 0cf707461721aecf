#!/usr/bin/env bash
# Builds the disk of the guest-agent test guest (e2e boot_verify::, `verify --boot
# --agent`) once and caches it under /var/cache/virtkeep-lab/agent-guest/<hash>/; prints
# the path of the image (disk.img). Does nothing when it is there already.
#
# The disk is bootable by SeaBIOS with no host file involved (`verify --boot` boots a
# backup's disks, never a kernel named by its XML): a FAT filesystem without a partition
# table, syslinux in its boot sector, and on it the LVM test hypervisor's Debian cloud
# kernel (lab/hvm/build.sh, built first if missing; its modules read out of its root
# image with debugfs, no mount) and an initramfs whose /init (busybox-static) loads the
# virtio modules, mounts devtmpfs, finds the port named org.qemu.guest_agent.0 under
# /sys/class/virtio-ports and runs the host's qemu-ga on it (its libraries from ldd);
# everything is logged to ttyS0. When qemu-ga exits, the guest powers off.
#
# Env: VK_AGENT_GUEST_CACHE (/var/cache/virtkeep-lab/agent-guest).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf '[agent-guest] %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
[[ $(id -u) -eq 0 ]] || die "must run as root (it writes under /var/cache)"
for t in debugfs mkfs.vfat mcopy syslinux cpio busybox qemu-ga ldd; do
  command -v "$t" >/dev/null ||
    die "$t is missing (lab/install-deps.sh installs syslinux, mtools, dosfstools, cpio, busybox-static, qemu-guest-agent)"
done

hvm=$("$here/hvm/build.sh") || die "lab/hvm/build.sh failed (the kernel comes from its image)"
# shellcheck disable=SC1091
kver=$(. "$hvm/build.env" && echo "$HVM_KERNEL")
[[ -n $kver && -s $hvm/vmlinuz && -s $hvm/root.img ]] || die "no kernel in $hvm"

root=${VK_AGENT_GUEST_CACHE:-/var/cache/virtkeep-lab/agent-guest}
key=$( (sha256sum "${BASH_SOURCE[0]}" && echo "$hvm" && sha256sum /usr/sbin/qemu-ga) | sha256sum | cut -c1-16)
out=$root/$key
if [[ -s $out/disk.img ]]; then
  echo "$out/disk.img"
  exit 0
fi
mkdir -p "$root"
exec 8>>"$root/.build.lock"
flock -w 300 8 || die "could not lock $root/.build.lock within 300 s"
if [[ -s $out/disk.img ]]; then
  echo "$out/disk.img"
  exit 0
fi

work=$(mktemp -d "$root/.tmp.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT
ir=$work/initramfs
mkdir -p "$ir"/{bin,dev,proc,sys,run,tmp,lib/modules,usr/sbin}
cp /bin/busybox "$ir/bin/busybox"
cp /usr/sbin/qemu-ga "$ir/usr/sbin/qemu-ga"
# qemu-ga's shared libraries, each at the path the loader is given by ldd
while read -r lib; do
  mkdir -p "$ir$(dirname "$lib")"
  cp -L "$lib" "$ir$lib"
done < <(ldd /usr/sbin/qemu-ga | grep -o '/[^ ]*')
mods=(virtio/virtio virtio/virtio_ring virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev
  virtio/virtio_pci char/virtio_console)
for m in "${mods[@]}"; do
  src=/usr/lib/modules/$kver/kernel/drivers/$m.ko
  debugfs -R "dump $src $ir/lib/modules/${m#*/}.ko" "$hvm/root.img" 2>/dev/null
  [[ -s $ir/lib/modules/${m#*/}.ko ]] || die "$src is not in $hvm/root.img"
done
cat >"$ir/init" <<'EOF'
#!/bin/busybox sh
# PID 1 of the guest-agent test guest (lab/agent-guest.sh).
b=/bin/busybox
$b mount -t devtmpfs devtmpfs /dev
$b mount -t proc proc /proc
$b mount -t sysfs sysfs /sys
$b mount -t tmpfs tmpfs /run
exec >/dev/ttyS0 2>&1
echo "vk-agent-guest: init"
for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console; do
  $b insmod /lib/modules/$m.ko || echo "vk-agent-guest: insmod $m failed"
done
port=
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$($b cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
  done
  [ -n "$port" ] || $b sleep 0.1
  i=$((i + 1))
done
if [ -z "$port" ]; then
  echo "vk-agent-guest: no org.qemu.guest_agent.0 port"
else
  echo "vk-agent-guest: qemu-ga on $port"
  /usr/sbin/qemu-ga -m virtio-serial -p "$port" -f /run/qemu-ga.pid -t /run
  echo "vk-agent-guest: qemu-ga exited ($?)"
fi
$b poweroff -f
EOF
chmod 755 "$ir/init"
(cd "$ir" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1 -n) >"$work/initrd"

cat >"$work/syslinux.cfg" <<'EOF'
DEFAULT vk
PROMPT 0
TIMEOUT 0
LABEL vk
  KERNEL vmlinuz
  INITRD initrd
  APPEND console=ttyS0 panic=-1 quiet
EOF
kib=$((($(stat -c %s "$hvm/vmlinuz") + $(stat -c %s "$work/initrd")) / 1024 + 2048))
mkfs.vfat -C -n VKAGENT "$work/disk.img" "$kib" >/dev/null
syslinux --install "$work/disk.img"
mcopy -i "$work/disk.img" "$hvm/vmlinuz" ::vmlinuz
mcopy -i "$work/disk.img" "$work/initrd" ::initrd
mcopy -i "$work/disk.img" "$work/syslinux.cfg" ::syslinux.cfg
mkdir -p "$out"
mv "$work/disk.img" "$out/disk.img.tmp"
mv "$out/disk.img.tmp" "$out/disk.img"
log "built $out/disk.img ($kib KiB, kernel $kver)"
echo "$out/disk.img"

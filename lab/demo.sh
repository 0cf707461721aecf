#!/usr/bin/env bash
# The main job end to end on embedded defaults, on a fresh machine: installs the lab's
# packages, brings the lab up (a private sshd on 127.0.0.1 stands for the hypervisor
# host), builds virtkeep, creates the demo VM vkt-demo (a qcow2 and a raw disk) and
# looks at the host over SSH with strict host-key checking.
# The lab stays up afterwards; lab/down.sh removes everything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"
step() { printf '\n== %s\n' "$*" >&2; }

step "install dependencies"
lab/install-deps.sh

step "bring the lab up"
lab/up.sh
# KEY=VALUE lines without spaces or quotes: safe to read this way
while IFS='=' read -r key value; do
  [[ $key == VK_* ]] && printf -v "$key" '%s' "$value"
done </tmp/virtkeep-lab/env

step "build virtkeep"
cargo build --release -p virtkeep
VIRTKEEP=$PWD/target/release/virtkeep
[[ -x $VIRTKEEP ]] || { echo "virtkeep binary missing at $VIRTKEEP" >&2; exit 1; }

step "create the demo VM vkt-demo"
DEMO_VM=vkt-demo
DEMO_QCOW2=$VK_POOL_DIR/vkt-demo-vda.qcow2
DEMO_RAW=$VK_POOL_DIR/vkt-demo-vdb.raw
virsh -c "$VK_LIBVIRT_URI" destroy --domain "$DEMO_VM" >/dev/null 2>&1 || true
virsh -c "$VK_LIBVIRT_URI" undefine --domain "$DEMO_VM" --snapshots-metadata --checkpoints-metadata >/dev/null 2>&1 || true
rm -f "$DEMO_QCOW2"* "$DEMO_RAW"*
qemu-img create -q -f qcow2 -o compat=1.1 "$DEMO_QCOW2" 64M
truncate -s 32M "$DEMO_RAW"
chown "$VK_QEMU_USER:$VK_QEMU_GROUP" "$DEMO_QCOW2" "$DEMO_RAW"
xml=$(mktemp /tmp/vkt-demo-XXXXXX.xml)
cat >"$xml" <<XML
<domain type='qemu'>
  <name>$DEMO_VM</name>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$DEMO_QCOW2'/>
      <target dev='vda' bus='virtio'/>
      <alias name='ua-vda'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$DEMO_RAW'/>
      <target dev='vdb' bus='virtio'/>
      <alias name='ua-vdb'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
virsh -c "$VK_LIBVIRT_URI" define --file "$xml" >/dev/null
rm -f "$xml"
virsh -c "$VK_LIBVIRT_URI" start --domain "$DEMO_VM" >/dev/null
# some recognisable data in the guest's disks
virsh -c "$VK_LIBVIRT_URI" qemu-monitor-command --domain "$DEMO_VM" --hmp \
  'qemu-io -d /machine/peripheral/ua-vda/virtio-backend "write -P 0xab 0 4M"' >/dev/null
virsh -c "$VK_LIBVIRT_URI" qemu-monitor-command --domain "$DEMO_VM" --hmp \
  'qemu-io -d /machine/peripheral/ua-vdb/virtio-backend "write -P 0xcd 1M 2M"' >/dev/null
# Flush, so that reading the image files from outside QEMU sees what the guest wrote.
for dev in ua-vda ua-vdb; do
  virsh -c "$VK_LIBVIRT_URI" qemu-monitor-command --domain "$DEMO_VM" --hmp \
    "qemu-io -d /machine/peripheral/$dev/virtio-backend flush" >/dev/null
done

# Guest-visible content of a disk image, as a hash (also while the VM runs).
disk_sum() { # FILE FORMAT
  local tmp
  tmp=$(mktemp /var/tmp/vkt-demo-sum-XXXXXX)
  qemu-img convert -U -f "$2" -O raw "$1" "$tmp"
  sha256sum "$tmp" | cut -d' ' -f1
  rm -f "$tmp"
}

# ---------------------------------------------------------------- main job
# virtkeep on its embedded defaults: the repository lives in the node user's XDG data dir,
# the config file in a demo directory (root's default, /etc/virtkeep/config.toml, is left
# alone), the new repository's key file beside it.
DEMO_DIR=/var/tmp/virtkeep-demo
rm -rf "$DEMO_DIR"
export VIRTKEEP_CONFIG=$DEMO_DIR/config/virtkeep/config.toml XDG_DATA_HOME=$DEMO_DIR/data
vk() { "$VIRTKEEP" "$@"; }

step "main job: add the hypervisor host (root@$VK_SSH_HOST:$VK_SSH_PORT, key auth)"
vk host add lab --ssh "$VK_SSH_USER@$VK_SSH_HOST:$VK_SSH_PORT" --identity "$VK_SSH_KEY" \
  --ceph-conf "$VK_CEPH_CONF" --ceph-id "$VK_CEPH_ID" --ceph-keyring "$VK_CEPH_KEYRING"

step "main job: pin the host key (the fingerprint an admin reads on the host's console)"
fingerprint=$(ssh-keygen -lf "$VK_SSH_HOSTKEY_ED25519_PUB" | cut -d' ' -f2)
vk host trust lab --fingerprint "$fingerprint"

step "main job: preflight"
vk host check lab

step "main job: create the repository (embedded default location, encrypted with a new key file)"
vk repo init

step "main job: the VMs on the host"
vk vm list lab

sums_before=("$(disk_sum "$DEMO_QCOW2" qcow2)" "$(disk_sum "$DEMO_RAW" raw)")
step "main job: back up the running VM over SSH"
vk backup lab/vkt-demo
# The guest keeps writing after the snapshot instant; the restore must not show it.
virsh -c "$VK_LIBVIRT_URI" qemu-monitor-command --domain "$DEMO_VM" --hmp \
  'qemu-io -d /machine/peripheral/ua-vda/virtio-backend "write -P 0xee 0 1M"' >/dev/null
vk snapshots
id=$(vk --json snapshots | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')

step "main job: restore backup $id as vkt-demo-restored and start it"
virsh -c "$VK_LIBVIRT_URI" destroy --domain vkt-demo-restored >/dev/null 2>&1 || true
virsh -c "$VK_LIBVIRT_URI" undefine --domain vkt-demo-restored >/dev/null 2>&1 || true
rm -f "$VK_POOL_DIR"/vkt-demo-restored-*
vk restore "$id" --to lab --name vkt-demo-restored --start

step "main job: verify"
vk verify --all --read-data
sums_after=("$(disk_sum "$VK_POOL_DIR/vkt-demo-restored-vda.qcow2" qcow2)" "$(disk_sum "$VK_POOL_DIR/vkt-demo-restored-vdb.img" raw)")
for i in 0 1; do
  if [[ ${sums_before[$i]} != "${sums_after[$i]}" ]]; then
    echo "FAILED: restored disk $i differs from the snapshot instant" >&2
    exit 1
  fi
done
virsh -c "$VK_LIBVIRT_URI" domstate --domain vkt-demo-restored
echo "OK: both restored disks equal the source at the snapshot instant; vkt-demo-restored runs" >&2
echo "(the lab stays up; lab/down.sh removes everything, $DEMO_DIR holds the demo's config and repository)" >&2

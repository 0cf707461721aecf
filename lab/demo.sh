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

SSH=(ssh -F /dev/null -p "$VK_SSH_PORT" -i "$VK_SSH_KEY" -o IdentitiesOnly=yes
  -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$VK_SSH_KNOWN_HOSTS"
  -o GlobalKnownHostsFile=/dev/null -o BatchMode=yes "$VK_SSH_USER@$VK_SSH_HOST")

# ---------------------------------------------------------------- main job
# The node looks at the hypervisor host over SSH (strict host keys, the lab key).
# (The backup/restore issue replaces this section with: virtkeep host add/trust,
#  repo init, backup lab/vkt-demo, restore --name ..., compare checksums.)
step "main job: virsh list --all on $VK_SSH_USER@$VK_SSH_HOST:$VK_SSH_PORT over SSH"
"${SSH[@]}" "virsh -c $VK_LIBVIRT_URI list --all"
"${SSH[@]}" "virsh -c $VK_LIBVIRT_URI domblklist --domain $DEMO_VM"
echo "virtkeep binary: $VIRTKEEP" >&2
echo "done; the lab stays up (lab/down.sh removes it)" >&2

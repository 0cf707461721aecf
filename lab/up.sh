#!/usr/bin/env bash
# Brings up the virtkeep test lab and writes /tmp/virtkeep-lab/env:
#   - a private sshd on 127.0.0.1 (own ed25519 + RSA host keys, key login for root,
#     password login + NOPASSWD sudo for the user vkpass, sudo for three binaries
#     only for vkallow)
#   - virtlogd + libvirtd (started here when not running), directory pool vkt-pool
#   - single-node Ceph (1 mon, 1 memstore OSD, pool rbd, radosgw + S3 user + bucket)
#   - a libvirt ceph secret holding the client.admin key
# Idempotent and safe to call concurrently (flock). When the lab is already healthy it
# only sweeps what dead test processes left behind.
set -euo pipefail
LOG_TAG=up
# shellcheck source=lab/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) -eq 0 ]] || die "lab/up.sh must run as root (it starts libvirtd, sshd and Ceph)"
for tool in virsh libvirtd virtlogd qemu-img qemu-io qemu-system-x86_64 /usr/sbin/sshd ssh-keygen \
  ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd radosgw radosgw-admin python3 flock uuidgen; do
  command -v "$tool" >/dev/null || die "'$tool' is missing: run lab/install-deps.sh first"
done

mkdir -p "$(dirname "$LOCK_FILE")"
take_lock

# ---------------------------------------------------------------- libvirt
# libvirt re-probes QEMU's capabilities (seconds, several times per `virsh define`) when
# /dev/kvm exists but its qemu user cannot open it ("KVM was enabled when probing, but it
# is not available now"). Give the kvm group access as udev would on a normal host; lab
# domains are <domain type='qemu'> (TCG) anyway. down.sh restores the old mode.
fix_kvm_access() {
  [[ -c /dev/kvm ]] || return 0
  getent group kvm >/dev/null || return 0
  local cur
  cur=$(stat -c '%a %U %G' /dev/kvm)
  if [[ $cur != "660 root kvm" ]]; then
    mkdir -p "$STATE_DIR"
    grep -q '^kvm-mode ' "$STARTED_FILE" 2>/dev/null || echo "kvm-mode $cur" >>"$STARTED_FILE"
    if ! { chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; }; then
      log "WARNING: could not open /dev/kvm to group kvm"
    fi
  fi
}

ensure_libvirt() {
  fix_kvm_access
  if ! libvirt_up; then
    mkdir -p "$STATE_DIR"
    if ! proc_running virtlogd; then
      rm -f /run/virtlogd.pid
      virtlogd -d </dev/null >/dev/null 2>&1 9>&- || die "virtlogd -d failed"
      local i
      for ((i = 0; i < 50; i++)); do [[ -s /run/virtlogd.pid ]] && break; sleep 0.1; done
      echo "virtlogd $(cat /run/virtlogd.pid 2>/dev/null)" >>"$STARTED_FILE"
      log "virtlogd started"
    fi
    if ! proc_running libvirtd; then
      rm -f /run/libvirtd.pid
      libvirtd -d </dev/null >/dev/null 2>&1 9>&- || die "libvirtd -d failed"
      local i
      for ((i = 0; i < 50; i++)); do [[ -s /run/libvirtd.pid ]] && break; sleep 0.1; done
      echo "libvirtd $(cat /run/libvirtd.pid 2>/dev/null)" >>"$STARTED_FILE"
      log "libvirtd started"
    fi
    local end=$((SECONDS + 30))
    until libvirt_up; do
      ((SECONDS < end)) || die "libvirtd does not answer 'virsh -c $URI version' after 30 s (see /var/log/libvirt/)"
      sleep 0.2
    done
    log "libvirtd answers"
  fi
}
ensure_pool() {
  mkdir -p "$IMAGES_DIR"
  chmod 0755 "$STATE_DIR" "$IMAGES_DIR"
  if ! virsh_q pool-info "$POOL_NAME" >/dev/null 2>&1; then
    virsh_q pool-define-as "$POOL_NAME" dir --target "$IMAGES_DIR" >/dev/null ||
      die "cannot define storage pool $POOL_NAME"
  fi
  if ! [[ $(virsh_q pool-info "$POOL_NAME" 2>/dev/null) =~ State:[[:space:]]+running ]]; then
    virsh_q pool-start "$POOL_NAME" >/dev/null || die "cannot start storage pool $POOL_NAME"
  fi
}

# What libvirt's QEMU runs as: qemu.conf's user/group, else the build default that
# Debian documents in the commented-out lines.
qemu_identity() {
  local conf=/etc/libvirt/qemu.conf user group
  user=$(sed -n 's/^user[[:space:]]*=[[:space:]]*"\(.*\)".*/\1/p' "$conf" | tail -n1)
  group=$(sed -n 's/^group[[:space:]]*=[[:space:]]*"\(.*\)".*/\1/p' "$conf" | tail -n1)
  [[ -n $user ]] || user=$(sed -n 's/^#user[[:space:]]*=[[:space:]]*"\(.*\)".*/\1/p' "$conf" | tail -n1)
  [[ -n $group ]] || group=$(sed -n 's/^#group[[:space:]]*=[[:space:]]*"\(.*\)".*/\1/p' "$conf" | tail -n1)
  [[ -n $user ]] || user=libvirt-qemu
  [[ -n $group ]] || group=libvirt-qemu
  [[ $user == +0 ]] && user=root
  [[ $group == +0 ]] && group=root
  getent passwd "$user" >/dev/null || die "libvirt's qemu user '$user' does not exist"
  getent group "$group" >/dev/null || die "libvirt's qemu group '$group' does not exist"
  QEMU_USER=$user
  QEMU_GROUP=$group
}

env_get() { sed -n "s/^$1=//p" "$ENV_FILE" 2>/dev/null | head -n1; }

lab_healthy() {
  [[ -s $ENV_FILE ]] || return 1
  pid_alive "$SSH_DIR/sshd.pid" "$SSH_DIR/sshd_config" || return 1
  ceph_answers || return 1
  local uuid
  uuid=$(env_get VK_CEPH_SECRET_UUID)
  [[ -n $uuid ]] && virsh_q secret-dumpxml "$uuid" >/dev/null 2>&1 || return 1
}

ensure_libvirt
if lab_healthy; then
  sweep dead "$(env_get VK_CEPH_SECRET_UUID)"
  ensure_pool
  log "lab already up (env: $ENV_FILE)"
  exit 0
fi

# ---------------------------------------------------------------- fresh start
log "starting the lab from scratch"
stop_lab_daemons
sweep all
rm -rf "$LAB_DIR"
ensure_pool
mkdir -p "$LAB_DIR" "$SSH_DIR" "$CEPH_DIR"
chmod 0755 "$LAB_DIR"
qemu_identity

# ---------------------------------------------------------------- sshd
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ssh-keygen -q -t ed25519 -N '' -C vkt-lab-hostkey -f "$SSH_DIR/ssh_host_ed25519_key"
ssh-keygen -q -t rsa -b 3072 -N '' -C vkt-lab-hostkey -f "$SSH_DIR/ssh_host_rsa_key"
ssh-keygen -q -t ed25519 -N '' -C vkt-lab-user -f "$SSH_DIR/id_ed25519"
cp "$SSH_DIR/id_ed25519.pub" "$SSH_DIR/authorized_keys"
chmod 0644 "$SSH_DIR/authorized_keys"
chmod 0755 "$SSH_DIR"

if ! id "$PASSWORD_USER" >/dev/null 2>&1; then
  useradd -m -s /bin/bash -c "virtkeep lab password user" "$PASSWORD_USER"
fi
PASSWORD=$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)
if ! id "$ALLOWLIST_USER" >/dev/null 2>&1; then
  useradd -m -s /bin/bash -c "virtkeep lab sudo allowlist user" "$ALLOWLIST_USER"
fi
for u in "$PASSWORD_USER" "$ALLOWLIST_USER"; do
  echo "$u:$PASSWORD" | chpasswd
  usermod -U "$u" 2>/dev/null || true
done
{
  printf '%s ALL=(ALL) NOPASSWD: ALL\n' "$PASSWORD_USER"
  printf '%s ALL=(root) NOPASSWD: /usr/bin/virsh, /usr/bin/qemu-img, /usr/bin/qemu-nbd\n' "$ALLOWLIST_USER"
} >"$SUDOERS_FILE.tmp"
chmod 0440 "$SUDOERS_FILE.tmp"
visudo -cqf "$SUDOERS_FILE.tmp" || die "generated sudoers file is invalid"
mv "$SUDOERS_FILE.tmp" "$SUDOERS_FILE"
printf '%s\n' "$PASSWORD" >"$SSH_DIR/password"
chmod 0600 "$SSH_DIR/password"

# The lab host is this machine, and root's ~/.bashrc here is the machine owner's, not a
# KVM host's: bash sources it for every command sshd runs (seen in CI: `pyenv init`,
# 0.19 s of CPU per SSH command, and a "cannot rehash" line on the command's stderr when
# two of them raced). With SHLVL=1 in the session's environment bash counts itself as a
# nested shell and skips ~/.bashrc, so the lab's commands run in sshd's plain environment.
mkdir -p /run/sshd
chmod 0755 /run/sshd
SSH_PORT=
for attempt in 1 2 3 4 5 6 7 8; do
  port=$((20000 + RANDOM % 30000))
  port_busy "$port" && continue
  cat >"$SSH_DIR/sshd_config" <<EOF
# virtkeep lab sshd (generated by lab/up.sh)
ListenAddress 127.0.0.1:$port
HostKey $SSH_DIR/ssh_host_ed25519_key
HostKey $SSH_DIR/ssh_host_rsa_key
PidFile $SSH_DIR/sshd.pid
AuthorizedKeysFile $SSH_DIR/authorized_keys
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxSessions 64
MaxStartups 64
MaxAuthTries 10
LoginGraceTime 30
AllowStreamLocalForwarding yes
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
SetEnv SHLVL=1
Subsystem sftp internal-sftp
LogLevel VERBOSE
EOF
  /usr/sbin/sshd -t -f "$SSH_DIR/sshd_config" || die "sshd rejects its generated config $SSH_DIR/sshd_config"
  rm -f "$SSH_DIR/sshd.pid"
  /usr/sbin/sshd -f "$SSH_DIR/sshd_config" -E "$SSH_DIR/sshd.log" </dev/null >/dev/null 2>&1 9>&- ||
    die "sshd failed to start (see $SSH_DIR/sshd.log)"
  for ((i = 0; i < 50; i++)); do
    if pid_alive "$SSH_DIR/sshd.pid" "$SSH_DIR/sshd_config" && port_busy "$port"; then
      SSH_PORT=$port
      break 2
    fi
    sleep 0.1
  done
  log "sshd did not come up on port $port (attempt $attempt), trying another port"
  stop_pid "$SSH_DIR/sshd.pid" "$SSH_DIR/sshd_config" 2
done
[[ -n $SSH_PORT ]] || die "could not start sshd on a free port (see $SSH_DIR/sshd.log)"
{
  printf '[127.0.0.1]:%s %s\n' "$SSH_PORT" "$(cut -d' ' -f1,2 "$SSH_DIR/ssh_host_ed25519_key.pub")"
  printf '[127.0.0.1]:%s %s\n' "$SSH_PORT" "$(cut -d' ' -f1,2 "$SSH_DIR/ssh_host_rsa_key.pub")"
} >"$SSH_DIR/known_hosts"
log "sshd listening on 127.0.0.1:$SSH_PORT"

# ---------------------------------------------------------------- ceph
# 1 mon + 1 memstore OSD + radosgw, everything under $CEPH_DIR (about 5 s).
c() { timeout 30 ceph -c "$CEPH_CONF" --connect-timeout 10 "$@"; }
for port in 3300 6789 7480; do
  port_busy "$port" && die "127.0.0.1:$port is in use by something else; the lab's Ceph needs it (ss -ltnp)"
done
mkdir -p "$CEPH_DIR"/{run,log,crash,mon/mon.a,osd/osd.0,rgw}
FSID=$(uuidgen)
KEYRING=$CEPH_DIR/keyring
ADMIN_KEYRING=$CEPH_DIR/ceph.client.admin.keyring
cat >"$CEPH_CONF" <<EOF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
ms bind port min = 6800
ms bind port max = 7300
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $ADMIN_KEYRING
run dir = $CEPH_DIR/run
crash dir = $CEPH_DIR/crash
pid file = $CEPH_DIR/run/\$name.pid
admin socket = $CEPH_DIR/run/\$name.asok
log file = $CEPH_DIR/log/\$name.log
mon cluster log file = $CEPH_DIR/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
auth allow insecure global id reclaim = false
mon data avail warn = 2
mon data avail crit = 1
mon max pg per osd = 1000
paxos propose interval = 0.05

[client]
admin socket =
log file =

[mon]
mon data = $CEPH_DIR/mon/\$name
mon initial members = a
keyring = $KEYRING

[osd]
osd data = $CEPH_DIR/osd/\$name
osd objectstore = memstore
memstore device bytes = 2147483648
osd fast shutdown = false
osd crush update on start = true
keyring = $KEYRING

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:7480
rgw thread pool size = 32
rgw data = $CEPH_DIR/rgw
log file = $CEPH_DIR/log/\$name.log
admin socket = $CEPH_DIR/run/\$name.asok
keyring = $KEYRING
EOF
ceph-authtool -C "$KEYRING" >/dev/null -n mon. --gen-key --cap mon 'allow *'
ceph-authtool "$KEYRING" -n client.admin --gen-key \
  --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *'
ceph-authtool "$KEYRING" -n osd.0 --gen-key \
  --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
ceph-authtool "$KEYRING" -n client.rgw.a --gen-key \
  --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw'
chmod 0600 "$KEYRING"
ADMIN_KEY=$(ceph-authtool "$KEYRING" -n client.admin -p)
printf '[client.admin]\n\tkey = %s\n' "$ADMIN_KEY" >"$ADMIN_KEYRING"
chmod 0600 "$ADMIN_KEYRING"

monmaptool --create --clobber --fsid "$FSID" --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' "$CEPH_DIR/run/monmap" >/dev/null
ceph-mon -c "$CEPH_CONF" -i a --mkfs --monmap "$CEPH_DIR/run/monmap" --keyring "$KEYRING" >"$CEPH_DIR/log/mon-mkfs.log" 2>&1 ||
  die "ceph-mon --mkfs failed: $(cat "$CEPH_DIR/log/mon-mkfs.log")"
ceph-mon -c "$CEPH_CONF" -i a </dev/null >>"$CEPH_DIR/log/mon.stderr" 2>&1 9>&- || die "ceph-mon failed to start (see $CEPH_DIR/log/)"
wait_until() { # wait_until SECONDS WHAT CMD...
  local limit=$1 what=$2
  shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "timed out after ${limit}s waiting for $what (logs: $CEPH_DIR/log/)"
    sleep 0.1
  done
}
wait_until 30 "ceph mon" c mon stat
log "ceph mon up"

OSD_UUID=$(uuidgen)
osd_id=$(c osd new "$OSD_UUID" 0) || die "ceph osd new failed"
[[ $osd_id == 0 ]] || die "ceph osd new returned '$osd_id', expected 0"
ceph-osd -c "$CEPH_CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$CEPH_DIR/log/osd-mkfs.log" 2>&1 ||
  die "ceph-osd --mkfs failed: $(tail -n 20 "$CEPH_DIR/log/osd-mkfs.log")"
ceph-osd -c "$CEPH_CONF" -i 0 </dev/null >>"$CEPH_DIR/log/osd.stderr" 2>&1 9>&- || die "ceph-osd failed to start (see $CEPH_DIR/log/)"
osd_up() { c osd dump --format json | grep -q '"up":1'; }
wait_until 30 "osd.0 up" osd_up
log "ceph osd up"

c osd pool create rbd 8 8 >/dev/null 2>"$CEPH_DIR/log/pool-create.err" ||
  die "ceph osd pool create rbd failed: $(cat "$CEPH_DIR/log/pool-create.err")"
timeout 60 rbd -c "$CEPH_CONF" pool init rbd || die "rbd pool init failed"
c health mute MGR_DOWN --sticky >/dev/null 2>&1 || true
log "ceph pool rbd ready"

radosgw -c "$CEPH_CONF" -n client.rgw.a </dev/null >>"$CEPH_DIR/log/rgw.stderr" 2>&1 9>&- || die "radosgw failed to start (see $CEPH_DIR/log/)"

# ---------------------------------------------------------------- libvirt ceph secret
SECRET_UUID=$(uuidgen)
cat >"$LAB_DIR/secret.xml" <<EOF
<secret ephemeral='no' private='no'>
  <uuid>$SECRET_UUID</uuid>
  <description>$SECRET_DESC_PREFIX ceph client.admin key (lab/up.sh)</description>
  <usage type='ceph'>
    <name>$SECRET_USAGE</name>
  </usage>
</secret>
EOF
virsh_q secret-define "$LAB_DIR/secret.xml" >/dev/null || die "virsh secret-define failed"
printf '%s' "$ADMIN_KEY" >"$LAB_DIR/secret.value"
chmod 0600 "$LAB_DIR/secret.value"
virsh_q secret-set-value "$SECRET_UUID" --file "$LAB_DIR/secret.value" >/dev/null || die "virsh secret-set-value failed"
rm -f "$LAB_DIR/secret.value"
log "libvirt secret $SECRET_UUID holds client.admin's key"

# ---------------------------------------------------------------- radosgw, S3 user, bucket
rgw_up() { (exec 3<>/dev/tcp/127.0.0.1/7480) 2>/dev/null; }
wait_until 60 "radosgw on 127.0.0.1:7480" rgw_up
S3_ACCESS_KEY=VKT$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Z0-9' | head -c 17)
S3_SECRET_KEY=$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)
S3_REGION=default
S3_BUCKET=vkt-lab-bucket
timeout 60 radosgw-admin -c "$CEPH_CONF" user create --uid=vkt-lab --display-name="virtkeep lab" \
  --access-key="$S3_ACCESS_KEY" --secret-key="$S3_SECRET_KEY" >"$CEPH_DIR/s3-user.json" 2>"$CEPH_DIR/log/s3-user.err" ||
  die "radosgw-admin user create failed: $(cat "$CEPH_DIR/log/s3-user.err")"
S3_ENDPOINT=http://127.0.0.1:7480 S3_ACCESS_KEY=$S3_ACCESS_KEY S3_SECRET_KEY=$S3_SECRET_KEY \
  S3_REGION=$S3_REGION S3_BUCKET=$S3_BUCKET timeout 60 python3 - <<'EOF' || die "creating the S3 bucket on radosgw failed"
import os, time, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"],
                  aws_access_key_id=os.environ["S3_ACCESS_KEY"],
                  aws_secret_access_key=os.environ["S3_SECRET_KEY"],
                  region_name=os.environ["S3_REGION"],
                  config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 10}))
for attempt in range(50):
    try:
        s3.create_bucket(Bucket=os.environ["S3_BUCKET"])
        break
    except Exception as e:  # radosgw may still be starting up
        if attempt == 49:
            raise
        time.sleep(0.2)
EOF
log "radosgw serving, bucket $S3_BUCKET"

# ---------------------------------------------------------------- env
cat >"$ENV_FILE.tmp" <<EOF
VK_LAB_DIR=$LAB_DIR
VK_SSH_HOST=127.0.0.1
VK_SSH_PORT=$SSH_PORT
VK_SSH_USER=root
VK_SSH_KEY=$SSH_DIR/id_ed25519
VK_SSH_KNOWN_HOSTS=$SSH_DIR/known_hosts
VK_SSH_HOSTKEY_ED25519_PUB=$SSH_DIR/ssh_host_ed25519_key.pub
VK_SSH_HOSTKEY_RSA_PUB=$SSH_DIR/ssh_host_rsa_key.pub
VK_SSH_PASSWORD_USER=$PASSWORD_USER
VK_SSH_PASSWORD=$PASSWORD
VK_LIBVIRT_URI=$URI
VK_POOL_NAME=$POOL_NAME
VK_POOL_DIR=$IMAGES_DIR
VK_QEMU_USER=$QEMU_USER
VK_QEMU_GROUP=$QEMU_GROUP
VK_CEPH_CONF=$CEPH_CONF
VK_CEPH_KEYRING=$ADMIN_KEYRING
VK_CEPH_ID=admin
VK_CEPH_POOL=rbd
VK_CEPH_MON=127.0.0.1:6789
VK_CEPH_SECRET_UUID=$SECRET_UUID
VK_S3_ENDPOINT=http://127.0.0.1:7480
VK_S3_ACCESS_KEY=$S3_ACCESS_KEY
VK_S3_SECRET_KEY=$S3_SECRET_KEY
VK_S3_REGION=$S3_REGION
VK_S3_BUCKET=$S3_BUCKET
EOF
chmod 0600 "$ENV_FILE.tmp"
mv "$ENV_FILE.tmp" "$ENV_FILE"
log "lab up: $ENV_FILE"

#!/usr/bin/env bash
# Tears the virtkeep test lab down: every vkt- domain, secret, pool, image and RBD image,
# the private sshd, radosgw, the OSD and the mon, and all lab state
# (/tmp/virtkeep-lab, /var/lib/virtkeep-lab). libvirtd/virtlogd are stopped only when
# lab/up.sh started them.
set -euo pipefail
LOG_TAG=down
# shellcheck source=lab/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) -eq 0 ]] || die "lab/down.sh must run as root"
take_lock

# Libvirt objects first (while Ceph still answers for RBD images). If libvirtd is not
# running but its config still holds lab objects, start it for the sweep.
started_for_sweep=0
if command -v virsh >/dev/null && ! libvirt_up; then
  if grep -qls -e "$POOL_NAME" -e "$SECRET_USAGE" -e '<name>vkt-' -e "$IMAGES_DIR" \
    /etc/libvirt/qemu/*.xml /etc/libvirt/storage/*.xml /etc/libvirt/secrets/*.xml 2>/dev/null; then
    log "libvirtd is not running but holds lab objects: starting it for the sweep"
    proc_running virtlogd || virtlogd -d </dev/null >/dev/null 2>&1 9>&-
    libvirtd -d </dev/null >/dev/null 2>&1 9>&-
    for ((i = 0; i < 150; i++)); do libvirt_up && break; sleep 0.2; done
    started_for_sweep=1
  fi
fi
sweep all

stop_lab_daemons
log "lab daemons stopped"

# libvirtd / virtlogd: only what up.sh started (recorded in $STARTED_FILE)
stop_started() { # NAME PID
  local name=$1 pid=$2 i
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  pid_cmdline_has "$pid" "$name" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    pid_cmdline_has "$pid" "$name" || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}
if [[ -s $STARTED_FILE ]]; then
  while read -r name pid; do
    [[ $name == libvirtd ]] && stop_started libvirtd "$pid" && log "libvirtd stopped"
  done <"$STARTED_FILE"
  while read -r name pid; do
    [[ $name == virtlogd ]] && stop_started virtlogd "$pid" && log "virtlogd stopped"
  done <"$STARTED_FILE"
elif ((started_for_sweep)); then
  pkill_pidfile() { [[ -s $1 ]] && stop_started "$2" "$(<"$1")"; }
  pkill_pidfile /run/libvirtd.pid libvirtd || true
fi

# /dev/kvm back to the mode it had before up.sh (recorded as "kvm-mode MODE USER GROUP")
if [[ -s $STARTED_FILE ]] && [[ -c /dev/kvm ]]; then
  read -r _ mode owner group < <(grep '^kvm-mode ' "$STARTED_FILE" | head -n1) || true
  if [[ -n ${mode:-} ]]; then
    if ! { chown "$owner:$group" /dev/kvm && chmod "$mode" /dev/kvm; }; then
      log "WARNING: could not restore /dev/kvm mode"
    fi
  fi
fi

# the password user keeps its account, but loses its password and sudo rights
rm -f "$SUDOERS_FILE"
for u in "$PASSWORD_USER" "$ALLOWLIST_USER"; do
  if id "$u" >/dev/null 2>&1; then
    usermod -L "$u" 2>/dev/null || true
  fi
done

rm -rf "$LAB_DIR" "$STATE_DIR"
log "lab down"

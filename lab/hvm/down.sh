#!/usr/bin/env bash
# Stops the LVM test hypervisor started by lab/hvm/up.sh and removes its per-boot state
# (/var/tmp/virtkeep-lab-hvm: overlay, PV disk, keys; /tmp/virtkeep-lab/hvm: env, pid). Only qemu processes of ours are
# touched (recognised by their command line), also when the pid file is gone.
# The cached image stays (it is a build cache); --purge removes it too.
# Idempotent; takes the same lock as up.sh (--locked: the caller holds it).
set -uo pipefail
LOG_TAG=down
# shellcheck source=lab/hvm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) -eq 0 ]] || hdie "lab/hvm/down.sh must run as root"
LOCKED=0 PURGE=0
for a in "$@"; do
  case $a in
    --locked) LOCKED=1 ;;
    --purge) PURGE=1 ;;
    *) hdie "usage: $0 [--purge]" ;;
  esac
done
if ((!LOCKED)); then
  exec 9>>"$HVM_LOCK_FILE"
  flock -w 900 9 || hdie "could not lock $HVM_LOCK_FILE within 900 s"
fi

env_get() { sed -n "s/^$1=//p" "$HVM_STATE_ENV" 2>/dev/null | head -n1; }

# graceful first: sync and power off from inside (PID 1 is a shell script)
port=$(env_get VK_HVM_PORT) key=$(env_get VK_HVM_KEY) kh=$(env_get VK_HVM_KNOWN_HOSTS)
pids=$(hvm_all_pids)
if [[ -n $pids && -n $port && -r $key ]]; then
  mapfile -t opts < <(hvm_ssh_opts "$port" "$key" "$kh")
  timeout -k 2 10 ssh "${opts[@]}" root@127.0.0.1 'sync; kill -USR2 1' </dev/null >/dev/null 2>&1 9>&- || true
  for _ in $(seq 40); do
    [[ -z $(hvm_all_pids) ]] && break
    sleep 0.25
  done
fi
for pid in $(hvm_all_pids); do
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 40); do
    hvm_pid_alive "$pid" || break
    sleep 0.25
  done
  hvm_pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null
  hlog "stopped qemu pid $pid"
done
if [[ -n $pids ]]; then hlog "stopped (qemu pid ${pids//$'\n'/ })"; else hlog "not running"; fi
rm -rf "$HVM_RUN_DIR" "$HVM_STATE_DIR"
if ((PURGE)); then
  rm -rf --one-file-system "$HVM_CACHE_ROOT"
  hlog "image cache removed"
fi
exit 0

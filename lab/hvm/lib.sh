# shellcheck shell=bash
# Shared definitions of lab/hvm/{build,up,down}.sh: the LVM test hypervisor, a small
# Debian VM under TCG (this machine's kernel has no device-mapper). Sourced, never run.

HVM_CACHE_ROOT=${VK_HVM_CACHE_ROOT:-/var/cache/virtkeep-lab/hvm} # built images, keyed by build.sh's hash
# Per-boot state (overlay, PV disk, keys, known_hosts, console log, pid, env). Kept out of
# /tmp/virtkeep-lab, which lab/up.sh wipes on a fresh start: a running VM survives that.
HVM_STATE_DIR=/var/tmp/virtkeep-lab-hvm
HVM_STATE_ENV=$HVM_STATE_DIR/env
# Published copies for the tests (env, qemu.pid); up.sh rewrites them when they are gone.
HVM_RUN_DIR=/tmp/virtkeep-lab/hvm
HVM_ENV_FILE=$HVM_RUN_DIR/env
HVM_LOCK_FILE=/tmp/virtkeep-lab-hvm.lock  # outside the run dir: survives its removal
HVM_BUILD_LOCK=$HVM_CACHE_ROOT/.build.lock
HVM_VG=vg0
HVM_THINPOOL=thinpool
# every qemu of ours carries this on its command line (-name): how we recognise it
HVM_QEMU_TAG=virtkeep-hvm

_HVM_T0=${EPOCHREALTIME/[.,]/}
hlog() {
  local t=$((${EPOCHREALTIME/[.,]/} - _HVM_T0))
  printf '[hvm-%s %3d.%02ds] %s\n' "${LOG_TAG:-?}" $((t / 1000000)) $((t % 1000000 / 10000)) "$*" >&2
}
hdie() {
  hlog "ERROR: $*"
  exit 1
}

# The cache directory of the image this build.sh makes (first 16 hex digits of its sha256).
hvm_image_dir() {
  local here h
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  h=$(sha256sum "$here/build.sh" | cut -c1-16)
  printf '%s/%s\n' "$HVM_CACHE_ROOT" "$h"
}

# hvm_pid_alive PID: PID is a live qemu of ours (PID 1 here reaps zombies lazily, so
# kill -0 is not enough: a zombie has an empty cmdline).
hvm_pid_alive() {
  local pid=${1//[^0-9]/} cmd
  [[ -n $pid ]] || return 1
  cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  [[ $cmd == *qemu-system* && $cmd == *"$HVM_QEMU_TAG"* ]]
}

# PIDs of every qemu of ours (also those whose pid file was removed with the run dir).
hvm_all_pids() {
  local d pid
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    hvm_pid_alive "$pid" && echo "$pid"
  done
  return 0
}

# hvm_ssh_opts PORT KEY KNOWN_HOSTS: OpenSSH options, strict host keys, no prompts.
hvm_ssh_opts() {
  printf '%s\n' -p "$1" -i "$2" -F /dev/null -o IdentitiesOnly=yes -o IdentityAgent=none \
    -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$3" -o GlobalKnownHostsFile=/dev/null \
    -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=10 -o ServerAliveCountMax=3 \
    -o LogLevel=ERROR
}

# shellcheck shell=bash
# Shared definitions for lab/up.sh, lab/down.sh, lab/test.sh and lab/demo.sh.
# Sourced, never executed.
# shellcheck disable=SC2034 # the constants are used by the scripts that source this

LAB_DIR=/tmp/virtkeep-lab               # runtime state: env, sshd, ceph (wiped by down)
STATE_DIR=/var/lib/virtkeep-lab         # images + "which daemons did the lab start"
IMAGES_DIR=$STATE_DIR/images
LOCK_FILE=/tmp/virtkeep-lab.lock
ENV_FILE=$LAB_DIR/env
SSH_DIR=$LAB_DIR/ssh
CEPH_DIR=$LAB_DIR/ceph
CEPH_CONF=$CEPH_DIR/ceph.conf
STARTED_FILE=$STATE_DIR/started-daemons # lines "libvirtd PID" / "virtlogd PID"
URI=qemu:///system
POOL_NAME=vkt-pool
PASSWORD_USER=vkpass
# Same password as vkpass, but sudo only for named binaries (a per-command allowlist,
# which virtkeep cannot work with: `host check` must say so).
ALLOWLIST_USER=vkallow
SUDOERS_FILE=/etc/sudoers.d/virtkeep-lab
SECRET_DESC_PREFIX=vkt-lab
SECRET_USAGE=vkt-lab-client.admin

_T0=${EPOCHREALTIME/[.,]/}
log() {
  local t=$((${EPOCHREALTIME/[.,]/} - _T0))
  printf '[%s %3d.%02ds] %s\n' "${LOG_TAG:-lab}" $((t / 1000000)) $((t % 1000000 / 10000)) "$*" >&2
}
die() {
  log "ERROR: $*"
  exit 1
}

# Take the lab-wide lock on fd 9 (every daemon we spawn gets `9>&-`).
take_lock() {
  exec 9>>"$LOCK_FILE"
  flock -w 300 9 || die "could not lock $LOCK_FILE within 300 s (another lab/up.sh or lab/down.sh hangs?)"
}

# pid_alive PIDFILE NEEDLE: the pid in PIDFILE is alive and its command line contains
# NEEDLE. PID 1 here reaps zombies lazily, so kill -0 is not enough: a zombie has an
# empty /proc/PID/cmdline.
pid_alive() {
  local f=$1 needle=$2 pid
  [[ -s $f ]] || return 1
  pid=$(<"$f")
  pid=${pid//[^0-9]/}
  [[ -n $pid ]] || return 1
  pid_cmdline_has "$pid" "$needle"
}
pid_cmdline_has() {
  local pid=$1 needle=$2 cmd
  cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  [[ -n $cmd && $cmd == *"$needle"* ]]
}

# stop_pid PIDFILE NEEDLE GRACE_SECONDS: SIGTERM, wait, SIGKILL.
stop_pid() {
  local f=$1 needle=$2 grace=$3 pid i
  pid_alive "$f" "$needle" || return 0
  pid=$(<"$f")
  pid=${pid//[^0-9]/}
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    pid_cmdline_has "$pid" "$needle" || return 0
    sleep 0.1
  done
  log "pid $pid ($needle) ignored SIGTERM for ${grace}s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    pid_cmdline_has "$pid" "$needle" || return 0
    sleep 0.1
  done
}

# proc_running NAME: a live (non-zombie) process with that exact name exists. pgrep also
# lists zombies, which PID 1 here reaps lazily.
proc_running() {
  local pid
  for pid in $(pgrep -x "$1" || true); do
    pid_cmdline_has "$pid" "$1" && return 0
  done
  return 1
}

virsh_q() { timeout 60 virsh -q -c "$URI" "$@"; }

# `virsh version` takes seconds (it asks QEMU for its version); a list is instant.
libvirt_up() { timeout 10 virsh -c "$URI" list --all --name >/dev/null 2>&1; }

# owner_alive NAME: names made by virtkeep_lab::unique_name are vkt-TAG-PID-COUNTER...
# During a partial sweep (lab healthy, tests may be running) a resource is kept when
# any "-DIGITS-DIGITS" pair in its name names a live process (conservative: a name we
# cannot attribute is kept; the full sweep at a fresh start or at down removes it).
owner_alive() {
  local name=$1 rest=$1 pid found=0
  while [[ $rest =~ -([0-9]+)-([0-9]+)(.*)$ ]]; do
    found=1
    pid=${BASH_REMATCH[1]}
    rest=-${BASH_REMATCH[2]}${BASH_REMATCH[3]}
    if [[ -d /proc/$pid && $pid != 1 ]]; then return 0; fi
  done
  ((found)) || return 0
  return 1
}

# sweep MODE (all|dead): remove vkt- domains, secrets, pools, images, RBD images.
# MODE=all removes everything the lab or its tests may have made; MODE=dead only what
# belongs to processes that are gone.
sweep() {
  local mode=$1 name src keep_secret=${2:-}
  if libvirt_up; then
    local doms
    doms=$(virsh_q list --all --name 2>/dev/null || true)
    while IFS= read -r name; do
      name=${name%"${name##*[![:space:]]}"}
      name=${name#"${name%%[![:space:]]*}"}
      [[ -n $name ]] || continue
      local candidate=0 owner=$name
      if [[ $name == vkt-* ]]; then
        candidate=1
      else
        # test domains with hostile custom names are recognised by their disks
        while IFS= read -r src; do
          case $src in
            "$IMAGES_DIR"/*)
              candidate=1
              owner=${src##*/}
              ;;
            rbd/vkt-*)
              candidate=1
              owner=${src#rbd/}
              ;;
          esac
        done < <(virsh_q domblklist --domain "$name" 2>/dev/null | awk '{ $1=""; sub(/^ /, ""); print }')
      fi
      ((candidate)) || continue
      if [[ $mode == dead ]] && owner_alive "$owner"; then continue; fi
      log "sweep: domain '$name'"
      virsh_q destroy --domain "$name" >/dev/null 2>&1 || true
      virsh_q undefine --domain "$name" --snapshots-metadata --checkpoints-metadata --nvram >/dev/null 2>&1 ||
        virsh_q undefine --domain "$name" --snapshots-metadata --checkpoints-metadata >/dev/null 2>&1 ||
        virsh_q undefine --domain "$name" >/dev/null 2>&1 || log "WARNING: could not undefine domain '$name'"
    done <<<"$doms"

    # secrets: lab secrets carry a description starting with vkt-lab; test secrets a
    # usage id starting with vkt-
    local uuid desc usage
    while read -r uuid _; do
      [[ $uuid =~ ^[0-9a-f-]{36}$ ]] || continue
      [[ $uuid == "$keep_secret" ]] && continue
      desc=$(virsh_q secret-dumpxml "$uuid" 2>/dev/null | sed -n 's:.*<description>\(.*\)</description>.*:\1:p')
      usage=$(virsh_q secret-dumpxml "$uuid" 2>/dev/null | sed -n 's:.*<name>\(.*\)</name>.*:\1:p')
      if [[ $desc == vkt-* || $usage == vkt-* ]]; then
        if [[ $mode == dead ]]; then
          [[ $desc == "$SECRET_DESC_PREFIX"* ]] && continue # the lab's own secret
          owner_alive "$usage" && continue
        fi
        log "sweep: secret $uuid ($desc)"
        virsh_q secret-undefine "$uuid" >/dev/null 2>&1 || true
      fi
    done < <(virsh_q secret-list 2>/dev/null || true)

    local pools
    pools=$(virsh_q pool-list --all --name 2>/dev/null || true)
    while IFS= read -r name; do
      name=${name%"${name##*[![:space:]]}"}
      name=${name#"${name%%[![:space:]]*}"}
      [[ $name == vkt-* ]] || continue
      if [[ $mode == dead ]]; then
        [[ $name == "$POOL_NAME" ]] && continue
        owner_alive "$name" && continue
      fi
      log "sweep: pool '$name'"
      virsh_q pool-destroy "$name" >/dev/null 2>&1 || true
      virsh_q pool-undefine "$name" >/dev/null 2>&1 || true
    done <<<"$pools"
  fi

  if [[ -d $IMAGES_DIR ]]; then
    local f
    for f in "$IMAGES_DIR"/* "$IMAGES_DIR"/.[!.]*; do
      [[ -e $f || -L $f ]] || continue
      if [[ $mode == dead ]]; then
        [[ ${f##*/} == vkt-* ]] || continue
        owner_alive "${f##*/}" && continue
      fi
      rm -rf -- "$f"
    done
  fi

  # RBD images, only when our cluster answers
  if [[ -s $CEPH_CONF ]] && ceph_answers; then
    local img
    while IFS= read -r img; do
      [[ $img == vkt-* ]] || continue
      if [[ $mode == dead ]] && owner_alive "$img"; then continue; fi
      log "sweep: rbd image $img"
      timeout 60 rbd -c "$CEPH_CONF" snap purge "rbd/$img" >/dev/null 2>&1 || true
      timeout 60 rbd -c "$CEPH_CONF" rm "rbd/$img" >/dev/null 2>&1 || log "WARNING: could not remove rbd image $img"
    done < <(timeout 30 rbd -c "$CEPH_CONF" ls rbd 2>/dev/null || true)
  fi
}

ceph_daemons_alive() {
  pid_alive "$CEPH_DIR/run/mon.a.pid" "$CEPH_CONF" &&
    pid_alive "$CEPH_DIR/run/osd.0.pid" "$CEPH_CONF" &&
    pid_alive "$CEPH_DIR/run/client.rgw.a.pid" "$CEPH_CONF"
}
ceph_answers() {
  ceph_daemons_alive && timeout 15 ceph -c "$CEPH_CONF" --connect-timeout 10 osd stat >/dev/null 2>&1
}

# Stop the lab's own daemons (sshd, radosgw, osd, mon) by their pid files.
stop_lab_daemons() {
  stop_pid "$SSH_DIR/sshd.pid" "$SSH_DIR/sshd_config" 3
  stop_pid "$CEPH_DIR/run/client.rgw.a.pid" "$CEPH_CONF" 3
  stop_pid "$CEPH_DIR/run/osd.0.pid" "$CEPH_CONF" 10
  stop_pid "$CEPH_DIR/run/mon.a.pid" "$CEPH_CONF" 10
}

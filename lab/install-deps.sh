#!/usr/bin/env bash
# Installs everything the virtkeep test lab needs (Debian 12). Idempotent: on a warm
# machine it only checks with dpkg and returns in well under a second.
set -euo pipefail

PKGS=(
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
  qemu-system-x86 qemu-system-common qemu-utils qemu-block-extra
  openssh-server openssh-client sshpass
  ceph-mon ceph-osd ceph-common radosgw
  netcat-openbsd python3-boto3 sudo procps util-linux passwd coreutils
  curl ca-certificates shellcheck
  mmdebstrap eatmydata e2fsprogs
  gdisk parted xfsprogs dosfstools mtools ntfs-3g libnbd-bin  # file-level restore fixtures (e2e/files*.rs)
  iptables iproute2  # link-cut fault tests (e2e/failures.rs: iptables DROP, ss -K)
  ovmf  # UEFI test domains (e2e/uefi.rs)
  chromium chromium-driver  # real-browser tests of the daemon's web console (e2e/web.rs)
  postgresql  # the shared catalog of a daemon cluster (lab/postgres.sh, e2e/cluster.rs)
  syslinux syslinux-common busybox-static qemu-guest-agent cpio  # the guest-agent test guest (lab/agent-guest.sh)
)

log() { printf '[install-deps] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root (it installs Debian packages and creates a lab user)"
  exit 1
fi

# qemu-utils must match the emulator's version: the image may ship a newer backport of
# qemu-utils whose Breaks: forbids Debian 12's qemu-system-common. Then we pin
# qemu-utils (and qemu-block-extra) to the qemu-system-x86 candidate, allowing a downgrade.
qemu_consistent() {
  local sys utils
  sys=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
  utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  [[ -n $sys && $sys == "$utils" ]]
}

missing=()
for p in "${PKGS[@]}"; do
  if ! [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]]; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} > 0)) || ! qemu_consistent; then
  log "installing: ${missing[*]:-(qemu version alignment)}"
  export DEBIAN_FRONTEND=noninteractive
  apt_opts=(-y --no-install-recommends -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  qemu_ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  if [[ -z $qemu_ver || $qemu_ver == "(none)" ]]; then
    log "no installable qemu-system-x86 in the apt sources; check /etc/apt/sources.list*"
    exit 1
  fi
  install=()
  for p in "${PKGS[@]}"; do
    case $p in
      qemu-utils | qemu-block-extra | qemu-system-x86 | qemu-system-common) install+=("$p=$qemu_ver") ;;
      *) install+=("$p") ;;
    esac
  done
  apt-get install "${apt_opts[@]}" --allow-downgrades "${install[@]}"
else
  log "all Debian packages present"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
log "done"

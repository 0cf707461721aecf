#!/usr/bin/env bash
# SSH streaming benchmark: russh (virtkeep-ssh) vs the OpenSSH client, same run.
#
# Creates a 2 GiB random file on the lab host (127.0.0.1, so a local file), then streams
# it with `cat` over one russh connection and over N=2,4 connections (byte ranges via
# dd), and with `ssh -c aes128-gcm@openssh.com ... cat FILE >/dev/null`. Each case runs
# RUNS times (default 3); the median wall time is reported, with the ratio
# russh/OpenSSH (>1 = russh faster). Page cache is warmed first so disk is not measured.
#
# Env: VK_BENCH_FILE (default /var/tmp/virtkeep-bench-2g.bin), VK_BENCH_SIZE (bytes),
#      RUNS, STREAMS (default "2 4"), VK_BENCH_NO_BUILD.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
env_file=/tmp/virtkeep-lab/env
if [[ ! -f $env_file ]]; then
    bash "$root/lab/up.sh"
fi
# shellcheck disable=SC1090
source "$env_file"

file=${VK_BENCH_FILE:-/var/tmp/virtkeep-bench-2g.bin}
size=${VK_BENCH_SIZE:-$((2 * 1024 * 1024 * 1024))}
runs=${RUNS:-3}
streams=${STREAMS:-"2 4"}

if [[ ! -f $file || $(stat -c %s "$file") -ne $size ]]; then
    echo "creating $file ($size bytes of random data)" >&2
    head -c "$size" /dev/urandom > "$file.tmp"
    mv "$file.tmp" "$file"
fi
cat "$file" > /dev/null # warm the page cache

# VK_BENCH_NO_BUILD=1 reuses an existing release binary (the shared target dir may be
# locked by other builds).
if [[ -z ${VK_BENCH_NO_BUILD:-} ]]; then
    (cd "$root" && cargo build --release -q -p virtkeep-ssh --example ssh_cat)
fi
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/ssh_cat"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }

openssh_once() {
    local t0 t1
    t0=$(now)
    ssh -q -c aes128-gcm@openssh.com -p "$VK_SSH_PORT" -i "$VK_SSH_KEY" \
        -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$VK_SSH_KNOWN_HOSTS" \
        -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o ControlPath=none \
        "$VK_SSH_USER@$VK_SSH_HOST" cat "$file" > /dev/null
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}

russh_once() {
    local out
    out=$("$bin" --host "$VK_SSH_HOST" --port "$VK_SSH_PORT" --user "$VK_SSH_USER" \
        --key "$VK_SSH_KEY" --known-hosts "$VK_SSH_KNOWN_HOSTS" \
        --file "$file" --size "$size" --streams "$1")
    sed -E 's/.*secs=([0-9.]+).*/\1/' <<< "$out"
}

mib=$(echo "$size / 1048576" | bc -l)
declare -A t
for ((r = 1; r <= runs; r++)); do
    t[openssh]+="$(openssh_once)"$'\n'
    t[1]+="$(russh_once 1)"$'\n'
    for n in $streams; do t[$n]+="$(russh_once "$n")"$'\n'; done
done

ossh=$(printf %s "${t[openssh]}" | median)
printf '%-28s %8s %10s %8s\n' case secs MiB/s ratio
printf '%-28s %8.2f %10.1f %8.2f\n' "openssh aes128-gcm, 1 conn" "$ossh" "$(echo "$mib / $ossh" | bc -l)" 1
for n in 1 $streams; do
    m=$(printf %s "${t[$n]}" | median)
    printf '%-28s %8.2f %10.1f %8.2f\n' "russh, $n conn" "$m" "$(echo "$mib / $m" | bc -l)" "$(echo "$ossh / $m" | bc -l)"
done

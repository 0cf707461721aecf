# shellcheck shell=bash
# shellcheck disable=SC2034 # globals (T_*, NET_*, WL_*) are read by the scripts that source this
# Helpers for bench/*.sh. Sourced, never executed.

BENCH_DIR=${BENCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}

blog() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
bdie() {
  blog "ERROR: $*"
  exit 1
}

# median of numbers on stdin (one per line); empty input -> "nan"
# (an even count averages the middle two; integers stay integers, never 1e+09: bc reads it)
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "nan"; exit} if (NR%2) v=a[(NR+1)/2]; else v=(a[NR/2]+a[NR/2+1])/2; if (v==int(v)) printf "%.0f\n", v; else printf "%.3f\n", v}'; }
# min / max of numbers on stdin
minmax() { sort -g | awk 'NR==1{mn=$1} {mx=$1} END {printf "%s-%s", mn, mx}'; }

# calc EXPR: floating point with bc, printed with 3 decimals
calc() { printf '%.3f' "$(bc -l <<<"$1")"; }

# Loads KEY=VALUE lines of the lab env file (no spaces or quotes in values) as variables.
load_lab_env() {
  local key value
  while IFS='=' read -r key value; do
    [[ $key == VK_* ]] && printf -v "$key" '%s' "$value"
  done <"$1"
}

# timed NAME CMD...: runs CMD with /usr/bin/time -v and the CPU sampler.
# Files: $RUN_DIR/NAME.{out,err,time,cpu.json}. Sets T_WALL (s, from the shell's clock),
# T_RSS_KB, T_USER, T_SYS. Returns CMD's exit status.
# EXTRA_SAMPLER: set to 0 to skip the sampler.
SAMPLER_PID=
PERF_PID=
timed() {
  local name=$1 rc=0 t0 t1
  shift
  local f=$RUN_DIR/$name
  if [[ ${EXTRA_SAMPLER:-1} == 1 ]]; then
    python3 "$BENCH_DIR/cpusample.py" "$f.cpu.json" 0.5 &
    SAMPLER_PID=$!
    sleep 0.3 # let its first scan happen before the command starts
  fi
  t0=$EPOCHREALTIME
  /usr/bin/time -v -o "$f.time" "$@" >"$f.out" 2>"$f.err" || rc=$?
  t1=$EPOCHREALTIME
  if [[ -n $SAMPLER_PID ]]; then
    kill -TERM "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
  fi
  T_WALL=$(calc "$t1 - $t0")
  T_RSS_KB=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$f.time" 2>/dev/null || echo 0)
  T_USER=$(awk -F': ' '/User time \(seconds\)/ {print $2}' "$f.time" 2>/dev/null || echo 0)
  T_SYS=$(awk -F': ' '/System time \(seconds\)/ {print $2}' "$f.time" 2>/dev/null || echo 0)
  return $rc
}

# cpu_of FILE.cpu.json COMM...: CPU seconds of those comms in a sampler file
cpu_of() {
  local f=$1
  shift
  local sel
  sel=$(printf '"%s",' "$@")
  jq -r "[.by_comm | to_entries[] | select(.key as \$k | [${sel%,}] | index(\$k)) | .value] | add // 0" "$f" 2>/dev/null || echo 0
}
# cpu_other FILE.cpu.json COMM...: CPU seconds of everything except those comms
cpu_other() {
  local f=$1
  shift
  local sel
  sel=$(printf '"%s",' "$@")
  jq -r "[.by_comm | to_entries[] | select(.key as \$k | [${sel%,}] | index(\$k) | not) | .value] | add // 0" "$f" 2>/dev/null || echo 0
}

# seconds between the first line matching RE1 and the last line matching RE2 of a
# tracing log (RFC 3339 timestamps at the start of each line)
log_span() {
  python3 - "$1" "$2" "$3" <<'PY'
import re, sys, datetime
path, a, b = sys.argv[1:4]
def ts(line):
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z", line)
    if not m:
        return None
    s = m.group(1)
    if "." in s:
        head, frac = s.split(".")
        s = head + "." + (frac + "000000")[:6]
        return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%f")
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S")
t1 = t2 = None
for line in open(path, errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if t1 is None and re.search(a, line):
        t1 = ts(line)
    if re.search(b, line):
        t2 = ts(line) or t2
print("%.3f" % (t2 - t1).total_seconds() if t1 and t2 else "nan")
PY
}

# ---------------------------------------------------------------- bytes over SSH
# Independent of virtkeep's own counters (bench/incremental.sh, bench/rbd.sh).
# The lab sshd (LogLevel VERBOSE) logs "Transferred: sent S, received R bytes" when a
# connection closes: SSH-layer bytes (packets with padding and MAC, key exchange and
# auth included) per connection. Other people's tests use the same lab sshd, so only
# the connections of our processes are summed (their client ports, from ss).
sshd_mark() { stat -c %s "${VK_LAB_DIR:-/tmp/virtkeep-lab}/ssh/sshd.log" 2>/dev/null || echo 0; }
# sshd_transferred OFFSET [PORTS_FILE]: "CONNS SENT RECEIVED ALL_CONNS ALL_SENT ALL_RECEIVED":
# the connections whose client port is listed in PORTS_FILE (see port_watch_start), and
# all connections that closed since OFFSET. sshd logs "Connection closed by … port P",
# "Transferred: …", "Closing connection to … port P" for each connection.
sshd_transferred() {
  tail -c +$(($1 + 1)) "${VK_LAB_DIR:-/tmp/virtkeep-lab}/ssh/sshd.log" 2>/dev/null |
    awk -v portsfile="${2:-/dev/null}" '
      BEGIN { while ((getline p < portsfile) > 0) want[p] = 1 }
      { sub(/\r$/, "") } # sshd -E writes CRLF
      /^Connection closed by .* port [0-9]+/ { last = $NF }
      pending && /^Closing connection to .* port [0-9]+/ { port = $NF }
      pending { if (port == "") port = last; if (port in want) { s += ps; r += pr; n++ } pending = 0; port = "" }
      /^Transferred: sent [0-9]+, received [0-9]+ bytes/ { ps = $3 + 0; pr = $5 + 0; as += ps; ar += pr; an++; pending = 1 }
      END { if (pending && (last in want)) { s += ps; r += pr; n++ }
            printf "%d %.0f %.0f %d %.0f %.0f\n", n, s, r, an, as, ar }'
}
# port_watch_start PATTERN FILE: until port_watch_stop, every 0.1 s, appends to FILE the
# client ports of established TCP connections to the lab sshd that belong to processes
# whose command line matches PATTERN (pgrep -f): how our connections are told apart from
# other clients of a shared lab sshd.
PORTWATCH_PID=
port_watch_start() {
  local pat=$1 out=$2
  : >"$out"
  (
    while :; do
      pids=$(pgrep -d, -f -- "$pat" || true)
      if [[ -n $pids ]]; then
        ss -Htnp state established "( dport = :$VK_SSH_PORT )" 2>/dev/null |
          awk -v pids=",$pids," '{ if (match($0, /pid=[0-9]+/)) { p = substr($0, RSTART + 4, RLENGTH - 4)
                 if (index(pids, "," p ",")) { n = split($3, a, ":"); print a[n] } } }' >>"$out"
      fi
      sleep 0.1
    done
  ) &
  PORTWATCH_PID=$!
}
port_watch_stop() {
  [[ -n $PORTWATCH_PID ]] || return 0
  kill "$PORTWATCH_PID" 2>/dev/null || true
  wait "$PORTWATCH_PID" 2>/dev/null || true
  PORTWATCH_PID=
}
# rx bytes of the loopback interface (/proc/net/dev; lo counts every packet once in rx,
# both directions, IP+TCP headers included, and everything on lo: Ceph and other
# people's tests on a shared lab too)
lo_bytes() { awk -F'[: ]+' '/^ *lo:/ {print $3}' /proc/net/dev; }

# net_timed NAME CMD...: timed (above) plus the bytes over SSH of the run. Our
# connections are those of processes matching $NET_MATCH (pgrep -f pattern).
# Sets NET_CONNS NET_SENT NET_RECV (sshd log, our connections closed during the run +
# 1 s), NET_ALL_CONNS NET_ALL_SENT NET_ALL_RECV (every connection that closed meanwhile),
# LO_RAW (lo rx delta over the same window) and LO_WIN (window length, s).
net_timed() {
  local mark lo0 lo1 t0 rc=0
  mark=$(sshd_mark)
  lo0=$(lo_bytes)
  t0=$EPOCHREALTIME
  port_watch_start "$NET_MATCH" "$RUN_DIR/$1.ports"
  timed "$@" || rc=$?
  port_watch_stop
  sort -un -o "$RUN_DIR/$1.ports" "$RUN_DIR/$1.ports"
  sleep 1 # sshd logs "Transferred" right after the client closed
  lo1=$(lo_bytes)
  LO_WIN=$(calc "$EPOCHREALTIME - $t0")
  LO_RAW=$((lo1 - lo0))
  read -r NET_CONNS NET_SENT NET_RECV NET_ALL_CONNS NET_ALL_SENT NET_ALL_RECV \
    <<<"$(sshd_transferred "$mark" "$RUN_DIR/$1.ports")"
  return $rc
}
# lo_idle_rate SECONDS: bytes/s on lo while nothing of ours runs (the noise to subtract)
lo_idle_rate() {
  local a b
  a=$(lo_bytes)
  sleep "$1"
  b=$(lo_bytes)
  calc "($b - $a) / $1"
}

# log_gaps LOG N: the N longest gaps between consecutive lines of a virtkeep log, with
# the line that opens the gap (for sequential control-path steps: roughly how long the
# remote command it names took). Shows where an incremental's fixed cost goes.
log_gaps() {
  python3 - "$1" "$2" <<'PY'
import re, sys, datetime
path, n = sys.argv[1], int(sys.argv[2])
rows = []
for line in open(path, errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip("\n")
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z\s*(.*)", line)
    if not m:
        continue
    t = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    t += datetime.timedelta(microseconds=int((m.group(2) or "0")[:6].ljust(6, "0")))
    rows.append((t, m.group(3)))
if not rows:
    print("(no timestamped lines)")
    sys.exit(0)
gaps = []
for (t1, text), (t2, _) in zip(rows, rows[1:]):
    gaps.append(((t2 - t1).total_seconds(), text))
total = (rows[-1][0] - rows[0][0]).total_seconds()
print(f"first to last log line: {total:.3f} s, {len(rows)} lines")
for g, text in sorted(gaps, key=lambda x: -x[0])[:n]:
    print(f"{g:7.3f} s  {text[:220]}")
PY
}

# ---------------------------------------------------------------- incremental workloads
# workload_files DIR P: the data pieces of bench/incremental.sh and bench/rbd.sh in DIR:
# head.bin/tail.bin (1 MiB random), rand1..4.bin (P random), rep.bin (a 4 MiB random
# block repeated to P), text1..3.bin (P of log-like text, zstd -1 ~2.7x, as backup.sh).
workload_files() {
  local d=$1 u=$2 i
  local mib=1048576
  head -c $mib /dev/urandom >"$d/head.bin"
  head -c $mib /dev/urandom >"$d/tail.bin"
  for i in 1 2 3 4; do head -c "$u" /dev/urandom >"$d/rand$i.bin"; done
  head -c $((4 * mib)) /dev/urandom >"$d/block4m"
  for ((i = 0; i < u / (4 * mib); i++)); do cat "$d/block4m"; done >"$d/rep.bin"
  python3 - "$d/pool.txt" <<'PY'
import random, sys
random.seed(20240501)
words = ("the of and to in is was for on are as with his they at be this from have or by one had not but what all "
         "were when we there can an your which their said if do will each about how up out them then she many some so "
         "these would other into has more her two like him see time could no make than first been its who now people "
         "my made over did down only way find use may water long little very after words called just where most know "
         "get through back much before go good new write our used me man too any day same right look think also "
         "around another came come work three word must because does part request response cache error warning").split()
hosts = [f"node-{i:02d}.example.net" for i in range(40)]
svcs = ["nginx", "sshd", "kernel", "systemd", "postgres", "app", "cron", "dockerd"]
r = random.randint
with open(sys.argv[1], "w") as f:
    for _ in range(200000):
        f.write(f"2025-{r(1,12):02d}-{r(1,28):02d}T{r(0,23):02d}:{r(0,59):02d}:{r(0,59):02d}.{r(0,999):03d}Z "
                f"{random.choice(hosts)} {random.choice(svcs)}[{r(100,32000)}]: "
                + " ".join(random.choices(words, k=r(4, 14)))
                + f" id={random.getrandbits(48):012x} status={random.choice((200,200,200,204,301,404,500))} ms={r(0,2000)}\n")
PY
  shuf -r -n $((3 * u / 80)) "$d/pool.txt" | head -c $((3 * u)) >"$d/text.bin" || true
  [[ $(stat -c %s "$d/text.bin") -eq $((3 * u)) ]] || bdie "text generation produced $(stat -c %s "$d/text.bin") bytes"
  for i in 1 2 3; do
    dd if="$d/text.bin" of="$d/text$i.bin" bs=1M iflag=skip_bytes,count_bytes skip=$(((i - 1) * u)) count="$u" status=none
    [[ $(stat -c %s "$d/text$i.bin") -eq $u ]] || bdie "text$i.bin has $(stat -c %s "$d/text$i.bin") bytes"
  done
  rm -f "$d/text.bin" "$d/pool.txt" "$d/block4m"
}
# workload_layout DISK U P: sets WL_LAYOUT ("file offset" lines) and WL_DATA (bytes):
# the pieces of workload_files DIR P (P <= U) at offsets in units U = DISK/32:
# 8 P + 2 MiB of data (~1/4 of the disk when P = U) spread over the disk, holes elsewhere.
workload_layout() {
  local disk=$1 u=$2 p=$3 mib=1048576
  WL_LAYOUT=(
    "head.bin 0"
    "rand1.bin $((1 * u))"
    "text1.bin $((4 * u + mib))"
    "rand2.bin $((9 * u + 65536))"
    "rep.bin $((13 * u))"
    "text2.bin $((17 * u + 3 * mib))"
    "rand3.bin $((21 * u))"
    "text3.bin $((26 * u + 4096))"
    "rand4.bin $((29 * u))"
    "tail.bin $((disk - mib))"
  )
  WL_DATA=$((8 * p + 2 * mib))
}

# gen_changes MODE SEED DISK N: N non-overlapping writes ("offset length" lines) that
# add up to ~1 % of DISK (N pieces of DISK/8192, one in each N-th of the disk at a
# random place), on stdout. MODE aligned: offsets and lengths in 64 KiB units (the
# dirty bitmap's granularity for 64 KiB qcow2 clusters); MODE unaligned: 4 KiB units,
# lengths from 1/2 to 3/2 of the piece size (how a guest file system writes).
# The last line is "# changed BYTES dirty64k BYTES" (dirty64k = the same writes
# rounded out to 64 KiB granules: what a 64 KiB dirty bitmap marks).
gen_changes() {
  python3 - "$@" <<'PY'
import random, sys
mode, seed, disk, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)
piece = disk // 8192
unit = 65536 if mode == "aligned" else 4096
slot = disk // n
out = []
for i in range(n):
    if mode == "aligned":
        length = piece
    else:
        length = rnd.randrange(piece // 2, piece * 3 // 2 + 1, unit)
    start = -(-i * slot // unit) * unit  # slot start rounded up to the unit
    room = (i + 1) * slot - start - length
    off = start + rnd.randrange(0, room // unit + 1) * unit
    out.append((off, length))
changed = sum(l for _, l in out)
gran = set()
for off, l in out:
    for g in range(off // 65536, (off + l - 1) // 65536 + 1):
        gran.add(g)
for off, l in out:
    print(off, l)
print(f"# changed {changed} dirty64k {len(gran) * 65536}")
PY
}

# hmp_writes DOM ALIAS PATTERN FILE: writes every "offset length" line of FILE with
# byte PATTERN into the running domain's disk (qemu-io on the device through the HMP
# monitor, as the lab's TestVm::write_pattern does), then flushes; waits until QEMU's
# log confirms every write. virsh's URI from $VK_LIBVIRT_URI.
hmp_writes() {
  local dom=$1 alias=$2 pat=$3 file=$4 off len out n=0 log start want got i
  local dev=/machine/peripheral/$alias/virtio-backend
  log=/var/log/libvirt/qemu/$dom.log
  start=$(stat -c %s "$log" 2>/dev/null || echo 0)
  while read -r off len; do
    [[ $off == "#" ]] && continue
    out=$(virsh -q -c "$VK_LIBVIRT_URI" qemu-monitor-command --domain "$dom" --hmp \
      "qemu-io -d $dev \"write -P $pat $off $len\"") || bdie "HMP qemu-io write failed on $dom"
    [[ -z ${out//[[:space:]]/} ]] || bdie "HMP qemu-io write $off $len on $dom: $out"
    n=$((n + 1))
  done <"$file"
  virsh -q -c "$VK_LIBVIRT_URI" qemu-monitor-command --domain "$dom" --hmp "qemu-io -d $dev \"flush\"" >/dev/null ||
    bdie "HMP qemu-io flush failed on $dom"
  want=$n
  for ((i = 0; i < 150; i++)); do
    got=$(tail -c +$((start + 1)) "$log" | grep -c 'wrote [0-9]*/[0-9]* bytes at offset' || true)
    ((got >= want)) && return 0
    sleep 0.1
  done
  bdie "QEMU's log confirms $got of $want writes on $dom"
}

# ---------------------------------------------------------------- figures and reports
# Figures of repeated runs are kept in associative arrays of space-separated lists:
#   declare -A WALL; add WALL get "$T_WALL"; med WALL get; mm WALL get
# add ARRAY KEY VALUE: appends VALUE to ARRAY[KEY]
add() { eval "$1[\$2]+=\"\$3 \""; }
# med ARRAY KEY: median of ARRAY[KEY] ("nan" when empty)
# shellcheck disable=SC2086 # the list splits on purpose
med() { local -n arr=$1; printf '%s\n' ${arr[$2]:-} | median; }
# mm ARRAY KEY: "min-max" of ARRAY[KEY]
# shellcheck disable=SC2086
mm() { local -n arr=$1; printf '%s\n' ${arr[$2]:-} | minmax; }
# verdict BC_EXPR: PASS when the comparison holds, FAIL otherwise
verdict() { if (($(bc <<<"$1"))); then echo PASS; else echo FAIL; fi; }
# drop_caches: a cold page cache for the next command (root)
drop_caches() { sync && echo 3 >/proc/sys/vm/drop_caches; }
# loadavg: the 1, 5 and 15 minute load averages
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
# machine_facts: one markdown-ready line: cores, CPU model, RAM, kernel
machine_facts() {
  local cpu
  cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
  printf 'nproc=%s, CPU "%s", %s, kernel %s' "$(nproc)" "$cpu" \
    "$(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo)" "$(uname -r)"
}
# md_row CELL...: one markdown table row
md_row() { local s="|" c; for c in "$@"; do s+=" $c |"; done; printf '%s\n' "$s"; }

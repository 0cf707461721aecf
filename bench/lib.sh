# shellcheck shell=bash
# Helpers for bench/*.sh. Sourced, never executed.

BENCH_DIR=${BENCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}

blog() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
bdie() {
  blog "ERROR: $*"
  exit 1
}

# median of numbers on stdin (one per line); empty input -> "nan"
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
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

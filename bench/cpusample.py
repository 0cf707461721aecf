#!/usr/bin/env python3
"""Per-process CPU accounting for a benchmark run, from /proc (no external tools).

Usage: cpusample.py OUT.json [INTERVAL]   (stop it with SIGTERM or SIGINT)

Every INTERVAL seconds (default 0.5) it reads utime+stime of every process, and of
every thread of processes whose comm is `virtkeep`. At the end it writes OUT.json:
  wall            seconds sampled
  cores_busy      average busy cores of the whole machine (from /proc/stat)
  ncpu            cores
  by_comm         {comm: cpu seconds used during the window}
  virtkeep_threads {"tid comm": cpu seconds}
A process first seen after the start counts from 0 (it was created during the run);
CPU burnt by a process between its last sample and its exit is missed (<= INTERVAL).
"""
import json
import os
import signal
import sys
import time

CLK = os.sysconf("SC_CLK_TCK")
OUT = sys.argv[1]
INTERVAL = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
stop = False


def on_signal(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)


def read_stat(path):
    try:
        with open(path, "rb") as f:
            s = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    lp, rp = s.find("("), s.rfind(")")
    comm = s[lp + 1 : rp]
    fields = s[rp + 2 :].split()
    # fields[0] is state (field 3); utime/stime are fields 14/15 -> index 11/12
    return comm, int(fields[11]) + int(fields[12])


def cpu_totals():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals), idle


def scan(procs, threads, initial):
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = read_stat(f"/proc/{d}/stat")
        if st is None:
            continue
        pid = int(d)
        comm, ticks = st
        if pid in procs:
            procs[pid][2] = ticks
        else:
            base = ticks if initial else 0
            procs[pid] = [comm, base, ticks]
        if comm == "virtkeep":
            try:
                tids = os.listdir(f"/proc/{d}/task")
            except OSError:
                tids = []
            for t in tids:
                tst = read_stat(f"/proc/{d}/task/{t}/stat")
                if tst is None:
                    continue
                key = (pid, int(t))
                if key in threads:
                    threads[key][2] = tst[1]
                else:
                    threads[key] = [tst[0], 0, tst[1]]


def main():
    procs, threads = {}, {}
    t0 = time.monotonic()
    tot0, idle0 = cpu_totals()
    scan(procs, threads, True)
    while not stop:
        time.sleep(INTERVAL)
        scan(procs, threads, False)
    scan(procs, threads, False)
    tot1, idle1 = cpu_totals()
    wall = time.monotonic() - t0
    ncpu = os.cpu_count() or 1
    busy = ((tot1 - tot0) - (idle1 - idle0)) / max(1, tot1 - tot0) * ncpu
    by_comm = {}
    for comm, a, b in procs.values():
        if b > a:
            by_comm[comm] = by_comm.get(comm, 0) + (b - a) / CLK
    vt = {}
    for (pid, tid), (comm, a, b) in threads.items():
        if b > a:
            vt[f"{tid} {comm}"] = (b - a) / CLK
    with open(OUT, "w") as f:
        json.dump(
            {
                "wall": wall,
                "ncpu": ncpu,
                "cores_busy": busy,
                "by_comm": dict(sorted(by_comm.items(), key=lambda kv: -kv[1])),
                "virtkeep_threads": dict(sorted(vt.items(), key=lambda kv: -kv[1])),
            },
            f,
            indent=1,
        )


main()

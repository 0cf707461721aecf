#!/usr/bin/env bash
# bench/web.sh [--release]: the web console's benchmark (issue 23): the dashboard of 500
# VMs with 10 backup jobs each and the repository card (a SQLite catalog filled by the generator in
# crates/virtkeep-daemon/src/web/pages.rs), server-side time (the catalog queries and the
# rendering, best of 5) and page weight, next to the baseline of the same run (one
# catalog query per VM). The goal: < 200 ms and < 200 KiB. The weight is asserted; the
# time is only reported (the machine may be shared: see the load average printed).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=()
[[ ${1:-} == --release ]] && profile=(--cargo-profile release)
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo nextest run --workspace "${profile[@]}" --run-ignored only --no-capture \
    -E 'package(virtkeep-daemon) & test(/dashboard_of_500_vms/)' 2>&1 | grep -E '^BENCH|FAIL|panicked'
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

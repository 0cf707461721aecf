#!/usr/bin/env bash
# Repository benchmark: throughput (1 GiB mixed data, 1 thread and all cores) and peak
# RSS of ingest for a 1 GiB and an 8 GiB disk (separate processes, VmHWM).
# Usage: crates/virtkeep-repo/bench/repo.sh [DIR]   (DIR: where the temporary repos go)
set -euo pipefail
cd "$(dirname "$0")/../../.."
DIR=${1:-/tmp}
cargo build --release -p virtkeep-repo --example repo_bench
BIN=target/release/examples/repo_bench
echo "== throughput (1 GiB, mixed)"
"$BIN" --size 1 --profile mixed --dir "$DIR"
echo "== peak RSS, ingest only"
"$BIN" --size 1 --profile mixed --mode ingest-rss --dir "$DIR"
"$BIN" --size 8 --profile light --mode ingest-rss --dir "$DIR"

#!/usr/bin/env bash
# The test suite on a fresh machine: installs what the lab needs, brings the lab up,
# runs every test of the workspace with cargo-nextest, and tears the lab down again
# (also when tests fail or the run is interrupted). Extra arguments go to nextest.
# VK_LAB_KEEP=1 leaves the lab running afterwards (faster reruns while developing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"

lab/install-deps.sh
if [[ ${VK_LAB_KEEP:-0} != 1 ]]; then
  trap 'lab/down.sh' EXIT
fi
lab/up.sh
cargo nextest run --workspace --no-fail-fast "$@"

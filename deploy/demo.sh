#!/usr/bin/env bash
# The local demo: Pebble, 3 agents on loopback and the coordinator issue one
# certificate; prints where it is.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/deps.sh
export PATH="/usr/sbin:$PATH"
exec cargo run --quiet -p certfleet-tests --bin certfleet-demo

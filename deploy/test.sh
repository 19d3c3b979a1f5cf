#!/usr/bin/env bash
# Runs every test: unit tests and the scenario tests against real Pebble,
# agents, nginx and the coordinator.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/deps.sh
export PATH="/usr/sbin:$PATH"
exec cargo test --workspace

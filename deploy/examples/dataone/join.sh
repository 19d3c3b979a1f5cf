#!/usr/bin/env bash
# Registers DataONE's four Coordinating Nodes with the coordinator. Each
# `certfleet node add` prints a one-time join token, the cluster CA pin, and the
# `certfleet-agent join ...` command to run on that node.
set -euo pipefail
certfleet node add cn-ucsb-1 --agent 10.0.1.11:7443
certfleet node add cn-unm-1  --agent 10.0.2.11:7443
certfleet node add cn-orc-1  --agent 10.0.3.11:7443
# The CA reaches cn-ornl-1 on a public address in front of its private one.
certfleet node add cn-ornl-1 --agent 10.0.4.11:7443 --http01 160.91.0.11

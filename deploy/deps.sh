#!/usr/bin/env bash
# Installs the Debian packages certfleet's demo and tests use, if missing:
# pebble (the ACME test CA and its DNS), nginx (webroot tests), postgresql,
# openssl, and certbot (the lineages `certfleet import --certbot` reads).
set -euo pipefail
need=()
command -v pebble >/dev/null && command -v pebble-challtestsrv >/dev/null || need+=(pebble)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql)
command -v openssl >/dev/null || need+=(openssl)
command -v certbot >/dev/null || need+=(certbot)
# The DataONE examples and the tests install keys as root:ssl-cert 0640.
if ! getent group ssl-cert >/dev/null && [ "$(id -u)" -eq 0 ]; then
  groupadd ssl-cert
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "certfleet needs: ${need[*]}. Run: sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${need[@]}"

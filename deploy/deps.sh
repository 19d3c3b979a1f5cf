#!/usr/bin/env bash
# Installs the Debian packages certfleet's demo and tests use, if missing:
# pebble (the ACME test CA and its DNS), nginx (webroot tests), apache2 (the
# web-server snippet tests), postgresql, openssl, certbot (the lineages
# `certfleet import --certbot` reads), python3-aiosmtpd (the mail tests' SMTP server),
# openssh-client/openssh-server (SSH nodes) and sudo (an SSH login other
# than root).
set -euo pipefail
need=()
command -v pebble >/dev/null && command -v pebble-challtestsrv >/dev/null || need+=(pebble)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -x /usr/sbin/apache2 ] || need+=(apache2)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql)
command -v openssl >/dev/null || need+=(openssl)
command -v certbot >/dev/null || need+=(certbot)
# The mail tests' SMTP server, run as /usr/bin/python3 -m aiosmtpd.
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || need+=(python3-aiosmtpd)
# The approval page's test drives a real headless browser.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
# SSH nodes: the coordinator's ssh client and ssh-keyscan; the tests'
# nodes run a real sshd.
command -v ssh >/dev/null && command -v ssh-keyscan >/dev/null || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
# The SSH tests' non-root login reaches the remote script through sudo.
[ -x /usr/bin/sudo ] && [ -x /usr/sbin/visudo ] || need+=(sudo)
# deploy/package-test.sh checks the units with systemd-analyze.
command -v systemd-analyze >/dev/null || need+=(systemd)
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

#!/usr/bin/env bash
# Builds the certfleet-coordinator and certfleet-agent Debian packages,
# installs them with dpkg -i, checks what they installed, and runs the
# installed binaries through a short scenario the way their units run them.
#
# systemd is not PID 1 here (CI, containers), so the units cannot start:
# this script does what they would. It makes the unit's directories, runs
# the coordinator as user certfleet with no capabilities and no new
# privileges (setpriv), the agent as root with only the unit's bounding
# set, and gives each a NOTIFY_SOCKET to report READY=1 on. The rest of
# the units' sandbox (namespaces, seccomp) needs systemd; the units
# themselves are checked with systemd-analyze verify (must print nothing)
# and security (exposure at most 2.5 and 5.0).
#
# Scenario: check says run would not start (no CA) -> init as certfleet ->
# check passes -> coordinator runs, READY=1 -> node add over the admin
# socket -> agent check fails (not joined) -> join -> agent runs, READY=1 ->
# the coordinator reaches it -> SIGHUP: the agent applies a new
# [[certificates]] live, refuses a broken config, the coordinator applies
# a new [placement] live -> SIGTERM: both stop cleanly -> dpkg -i again (an
# upgrade) keeps the config and the state.
#
# Needs root. Leaves the packages installed; the scenario's processes are
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$HOME/.cargo/bin:$PATH"

fail() {
  echo "package-test: FAIL: $*" >&2
  exit 1
}
step() { echo "== $*"; }

# Completions and man pages, generated from the binaries' clap definitions,
# sorted into what each package installs (target/deb-assets/PACKAGE/).
# deploy/assets.sh writes them into target/assets/; without it they are
# generated here from the binaries' hidden `completions` and `man`
# subcommands.
docs() {
  local assets=target/assets out=target/deb-assets
  if [ -x deploy/assets.sh ]; then
    deploy/assets.sh
  else
    rm -rf "$assets"
    mkdir -p "$assets/completions/bash" "$assets/completions/zsh" "$assets/completions/fish" "$assets/man/man1"
    for bin in certfleet certfleet-coordinator certfleet-agent; do
      target/release/$bin completions bash >"$assets/completions/bash/$bin" &&
        target/release/$bin completions zsh >"$assets/completions/zsh/_$bin" &&
        target/release/$bin completions fish >"$assets/completions/fish/$bin.fish" &&
        target/release/$bin man "$assets/man/man1" ||
        fail "$bin cannot print its completions and man pages (the hidden \`completions\` and \`man\` subcommands): the packages need them"
    done
  fi
  rm -rf "$out"
  local pkg bin
  for pkg in certfleet-coordinator certfleet-agent; do
    mkdir -p "$out/$pkg/man" "$out/$pkg/bash" "$out/$pkg/zsh" "$out/$pkg/fish"
  done
  for bin in certfleet certfleet-coordinator certfleet-agent; do
    pkg=certfleet-coordinator
    [ "$bin" = certfleet-agent ] && pkg=certfleet-agent
    cp "$assets/completions/bash/$bin" "$out/$pkg/bash/$bin" &&
      cp "$assets/completions/zsh/_$bin" "$out/$pkg/zsh/_$bin" &&
      cp "$assets/completions/fish/$bin.fish" "$out/$pkg/fish/$bin.fish" ||
      fail "no completions for $bin under $assets/completions"
  done
  # certfleet-agent*.1 are the agent's; every other page (certfleet.1,
  # certfleet-node-add.1, certfleet-coordinator*.1) the coordinator's.
  local page
  for page in "$assets"/man/man1/*.1; do
    [ -e "$page" ] || fail "no man pages under $assets/man/man1"
    case "$(basename "$page")" in
      certfleet-agent.1 | certfleet-agent-*.1) cp "$page" "$out/certfleet-agent/man/" ;;
      *) cp "$page" "$out/certfleet-coordinator/man/" ;;
    esac
  done
  [ -e "$out/certfleet-agent/man/certfleet-agent.1" ] || fail "no certfleet-agent.1"
  [ -e "$out/certfleet-coordinator/man/certfleet.1" ] || fail "no certfleet.1"
  [ -e "$out/certfleet-coordinator/man/certfleet-coordinator.1" ] || fail "no certfleet-coordinator.1"
}

build() {
  step "build"
  if ! command -v cargo-deb >/dev/null; then
    cargo install cargo-deb --version 3.8.0 --locked
  fi
  cargo build --release -p certfleet-coordinator -p certfleet-ctl -p certfleet-agent --bins
  docs
  rm -f target/debian/certfleet-coordinator_*.deb target/debian/certfleet-agent_*.deb
  cargo deb --no-build -p certfleet-coordinator
  cargo deb --no-build -p certfleet-agent
  COORDINATOR_DEB=$(ls target/debian/certfleet-coordinator_*.deb)
  AGENT_DEB=$(ls target/debian/certfleet-agent_*.deb)
}

install_packages() {
  step "dpkg -i"
  # The scenario starts from a machine that never ran certfleet, and it
  # writes /etc/certfleet and /var/lib/certfleet*: never a real one.
  local d
  for d in /etc/certfleet/coordinator.toml /etc/certfleet/agent.toml /var/lib/certfleet/ca /var/lib/certfleet-agent/identity; do
    [ ! -e "$d" ] || fail "$d exists: run this on a test machine without certfleet (there: dpkg --purge certfleet-coordinator certfleet-agent; rm -rf /etc/certfleet /var/lib/certfleet /var/lib/certfleet-agent /run/certfleet)"
  done
  dpkg -i "$COORDINATOR_DEB" "$AGENT_DEB"
  getent passwd certfleet >/dev/null || fail "no user certfleet"
  getent group certfleet >/dev/null || fail "no group certfleet"
  getent group ssl-cert >/dev/null || fail "no group ssl-cert"
  [ "$(stat -c %U:%a /var/lib/certfleet)" = certfleet:700 ] || fail "/var/lib/certfleet is $(stat -c %U:%a /var/lib/certfleet), not certfleet:700"
  local f
  for f in /usr/bin/certfleet /usr/bin/certfleet-coordinator /usr/bin/certfleet-agent \
    /usr/share/doc/certfleet-coordinator/examples/coordinator.toml \
    /usr/share/doc/certfleet-agent/examples/agent-nginx.toml \
    /usr/share/man/man1/certfleet.1.gz /usr/share/man/man1/certfleet-agent.1.gz \
    /usr/share/bash-completion/completions/certfleet /usr/share/zsh/vendor-completions/_certfleet-agent \
    /usr/share/fish/vendor_completions.d/certfleet-coordinator.fish; do
    [ -e "$f" ] || fail "the packages did not install $f"
  done
  COORDINATOR_UNIT=$(dpkg -L certfleet-coordinator | grep '/systemd/system/certfleet-coordinator.service$')
  AGENT_UNIT=$(dpkg -L certfleet-agent | grep '/systemd/system/certfleet-agent.service$')
  # Enabled (installed before it is configured: it starts once the config exists).
  [ -L /etc/systemd/system/multi-user.target.wants/certfleet-coordinator.service ] || fail "certfleet-coordinator.service is not enabled"
  [ -L /etc/systemd/system/multi-user.target.wants/certfleet-agent.service ] || fail "certfleet-agent.service is not enabled"
}

units() {
  step "systemd-analyze verify"
  local out
  out=$(systemd-analyze verify "$COORDINATOR_UNIT" "$AGENT_UNIT" 2>&1) || fail "systemd-analyze verify failed: $out"
  [ -z "$out" ] || fail "systemd-analyze verify printed (it must print nothing):
$out"
  step "systemd-analyze security"
  local unit limit score
  for unit in "$COORDINATOR_UNIT:2.5" "$AGENT_UNIT:5.0"; do
    limit=${unit##*:}
    unit=${unit%:*}
    score=$(systemd-analyze security --offline=true "$unit" 2>&1 | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p')
    [ -n "$score" ] || fail "no exposure score for $unit"
    echo "$(basename "$unit"): exposure $score (target: at most $limit)"
    awk -v s="$score" -v l="$limit" 'BEGIN { exit !(s <= l) }' || fail "$unit scores $score, above $limit"
  done
}

# The scenario's processes, stopped on exit.
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

WORK=""
# Starts a NOTIFY_SOCKET listener that appends each message to $WORK/$1.notify.
notify_socket() {
  local name=$1
  python3 - "$WORK/$name.sock" "$WORK/$name.notify" <<'PY' &
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o666)
while True:
    msg = s.recv(4096).decode()
    with open(log, "a") as f:
        f.write(msg if msg.endswith("\n") else msg + "\n")
PY
  PIDS+=($!)
  local i
  for i in $(seq 50); do
    [ -S "$WORK/$name.sock" ] && return 0
    sleep 0.1
  done
  fail "the NOTIFY_SOCKET listener for $name did not start"
}

# Waits until file $1 holds a line matching $2 (at most $3 seconds).
wait_for() {
  local file=$1 pattern=$2 secs=${3:-30} i
  for i in $(seq $((secs * 10))); do
    grep -q -- "$pattern" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "--- $file:" >&2
  cat "$file" >&2 || true
  fail "no \"$pattern\" in $file after ${secs}s"
}

# Runs "$@", expecting exit code $1 and output matching $2.
expect() {
  local code=$1 pattern=$2 out rc
  shift 2
  set +e
  out=$("$@" 2>&1)
  rc=$?
  set -e
  echo "$out" | sed 's/^/    /'
  [ "$rc" = "$code" ] || fail "\`$*\` exited $rc, not $code"
  echo "$out" | grep -q -- "$pattern" || fail "\`$*\` did not say \"$pattern\""
}

scenario() {
  step "scenario"
  WORK=$(mktemp -d /tmp/certfleet-package-test.XXXXXX)
  chmod 755 "$WORK"
  # What the coordinator's unit makes: RuntimeDirectory=certfleet (0750).
  install -d -m 0750 -o certfleet -g certfleet /run/certfleet
  cat >/etc/certfleet/coordinator.toml <<'TOML'
state_dir = "/var/lib/certfleet"
admin_socket = "/run/certfleet/admin.sock"

[acme]
directory = "https://127.0.0.1:14000/dir"

[enrollment]
listen = "127.0.0.1:17444"
TOML
  chown root:certfleet /etc/certfleet/coordinator.toml
  chmod 0640 /etc/certfleet/coordinator.toml
  as_certfleet=(setpriv --reuid=certfleet --regid=certfleet --init-groups --no-new-privs --bounding-set=-all --inh-caps=-all --)

  expect 2 "certfleet-coordinator --config /etc/certfleet/coordinator.toml init" \
    "${as_certfleet[@]}" certfleet-coordinator check
  expect 0 "CA pin: sha256:" "${as_certfleet[@]}" certfleet-coordinator init
  expect 0 "run would start" "${as_certfleet[@]}" certfleet-coordinator check

  notify_socket coordinator
  NOTIFY_SOCKET="$WORK/coordinator.sock" "${as_certfleet[@]}" \
    /usr/bin/certfleet-coordinator --config /etc/certfleet/coordinator.toml run \
    >"$WORK/coordinator.log" 2>&1 &
  local coordinator=$!
  PIDS+=($coordinator)
  wait_for "$WORK/coordinator.notify" "^READY=1"
  [ "$(stat -c %U:%G:%a /run/certfleet/admin.sock)" = certfleet:certfleet:660 ] ||
    fail "the admin socket is $(stat -c %U:%G:%a /run/certfleet/admin.sock), not certfleet:certfleet:660"
  [ "$(stat -c %U /var/lib/certfleet/ca)" = certfleet ] || fail "the CA is not certfleet's"

  local added token pin
  added=$(certfleet --socket /run/certfleet/admin.sock --json node add web-1 --agent 127.0.0.1:17443)
  token=$(echo "$added" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  pin=$(echo "$added" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_pin"])')

  cat >/etc/certfleet/agent.toml <<'TOML'
node = "web-1"

[grpc]
listen = "127.0.0.1:17443"

[http01]
mode = "standalone"
listen = "127.0.0.1:17080"
TOML
  chmod 0600 /etc/certfleet/agent.toml
  expect 2 "not joined\|join" certfleet-agent check
  echo "$token" | certfleet-agent join --coordinator 127.0.0.1:17444 --token-file - --ca-pin "$pin"
  expect 0 "run would start" certfleet-agent check

  notify_socket agent
  NOTIFY_SOCKET="$WORK/agent.sock" setpriv --no-new-privs \
    --bounding-set=-all,+chown,+fowner,+dac_override,+net_bind_service --inh-caps=-all -- \
    /usr/bin/certfleet-agent --config /etc/certfleet/agent.toml run \
    >"$WORK/agent.log" 2>&1 &
  local agent=$!
  PIDS+=($agent)
  wait_for "$WORK/agent.notify" "^READY=1"
  # The coordinator reaches the agent over mutual TLS.
  expect 0 "web-1" certfleet --socket /run/certfleet/admin.sock nodes

  step "reload"
  # Targets must be under directories only root can write (not /tmp).
  local certs=/srv/certfleet-package-test
  rm -rf "$certs"
  install -d -m 0755 "$certs"
  cat >>/etc/certfleet/agent.toml <<TOML

[[certificates]]
name = "web"

[[certificates.files]]
content = "fullchain"
path = "$certs/web.pem"

[[certificates.files]]
content = "privkey"
path = "$certs/web.key"
mode = "0600"

[[certificates.services]]
name = "web"
restart = ["/bin/true"]
TOML
  kill -HUP "$agent"
  wait_for "$WORK/agent.log" "config reloaded.*certificate web added"
  wait_for "$WORK/agent.notify" "^RELOADING=1"
  echo "not = [valid" >>/etc/certfleet/agent.toml
  kill -HUP "$agent"
  wait_for "$WORK/agent.log" "config reload refused"
  kill -0 "$agent" || fail "the agent died of a broken config on reload"
  expect 2 "agent.toml" certfleet-agent check

  printf '\n[placement]\nconcurrency = 8\n' >>/etc/certfleet/coordinator.toml
  kill -HUP "$coordinator"
  wait_for "$WORK/coordinator.log" "config reloaded .*applied=\[placement\] needs_restart=nothing"
  kill -0 "$coordinator" || fail "the coordinator died on reload"

  step "stop"
  kill -TERM "$agent" "$coordinator"
  wait "$agent" || fail "the agent exited $? on SIGTERM"
  wait "$coordinator" || fail "the coordinator exited $? on SIGTERM"
  wait_for "$WORK/agent.notify" "^STOPPING=1"

  step "upgrade keeps the config and the state"
  local before after
  before=$(sha256sum /etc/certfleet/coordinator.toml /etc/certfleet/agent.toml /var/lib/certfleet/ca/* | sort)
  dpkg -i "$COORDINATOR_DEB" "$AGENT_DEB"
  after=$(sha256sum /etc/certfleet/coordinator.toml /etc/certfleet/agent.toml /var/lib/certfleet/ca/* | sort)
  [ "$before" = "$after" ] || fail "reinstalling changed the config or the state"
  [ -d /var/lib/certfleet-agent/identity ] || fail "reinstalling removed the agent's identity"
  expect 0 "run would start" "${as_certfleet[@]}" certfleet-coordinator check
}

build
install_packages
units
scenario
echo "package-test: ok"

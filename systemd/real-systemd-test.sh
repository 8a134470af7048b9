#!/usr/bin/env bash
# Boots a real systemd (Debian bookworm in a systemd-nspawn container), installs the
# package in it and checks what the units promise:
#   1. socket activation of the system unit: qiod starts when a client connects;
#   2. `systemctl status qiod` shows the upstream state on its Status: line;
#   3. a SIGSTOPped qiod is restarted by the watchdog;
#   4. `systemctl reload qiod` applies a new server address without a restart;
#   5. the user units work for a user with `systemctl --user` (socket activation too).
#
# Usage (as root): systemd/real-systemd-test.sh DEB [TESTSERVER]
#   DEB         the package (dist/build-deb.sh prints its path)
#   TESTSERVER  the qio-testserver binary (default target/debug/qio-testserver); two run on
#               this machine's loopback, which the container shares
# Needs debootstrap and systemd-container (apt-get install debootstrap systemd-container).
# Exit codes: 0 all checks passed, 1 a check failed, 77 it cannot run on this machine (not
# root, a tool missing, no Debian root could be made, or systemd did not boot), said why.
# The Debian root is made once (about a minute and a half) in $QIOD_SYSTEMD_ROOT (default
# /var/tmp/qiod-systemd-root) and booted read-only with a tmpfs overlay
# (--volatile=overlay), so a run changes nothing in it. Leaves no process or mount behind.
#
# For speed the service gets a drop-in with WatchdogSec=4s (the unit says 30 s): the
# mechanism checked is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath "${1:?usage: systemd/real-systemd-test.sh DEB [TESTSERVER]}")
testserver=$(realpath "${2:-target/debug/qio-testserver}")
root=${QIOD_SYSTEMD_ROOT:-/var/tmp/qiod-systemd-root}
machine=qiod-test-$$
cannot() { echo "real-systemd-test.sh: cannot run here: $*" >&2; exit 77; }
[ "$(id -u)" = 0 ] || cannot "needs root"
[ -x "$testserver" ] || { echo "real-systemd-test.sh: no $testserver; cargo build -p qio-testserver" >&2; exit 1; }
for tool in debootstrap systemd-nspawn nsenter; do
  command -v "$tool" >/dev/null || cannot "$tool is needed (apt-get install debootstrap systemd-container)"
done

tmp=$(mktemp -d)
pids=()
nspawn=
cleanup() {
  if [ -n "$nspawn" ] && kill -0 "$nspawn" 2>/dev/null; then
    kill -TERM "$nspawn" 2>/dev/null || true   # nspawn asks the container's systemd to halt
    for _ in $(seq 100); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$nspawn" 2>/dev/null || true
    wait "$nspawn" 2>/dev/null || true
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  # nspawn leaves this empty folder when it runs without a host systemd.
  rmdir "/run/systemd/nspawn/propagate/$machine" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
log() { echo "-- $*"; }
fail() {
  echo "real systemd test failed: $*" >&2
  if [ -n "$nspawn" ] && kill -0 "$nspawn" 2>/dev/null; then
    inside journalctl --no-pager -n 60 -u qiod.service -u qiod.socket >&2 || true
  fi
  exit 1
}
# Runs a command in the container, as root, with a clean environment.
inside() { nsenter -t "$leader" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
# Waits up to $1 seconds for the command after it to succeed.
until_ok() {
  local secs=$1
  shift
  for _ in $(seq $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

# procps for kill(1), which the units' ExecReload= runs (the package depends on it);
# libpam-systemd for the user managers that `systemctl --user` talks to.
if [ ! -x "$root/bin/kill" ] || ! compgen -G "$root/lib/*/security/pam_systemd.so" >/dev/null; then
  log "making a Debian bookworm root in $root (once)"
  rm -rf "$root.new"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,libpam-systemd bookworm "$root.new" >"$tmp/debootstrap.log" 2>&1 \
    || { tail -20 "$tmp/debootstrap.log"; rm -rf "$root.new"; cannot "debootstrap could not make a Debian root"; }
  rm -rf "$root"
  mv -T "$root.new" "$root"
fi

start_server() { # start_server NAME: prints the server's URL
  "$testserver" --port 0 >"$tmp/$1.out" 2>"$tmp/$1.log" &
  pids+=($!)
  until_ok 20 grep -q '^listening on ' "$tmp/$1.out" || fail "the test server $1 did not start"
}
start_server a
start_server b
url_a=$(sed -n 's/^listening on //p' "$tmp/a.out")
url_b=$(sed -n 's/^listening on //p' "$tmp/b.out")

log "booting systemd in a container"
mkdir "$tmp/deb"
cp "$deb" "$tmp/deb/qiod.deb"
systemd-nspawn --quiet --directory="$root" --volatile=overlay --machine="$machine" \
  --register=no --keep-unit --console=pipe --bind-ro="$tmp/deb:/mnt/deb" \
  --boot </dev/null >"$tmp/nspawn.log" 2>&1 &
nspawn=$!
leader=
# nspawn's first child sets the container up and leaves; its second is the container's
# PID 1, systemd.
until_ok 30 pgrep -x systemd -P "$nspawn" || { cat "$tmp/nspawn.log"; cannot "systemd-nspawn started no systemd"; }
leader=$(pgrep -x systemd -P "$nspawn")
booted() { case $(inside systemctl is-system-running 2>/dev/null) in running | degraded) ;; *) return 1 ;; esac; }
until_ok 90 booted || true
state=$(inside systemctl is-system-running 2>&1 || true)
case $state in
  running | degraded) log "systemd $(inside systemctl --version | head -1 | cut -d' ' -f2) is $state in the container" ;;
  *)
    inside systemctl --failed --no-pager || true
    cat "$tmp/nspawn.log"
    cannot "the container's systemd did not finish booting: '$state'"
    ;;
esac

log "installing the package"
inside dpkg -i /mnt/deb/qiod.deb >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log"; fail "dpkg -i"; }
inside mkdir -p /etc/qiod /etc/systemd/system/qiod.service.d
config() { printf 'servers = ["%s"]\nallowed_groups = ["qiod-clients"]\n' "$1" | inside tee /etc/qiod/config.toml >/dev/null; }
config "$url_a"
printf '[Service]\nWatchdogSec=4s\n' | inside tee /etc/systemd/system/qiod.service.d/test.conf >/dev/null
# A user who is no root but a member of allowed_groups, as in systemd/README.md.
inside groupadd --system qiod-clients
inside useradd --no-create-home --groups qiod-clients bob
bob_connects() {
  inside runuser -u bob -- env QIOD_SOCKET=/run/qiod/qiod.sock qio status >"$tmp/bob" 2>&1 \
    || { cat "$tmp/bob"; fail "bob (in allowed_groups) cannot use the system daemon $*"; }
}
inside systemctl daemon-reload

log "1. socket activation"
inside systemctl enable --now qiod.socket
[ "$(inside systemctl is-active qiod.service || true)" = inactive ] || fail "qiod runs before any client"
inside test -S /run/qiod/qiod.sock || fail "systemd does not listen on /run/qiod/qiod.sock"
inside env QIOD_SOCKET=/run/qiod/qiod.sock qio status >"$tmp/status1" 2>&1 || true
until_ok 20 test "$(inside systemctl is-active qiod.service)" = active || fail "a client did not start qiod"
echo "a client connected; qiod.service is active"

log "2. the upstream state on systemctl status"
status_has() { inside systemctl status --no-pager qiod.service | grep -q "Status: \"open $1\""; }
until_ok 20 status_has "$url_a" || { inside systemctl status --no-pager qiod.service; fail "no 'open $url_a' status line"; }
inside systemctl status --no-pager qiod.service | grep 'Status:'
inside env QIOD_SOCKET=/run/qiod/qiod.sock qio send --wait /clienttest/echo '"through systemd"' \
  | grep -qx '{"code":200,"data":"through systemd"}' || fail "qio send --wait through the activated daemon"
bob_connects "once it runs"
echo "bob, a member of allowed_groups, connects: $(inside ls -ld /run/qiod | cut -d' ' -f1,3)"

log "3. the watchdog restarts a stopped qiod"
pid=$(inside systemctl show -P MainPID qiod.service)
inside sh -c "kill -STOP $pid"
restarted() {
  local now
  now=$(inside systemctl show -P MainPID qiod.service)
  [ "$now" != 0 ] && [ "$now" != "$pid" ] && [ "$(inside systemctl is-active qiod.service)" = active ]
}
until_ok 30 restarted || { inside systemctl status --no-pager qiod.service; fail "qiod was not restarted"; }
inside journalctl --no-pager -u qiod.service | grep -q 'Watchdog timeout' || fail "the journal does not say the watchdog fired"
inside journalctl --no-pager -u qiod.service | grep -E 'Watchdog timeout|Scheduled restart' | tail -2
echo "stopped pid $pid, now pid $(inside systemctl show -P MainPID qiod.service) (restarts: $(inside systemctl show -P NRestarts qiod.service))"
until_ok 20 status_has "$url_a" || fail "no 'open' after the restart"
bob_connects "after a restart"

log "4. systemctl reload applies a config change"
pid=$(inside systemctl show -P MainPID qiod.service)
config "$url_b"
inside systemctl reload qiod.service || fail "systemctl reload qiod"
until_ok 20 status_has "$url_b" || { inside systemctl status --no-pager qiod.service; fail "reload did not move qiod to $url_b"; }
[ "$(inside systemctl show -P MainPID qiod.service)" = "$pid" ] || fail "reload restarted qiod"
inside systemctl status --no-pager qiod.service | grep 'Status:'

log "5. the user units with systemctl --user"
inside useradd --create-home --shell /bin/sh alice
uid=$(inside id -u alice)
inside runuser -u alice -- mkdir -p /home/alice/.config/qiod
printf 'servers = ["%s"]\n' "$url_a" | inside runuser -u alice -- tee /home/alice/.config/qiod/config.toml >/dev/null
inside loginctl enable-linger alice
until_ok 30 inside test -S "/run/user/$uid/systemd/private" || fail "alice's user manager did not start"
user() { inside runuser -u alice -- env XDG_RUNTIME_DIR="/run/user/$uid" "$@"; }
user systemctl --user enable --now qiod.socket
[ "$(user systemctl --user is-active qiod.service || true)" = inactive ] || fail "alice's qiod runs before any client"
user qio status >"$tmp/status5" 2>&1 || true
until_ok 20 test "$(user systemctl --user is-active qiod.service)" = active || {
  user systemctl --user status --no-pager qiod.service || true
  fail "a client of alice did not start her qiod"
}
user_open() { user systemctl --user status --no-pager qiod.service | grep -q "Status: \"open $url_a\""; }
until_ok 20 user_open || { user systemctl --user status --no-pager qiod.service; fail "alice's qiod is not open"; }
user systemctl --user status --no-pager qiod.service | grep 'Status:'
user qio send --wait /clienttest/echo 1 | grep -qx '{"code":200,"data":1}' || fail "alice's qio send --wait"

log "removing the package"
inside dpkg -r qiod >/dev/null
inside test ! -e /usr/bin/qiod || fail "dpkg -r left /usr/bin/qiod"
inside test ! -e /run/qiod || fail "dpkg -r left /run/qiod"
inside test ! -L /etc/systemd/system/sockets.target.wants/qiod.socket || fail "dpkg -r left the unit enabled"
[ "$(inside systemctl is-active qiod.socket qiod.service | sort -u)" = inactive ] || fail "qiod still runs after dpkg -r"
echo "real systemd test: all checks passed"

#!/usr/bin/env bash
# Checks the unit files with `systemd-analyze verify`, loaded as a user manager and as the
# system manager would load them. Any complaint about them fails the check: verify itself
# exits 0 on unknown keys and unparsable values, and only prints them.
#
# Usage: systemd/verify.sh [QIOD_BINARY]   (default: target/debug/qiod, built beforehand)
# verify insists that ExecStart= names an existing program, so the checked copies point at
# QIOD_BINARY instead of the install paths.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/qiod}")
[ -x "$bin" ] || { echo "verify.sh: $bin is not an executable; build qiod first" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/user" "$tmp/system" "$tmp/run"
chmod 700 "$tmp/run"

check() { # check <user|system> <unit files...>
  local kind=$1 out status=0
  shift
  local units=()
  for f in "$@"; do
    sed "s|^ExecStart=[^ ]*|ExecStart=$bin|" "$f" >"$tmp/$kind/${f##*/}"
    units+=("$tmp/$kind/${f##*/}")
  done
  local flags=(--man=no)
  # A user manager needs a runtime directory, which CI's root shell does not have.
  [ "$kind" = user ] && flags+=(--user)
  out=$(XDG_RUNTIME_DIR="$tmp/run" systemd-analyze "${flags[@]}" verify "${units[@]}" 2>&1) || status=$?
  if [ "$status" -ne 0 ] || grep -qE 'qiod\.(service|socket)' <<<"$out"; then
    echo "$kind units: systemd-analyze verify failed:"
    echo "$out"
    return 1
  fi
  echo "$kind units: ok ($*)"
}

check user systemd/qiod.service systemd/qiod.socket
check system systemd/system/qiod.service systemd/system/qiod.socket

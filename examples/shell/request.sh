#!/usr/bin/env bash
# Sends one request to qiod and prints the reply line; exits 0 iff its code is 200.
#
#   bash request.sh /clienttest/echo '"hi"'
#
# JSON is the request's data (default: null). Needs socat. The daemon must be
# connected upstream: a request sent while it is offline fails at once (code -1).
set -eu
# shellcheck source-path=SCRIPTDIR source=qiod.sh
. "$(dirname "$0")/qiod.sh"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: request.sh PATH [JSON]" >&2
  exit 2
fi
path=$(qiod_clean_path "$1")
data=$(printf '%s' "${2:-null}" | tr '\n' ' ') # one request, one line
sock=$(qiod_socket)
if [ ! -S "$sock" ]; then
  echo "${0##*/}: no qiod socket at $sock (is qiod running? set QIOD_SOCKET)" >&2
  exit 1
fi

# socat sends the line, then waits for the daemon, which closes the connection
# once it has replied (at the latest after its request timeout, 30 s by default);
# $QIOD_WAIT bounds the wait (seconds, default 35).
# The first line from the daemon is its state (/open or /close); keep the reply.
# Matching text relies on qiod writing "id" then "code" first, which PROTOCOL.md
# does not promise (field order means nothing there): real programs parse JSON.
if ! reply=$(printf '{"op":"send","path":"%s","data":%s,"id":1}\n' "$path" "$data" |
  socat -t "${QIOD_WAIT:-35}" - UNIX-CONNECT:"$sock" |
  grep -m 1 '^{"id":1,'); then
  echo "request.sh: no reply from qiod at $sock" >&2
  exit 1
fi
printf '%s\n' "$reply"
case $reply in
  '{"id":1,"code":200,'*) exit 0 ;;
  *) exit 1 ;;
esac

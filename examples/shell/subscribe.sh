#!/usr/bin/env bash
# Subscribes to PATH and prints its events, one JSON line each, until
# interrupted, or until COUNT events (second argument or $COUNT).
#
#   bash subscribe.sh /clienttest/broadcast 3
#
# Connection events (/open, /close, /lost, /error) go to stderr. Needs socat.
set -eu
# shellcheck source-path=SCRIPTDIR source=qiod.sh
. "$(dirname "$0")/qiod.sh"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: subscribe.sh PATH [COUNT]" >&2
  exit 2
fi
path=$(qiod_clean_path "$1")
count=${2:-${COUNT:-0}} # 0: no limit
case $count in
  '' | *[!0-9]*)
    echo "subscribe.sh: COUNT must be a number, not '$count'" >&2
    exit 2
    ;;
esac
sock=$(qiod_socket)
if [ ! -S "$sock" ]; then
  echo "${0##*/}: no qiod socket at $sock (is qiod running? set QIOD_SOCKET)" >&2
  exit 1
fi

# socat runs beside the script: we write requests to its stdin and read its
# stdout. Holding its stdin open keeps the connection (and so the subscription).
coproc QIOD { exec socat - UNIX-CONNECT:"$sock"; }
exec 3<&"${QIOD[0]}" 4>&"${QIOD[1]}"
trap 'kill "$QIOD_PID" 2>/dev/null || true' EXIT

printf '{"op":"on","path":"%s","id":"on"}\n' "$path" >&4
seen=0
# As in request.sh, the patterns rely on the order qiod writes fields in
# ("event" or "id" first); a program that must not depend on it parses JSON.
while IFS= read -r line <&3; do
  case $line in
    '{"event":"'"$path"'",'* | '{"event":"'"$path"'"}')
      printf '%s\n' "$line"
      seen=$((seen + 1))
      if [ "$seen" -eq "$count" ]; then
        exit 0
      fi
      ;;
    '{"id":"on","code":200,'*) echo "subscribed to $path" >&2 ;;
    '{"id":"on","code":202,'*) echo "subscribed to $path; qiod is not connected to its server yet, events follow once it is" >&2 ;;
    '{"id":"on",'*)
      echo "subscribing to $path failed: $line" >&2
      exit 1
      ;;
    *) printf '%s\n' "$line" >&2 ;; # connection events
  esac
done
echo "subscribe.sh: qiod closed the connection" >&2
exit 1

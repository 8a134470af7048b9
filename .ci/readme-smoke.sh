#!/usr/bin/env bash
# Runs README.md's "Try it" commands for real: test server, daemon, one request over the
# socket with socat, and checks the answer.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

cargo build --locked -p qio-testserver -p qiod --bins
target/debug/qio-testserver >"$tmp/server.out" &
pids+=($!)
for _ in $(seq 100); do [ -s "$tmp/server.out" ] && break; sleep 0.1; done
url=$(head -n1 "$tmp/server.out" | sed 's/^listening on //')
echo "test server: $url"

target/debug/qiod --server "$url" --socket "$tmp/qiod.sock" 2>"$tmp/qiod.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$tmp/qiod.sock" ] && break; sleep 0.1; done

answer=$(printf '%s\n' '{"op":"send","path":"/clienttest/echo","data":"hi","id":1}' \
  | socat -t 2 - "UNIX-CONNECT:$tmp/qiod.sock")
echo "$answer"
if ! grep -q '"id":1,"code":200,"data":"hi"' <<<"$answer"; then
  echo "README smoke test failed: no echo answer"; cat "$tmp/qiod.log"; exit 1
fi
echo "README smoke test: ok"

#!/usr/bin/env bash
# Runs README.md's commands for real (all but the systemd ones, which need a running
# systemd; .ci/run checks the units with systemd-analyze instead), and checks their output.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
fail() { echo "README smoke test failed: $*"; for f in "$tmp"/*.log; do echo "--- $f"; cat "$f"; done; exit 1; }
wait_socket() { for _ in $(seq 1200); do [ -S "$1" ] && return 0; sleep 0.05; done; fail "no socket at $1"; }

# README's one build. Every later command names a binary, not a package, so cargo resolves
# features for the whole workspace each time and must find everything built already:
# a `Compiling` line from the client's first run means README's promise is broken.
cargo build -q --locked --bin qiod-demo --bin qio
cargo run --locked --bin qio -- --help >/dev/null 2>"$tmp/first-qio.log" || fail "qio --help"
if grep -q Compiling "$tmp/first-qio.log"; then
  fail "README's second command compiled again: $(grep Compiling "$tmp/first-qio.log" | tr '\n' ' ')"
fi
cargo build -q --locked --bin qio-testserver --bin qiod
qio() { cargo run -q --locked --bin qio -- "$@"; }

echo "== the demo"
sock="$tmp/qiod-demo.sock"
cargo run -q --locked --bin qiod-demo -- --socket "$sock" >"$tmp/demo.log" 2>&1 &
pids+=($!)
wait_socket "$sock"
ticks=$(qio --socket "$sock" sub /demo/tick --count 2)
echo "$ticks"
[ "$(grep -c '"event":"/demo/tick"' <<<"$ticks")" = 2 ] || fail "qio sub printed no ticks"
answer=$(qio --socket "$sock" send --wait /clienttest/echo '"hi"')
echo "$answer"
[ "$answer" = '{"code":200,"data":"hi"}' ] || fail "qio send --wait"
qio --socket "$sock" status | tee "$tmp/status.out"
grep -q "open" "$tmp/status.out" || fail "qio status does not say open"
answered=$(QIOD_SOCKET="$sock" timeout 20 python3 examples/python/answer_requests.py /demo/question --count 1) \
  || fail "answer_requests.py against the demo"
echo "$answered"
grep -q '"event": *"/demo/question"' <<<"$answered" || fail "answer_requests.py answered no demo question"
lines=$(printf '%s\n' '{"op":"on","path":"/demo/tick","id":1}' | socat -t 2 - "UNIX-CONNECT:$sock")
echo "$lines"
grep -q '"id":1,"code":200' <<<"$lines" || fail "socat on /demo/tick"

echo "== qiod against the stand-alone test server"
cargo run -q --locked --bin qio-testserver >"$tmp/server.out" 2>"$tmp/server.log" &
pids+=($!)
for _ in $(seq 1200); do [ -s "$tmp/server.out" ] && break; sleep 0.05; done
[ -s "$tmp/server.out" ] || fail "the test server printed no address"
url=$(head -n1 "$tmp/server.out" | sed 's/^listening on //')
echo "test server: $url"
cargo run -q --locked --bin qiod -- --server "$url" --socket "$tmp/qiod.sock" 2>"$tmp/qiod.log" &
pids+=($!)
wait_socket "$tmp/qiod.sock"
# A request sent before the upstream is open gets -1 at once (PROTOCOL.md): wait for it.
for _ in $(seq 1200); do
  qio --socket "$tmp/qiod.sock" status --json | grep -q '"state":"open"' && break; sleep 0.05
done
answer=$(printf '%s\n' '{"op":"send","path":"/clienttest/echo","data":"hi","id":1}' \
  | socat -t 2 - "UNIX-CONNECT:$tmp/qiod.sock")
echo "$answer"
grep -q '"id":1,"code":200,"data":"hi"' <<<"$answer" || fail "no echo answer"

echo "== install"
export CARGO_TARGET_DIR="$PWD/target"
cargo install -q --locked --path daemon --root "$tmp/root"
cargo install -q --locked --path client-shim --root "$tmp/root"
"$tmp/root/bin/qiod" --help >/dev/null || fail "installed qiod"
"$tmp/root/bin/qio" --help >/dev/null || fail "installed qio"

echo "README smoke test: ok"

#!/usr/bin/env bash
# Installs the package on this machine with dpkg -i, runs the installed binaries, removes
# it with dpkg -r, and checks that nothing is left behind: every file the package holds is
# gone, and the file systems it touches list the same files as before.
#
# Usage (as root): dist/deb-install-test.sh target/deb/qiod_VERSION_ARCH.deb
set -euo pipefail
deb=$(realpath "$1")
[ "$(id -u)" = 0 ] || { echo "deb-install-test.sh: needs root (dpkg -i)" >&2; exit 1; }
if dpkg-query -W -f '${Status}' qiod 2>/dev/null | grep -q installed; then
  echo "deb-install-test.sh: qiod is installed already; remove it first (dpkg -r qiod)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "Debian package test failed: $*" >&2; exit 1; }
# What dpkg and man-db keep for themselves (its database, man's index) is not ours.
snapshot() {
  find /etc /usr /lib /opt /var/lib/systemd -xdev 2>/dev/null | grep -v '^/etc/ld.so.cache$' | sort
}

snapshot >"$tmp/before"
dpkg-deb -c "$deb" | awk '{print $NF}' | sed 's|^\./|/|; s|/$||' | grep -v '^/\?$' >"$tmp/files"
dpkg -i "$deb"
[ "$(dpkg-query -W -f '${Status}' qiod)" = "install ok installed" ] || fail "dpkg does not list qiod as installed"
/usr/bin/qiod --version | grep -qx "qiod $(dpkg-query -W -f '${Version}' qiod)" || fail "qiod --version"
/usr/bin/qio --help | grep -q "Exit codes:" || fail "qio --help"
/usr/bin/qiod --help | grep -q "Servers and dialect:" || fail "qiod --help"
for f in /lib/systemd/system/qiod.socket /usr/lib/systemd/user/qiod.service \
  /usr/share/man/man1/qiod.1.gz /usr/share/man/man1/qio-sub.1.gz \
  /usr/share/bash-completion/completions/qio /usr/share/doc/qiod/examples/config.toml; do
  [ -f "$f" ] || fail "$f is not installed"
done
grep -qx 'ExecStart=/usr/bin/qiod' /lib/systemd/system/qiod.service || fail "system unit's ExecStart"
grep -qx 'ExecStart=/usr/bin/qiod' /usr/lib/systemd/user/qiod.service || fail "user unit's ExecStart"
echo "installed: $(/usr/bin/qiod --version), $(du -k /usr/bin/qiod | cut -f1) KiB; qio $(du -k /usr/bin/qio | cut -f1) KiB"

dpkg -r qiod
# Not even in dpkg's database (a package with conffiles or a postrm would stay there as
# "config-files" until a purge).
if status=$(dpkg-query -W -f '${Status}' qiod 2>/dev/null) && [ "$status" != "unknown ok not-installed" ]; then
  fail "dpkg still lists qiod: $status"
fi
ls /var/lib/dpkg/info/qiod.* >/dev/null 2>&1 && fail "dpkg keeps $(ls /var/lib/dpkg/info/qiod.*)"
left=0
while read -r f; do
  case $f in /lib|/usr|/usr/*/|/lib/systemd|/usr/lib|/usr/share|/usr/bin) continue ;; esac
  if [ -f "$f" ] || [ -L "$f" ]; then echo "left behind: $f"; left=1; fi
done <"$tmp/files"
snapshot >"$tmp/after"
if ! diff "$tmp/before" "$tmp/after" >"$tmp/diff"; then
  echo "the file systems changed:"; cat "$tmp/diff"; left=1
fi
[ "$left" = 0 ] || fail "dpkg -r left files behind"
echo "removed: nothing left behind"

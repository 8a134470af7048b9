# shellcheck shell=bash
# Helpers sourced by the other scripts here (not run on its own).

# Prints where the daemon listens, computed exactly as the daemon computes it:
# $QIOD_SOCKET; else $XDG_RUNTIME_DIR/qiod/qiod.sock when that is an absolute
# path; else /run/qiod/qiod.sock for root; else /tmp/qiod-<uid>/qiod.sock.
qiod_socket() {
  if [ -n "${QIOD_SOCKET:-}" ]; then
    printf '%s\n' "$QIOD_SOCKET"
    return
  fi
  case ${XDG_RUNTIME_DIR:-} in
    /*)
      printf '%s\n' "${XDG_RUNTIME_DIR%/}/qiod/qiod.sock"
      return
      ;;
  esac
  uid=$(id -u)
  if [ "$uid" -eq 0 ]; then
    printf '%s\n' /run/qiod/qiod.sock
  else
    printf '%s\n' "/tmp/qiod-$uid/qiod.sock"
  fi
}

# Prints PATH as the daemon writes it in events: only A-Z a-z 0-9 _ - /, one
# leading /, no empty segment, no trailing /. What is left needs no JSON escaping.
qiod_clean_path() {
  clean=$(printf '%s' "$1" | LC_ALL=C tr -cd 'A-Za-z0-9_/-' | tr -s '/')
  clean=/${clean#/}
  [ "$clean" = / ] || clean=${clean%/}
  printf '%s\n' "$clean"
}

"""A small client for qiod, the daemon that shares one Quick.IO connection.

Standard library only (Python 3.8+), no threads: one Unix socket, one JSON object
per line each way (see ipc-proto/PROTOCOL.md). Every line the daemon sends is
either a reply (it has the "id" of a request) or an event (it has "event").

    from qio import QioClient

    with QioClient() as qio:
        qio.wait_open()
        print(qio.send("/clienttest/echo", "hi"))   # {'id': 1, 'code': 200, ...}
        qio.on("/news")
        for ev in qio.events():
            print(ev["event"], ev.get("data"))

Run it as a script for a quick check: `python3 qio.py [PATH [JSON]]` prints the
daemon's status, or the reply to one request.

Before sending anything, the client checks that the daemon is really qiod run by
someone it trusts (as qio and qio-client do; see PROTOCOL.md, Transport): the
socket's folder must not be a symlink, must belong to you, root or the daemon's
user, and must not be writable by group or others; the process listening must run
as you, root or the daemon's user (SO_PEERCRED, Linux). The daemon's user, for the
system service, is `daemon_user="qiod"` or QIOD_DAEMON_USER=qiod. A failed check
raises QioTrustError (a ConnectionError) naming what was found and expected.
"""

import json
import os
import re
import socket
import stat
import struct
import sys
import time
from collections import deque

__all__ = [
    "QioClient",
    "QioError",
    "QioTrustError",
    "clean_path",
    "compact",
    "default_socket_path",
]

DAEMON_USER_ENV = "QIOD_DAEMON_USER"


def default_socket_path():
    """Where the daemon listens, computed exactly as the daemon computes it."""
    path = os.environ.get("QIOD_SOCKET")
    if path:
        return path
    # The XDG spec says to ignore a relative runtime dir.
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "qiod", "qiod.sock")
    uid = os.getuid()
    return "/run/qiod/qiod.sock" if uid == 0 else "/tmp/qiod-%d/qiod.sock" % uid


def clean_path(path):
    """A path as the daemon writes it in events: only A-Z a-z 0-9 _ - /, starting
    with one "/", no empty segment, no trailing "/". ("news/" becomes "/news".)"""
    kept = re.sub(r"[^A-Za-z0-9_/-]", "", path)
    return "/" + "/".join(part for part in kept.split("/") if part)


def compact(msg):
    """One JSON line, without spaces, as the daemon writes them."""
    return json.dumps(msg, separators=(",", ":"))


class QioError(Exception):
    """A request the daemon or the server refused; carries the reply's code."""

    def __init__(self, reply):
        self.reply = reply
        self.code = reply.get("code")
        super().__init__("code %s: %s" % (self.code, reply.get("err_msg", "")))


class QioTrustError(ConnectionError):
    """The socket's folder, or the process listening on the socket, is not trusted:
    it could be another user's stand-in for qiod. Nothing was sent to it."""


class Trusted(set):
    """The uids trusted behind a socket; `unresolved` is a daemon user name that names
    no user now (a systemd dynamic user exists only while its service runs)."""

    unresolved = None


def _describe(uids):
    named = ["uid %d" % u for u in sorted(uids) if u != 0]
    if 0 in uids:
        named.append("root")
    text = " or ".join(named)
    if getattr(uids, "unresolved", None):
        text += (
            " (%s=%s names no user now; a systemd dynamic user exists only while its "
            "service runs)" % (DAEMON_USER_ENV, uids.unresolved)
        )
    return text


def trusted_uids(daemon_user=None):
    """You, root, and the daemon's user (`daemon_user`, else QIOD_DAEMON_USER): a
    user name or a numeric uid. A name that names no user now adds nothing."""
    uids = Trusted({os.getuid(), 0})
    name = daemon_user if daemon_user is not None else os.environ.get(DAEMON_USER_ENV, "")
    name = str(name).strip()
    if name:
        if name.isdigit():
            uids.add(int(name))
        else:
            import pwd

            try:
                uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                uids.unresolved = name
    return uids


def _parts(path):
    return [p for p in path.split("/") if p and p != "."]


def check_folder(socket_path, trusted):
    """Walks the socket's folder from / as qiod does: no symlink is followed unless a
    trusted uid owns it; every folder must belong to a trusted uid and must not be
    writable by group or others (sticky is fine above, as /tmp is, but not for the
    socket's own folder). Raises QioTrustError, or FileNotFoundError when missing."""
    folder = os.path.dirname(socket_path) or "."
    if not folder.startswith("/"):
        folder = os.path.join(os.getcwd(), folder)
    todo = list(reversed(_parts(folder)))
    stack = ["/"]
    _check_level("/", os.lstat("/"), not todo, trusted)
    links = 0
    while todo:
        name = todo.pop()
        if name == "..":
            if len(stack) > 1:
                stack.pop()
            continue
        last = not todo
        path = os.path.join(stack[-1], name)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if last:
                raise QioTrustError(
                    "the socket's folder %s is a symlink, which could be pointed "
                    "elsewhere; use the real folder" % path
                )
            _check_owner(path, st, trusted)
            links += 1
            if links > 40:
                raise QioTrustError("too many symlinks on the way to %s" % folder)
            target = os.readlink(path)
            if target.startswith("/"):
                stack = ["/"]
            todo.extend(reversed(_parts(target)))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise QioTrustError("%s is not a directory" % path)
        _check_level(path, st, last, trusted)
        stack.append(path)


def _check_owner(path, st, trusted):
    if st.st_uid not in trusted:
        raise QioTrustError(
            "%s belongs to uid %d, expected %s: another user could replace the "
            "socket; remove it or use a socket in a folder of your own"
            % (path, st.st_uid, _describe(trusted))
        )


def _check_level(path, st, last, trusted):
    _check_owner(path, st, trusted)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and (last or not mode & stat.S_ISVTX):
        raise QioTrustError(
            "%s is writable by %s (mode %04o), so another user could %s; use a "
            "private folder (e.g. /tmp/qiod-<uid>/, created 0700)"
            % (
                path,
                "others" if mode & 0o002 else "its group",
                mode,
                "take the socket's path" if last else "replace what is in it",
            )
        )


def check_peer(sock, socket_path, trusted):
    """The process listening on the connected `sock` must run as a trusted uid."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in trusted:
        raise QioTrustError(
            "the process listening on %s runs as uid %d (pid %d), expected %s: it is "
            "not your qiod; if it is a system daemon you mean to use, set %s to its "
            "user" % (socket_path, uid, pid, _describe(trusted), DAEMON_USER_ENV)
        )


class QioClient:
    """One connection to qiod.

    Replies are matched to requests by id; events that arrive while a method waits
    for its reply are kept, in order, for `events()`. Connection events ("/open",
    "/close", "/error", "/lost") are events like the others.
    """

    def __init__(self, socket_path=None, timeout=None, daemon_user=None):
        """Connects, and checks the daemon (see the module's doc) before anything is
        sent. `timeout` (seconds) bounds each wait for a line; None: no bound.
        `daemon_user`: the user qiod runs as when it is not you (else
        QIOD_DAEMON_USER)."""
        self.socket_path = socket_path or default_socket_path()
        self.state = None  # "open" or "closed": the daemon's /open and /close events
        trusted = trusted_uids(daemon_user)
        try:
            check_folder(self.socket_path, trusted)
        except QioTrustError as e:
            raise QioTrustError("refusing to use qiod on %s: %s" % (self.socket_path, e)) from None
        except OSError as e:
            msg = "cannot connect to qiod at %s: %s (is it running? set QIOD_SOCKET)"
            raise ConnectionError(msg % (self.socket_path, e.strerror or e)) from e
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.socket_path)
            check_peer(self._sock, self.socket_path, trusted)
        except QioTrustError as e:
            self._sock.close()
            raise QioTrustError("refusing to use qiod on %s: %s" % (self.socket_path, e)) from None
        except OSError as e:
            self._sock.close()
            msg = "cannot connect to qiod at %s: %s (is it running? set QIOD_SOCKET)"
            raise ConnectionError(msg % (self.socket_path, e.strerror or e)) from e
        self._buf = bytearray()
        self._events = deque()
        self._last_id = 0

    def close(self):
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Requests that wait for their reply.

    def send(self, path, data=None):
        """Sends an event upstream and returns the server's reply as a dict.

        The reply's "code" says how it went (200 is success; negative codes are the
        daemon's: -1 disconnected, -2 timeout, -3 overloaded). When the server asks
        for an answer back, the reply has a "cb" to pass to `answer`.
        """
        return self._call({"op": "send", "path": path, "data": data})

    def on(self, path, data=None):
        """Subscribes to a path; raises QioError when refused.

        A reply with code 202 means qiod is not connected to its server yet: the
        subscription is held and made when it connects, so events follow then.
        """
        reply = self._call({"op": "on", "path": path, "data": data})
        if reply.get("code") == 202:
            return reply
        return self._check(reply)

    def off(self, path):
        """Unsubscribes from a path."""
        return self._check(self._call({"op": "off", "path": path}))

    def status(self):
        """The daemon's state: connection, subscriptions, counters."""
        return self._check(self._call({"op": "status"}))["data"]

    # Fire and forget: no id, so no reply; a failure arrives as an "/error" event.

    def emit(self, path, data=None):
        """Sends an event upstream without waiting (queued while offline)."""
        self._write({"op": "send", "path": path, "data": data})

    def answer(self, cb, data=None):
        """Answers a callback the server asked for (an event's or reply's "cb")."""
        self._write({"op": "callback", "cb": cb, "data": data})

    # Reading.

    def events(self):
        """Yields every event, as a dict, forever (until the daemon hangs up)."""
        while True:
            while self._events:
                yield self._events.popleft()
            msg = self._read()
            if "event" in msg:
                yield msg
            # A reply nobody waits for (there are none with this class) is dropped.

    def wait_open(self, timeout=10.0):
        """Waits until the upstream connection is open; False if it was not in time.

        Requests sent while the daemon is offline fail at once with code -1, so a
        short-lived program waits for this first.
        """
        deadline = time.monotonic() + timeout
        saved = self._sock.gettimeout()
        try:
            while self.state != "open":
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._sock.settimeout(left if saved is None else min(left, saved))
                try:
                    self._events.append(self._read())
                except socket.timeout:
                    return False
        finally:
            self._sock.settimeout(saved)
        return True

    # The line protocol.

    def _call(self, request):
        self._last_id += 1
        request["id"] = self._last_id
        self._write(request)
        while True:
            msg = self._read()
            if msg.get("id") == request["id"] and "event" not in msg:
                return msg
            self._events.append(msg)  # an event that came first: keep it for events()

    @staticmethod
    def _check(reply):
        if reply.get("code") != 200:
            raise QioError(reply)
        return reply

    def _write(self, request):
        # Fields left out are the same as null to the daemon; leave them out.
        request = {k: v for k, v in request.items() if v is not None}
        self._sock.sendall((compact(request) + "\n").encode())

    def _read(self):
        """The next line from the daemon, parsed."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                break
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("qiod closed the connection")
            self._buf += chunk
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        msg = json.loads(line)
        if msg.get("event") == "/open":
            self.state = "open"
        elif msg.get("event") == "/close":
            self.state = "closed"
        return msg


if __name__ == "__main__":
    with QioClient() as qio:
        if not qio.wait_open():
            sys.exit("qiod is not connected upstream")
        if len(sys.argv) > 1:
            data = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
            print(compact(qio.send(sys.argv[1], data)))
        else:
            print(json.dumps(qio.status(), indent=2))

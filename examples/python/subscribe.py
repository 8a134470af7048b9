#!/usr/bin/env python3
"""Subscribes to PATH and prints each of its events as one JSON line.

    python3 subscribe.py /clienttest/broadcast --count 3

Connection events (/open, /close, /lost, /error) go to stderr. Stops after
--count events, or on Ctrl-C.
"""

import argparse
import sys

from qio import QioClient, QioError, clean_path, compact


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the path to subscribe to, e.g. /news")
    parser.add_argument("--count", type=int, help="stop after this many events")
    args = parser.parse_args()
    path = clean_path(args.path)  # events name the path in this form

    with QioClient() as qio:
        # An "on" sent while the daemon is not connected is answered 202 and held:
        # the daemon makes it when it connects, and restores it after reconnects,
        # so there is no need to wait for /open first.
        try:
            reply = qio.on(path)
        except QioError as e:
            sys.exit("subscribing to %s failed: %s" % (path, e))
        if reply.get("code") == 202:
            print("subscribed to %s; qiod is not connected to its server yet, events "
                  "follow once it is" % path, file=sys.stderr, flush=True)
        else:
            print("subscribed to %s" % path, file=sys.stderr, flush=True)

        seen = 0
        for ev in qio.events():
            if ev["event"] != path:
                print(compact(ev), file=sys.stderr, flush=True)
                continue
            print(compact(ev), flush=True)
            seen += 1
            if seen == args.count:
                break


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:  # no daemon, or it went away
        sys.exit(str(e))

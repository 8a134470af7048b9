#!/usr/bin/env python3
"""Subscribes to PATH and answers every server request that arrives on it.

    python3 answer_requests.py /questions --count 1

An event that carries a "cb" is the server asking for an answer; this one answers
{"answered": <the event's data>} and prints the event as one JSON line. Stops
after --count answers, or on Ctrl-C.
"""

import argparse
import sys

from qio import QioClient, QioError, clean_path, compact


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the path to subscribe to")
    parser.add_argument("--count", type=int, help="stop after this many answers")
    args = parser.parse_args()
    path = clean_path(args.path)  # events name the path in this form

    with QioClient() as qio:
        try:
            qio.on(path)
        except QioError as e:
            sys.exit("subscribing to %s failed: %s" % (path, e))
        print("subscribed to %s" % path, file=sys.stderr, flush=True)

        answered = 0
        for ev in qio.events():
            if ev["event"] != path or "cb" not in ev:
                # Connection events, and plain events that ask for nothing.
                print(compact(ev), file=sys.stderr, flush=True)
                continue
            # Fire and forget: if the answer cannot be delivered (the connection
            # that asked is gone), an /error event says so.
            qio.answer(ev["cb"], {"answered": ev.get("data")})
            print(compact(ev), flush=True)
            answered += 1
            if answered == args.count:
                break


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:  # no daemon, or it went away
        sys.exit(str(e))

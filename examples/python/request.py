#!/usr/bin/env python3
"""Sends one request and prints the reply as one JSON line; exits 0 iff code 200.

    python3 request.py /clienttest/echo '"hi"'

JSON is the request's data (default: null).
"""

import argparse
import json
import sys

from qio import QioClient, compact


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the path to send to, e.g. /clienttest/echo")
    parser.add_argument("data", nargs="?", default="null", help="the data, as JSON")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for the daemon to be connected")
    args = parser.parse_args()
    try:
        data = json.loads(args.data)
    except ValueError as e:
        parser.error("data is not JSON: %s" % e)

    with QioClient() as qio:
        # A request made while the daemon is offline fails at once (code -1).
        if not qio.wait_open(args.wait):
            sys.exit("qiod is not connected to its server")
        reply = qio.send(args.path, data)
    print(compact(reply))
    sys.exit(0 if reply["code"] == 200 else 1)


if __name__ == "__main__":
    try:
        main()
    except OSError as e:  # no daemon, or it went away
        sys.exit(str(e))

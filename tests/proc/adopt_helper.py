"""Test helper: spawn a process from a Python process that exits, as an agent restart leaves it.

``reaper`` mode becomes a child subreaper (a stand-in for init), runs
``spawner`` mode as its child, relays the identity line, then reaps orphans
until its stdin closes. ``spawner`` mode spawns the target with
``nkudo.proc.spawn``, prints its identity as JSON and exits.
"""

from __future__ import annotations

import ctypes
import os
import select
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def reaper(args: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    out = subprocess.run([sys.executable, __file__, "spawner", *args], stdout=subprocess.PIPE, check=True)
    sys.stdout.buffer.write(out.stdout)
    sys.stdout.flush()
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.05)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        if ready and not os.read(sys.stdin.fileno(), 4096):
            return 0


def spawner(args: list[str]) -> int:
    from nkudo.proc import spawn

    log, native, marker, *argv = args
    h = spawn(argv, env={"PATH": "/usr/bin:/bin"}, log_path=log, native=native == "1", marker=marker or None)
    print(h.identity.to_json(), flush=True)
    return 0  # exits without stopping the child


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    sys.exit(reaper(rest) if mode == "reaper" else spawner(rest))

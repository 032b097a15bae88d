"""Run a command with CPU hogs beside it: ``make test-stress`` (issue 19).

The suite passed on a quiet machine and failed when the machine was loaded (a CI runner shared
with other jobs, a laptop compiling): assertions that compared two separately read snapshots,
waits sized for an idle CPU. This runs the integration tests the way a busy machine would:
one busy-looping process per core (``--hogs``), at the tests' own priority, for as long as the
command runs; the hogs are stopped however the command ends.

    python -m tests.stress [--hogs N] -- COMMAND [ARGS...]

Exit status: the command's. The hogs' process ids are in ``HOTSITE_STRESS_HOGS`` for the
command (comma-separated), so a test can see they are there.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Sequence


def _burn() -> None:
    """Spin until terminated: one core's worth of competition."""
    n = 0
    while True:
        n = (n * 1103515245 + 12345) & 0x7FFFFFFF


def start_hogs(count: int) -> list[multiprocessing.Process]:
    hogs = [multiprocessing.Process(target=_burn, name=f"cpu hog {i}", daemon=True) for i in range(count)]
    for hog in hogs:
        hog.start()
    return hogs


def stop_hogs(hogs: Sequence[multiprocessing.Process]) -> None:
    for hog in hogs:
        hog.terminate()
    for hog in hogs:
        hog.join(timeout=5)
        if hog.is_alive():
            hog.kill()
            hog.join(timeout=5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stress", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hogs", type=int, default=os.cpu_count() or 1, help="busy processes (default: one a core)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (python -m tests.stress -- COMMAND ...)")
    hogs = start_hogs(max(0, args.hogs))
    started = time.monotonic()
    try:
        env = {**os.environ, "HOTSITE_STRESS_HOGS": ",".join(str(h.pid) for h in hogs)}
        code = subprocess.call(command, env=env)
    except KeyboardInterrupt:
        code = 130
    finally:
        stop_hogs(hogs)
    print(f"tests.stress: {' '.join(command)} exited {code} after {time.monotonic() - started:.0f} s "
          f"beside {len(hogs)} CPU hog(s)", file=sys.stderr)  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())

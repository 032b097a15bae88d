"""A shared routing world for several appliances: a hook command with a fencing rule.

Stands in for what several appliances drive together (a carrier's redirect
API, a shared Kamailio): one JSON file holds the routing in force and the
newest token obeyed. It speaks the hook actuator's contract
(``failover/actuators/hook.py``): ``apply`` with a token older than the
newest obeyed is refused (exit 3, "stale token"), ``--verify`` exits 1 with
the differences. Every request is appended to ``<world>.log`` (one JSON
line: who, action, token, routing, verdict, time), which the multi-site
tests read to prove that no two leaders acted in overlapping windows.

    routing_world.py --world FILE --name APPLIANCE [--verify]   (JSON on stdin)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _log(world: Path, entry: dict[str, Any]) -> None:
    with (world.parent / (world.name + ".log")).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def differences(held: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    if held is None:
        return ["nothing applied yet"]
    keys = ("name", "default_set", "hotlines", "fenced_uris")
    return [f"{k}: {held.get(k)!r}, wanted {wanted.get(k)!r}" for k in keys if held.get(k) != wanted.get(k)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--verify", action="store_true")
    args = ap.parse_args(argv)
    request = json.loads(sys.stdin.read())
    token, routing = int(request["token"]), request["routing"]
    lock = args.world.parent / (args.world.name + ".lock")
    with lock.open("a") as held_lock:
        fcntl.flock(held_lock, fcntl.LOCK_EX)
        state = json.loads(args.world.read_text()) if args.world.exists() else {"token": 0, "routing": None}
        entry = {"by": args.name, "token": token, "routing": routing["name"], "at": time.time()}
        if args.verify:
            diffs = differences(state["routing"], routing)
            print("\n".join(diffs))
            return 1 if diffs else 0
        if token < state["token"]:
            _log(args.world, {**entry, "action": "apply", "verdict": "refused"})
            print(f"stale token {token}: {state['token']} already obeyed", file=sys.stderr)
            return 3
        state = {"token": token, "routing": routing, "by": args.name}
        tmp = args.world.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, args.world)
        _log(args.world, {**entry, "action": "apply", "verdict": "applied"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A shared routing world for several appliances: the reference hook, with a fencing rule.

Stands in for what several appliances drive together (a carrier's redirect
API, a shared Kamailio): one JSON file holds the routing in force and the
newest token obeyed. It is the reference implementation of the hook
protocol (``failover/actuators/HOOKS.md``):

* ``apply`` with a token older than the newest obeyed or fenced is refused
  (exit 3, "stale token") and changes nothing;
* ``--fence`` records the token as the newest obeyed, keeps the routing, and
  is itself refused (exit 3) when a newer token was already obeyed;
* ``--verify`` exits 1 with the differences, 0 when the world matches.

The token check and the write happen under one lock, *after* the work: a
slow apply (``<world>.slow`` holds the seconds it takes, as a slow carrier
API would) checks the token when it commits, so a write that a pause kept in
flight across a takeover is refused if the new leader fenced meanwhile. While
an apply is in flight, ``<world>.inflight`` holds its pid and token (the
tests pause it with SIGSTOP).

Every request is appended to ``<world>.log`` (one JSON line: who, action,
token, routing, verdict, time), which the multi-site tests read to prove
that no two leaders acted in overlapping windows and no stale write landed.

    routing_world.py --world FILE --name APPLIANCE [--verify | --fence]   (JSON on stdin)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR, EXIT_STALE = 0, 1, 2, 3


def _log(world: Path, entry: dict[str, Any]) -> None:
    with (world.parent / (world.name + ".log")).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def differences(held: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    if held is None:
        return ["nothing applied yet"]
    keys = ("name", "default_set", "hotlines", "fenced_uris")
    return [f"{k}: {held.get(k)!r}, wanted {wanted.get(k)!r}" for k in keys if held.get(k) != wanted.get(k)]


def _save(world: Path, state: dict[str, Any]) -> None:
    tmp = world.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, world)


def _slow(world: Path, token: int) -> None:
    """A slow carrier API: the work takes ``<world>.slow`` seconds, before the commit."""
    slow = world.parent / (world.name + ".slow")
    try:
        seconds = float(slow.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return
    inflight = world.parent / (world.name + ".inflight")
    inflight.write_text(json.dumps({"pid": os.getpid(), "token": token}))
    time.sleep(seconds)


def _commit(args: argparse.Namespace, request: dict[str, Any], action: str) -> int:
    token = int(request["token"])
    routing = request.get("routing") or {}
    lock = args.world.parent / (args.world.name + ".lock")
    with lock.open("a") as held_lock:
        fcntl.flock(held_lock, fcntl.LOCK_EX)
        state: dict[str, Any] = (
            json.loads(args.world.read_text()) if args.world.exists() else {"token": 0, "routing": None}
        )
        entry = {"by": args.name, "token": token, "routing": routing.get("name"), "at": time.time()}
        if action == "verify":
            diffs = differences(state["routing"], routing)
            print("\n".join(diffs))
            return EXIT_DIFFERENT if diffs else EXIT_OK
        if token < state["token"]:
            _log(args.world, {**entry, "action": action, "verdict": "refused"})
            print(f"stale token {token}: {state['token']} already obeyed", file=sys.stderr)
            return EXIT_STALE
        if action == "fence":
            state = {**state, "token": token, "fenced_by": args.name}
            verdict = "fenced"
        else:
            state = {"token": token, "routing": routing, "by": args.name}
            verdict = "applied"
        _save(args.world, state)
        _log(args.world, {**entry, "action": action, "verdict": verdict})
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--name", required=True)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--verify", action="store_true")
    mode.add_argument("--fence", action="store_true")
    args = ap.parse_args(argv)
    try:
        request = json.loads(sys.stdin.read())
        int(request["token"])
    except (ValueError, KeyError, TypeError) as exc:
        print(f"bad request on stdin: {exc}", file=sys.stderr)
        return EXIT_ERROR
    action = "verify" if args.verify else "fence" if args.fence else "apply"
    if action == "apply":
        _slow(args.world, int(request["token"]))
    try:
        return _commit(args, request, action)
    finally:
        if action == "apply":
            with contextlib.suppress(FileNotFoundError):
                (args.world.parent / (args.world.name + ".inflight")).unlink()


if __name__ == "__main__":
    sys.exit(main())

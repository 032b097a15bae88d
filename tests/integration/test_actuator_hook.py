"""The hook actuator with real scripts and a real local HTTP receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from failover.actuators.base import ActuatorError, StaleToken
from failover.actuators.hook import HookActuator, sign
from failover.routing import Routing

FAILOVER = Routing("failover", "backup", 2, {"95588": 2, "95566": 3}, frozenset({1}))
NORMAL = Routing("normal", "primary", 1, {"95588": 1}, active_sets=frozenset({1}))

# A hook that keeps the routing it was given in a state file and reads it back on --verify.
REDIRECT = """\
import json, os, sys
state = {state!r}
request = json.load(sys.stdin)
with open(state + ".calls", "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "request": request,
                          "env": {{k: v for k, v in os.environ.items() if k.startswith("HOTSITE_")}}}}) + "\\n")
if "--verify" in sys.argv:
    try:
        held = json.load(open(state))
    except FileNotFoundError:
        print("nothing redirected yet"); sys.exit(1)
    if held != request["routing"]:
        print(f"carrier redirects {{held['name']}}, wanted {{request['routing']['name']}}"); sys.exit(1)
    sys.exit(0)
if os.path.exists(state + ".fail"):
    print("talking to the carrier API", file=sys.stderr)
    print("carrier API says: 503 maintenance window", file=sys.stderr)
    sys.exit(4)
with open(state, "w") as f:
    json.dump(request["routing"], f)
"""


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "hook.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_command_hook_applies_verifies_and_reports_its_failure(tmp_path: Path) -> None:
    state = tmp_path / "carrier.json"
    hook = HookActuator(
        command=script(tmp_path, REDIRECT.format(state=str(state))), timeout_s=10, name="carrier"
    )

    async def go() -> None:
        assert await hook.verify(FAILOVER) == ["nothing redirected yet"]
        await hook.apply(FAILOVER, 3)
        assert await hook.verify(FAILOVER) == []
        assert await hook.verify(NORMAL) == ["carrier redirects failover, wanted normal"]
        (tmp_path / "carrier.json.fail").touch()
        with pytest.raises(ActuatorError, match="exited 4: carrier API says: 503 maintenance window"):
            await hook.apply(NORMAL, 4)
        with pytest.raises(StaleToken):
            await hook.apply(NORMAL, 2)

    asyncio.run(go())
    calls = [json.loads(line) for line in (tmp_path / "carrier.json.calls").read_text().splitlines()]
    apply = next(c for c in calls if c["request"]["action"] == "apply")
    assert apply["request"] == {"action": "apply", "token": 3, "routing": FAILOVER.to_json()}
    assert apply["env"] == {"HOTSITE_ACTION": "apply", "HOTSITE_ROUTING": "failover", "HOTSITE_TOKEN": "3"}
    assert apply["argv"] == []
    verify = next(c for c in calls if c["request"]["action"] == "verify")
    assert verify["argv"] == ["--verify"] and verify["env"]["HOTSITE_ACTION"] == "verify"


def test_verify_exit_other_than_0_or_1_is_an_error_not_a_difference(tmp_path: Path) -> None:
    hook = HookActuator(
        command=script(tmp_path, "import sys\nprint('no credentials', file=sys.stderr)\nsys.exit(2)\n")
    )
    with pytest.raises(ActuatorError, match="--verify exited 2: no credentials"):
        asyncio.run(hook.verify(FAILOVER))
    quiet = HookActuator(command=script(tmp_path, "import sys\nsys.exit(2)\n"), verify=False)
    assert asyncio.run(quiet.verify(FAILOVER)) == []  # declared unverifiable: trusted


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    body = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(60)\n"
    )
    hook = HookActuator(command=script(tmp_path, body), timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ActuatorError, match=r"did not finish within 1s \(process group killed\)"):
        asyncio.run(hook.apply(FAILOVER, 1))
    assert time.monotonic() - started < 4
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            # a zombie of the grandchild (reparented to init) counts as gone
            status = (
                Path(f"/proc/{pid}/stat").read_text().split()[2]
                if Path(f"/proc/{pid}/stat").exists()
                else "X"
            )
            if status == "Z":
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"process {pid} of the hook survived the timeout")


def test_missing_program_is_an_actuator_error(tmp_path: Path) -> None:
    hook = HookActuator(command=[str(tmp_path / "no-such-hook")])
    with pytest.raises(ActuatorError, match="cannot run .*no-such-hook"):
        asyncio.run(hook.apply(FAILOVER, 1))


class Receiver:
    """A carrier's redirect API: checks the signature, keeps what it was told, answers verify."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.requests: list[dict[str, Any]] = []
        self.held: dict[str, Any] | None = None
        self.fenced: int | None = None
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                wanted = "sha256=" + hmac.new(outer.secret, body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(self.headers.get("X-Hotsite-Signature", ""), wanted):
                    return self._answer(401, {"error": "bad signature"})
                request = json.loads(body)
                outer.requests.append({"headers": dict(self.headers), "body": request})
                if outer.status != 200:
                    return self._answer(outer.status, {"error": "nope"})
                if request["action"] == "fence":
                    outer.fenced = request["token"]
                    return self._answer(200, {"ok": True})
                if request["action"] == "verify":
                    held = outer.held
                    diff = [] if held == request["routing"] else [f"redirect is {held and held['name']}"]
                    return self._answer(200, {"differences": diff})
                outer.held = request["routing"]
                return self._answer(200, {"ok": True})

            def _answer(self, code: int, data: dict[str, Any]) -> None:
                raw = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/redirect"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(b"s3cret-shared-with-the-carrier")
    yield r
    r.stop()


def test_webhook_signs_applies_verifies_and_maps_status_codes(tmp_path: Path, receiver: Receiver) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text("s3cret-shared-with-the-carrier\n")
    hook = HookActuator(url=receiver.url, secret_file=secret, timeout_s=3, name="carrier")

    async def go() -> None:
        assert await hook.verify(FAILOVER) == ["redirect is None"]
        await hook.apply(FAILOVER, 7)
        assert await hook.verify(FAILOVER) == []
        assert await hook.verify(NORMAL) == ["redirect is failover"]
        await hook.fence(8)
        assert receiver.fenced == 8 and receiver.held == FAILOVER.to_json()  # a fence moves nothing
        receiver.status = 409
        with pytest.raises(StaleToken, match="HTTP 409"):
            await hook.apply(NORMAL, 8)
        with pytest.raises(StaleToken, match="HTTP 409"):
            await hook.fence(9)
        receiver.status = 500
        with pytest.raises(ActuatorError, match="HTTP 500"):
            await hook.apply(NORMAL, 8)
        receiver.status = 200
        secret.write_text("wrong")
        with pytest.raises(ActuatorError, match="HTTP 401"):
            await hook.apply(NORMAL, 8)
        await hook.close()

    asyncio.run(go())
    first_apply = next(r for r in receiver.requests if r["body"]["action"] == "apply")
    assert first_apply["body"]["routing"] == FAILOVER.to_json()
    assert first_apply["body"]["token"] == 7
    assert first_apply["headers"]["X-Hotsite-Routing"] == "failover"
    assert first_apply["headers"]["X-Hotsite-Token"] == "7"
    fence = next(r for r in receiver.requests if r["body"]["action"] == "fence")
    assert {k: v for k, v in fence["body"].items() if k != "sent_at"} == {"action": "fence", "token": 8}
    assert fence["headers"]["X-Hotsite-Token"] == "8" and "X-Hotsite-Routing" not in fence["headers"]


def test_webhook_unreachable_and_slow_are_actuator_errors(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hook = HookActuator(url=f"http://127.0.0.1:{port}/x", timeout_s=1)
    with pytest.raises(ActuatorError, match="cannot reach"):
        asyncio.run(hook.apply(FAILOVER, 1))

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        slow = HookActuator(url=f"http://127.0.0.1:{silent.getsockname()[1]}/x", timeout_s=0.5)
        with pytest.raises(ActuatorError, match=r"no answer .* within 0.5s"):
            asyncio.run(slow.apply(FAILOVER, 1))


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"action": "apply"}'
    assert sign(b"k", body) == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()


WORLD_HOOK = Path(__file__).resolve().parents[1] / "support" / "routing_world.py"


def world_hook(world: Path, name: str) -> HookActuator:
    return HookActuator(
        command=[sys.executable, str(WORLD_HOOK), "--world", str(world), "--name", name], timeout_s=10
    )


def test_the_reference_hook_refuses_an_in_flight_write_once_a_newer_token_is_fenced(tmp_path: Path) -> None:
    """HOOKS.md's token rule, checked at commit time: a slow apply started before the fence loses."""
    world = tmp_path / "world.json"
    old, new = world_hook(world, "old"), world_hook(world, "new")
    inflight = tmp_path / "world.json.inflight"

    async def go() -> None:
        await old.apply(NORMAL, 5)
        (tmp_path / "world.json.slow").write_text("1.0")
        late = asyncio.create_task(old.apply(FAILOVER, 5))
        while not inflight.exists():
            await asyncio.sleep(0.01)
        (tmp_path / "world.json.slow").unlink()
        await new.fence(6)
        with pytest.raises(StaleToken, match="exited 3: stale token 5: 6 already obeyed"):
            await late
        assert await new.verify(NORMAL) == []  # the fence moved nothing, the late write landed nothing
        with pytest.raises(StaleToken, match="obeyed a newer token: stale token 5: 6 already obeyed"):
            await old.fence(5)
        await new.apply(FAILOVER, 6)
        assert await new.verify(FAILOVER) == []

    asyncio.run(go())
    log = [json.loads(line) for line in (tmp_path / "world.json.log").read_text().splitlines()]
    assert [(e["by"], e["action"], e["token"], e["verdict"]) for e in log] == [
        ("old", "apply", 5, "applied"),
        ("new", "fence", 6, "fenced"),
        ("old", "apply", 5, "refused"),
        ("old", "fence", 5, "refused"),
        ("new", "apply", 6, "applied"),
    ]


def test_fence_argv_stdin_and_environment_and_a_hook_that_cannot_fence(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    body = (
        "import json, os, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'stdin': json.load(sys.stdin),"
        " 'env': {k: v for k, v in os.environ.items() if k.startswith('HOTSITE_')}}) + '\\n')\n"
        "sys.exit(0 if '--fence' in sys.argv else 5)\n"
    )
    hook = HookActuator(command=script(tmp_path, body), timeout_s=10)
    asyncio.run(hook.fence(12))
    call = json.loads(calls.read_text().splitlines()[0])
    assert call == {
        "argv": ["--fence"],
        "stdin": {"action": "fence", "token": 12},
        "env": {"HOTSITE_ACTION": "fence", "HOTSITE_TOKEN": "12"},
    }
    with pytest.raises(StaleToken):  # older than what it was fenced with: never reaches the hook
        asyncio.run(hook.fence(11))
    old_style = HookActuator(
        command=script(tmp_path, "import argparse\nargparse.ArgumentParser().parse_args()\n")
    )
    with pytest.raises(ActuatorError, match=r"--fence exited 2: .*HOOKS.md") as refused:
        asyncio.run(old_style.fence(1))
    assert not isinstance(refused.value, StaleToken)

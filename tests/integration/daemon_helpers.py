"""Start the real daemon as a subprocess and talk to it the way a technician would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HOTSITE = [sys.executable, "-m", "appliance.cli.main"]


def hotsite(
    *args: str, config: Path | None = None, timeout: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [*HOTSITE, *(["--config", str(config)] if config else []), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


class RunningDaemon:
    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [*HOTSITE, "--config", str(config), "run"],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            if hotsite("status", "--json", config=self.config).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{self.log.read_text()}")

    def status(self) -> dict[str, Any]:
        proc = hotsite("status", "--json", config=self.config)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon ignored SIGTERM:\n{self.log.read_text()}") from None
        self._log_file.close()
        return self.proc.returncode


def metrics(listen: str) -> str:
    return httpx.get(f"http://{listen}/metrics", timeout=5).text


def wait_for(
    predicate: Any,
    timeout: float = 15.0,
    interval: float = 0.2,
    what: str = "condition",
    on_fail: Any = lambda: "",
) -> Any:
    """The predicate's first truthy value; on timeout, an AssertionError with ``on_fail()`` (logs)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}\n{on_fail()}")

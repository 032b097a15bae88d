"""Issue 19: ``make demo`` shows the whole mission. Its lab runs in a tmux pane and the test does the
five things the hint line offers, reading the screen after each:

1. cut the primary: calls move to the backup, the on-call phone's page is in the SMS log;
2. reply ``ACK <code>`` by SMS (``hotsite lab sms``): the reply is in the log, the incident acked;
3. heal and fail back: routing returns to the primary, the resolve text goes out;
4. degrade the primary (grey failure): the hotlines move although its SBC answers;
5. partition the primary from the appliance only: no failover (primary_degraded), the witness
   still sees it.

Replication runs throughout (the primary's ``hotsite source`` and CRM writer): at start-up both
streams are on ``top`` caught up; after the cut the CRM database is promoted with its data-loss
window on screen, and the dialplans' link goes down while their lag (their window) grows; after
the failback both follow the primary again.

Every run renders the screen after the cut as an SVG (tmux's ANSI capture through rich) and checks
that it shows that moment. With ``HOTSITE_DEMO_CAPTURE=FILE`` the screen is written to FILE and the
picture beside it as FILE with ``.svg`` (the README's ``docs/demo-screen.txt`` and
``docs/demo-screen.svg`` are made that way).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text

from provisioning.lab.config import ON_CALL
from tests.conftest import free_port
from tests.integration.daemon_helpers import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]
for ok, why in [
    (os.geteuid() == 0, "the namespace lab needs root"),
    (shutil.which("kamailio") is not None, "kamailio is not installed"),
    (shutil.which("sipp") is not None, "sipp (sip-tester) is not installed"),
    (shutil.which("tmux") is not None, "tmux is not installed"),
]:
    if not ok:
        pytestmark.append(pytest.mark.skip(reason=why))

HOTSITE = [sys.executable, "-m", "appliance.cli.main"]
WIDTH, HEIGHT = 200, 70


class Demo:
    """`hotsite lab demo` in a tmux pane, and the commands a viewer types in another terminal."""

    def __init__(self, work: Path) -> None:
        # As short as make demo's /run/hotsite-lab, so the hint lines fit the pane as they do there
        # (the capture then writes the default path back in); lab down removes it.
        self.workdir = Path("/tmp") / f"hsd-{uuid.uuid4().hex[:6]}"
        self.runtime_dir = self.workdir / "run"
        self.tmux = ["tmux", "-S", str(work / "tmux.sock")]
        self.session = f"hotsite-demo-{uuid.uuid4().hex[:8]}"

    def start(self) -> None:
        demo = [*HOTSITE, "lab", "demo", "--workdir", str(self.workdir), "--mode", "netns",
                "--metrics-listen", f"127.0.0.1:{free_port()}"]  # fmt: skip
        env = {"TERM": "xterm-256color", "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
        subprocess.run([*self.tmux, "new-session", "-d", "-s", self.session, "-x", str(WIDTH), "-y", str(HEIGHT),
                        f"cd {shlex.quote(os.getcwd())} && {shlex.join(demo)}; sleep 60"],  # fmt: skip
                       check=True, env=env)  # fmt: skip

    def screen(self, colours: bool = False) -> str:
        """The pane's text; with ``colours``, its ANSI escapes too (``capture-pane -e``)."""
        flags = ["-p", "-e"] if colours else ["-p"]
        proc = subprocess.run(
            [*self.tmux, "capture-pane", *flags, "-t", self.session], capture_output=True, text=True
        )
        return proc.stdout

    def see(self, condition: Callable[[str], bool], what: str, timeout: float = 90) -> str:
        return str(wait_for(lambda: condition(s := self.screen()) and s, timeout=timeout, what=what))

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*HOTSITE, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    def lab(self, *args: str) -> None:
        self.run("lab", args[0], "--workdir", str(self.workdir), *args[1:])

    def api(self, *args: str) -> Any:
        """The daemon's answer as JSON; None while it is not (yet) listening."""
        cmd = [*HOTSITE, *args, "--json", "--runtime-dir", str(self.runtime_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def state(self) -> str:
        status = self.api("status")
        return str(status["failover"]["state"]) if status else "daemon not answering"

    def stop(self) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.session, "C-c"], capture_output=True)
        try:
            wait_for(lambda: "lab down" in self.screen(), timeout=120, what="the demo torn down")
        finally:
            subprocess.run([*self.tmux, "kill-server"], capture_output=True)
            subprocess.run([*HOTSITE, "lab", "down", "--workdir", str(self.workdir)], capture_output=True)
            shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    running = Demo(tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _failover_incident(demo: Demo) -> dict[str, Any] | None:
    listed = demo.api("incidents") or {"active": []}
    return next((i for i in listed["active"] if i["group"] == "failover"), None)


def _steady(demo: Demo) -> None:
    def steady() -> bool:
        status = demo.api("status")
        return (
            bool(status)
            and status["failover"]["state"] == "primary_active"
            and all(s["verdict"] == "up" for s in status["sites"])
        )

    wait_for(steady, timeout=120, what="steady")


def _row(screen: str, stream: str) -> list[str]:
    """The replication table's row of ``stream`` on the screen, split on blanks ([] if absent)."""
    return next((line.split() for line in screen.splitlines() if line.startswith(f"{stream} ")), [])


def _window(screen: str, stream: str) -> float | None:
    """``stream``'s seconds on the data-loss window line (None if not there)."""
    line = next((x for x in screen.splitlines() if x.startswith("data-loss window")), "")
    words = line.replace(",", " ").split()
    if stream not in words or words.index(stream) + 1 >= len(words):
        return None
    value = words[words.index(stream) + 1].removesuffix("s")
    return float(value) if value.replace(".", "", 1).isdigit() else None


def _caught_up(demo: Demo) -> None:
    """Both streams UP on the screen, each within a second or two of the primary."""

    def shown(s: str) -> bool:
        return (
            "data-loss window (a takeover now would lose)" in s
            and all("UP" in _row(s, n) for n in ("crm", "dialplans"))
            and all((w := _window(s, n)) is not None and w < 3 for n in ("crm", "dialplans"))
        )

    demo.see(shown, "replication caught up on top", timeout=60)


def _back_to_primary(demo: Demo) -> None:
    wait_for(lambda: demo.state() == "failback_pending", timeout=120, what="the primary back")
    demo.run("failback", "--yes", "--runtime-dir", str(demo.runtime_dir))
    demo.see(lambda s: "primary_active" in s, "routing back on the screen")


def _as_make_demo_shows_it(demo: Demo, screen: str) -> str:
    """The screen with the default workdir, which the hint line then leaves out."""
    return screen.replace(f" --workdir {demo.workdir}", "").replace(str(demo.workdir), "/run/hotsite-lab")


def _picture(demo: Demo, path: Path) -> Path:
    """The pane, colours and all, as an SVG (the README's picture): rich renders tmux's ANSI capture."""
    ansi = _as_make_demo_shows_it(demo, demo.screen(colours=True)).rstrip()
    console = Console(
        record=True, width=WIDTH, file=io.StringIO(), force_terminal=True, color_system="truecolor"
    )
    console.print(Text.from_ansi(ansi), crop=True, overflow="crop", no_wrap=True)
    console.save_svg(str(path), title="hotsite top: the demo after `hotsite lab impair primary --cut`")
    svg = path.read_text()
    # The picture shows what the test just asserted on the screen: it is the same moment.
    for shown in ("hotsite top", "backup_active", "PROMOTED", "at promotion", ON_CALL):
        assert shown.replace(" ", "&#160;") in svg, f"{shown!r} missing from the SVG"
    return path


def test_the_five_things_the_demo_offers(demo: Demo, tmp_path: Path) -> None:
    first = demo.see(
        lambda s: "SMS (the demo's GSM modem)" in s and "primary" in s, "the demo screen", timeout=180
    )
    for action in ("1 cut", "2 ack", "3 heal", "4 degrade", "5 split"):
        assert action in first, f"the hint line offers {action!r}"
    _steady(demo)
    _caught_up(demo)
    replication = demo.run("--runtime-dir", str(demo.runtime_dir), "replication", "status", "--json")
    streams = {s["name"]: s for s in json.loads(replication.stdout)["streams"]}
    assert streams["crm"]["transactions"] > 0, "the writer's commits reach the backup"

    # 1. Cut: calls move to the backup; the on-call phone is paged (the SMS log on screen).
    demo.lab("impair", "primary", "--cut")
    after_cut = demo.see(
        lambda s: "backup_active" in s and f"out  {ON_CALL}" in s and "at promotion" in s,
        "failover, the page and the promotion's data-loss window",
    )
    assert "PROMOTED" in _row(after_cut, "crm")
    promoted = _window(after_cut, "crm")
    assert promoted is not None and promoted < 10, after_cut  # the cut's seconds before the promotion
    picture = _picture(demo, tmp_path / "demo-screen.svg")
    if capture := os.environ.get("HOTSITE_DEMO_CAPTURE"):
        shown = _as_make_demo_shows_it(demo, after_cut)
        Path(capture).write_text("\n".join(line.rstrip() for line in shown.rstrip().splitlines()) + "\n")
        shutil.copyfile(picture, Path(capture).with_suffix(".svg"))

    # The dialplans are not promoted: their link goes down and their window keeps growing.
    down = demo.see(lambda s: "DOWN" in _row(s, "dialplans"), "the dialplans' link down", timeout=60)
    before = _window(down, "dialplans")
    assert before is not None
    demo.see(lambda s: (w := _window(s, "dialplans")) is not None and w >= before + 2, "the window growing")
    assert _window(demo.screen(), "crm") == promoted  # what the promotion recorded stays as it was

    # 2. ACK by SMS: the reply is on screen and the incident is acknowledged.
    incident = wait_for(lambda: _failover_incident(demo), timeout=30, what="the failover incident")
    code = str(incident["short_code"])
    demo.lab("sms", "--from", ON_CALL, f"ACK {code}")
    demo.see(lambda s: f"in   {ON_CALL}  ACK {code}" in s, "the reply in the SMS log")
    wait_for(lambda: (i := _failover_incident(demo)) is not None and i["status"] == "acked", timeout=30,
             what="the incident acknowledged")  # fmt: skip
    demo.see(lambda s: "acked" in s, "the acknowledgement on screen")

    # 3. Heal and fail back: routing returns; the resolve text goes out.
    demo.lab("heal", "primary")
    _back_to_primary(demo)
    _caught_up(demo)  # the failback demoted the copy: it follows the primary again
    demo.see(lambda s: any(f"out  {ON_CALL}" in line and "resolved" in line.lower() for line in s.splitlines()),
             "the resolve text")  # fmt: skip

    # 4. Degrade: a grey failure (the ACD is down, the SBC answers) moves the hotlines too.
    _steady(demo)
    demo.lab("degrade", "primary")
    demo.see(lambda s: "backup_active" in s, "the hotlines moved on a grey failure")
    demo.lab("heal", "primary")
    _back_to_primary(demo)

    # 5. Partition: only the appliance loses the primary; the witness still sees it: no failover.
    _steady(demo)
    demo.lab("partition", "primary")
    deadline = time.monotonic() + 20  # well past hold_down_s (3 s) and the fall of the probes
    while time.monotonic() < deadline:
        assert "backup_active" not in demo.screen()
        time.sleep(1)
    # The engine sees the primary degraded from here and holds routing where it is.
    demo.see(lambda s: "primary_degraded" in s, "the primary shown degraded, not failed over")
    assert demo.state() == "primary_degraded"
    demo.lab("heal", "primary")

"""systemd's own exposure score of the units hotsite ships, against the targets of issue 18.

`systemd-analyze security --offline=yes` scores a unit file without loading it
into a running systemd (this machine's PID 1 need not be systemd). Targets:
hotsite.service at most 3.0 (was 5.1 MEDIUM), the first-boot unit at most 5.0
(was 9.5 UNSAFE, a root one-shot with no sandboxing). Each score is printed
beside its target (pytest -s).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance import config, systemd_unit
from tests.conftest import REPO
from tests.support import configs

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")

MINIMAL = configs.TWO_SITES


def exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize(
    ("name", "text", "target"),
    [
        ("hotsite.service (shipped: the example config)", None, 3.0),
        ("hotsite.service (rendered: sites only)", MINIMAL, 3.0),
        ("hotsite-firstboot.service", "firstboot", 5.0),
    ],
)
def test_exposure_is_within_its_target(tmp_path: Path, name: str, text: str | None, target: float) -> None:
    if text is None:
        source = (REPO / "images/systemd/hotsite.service").read_text()
        unit = tmp_path / "hotsite.service"
    elif text == "firstboot":
        source = (REPO / "images/firstboot/hotsite-firstboot.service").read_text()
        unit = tmp_path / "hotsite-firstboot.service"
    else:
        source = systemd_unit.render(config.parse(text))
        unit = tmp_path / "hotsite.service"
    unit.write_text(source)
    score = exposure(unit)
    print(f"systemd-analyze security: {name}: {score:.1f} (target <= {target:.1f})")
    assert score <= target


def test_a_unit_without_the_sandbox_scores_worse(tmp_path: Path) -> None:
    """The score reads the settings: a bare unit of the same daemon is far above the target."""
    unit = tmp_path / "hotsite.service"
    unit.write_text("[Service]\nExecStart=/opt/hotsite/bin/hotsite run\nUser=hotsite\n")
    score = exposure(unit)
    print(f"systemd-analyze security: hotsite.service without a sandbox: {score:.1f}")
    assert score > 5.0

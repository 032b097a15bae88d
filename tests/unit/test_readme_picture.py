"""The README's picture of the demo is a real capture of `hotsite top` (tests/integration/test_demo_tmux.py
writes it with HOTSITE_DEMO_CAPTURE), committed beside its text twin: both present, the SVG well formed,
showing the moment after the cut that the text shows."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from tests.conftest import REPO


def test_the_readme_shows_the_captured_demo_screen() -> None:
    readme = (REPO / "README.md").read_text()
    assert "](docs/demo-screen.svg)" in readme
    svg = (REPO / "docs" / "demo-screen.svg").read_text()
    ET.fromstring(svg)  # well formed
    text = (REPO / "docs" / "demo-screen.txt").read_text()
    assert text in readme, "the README's text capture is docs/demo-screen.txt"
    for shown in ("hotsite top", "backup_active", "PROMOTED", "at promotion"):
        assert shown in text and shown.replace(" ", "&#160;") in svg, shown
    assert "/tmp/" not in svg and "/tmp/" not in text, "the capture shows make demo's own paths"

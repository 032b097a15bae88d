"""A cut closes nothing: a replication session stays connected until its idle timeout (15 s) while the
source is already silent. Status and `top` show that silence within a few heartbeats instead of UP."""

from __future__ import annotations

import time

from appliance.cli.replication import _link_word
from appliance.cli.top import _link as top_link
from appliance.replication.client import StreamStats
from appliance.replication.service import QUIET_AFTER_S, _link


def test_silence_is_counted_from_the_last_message_and_only_while_connected() -> None:
    stats = StreamStats()
    assert stats.silent_s(time.monotonic()) is None  # never connected
    stats.connected = True
    stats.heard(120)
    now = time.monotonic()
    assert stats.bytes_received == 120
    assert 6.0 <= (stats.silent_s(now + 6.0) or 0) < 6.1
    stats.connected = False
    assert stats.silent_s(now + 6.0) is None


def test_the_link_reads_quiet_after_a_few_missed_heartbeats() -> None:
    assert _link(False, None) == "down"
    assert _link(True, 0.4) == "up"  # heartbeats every 0.5 s: normal
    assert _link(True, QUIET_AFTER_S) == "quiet"
    assert _link(True, None) == "up"


def test_top_and_status_show_the_quiet_link() -> None:
    quiet = {"connected": True, "link": "quiet", "silent_s": 6.4}
    assert top_link(quiet).plain == "QUIET 6s"
    assert top_link({"connected": True, "link": "up"}).plain == "UP"
    assert top_link({"connected": False}).plain == "DOWN"  # an older daemon without "link"
    assert _link_word(quiet) == "quiet" and _link_word({"connected": False, "link": "down"}) == "DOWN"

"""RTP statistics (RFC 3550) and the E-model (ITU-T G.107): reference values and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitoring import mos, rtp


def stream(
    seqs: list[int], *, start_seq: int = 0, delays: list[float] | None = None, payload: bytes = b"\xff" * 160
) -> rtp.ReceiverStats:
    """Packets k in ``seqs`` (offsets from start_seq), sent every 20 ms, arriving after delays[k]."""
    stats = rtp.ReceiverStats()
    for i, k in enumerate(seqs):
        packet = rtp.parse(rtp.build(rtp.PCMU, start_seq + k, 1000 + 160 * k, 0x1234, payload))
        delay = delays[i] if delays else 0.030
        stats.add(packet, 5.0 + 0.020 * k + delay)
    return stats


# -- G.711 ----------------------------------------------------------------------------


def test_ulaw_reference_values() -> None:
    # G.711 Table 2a: 0 encodes as 0xFF, the extremes as 0x80/0x00; decoding inverts encoding.
    assert rtp.ulaw_encode(0) == 0xFF
    assert rtp.ulaw_encode(32767) == 0x80
    assert rtp.ulaw_encode(-32768) == 0x00
    assert rtp.ULAW_TABLE[0xFF] == 0 and rtp.ULAW_TABLE[0x80] == 32124 and rtp.ULAW_TABLE[0x00] == -32124


def test_alaw_reference_values() -> None:
    # 0xD5 is A-law's smallest positive step (8), 0x55 the negative one; 0xAA the largest (32256).
    assert rtp.ALAW_TABLE[0xD5] == 8 and rtp.ALAW_TABLE[0x55] == -8
    assert rtp.ALAW_TABLE[0xAA] == 32256


@given(st.integers(-32768, 32767))
def test_ulaw_round_trip_error_is_within_the_segment_step(sample: int) -> None:
    decoded = rtp.ULAW_TABLE[rtp.ulaw_encode(sample)]
    assert abs(decoded - max(-32124, min(32124, sample))) <= max(8, abs(sample) // 16)


def test_tone_level_is_what_was_asked() -> None:
    for level in (-10.0, -20.0, -30.0):
        assert rtp.level_dbov(rtp.tone(level_dbov=level), rtp.PCMU) == pytest.approx(level, abs=0.3)
    assert rtp.level_dbov(b"\xff" * 160, rtp.PCMU) == rtp.SILENCE_DBOV  # mu-law silence


# -- packets --------------------------------------------------------------------------


@given(
    st.sampled_from([rtp.PCMU, rtp.PCMA, 96]),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=200),
    st.booleans(),
)
def test_build_parse_round_trip(pt: int, seq: int, ts: int, ssrc: int, payload: bytes, marker: bool) -> None:
    packet = rtp.parse(rtp.build(pt, seq, ts, ssrc, payload, marker))
    assert (packet.payload_type, packet.seq, packet.timestamp, packet.ssrc) == (pt, seq, ts, ssrc)
    assert packet.payload == payload and packet.marker == marker


@given(st.binary(max_size=64))
def test_garbage_is_one_error_type(data: bytes) -> None:
    try:
        packet = rtp.parse(data)
    except rtp.RtpParseError:
        return
    assert data[0] >> 6 == 2 and len(packet.payload) <= len(data) - 12


def test_parse_rejects_bad_versions_padding_and_rtcp() -> None:
    good = rtp.build(rtp.PCMU, 1, 2, 3, b"abc")
    with pytest.raises(rtp.RtpParseError, match="version"):
        rtp.parse(bytes([0x40]) + good[1:])
    with pytest.raises(rtp.RtpParseError, match="padding"):
        rtp.parse(bytes([0xA0]) + good[1:-1] + b"\x09")  # padding longer than the payload
    with pytest.raises(rtp.RtpParseError, match="RTCP"):
        rtp.parse(bytes([0x80, 201]) + good[2:])  # an RTCP receiver report
    with pytest.raises(rtp.RtpParseError, match="extension"):
        rtp.parse(bytes([0x90]) + good[1:12] + b"\x00")
    assert rtp.parse(bytes([0xA0]) + good[1:] + b"\x00\x02").payload == b"abc"  # 2 bytes of padding


# -- receiver statistics --------------------------------------------------------------


def test_loss_free_zero_jitter_stream() -> None:
    stats = stream(list(range(150)))
    assert (stats.received, stats.expected, stats.lost) == (150, 150, 0)
    assert stats.jitter == pytest.approx(0.0, abs=1e-9) and stats.loss_fraction == 0.0


def test_jitter_converges_to_the_alternating_delay_step() -> None:
    # Transit alternates by 10 ms: |D| = 80 timestamp units every packet, J -> 80 (A.8's 1/16 filter).
    stats = stream(list(range(400)), delays=[0.030 + (0.010 if k % 2 else 0) for k in range(400)])
    assert stats.jitter_ms == pytest.approx(10.0, rel=1e-3)


def test_one_late_packet_jitter_by_hand() -> None:
    # Packet 2 is 16 ms late: D = 128 units then 128 back, J = 128/16 = 8, then 8 + (128 - 8)/16 = 15.5.
    stats = stream([0, 1, 2, 3], delays=[0.030, 0.030, 0.046, 0.030])
    assert stats.jitter == pytest.approx(15.5)


@settings(max_examples=200)
@given(
    st.integers(0, 2**16 - 1),
    st.lists(st.booleans(), min_size=10, max_size=400),
)
def test_loss_counts_exactly_the_dropped_packets_across_a_wrap(start: int, kept: list[bool]) -> None:
    kept[0] = kept[1] = kept[-1] = True  # the source is validated by two in sequence; the last fixes the end
    seqs = [k for k, keep in enumerate(kept) if keep]
    stats = stream(seqs, start_seq=start)
    assert stats.expected == len(kept)
    assert stats.lost == kept.count(False)


@given(st.floats(0, 2.0), st.lists(st.floats(0, 0.05), min_size=20, max_size=20))
def test_jitter_ignores_a_constant_delay_and_is_never_negative(shift: float, delays: list[float]) -> None:
    a = stream(list(range(20)), delays=delays)
    b = stream(list(range(20)), delays=[d + shift for d in delays])
    assert a.jitter >= 0
    assert a.jitter == pytest.approx(b.jitter, abs=1e-3)


def test_duplicates_and_other_sources_do_not_count_as_loss() -> None:
    stats = stream([0, 1, 2, 2, 3, 4])
    assert stats.lost == -1 and stats.loss_fraction == 0.0  # RFC 3550: duplicates make loss negative
    other = rtp.parse(rtp.build(rtp.PCMU, 5, 0, 0x9999, b""))
    assert stats.add(other, 10.0) is False


def test_received_level_is_the_audio_level() -> None:
    loud = stream(list(range(50)), payload=rtp.tone(level_dbov=-20, samples=160))
    silent = stream(list(range(50)))
    assert loud.level_dbov == pytest.approx(-20, abs=0.5)
    assert silent.level_dbov == rtp.SILENCE_DBOV


# -- the E-model ------------------------------------------------------------------------


def test_default_r_gives_mos_4_41() -> None:
    assert mos.r_factor(0, 0) == pytest.approx(93.2)
    assert mos.mos_from_r(93.2) == pytest.approx(4.41, abs=0.005)


def test_mos_reference_points() -> None:
    # G.107 Annex B: R = 0 -> 1, R = 100 -> 4.5, R = 50 -> 2.58, R = 80 -> 4.02.
    assert mos.mos_from_r(0) == 1.0 and mos.mos_from_r(100) == 4.5
    assert mos.mos_from_r(50) == pytest.approx(2.575, abs=0.001)
    assert mos.mos_from_r(80) == pytest.approx(4.024, abs=0.001)


def test_delay_impairment_reference_values() -> None:
    assert mos.delay_impairment(100) == 0.0
    # Ta = 200 ms: X = 1, Idd = 25 * (2^(1/6) - 3 * (1 + 3^-6)^(1/6) + 2)
    expected = 25 * (2 ** (1 / 6) - 3 * (1 + 3**-6) ** (1 / 6) + 2)
    assert mos.delay_impairment(200) == pytest.approx(expected) == pytest.approx(3.04, abs=0.01)
    assert mos.delay_impairment(400) == pytest.approx(24.07, abs=0.01)  # X = 2: 25 * (65^(1/6) - 3.042 + 2)


def test_loss_impairment_reference_values() -> None:
    # G.711 with PLC (Bpl 25.1): 1% random loss -> 95 * 1 / 26.1 = 3.64; without PLC: 95 / 5.3 = 17.9.
    assert mos.effective_equipment_impairment(1) == pytest.approx(95 / 26.1)
    assert mos.effective_equipment_impairment(1, bpl=mos.G711_BPL_NO_PLC) == pytest.approx(95 / 5.3)
    assert mos.effective_equipment_impairment(100) == pytest.approx(95 * 100 / 125.1)
    with pytest.raises(ValueError, match="loss_pct"):
        mos.effective_equipment_impairment(101)


@given(st.floats(0, 1000), st.floats(0, 100), st.floats(0, 1000), st.floats(0, 100))
def test_more_delay_or_loss_never_raises_the_estimate(d1: float, l1: float, d2: float, l2: float) -> None:
    lo_d, hi_d = sorted((d1, d2))
    lo_l, hi_l = sorted((l1, l2))
    better = mos.mos_from_r(mos.r_factor(lo_d, lo_l))
    worse = mos.mos_from_r(mos.r_factor(hi_d, hi_l))
    assert 1.0 <= worse <= better + 1e-9 <= 4.5 + 1e-9
    assert not math.isnan(worse)

"""RTP for test calls: G.711 audio, packets, and what a receiver measures (pure).

A test call must say whether a customer would have *heard* something, and
how well: packets and loss per RFC 3550 A.1 (extended sequence numbers, so a
wrap of the 16-bit counter is not a loss), interarrival jitter per RFC 3550
6.4.1 / A.8, the round trip when the far end echoes our packets, and the level
of the audio received (G.711 decoded, energy in dBov) so that a stream of
silence, or no stream at all, is "no audio".

Nothing here does I/O or reads a clock: arrival times are given, so every
statistic is reproducible from a recorded trace.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

RTP_VERSION = 2
PCMU, PCMA = 0, 8  # static payload types (RFC 3551)
CLOCK_HZ = 8000  # G.711's RTP clock
FRAME_SAMPLES = 160  # 20 ms at 8 kHz
HEADER = struct.Struct("!BBHII")
MAX_PACKET = 1500  # a larger datagram is not one of ours
# RFC 3550 A.1
MAX_DROPOUT = 3000
MAX_MISORDER = 100
MIN_SEQUENTIAL = 2
SEQ_MOD = 1 << 16
# Full scale of 16-bit linear PCM, for dBov; silence is reported as this floor.
FULL_SCALE = 32768.0
SILENCE_DBOV = -120.0


class RtpParseError(ValueError):
    """Not an RTP packet we can use (the only error :func:`parse` raises)."""


# -- G.711 (ITU-T G.711; the classic Sun reference algorithm) ----------------------

_BIAS = 0x84
_CLIP = 32635


def ulaw_encode(sample: int) -> int:
    """One 16-bit linear sample to a mu-law byte."""
    sample = max(-32768, min(32767, sample))
    sign = 0x80 if sample < 0 else 0
    magnitude = min(-sample if sample < 0 else sample, _CLIP) + _BIAS
    exponent = max(0, magnitude.bit_length() - 8)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _ulaw_decode(byte: int) -> int:
    byte = ~byte & 0xFF
    exponent, mantissa = (byte >> 4) & 0x07, byte & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return -magnitude if byte & 0x80 else magnitude


def _alaw_decode(byte: int) -> int:
    byte ^= 0x55
    value = (byte & 0x0F) << 4
    segment = (byte & 0x70) >> 4
    if segment == 0:
        value += 8
    else:
        value = (value + 0x108) << (segment - 1)
    return value if byte & 0x80 else -value


ULAW_TABLE: tuple[int, ...] = tuple(_ulaw_decode(b) for b in range(256))
ALAW_TABLE: tuple[int, ...] = tuple(_alaw_decode(b) for b in range(256))
DECODERS = {PCMU: ULAW_TABLE, PCMA: ALAW_TABLE}


def tone(frequency_hz: float = 1004.0, level_dbov: float = -20.0, samples: int = CLOCK_HZ) -> bytes:
    """A mu-law sine: 1004 Hz is the telephone test tone (ITU-T O.41), off every codec's grid."""
    amplitude = FULL_SCALE * 10 ** (level_dbov / 20) * math.sqrt(2)  # RMS level -> peak
    return bytes(
        ulaw_encode(round(amplitude * math.sin(2 * math.pi * frequency_hz * n / CLOCK_HZ)))
        for n in range(samples)
    )


def level_dbov(payload: bytes, payload_type: int) -> float:
    """RMS level of G.711 audio relative to full scale (a full-scale sine is -3 dBov)."""
    table = DECODERS.get(payload_type)
    if table is None or not payload:
        return SILENCE_DBOV
    power = sum(table[b] ** 2 for b in payload) / len(payload)
    return SILENCE_DBOV if power <= 0 else max(SILENCE_DBOV, 10 * math.log10(power / FULL_SCALE**2))


# -- packets --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    seq: int
    timestamp: int
    ssrc: int
    marker: bool
    payload: bytes


def build(
    payload_type: int, seq: int, timestamp: int, ssrc: int, payload: bytes, marker: bool = False
) -> bytes:
    """An RTP packet without CSRCs or extension (RFC 3550 5.1)."""
    return (
        HEADER.pack(
            RTP_VERSION << 6,
            (0x80 if marker else 0) | payload_type,
            seq % SEQ_MOD,
            timestamp % (1 << 32),
            ssrc,
        )
        + payload
    )


def parse(data: bytes) -> RtpPacket:
    """Parse one datagram strictly: version 2, CSRCs, extension and padding within bounds."""
    if not HEADER.size <= len(data) <= MAX_PACKET:
        raise RtpParseError(f"{len(data)} bytes: not an RTP packet")
    first, second, seq, timestamp, ssrc = HEADER.unpack_from(data)
    if first >> 6 != RTP_VERSION:
        raise RtpParseError(f"RTP version {first >> 6}, expected 2")
    offset = HEADER.size + 4 * (first & 0x0F)
    if first & 0x10:  # header extension: 16-bit profile, 16-bit length in words
        if len(data) < offset + 4:
            raise RtpParseError("truncated header extension")
        offset += 4 + 4 * struct.unpack_from("!H", data, offset + 2)[0]
    end = len(data)
    if first & 0x20:  # padding: the last byte counts it
        end -= data[-1]
    if end < offset or (first & 0x20 and data[-1] == 0):
        raise RtpParseError("header, extension or padding longer than the packet")
    payload_type = second & 0x7F
    if 72 <= payload_type <= 76:  # RFC 5761: RTCP SR/RR/SDES/BYE/APP on the same port
        raise RtpParseError(f"RTCP packet type {payload_type + 128}, not RTP")
    return RtpPacket(payload_type, seq, timestamp, ssrc, bool(second & 0x80), bytes(data[offset:end]))


# -- receiver statistics (RFC 3550 A.1 and A.8) -------------------------------------


class ReceiverStats:
    """What a receiver learns about one source: sequence, loss, jitter, level.

    Follows RFC 3550 A.1: a source is valid after ``MIN_SEQUENTIAL`` packets in
    sequence, a jump beyond ``MAX_DROPOUT`` restarts it after two sequential
    packets (the sender restarted), duplicates and late packets within
    ``MAX_MISORDER`` are received but not expected twice. Jitter is kept in
    timestamp units, as the RFC does, and reported in milliseconds.
    """

    def __init__(self, clock_hz: int = CLOCK_HZ) -> None:
        self.clock_hz = clock_hz
        self.ssrc: int | None = None
        self.received = 0
        self.base_seq = 0
        self.max_seq = 0
        self.cycles = 0
        self.bad_seq = SEQ_MOD + 1
        self.probation = MIN_SEQUENTIAL
        self.jitter = 0.0  # timestamp units
        self._transit: float | None = None
        self._energy = 0.0
        self._samples = 0

    def add(self, packet: RtpPacket, arrival_s: float) -> bool:
        """Account one packet that arrived at ``arrival_s`` (any monotonic seconds); False if not counted."""
        if self.ssrc is None:
            self.ssrc = packet.ssrc
            self._init_seq(packet.seq)
            self.max_seq = (packet.seq - 1) % SEQ_MOD
        elif packet.ssrc != self.ssrc:
            return False  # another source: not this stream
        if not self._update_seq(packet.seq):
            return False
        transit = arrival_s * self.clock_hz - packet.timestamp
        if self._transit is not None:
            d = abs(transit - self._transit)
            self.jitter += (d - self.jitter) / 16
        self._transit = transit
        table = DECODERS.get(packet.payload_type)
        if table is not None:
            self._energy += sum(table[b] ** 2 for b in packet.payload)
            self._samples += len(packet.payload)
        return True

    def _init_seq(self, seq: int) -> None:
        self.base_seq = seq
        self.max_seq = seq
        self.bad_seq = SEQ_MOD + 1
        self.cycles = 0
        self.received = 0

    def _update_seq(self, seq: int) -> bool:
        """RFC 3550 A.1 ``update_seq``, returning whether the packet counts."""
        udelta = (seq - self.max_seq) % SEQ_MOD
        if self.probation:
            if seq == (self.max_seq + 1) % SEQ_MOD:
                self.probation -= 1
                self.max_seq = seq
                if self.probation == 0:
                    # Unlike A.1, the probation packets count too (a test call is short):
                    # the base is the first of them, one cycle back if the counter wrapped between.
                    self._init_seq(seq)
                    self.base_seq = (seq - (MIN_SEQUENTIAL - 1)) % SEQ_MOD
                    self.cycles = SEQ_MOD if seq < MIN_SEQUENTIAL - 1 else 0
                    self.received = MIN_SEQUENTIAL
                    return True
            else:
                self.probation = MIN_SEQUENTIAL - 1
                self.max_seq = seq
            return False
        if udelta < MAX_DROPOUT:
            if seq < self.max_seq:
                self.cycles += SEQ_MOD
            self.max_seq = seq
        elif udelta <= SEQ_MOD - MAX_MISORDER:
            if seq == self.bad_seq:  # two sequential packets after a big jump: the sender restarted
                self._init_seq(seq)
            else:
                self.bad_seq = (seq + 1) % SEQ_MOD
                return False
        # else: a duplicate or reordered packet, counted as received
        self.received += 1
        return True

    @property
    def expected(self) -> int:
        if self.ssrc is None or self.probation:
            return 0
        return self.cycles + self.max_seq - self.base_seq + 1

    @property
    def lost(self) -> int:
        """Packets expected but not received (negative with duplicates, as RFC 3550 6.4.1 allows)."""
        return self.expected - self.received

    @property
    def loss_fraction(self) -> float:
        expected = self.expected
        return 0.0 if expected <= 0 else max(0.0, min(1.0, self.lost / expected))

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000 / self.clock_hz

    @property
    def level_dbov(self) -> float:
        if self._samples == 0 or self._energy <= 0:
            return SILENCE_DBOV
        return max(SILENCE_DBOV, 10 * math.log10(self._energy / self._samples / FULL_SCALE**2))

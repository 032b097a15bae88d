"""An estimated MOS for a test call, from the ITU-T G.107 E-model (pure).

The E-model rates a connection by R = Ro - Is - Id - Ie,eff + A. With every
parameter at its G.107 default the rating is R = 93.2 (MOS 4.41): the best a
narrow-band call gets. A test call measures two things that move R:

* **Ie,eff**, the equipment impairment under packet loss (G.107 eq. 7-29):
  ``Ie + (95 - Ie) * Ppl / (Ppl / BurstR + Bpl)``, with G.711's Ie = 0 and its
  packet-loss robustness Bpl from G.113 Appendix I: 25.1 with packet loss
  concealment (what SBCs and phones do), 4.3 without.
* **Idd**, the impairment by absolute delay Ta (G.107 eq. 7-26): 0 up to 100
  ms, then ``25 * ((1 + X^6)^(1/6) - 3 * (1 + (X/3)^6)^(1/6) + 2)`` with
  ``X = log2(Ta / 100)``. The talker and listener echo terms (Idte, Idle) are
  left at their default-parameter values, i.e. echo is assumed cancelled.

Ta is mouth to ear: the network's one-way delay plus what the endpoints add
(packetisation and a jitter buffer), which a probe cannot see; it is passed in.
R maps to MOS by G.107 Annex B (eq. B-4).
"""

from __future__ import annotations

import math

DEFAULT_R = 93.2  # G.107 with every parameter at its default
G711_IE = 0.0
G711_BPL_PLC = 25.1  # G.113 Appendix I, G.711 with packet loss concealment
G711_BPL_NO_PLC = 4.3
RANDOM_LOSS = 1.0  # BurstR: 1 for random loss, > 1 for bursty loss


def delay_impairment(ta_ms: float) -> float:
    """Idd: the impairment by mouth-to-ear delay ``ta_ms`` (G.107 eq. 7-26)."""
    if ta_ms <= 100:
        return 0.0
    x = math.log2(ta_ms / 100)
    return 25 * ((1 + x**6) ** (1 / 6) - 3 * (1 + (x / 3) ** 6) ** (1 / 6) + 2)


def effective_equipment_impairment(
    loss_pct: float, ie: float = G711_IE, bpl: float = G711_BPL_PLC, burst_r: float = RANDOM_LOSS
) -> float:
    """Ie,eff for ``loss_pct`` percent of packets lost (G.107 eq. 7-29)."""
    if not 0 <= loss_pct <= 100:
        raise ValueError(f"loss_pct must be within 0..100, got {loss_pct}")
    if bpl <= 0 or burst_r <= 0:
        raise ValueError("bpl and burst_r must be > 0")
    return ie + (95 - ie) * loss_pct / (loss_pct / burst_r + bpl)


def r_factor(
    ta_ms: float, loss_pct: float, *, bpl: float = G711_BPL_PLC, burst_r: float = RANDOM_LOSS
) -> float:
    """R for a G.711 call with mouth-to-ear delay ``ta_ms`` and ``loss_pct`` loss."""
    if ta_ms < 0:
        raise ValueError(f"ta_ms must be >= 0, got {ta_ms}")
    return (
        DEFAULT_R
        - delay_impairment(ta_ms)
        - effective_equipment_impairment(loss_pct, bpl=bpl, burst_r=burst_r)
    )


def mos_from_r(r: float) -> float:
    """The estimated MOS (conversational quality) for a rating R (G.107 Annex B, eq. B-4)."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    # The cubic dips just below 1 for R < 6.5: a MOS is never below 1.
    return max(1.0, 1 + 0.035 * r + r * (r - 60) * (100 - r) * 7e-6)

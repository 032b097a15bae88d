"""``[callkpis]``: per-trunk call KPIs read from Kamailio, and when they make a trunk ``degraded``.

Lives beside the feature (monitoring/kpis.py, monitoring/KPIS.md); the root
config only names the section.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

TrunkName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class CallKpisSection(BaseModel):
    """Per-trunk call KPIs from Kamailio's statistics (needs ``[kamailio] rpc_url``).

    A trunk that answers OPTIONS but whose real calls fail — ASR below
    ``min_asr_pct`` over ``window_s`` with at least ``min_attempts`` attempts —
    is ``degraded: calls failing`` and an incident is opened (and paged). It is
    well again at ``recover_asr_pct``. ``channels``: each trunk's configured
    channels (E1s x 30, SIP trunk licences), to show calls in progress against.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    interval_s: float = Field(default=5.0, ge=0.2, le=3600)  # how often the statistics are read
    window_s: float = Field(default=300.0, ge=1, le=86400)  # ASR, NER, PDD over this sliding window
    min_attempts: int = Field(default=20, ge=1, le=1_000_000)  # fewer in the window: no judgement
    min_asr_pct: float = Field(default=20.0, ge=0, le=100)  # below: calls failing
    recover_asr_pct: float = Field(default=30.0, ge=0, le=100)  # failing until back at or above
    page: bool = True  # calls failing opens an incident (and pages); False: shown only
    channels: dict[TrunkName, Annotated[int, Field(ge=1, le=100_000)]] = {}

    @model_validator(mode="after")
    def _recover_at_or_above_failing(self) -> CallKpisSection:
        if self.recover_asr_pct < self.min_asr_pct:
            raise ValueError(
                f"recover_asr_pct ({self.recover_asr_pct:g}) must be at least min_asr_pct"
                f" ({self.min_asr_pct:g}): a trunk would recover while still failing"
            )
        if self.window_s < 2 * self.interval_s:
            raise ValueError(
                f"window_s ({self.window_s:g}) must be at least twice interval_s ({self.interval_s:g}):"
                " a window needs two readings"
            )
        return self

"""The witness: a third vantage point that says whether *it* can see the primary.

With two sites, the backup cannot tell "the primary is dead" from "my link
to the primary is cut". ``hotsite witness`` runs at a third place (the
carrier edge, a cloud VM), probes the primary itself with the same probes and
the same rise/fall health model as the daemon, and answers ``GET /vote``
(the document is described in :mod:`failover.witness.vote`).

Two programs, one contract, one module each:

* :mod:`~failover.witness.settings`: the agent's settings (TOML or options);
* :mod:`~failover.witness.vote`: the vote contract, pure on both sides:
  :func:`fold_round`, :func:`render_vote` (agent) and :func:`interpret` (appliance);
* :mod:`~failover.witness.agent`: :class:`WitnessAgent`, the probe loop and
  ``/vote``, ``/metrics`` on the bounded server of :mod:`appliance.httpd`
  (head bounded and authenticated before anything else). A bearer token and
  TLS are required unless ``allow_unauthenticated`` / ``allow_plain_http`` say
  otherwise. ``GET /vote?nonce=N`` echoes ``N``: the voter refuses an answer
  without its own nonce, so a recorded vote cannot be replayed;
* :mod:`~failover.witness.voter`: :class:`HttpWitnessVoter`, the appliance's
  client (a :class:`~failover.thirdvote.Voter`); :func:`voter_from_config` picks it
  or :class:`~failover.thirdvote.NullVoter`.
"""

from __future__ import annotations

from failover.witness.agent import WitnessAgent
from failover.witness.metrics import WitnessMetrics
from failover.witness.settings import WitnessSettings, display_name, load_settings, read_token
from failover.witness.vote import (
    DEFAULT_MAX_AGE_S,
    MAX_ANSWER_BYTES,
    MAX_DETAIL_CHARS,
    VERSION,
    WitnessView,
    fold_round,
    interpret,
    new_view,
    primary_alive,
    render_vote,
)
from failover.witness.voter import HttpWitnessVoter, voter_from_config

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "MAX_ANSWER_BYTES",
    "MAX_DETAIL_CHARS",
    "VERSION",
    "HttpWitnessVoter",
    "WitnessAgent",
    "WitnessMetrics",
    "WitnessSettings",
    "WitnessView",
    "display_name",
    "fold_round",
    "interpret",
    "load_settings",
    "new_view",
    "primary_alive",
    "read_token",
    "render_vote",
    "voter_from_config",
]

"""The one-machine lab: network namespaces with real Kamailio, SIPp and HTTP peers.

See lab.py for the API (Lab.up/down/status/impair/heal/wait_ready) and
topology.py for hosts, addresses and ports.
"""

from provisioning.lab.lab import Lab, LabError

__all__ = ["Lab", "LabError"]

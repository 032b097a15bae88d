"""What the tests share, so a test file holds only what is its own.

- ``configs``: valid ``hotsite.toml`` texts (two sites, sites with seats, destinations,
  hotlines, the daemon template); a test adds its sections to these, never a copy.
- ``lab``: the lab tests' skip marks, the namespace lab and the real daemon on it.
- ``replication_rig``: the PKI, TLS contexts, agent, client, ``[replication]`` section
  and blob database every replication test starts from.
- ``modem``: the emulated GSM modem (the only emulated device); ``multisite``,
  ``routing_world``, ``sshd_host``, ``surfaces``: larger worlds; ``layers``: the
  import-layer contract.

Tests are type-checked with the code (``make typecheck``: mypy's ``packages`` include
``tests``), and reach into no private attribute where a public seam exists.
"""

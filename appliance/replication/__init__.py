"""Replication of the primary's customer database (SQLite WAL shipping) and config files to the backup.

Source side (``hotsite source`` at the primary): :mod:`.follower` reads the
WAL of a database it does not own, :mod:`.source` serves streams over mutual
TLS (:mod:`.tls`, :mod:`.protocol`), :mod:`.files` scans config trees.
Backup side (the appliance): :mod:`.client` receives, :mod:`.replica`
applies atomically and verifies checksums (:mod:`.checksum`),
:mod:`.snapshots` keeps copies for point-in-time restore, :mod:`.promotion`
holds the failover decisions, :mod:`.service` wires it all for the daemon.
"""

"""Who may move routing: one :class:`~failover.coordination.base.Coordination` interface, one backend each.

``[coordination] backend`` picks the backend from the table in
:mod:`failover.coordination.backends` (``witness``: this appliance alone, with
its witness; ``etcd``: a leader lease shared by several appliances). A new
backend is one module here implementing the interface, one line in that table
and its value in the section's ``backend`` field.
"""

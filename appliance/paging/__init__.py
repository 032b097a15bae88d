"""Paging: incidents, on-call, escalation, and the channels that reach contractors.

The decisions (``incidents``, ``oncall``) are pure functions of
(state, event, now); the channels (``modem``, ``smtp``, ``webhook``) and the
durable ``outbox`` are the edges; ``service.PagingService`` wires them.
"""

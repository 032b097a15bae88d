"""Failover: the engine that decides, the plans that size it, the actuators that act."""

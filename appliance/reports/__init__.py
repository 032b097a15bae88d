"""Incident and drill reports from the audit log.

``timeline`` builds them from events (pure); ``render`` writes Markdown or self-contained HTML.
"""

"""Metric sources, one module each. Nothing here knows about Celery or the orchestrator."""

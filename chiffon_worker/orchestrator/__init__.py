"""The orchestrator side: heartbeat consumer, registry, liveness, routing, exporter, CLI.

Nothing is imported here (the submodules pull in SQLAlchemy, kombu and prometheus_client);
import what you need, e.g. ``from chiffon_worker.orchestrator.routing import submit``.
See ``docs/orchestrator.md``.
"""

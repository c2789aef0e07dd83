"""The agent's Celery side: what ``celery -A chiffon_worker worker -B`` runs.

One module per part, imports pointing one way (factory -> the rest -> runtime):

- :mod:`.factory`: builds the Celery app once per process (``chiffon_worker.app``) and the
  worker class behind ``celery worker`` (name, log level, the ready line);
- :mod:`.settings`: every Celery setting as a pure function of the chiffon ``Config``;
- :mod:`.consumer`: the worker's consumer (no Mingle/Gossip, capped reconnect back-off,
  broken task envelopes dropped, a refused login ends the agent with exit 2);
- :mod:`.beat`: ``-B`` as a thread of the worker, with the heartbeat schedule;
- :mod:`.heartbeat_sender`: takes the snapshot and publishes one heartbeat, bounded;
- :mod:`.tasks`: ``chiffon.execute_work``;
- :mod:`.control`: the ``chiffon_metrics`` inspect command;
- :mod:`.runtime`: this process's config and ``DesktopAgent``.

Nothing here is imported by ``import chiffon_worker``; the app is built on first access.
"""

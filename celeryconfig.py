"""The Celery settings module of the chiffon agent, for tools that want one by name.

The agent itself never imports this file: ``celery -A chiffon_worker worker -B`` takes
its settings from the chiffon config through
``chiffon_worker.worker.settings.celery_settings`` (so a stray ``celeryconfig.py`` in the
working directory cannot replace them; the worker logs a warning and ignores it). This
module holds the same values, for a checkout's tools that load settings by module name,
e.g. ``Celery().config_from_object("celeryconfig")`` run from the project root.

Every value comes from the layered chiffon config (``/etc/chiffon/agent.yml``,
``~/.chiffon/agent.yml``, ``$CHIFFON_CONFIG``, ``CHIFFON_*`` environment); edit those, not
this file. ``chiffon config show`` prints the effective values. It is not installed with
the package (a top-level ``celeryconfig`` in site-packages would shadow other projects').
"""

from __future__ import annotations

from chiffon_worker.worker.runtime import get_config as _get_config
from chiffon_worker.worker.settings import celery_settings as _celery_settings

globals().update(_celery_settings(_get_config()))

"""Celery settings module of the chiffon agent (``app.config_from_object("celeryconfig")``).

Every value is derived from the layered chiffon config (``/etc/chiffon/agent.yml``,
``~/.chiffon/agent.yml``, ``$CHIFFON_CONFIG``, ``CHIFFON_*`` environment); edit those, not
this file. See ``chiffon config show`` for the effective values.
"""

from __future__ import annotations

from chiffon_worker.app import current_config
from chiffon_worker.celery_settings import settings_from_config

globals().update(settings_from_config(current_config()))

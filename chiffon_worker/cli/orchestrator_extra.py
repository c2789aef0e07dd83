"""The guard around imports of the orchestrator extra (SQLAlchemy, psycopg, prometheus_client).

Commands that need the extra import it inside their handler, under
:func:`needs_orchestrator_extra`, so ``chiffon`` builds its parser and runs the agent
commands on a base install, and a registry command there fails with one line that says
what to install.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from chiffon_worker.errors import MissingExtra

#: Top-level modules of the ``orchestrator`` extra (see ``pyproject.toml``).
EXTRA_MODULES = frozenset({"sqlalchemy", "psycopg", "prometheus_client", "orjson"})

INSTALL_HINT = "pip install 'chiffon-worker[orchestrator]'"


@contextmanager
def needs_orchestrator_extra(command: str) -> Iterator[None]:
    """Turn a missing module of the extra, imported in the block, into MissingExtra (one
    line, exit status 2).

    Any other ImportError propagates: it is a bug, not a missing extra.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        top_level = (exc.name or "").partition(".")[0]
        if top_level not in EXTRA_MODULES:
            raise
        raise MissingExtra(f"chiffon {command} needs the orchestrator extra "
                           f"({top_level} is not installed): {INSTALL_HINT}") from None

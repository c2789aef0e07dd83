"""The types every command module shares: where it registers, and what a handler is."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

#: The ``chiffon`` subparsers a command module adds its commands to.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: A command: takes the parsed arguments, returns the exit status; deliberate failures
#: raise :class:`~chiffon_worker.errors.ChiffonError`, which ``main`` prints as one line.
Handler: TypeAlias = Callable[[argparse.Namespace], int]

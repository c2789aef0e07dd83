"""``python -m chiffon_worker.cli``: the same as the ``chiffon`` command."""

from __future__ import annotations

import sys

from chiffon_worker.cli import main

if __name__ == "__main__":
    sys.exit(main())

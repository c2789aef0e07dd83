#!/usr/bin/env bash
# Run the whole test suite (lint, types, tests): installs into ./.venv on first use.
# Extra arguments go to pytest.
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== pytest"; exec pytest "$@"

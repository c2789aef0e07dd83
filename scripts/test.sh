#!/usr/bin/env bash
# Run the whole test suite (lint, types, tests): installs into ./.venv on first use.
# Extra arguments go to pytest.
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
echo "== ruff"; ruff check .
echo "== mypy"; mypy
# Test files run in CHIFFON_TEST_WORKERS processes (default 2), each file whole in one of
# them (its module fixtures, private brokers and agents stay together): most of the suite
# waits on real brokers and agents, so two at a time halve the wall time on 2 cores.
# CHIFFON_TEST_WORKERS=0 runs everything in this process.
echo "== pytest"; exec pytest -n "${CHIFFON_TEST_WORKERS:-2}" --dist loadfile "$@"

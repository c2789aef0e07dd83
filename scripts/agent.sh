#!/usr/bin/env bash
# Run the chiffon agent on this machine: installs into ./.venv on first use, then starts
# the Celery worker with its embedded beat (heartbeats). Extra arguments go to celery.
CHIFFON_EXTRAS=orchestrator
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
exec celery -A chiffon_worker worker -B "$@"

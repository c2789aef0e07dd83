"""The registry fails with one clear RegistryError, and never loses what it stored."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import event

from chiffon_worker.config import Config
from chiffon_worker.errors import RegistryError
from chiffon_worker.orchestrator.registry import Registry

from .feeding import Feeder
from .snapshots import make_snapshot

T0 = float(int(time.time()))


def test_the_default_registry_is_sqlite_in_the_state_dir_which_is_created(
        clean_env: Path, tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    config = Config(state_dir=str(state))
    with Registry.from_config(config) as registry:
        assert registry.dialect == "sqlite"
    assert (state / "registry.sqlite3").is_file()
    with sqlite3.connect(state / "registry.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_state_dir_that_cannot_be_created_is_a_registry_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RegistryError, match="cannot create the registry directory"):
        Registry(f"sqlite:///{blocker / 'state' / 'reg.sqlite3'}")


def test_a_full_disk_is_a_registry_error_and_stored_data_stays_readable(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'reg.sqlite3'}"
    with Registry(url) as registry:
        feeder = Feeder(registry)
        feeder.snapshot(make_snapshot("kept", seq=1), received_at=T0)
        feeder.commit()
        # SQLite's own "database or disk is full" error: cap the file at its current size
        event.listen(registry.engine, "connect",
                     lambda conn, _rec: conn.execute("PRAGMA max_page_count = 1"))
        registry.engine.dispose()
        for n in range(200):
            feeder.snapshot(make_snapshot(f"new-{n}", seq=1), received_at=T0)
        batch = feeder.writer.take_batch()
        assert batch is not None
        with pytest.raises(RegistryError, match="disk is full") as caught:
            feeder.writer.write(batch)
        assert "\n" not in str(caught.value)
        assert len(batch.agent_rows) == 200, "the failed batch is intact for a retry"
        assert feeder.stats.write_errors == 1
    with Registry(url) as reopened:
        assert [r.agent_id for r in reopened.agents()] == ["kept"]
    with sqlite3.connect(tmp_path / "reg.sqlite3") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="runs the check as user nobody, which needs root")
def test_a_read_only_state_dir_is_a_one_line_error_from_the_cli() -> None:
    # root ignores file modes, so the CLI runs as nobody against a root-owned directory
    try:
        subprocess.run([sys.executable, "-c", "pass"], user="nobody", check=True, timeout=30)
    except (PermissionError, subprocess.CalledProcessError):
        pytest.skip(f"user nobody cannot run {sys.executable}")
    state = Path(tempfile.mkdtemp(prefix="chiffon-ro-"))
    try:
        state.chmod(0o755)
        env = {"PATH": os.environ["PATH"], "HOME": str(state), "CHIFFON_STATE_DIR": str(state)}
        done = subprocess.run([sys.executable, "-m", "chiffon_worker.cli", "status"],
                              env=env, user="nobody", group="nogroup", capture_output=True,
                              text=True, timeout=60, cwd=state, check=False)
    finally:
        shutil.rmtree(state)
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    # status only reads: in a state dir it cannot write it makes nothing and says so
    assert lines[0].startswith(f"chiffon: error: no registry at {state}")


def test_writing_to_a_read_only_database_is_a_registry_error_and_reads_still_work(
        tmp_path: Path) -> None:
    path = tmp_path / "reg.sqlite3"
    with Registry(f"sqlite:///{path}") as registry:
        feeder = Feeder(registry)
        feeder.snapshot(make_snapshot("kept", seq=1), received_at=T0)
        feeder.commit()
    with Registry(f"sqlite:///file:{path}?mode=ro&uri=true") as read_only:
        assert [r.agent_id for r in read_only.agents()] == ["kept"]
        feeder = Feeder(read_only)
        feeder.snapshot(make_snapshot("kept", seq=2), received_at=T0 + 30)
        with pytest.raises(RegistryError, match=r"readonly database.*writable"):
            feeder.commit()
        record = read_only.agent("kept")
        assert record is not None and record.seq == 1


def test_an_unreachable_postgresql_is_a_registry_error_with_the_password_masked() -> None:
    with pytest.raises(RegistryError) as caught:
        Registry("postgresql+psycopg://chiffon:hunter2@127.0.0.1:1/registry")
    message = str(caught.value)
    assert "hunter2" not in message
    assert "chiffon:**@127.0.0.1:1" in message


@pytest.mark.parametrize("url", ["mysql://x@localhost/db", "not a url"])
def test_an_unsupported_database_url_is_a_registry_error(url: str) -> None:
    with pytest.raises(RegistryError):
        Registry(url)

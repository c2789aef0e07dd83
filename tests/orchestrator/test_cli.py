"""The orchestrator commands through the real ``chiffon`` CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chiffon_worker.cli import main
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.signing import sign_snapshot
from chiffon_worker.wire import HEARTBEAT_QUEUE
from tests.conftest import missing_service
from tests.orchestrator_process import VhostUnavailable, private_vhost

from .conftest import Publisher, wait_for
from .feeding import Feeder
from .snapshots import make_snapshot

CHIFFON = [sys.executable, "-m", "chiffon_worker.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cli_env(clean_env: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for chiffon subprocesses: private home and state dir."""
    state = tmp_path / "chiffon-state"
    os.environ["CHIFFON_STATE_DIR"] = str(state)  # restored by clean_env's monkeypatch
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHIFFON_")}
    env.update(CHIFFON_STATE_DIR=str(state), CHIFFON_LOG_LEVEL="INFO")
    return env


@pytest.fixture
def orchestrator(cli_env: dict[str, str], rabbitmq_url: str
                 ) -> Iterator[tuple[subprocess.Popen[str], int, Publisher]]:
    """``chiffon orchestrator`` as a subprocess on a private vhost; yields (process, port,
    a publisher of heartbeats as agents send them there)."""
    port = _free_port()
    try:
        with private_vhost(rabbitmq_url) as url:
            env = {**cli_env, "CHIFFON_HEARTBEAT_SECRET": "lab-secret",
                   "CHIFFON_BROKER_URL": url}
            process = subprocess.Popen([*CHIFFON, "orchestrator", "--metrics-port", str(port),
                                        "--metrics-addr", "127.0.0.1"],
                                       env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            publisher = Publisher(url, HEARTBEAT_QUEUE)
            try:
                wait_for(lambda: _metrics(port) is not None or process.poll() is not None, 30,
                         "the orchestrator to serve /metrics")
                assert process.poll() is None, process.communicate()
                yield process, port, publisher
            finally:
                publisher.close()
                if process.poll() is None:
                    process.kill()
                    process.communicate()
    except VhostUnavailable as exc:
        missing_service(str(exc))


def _metrics(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def _accepted(port: int) -> float:
    text = _metrics(port) or ""
    for family in text_string_to_metric_families(text):
        if family.name == "chiffon_heartbeats_accepted":
            return float(family.samples[0].value)
    return -1.0


@pytest.mark.integration
def test_orchestrator_fills_the_registry_that_status_json_reports_and_stops_on_sigterm(
        orchestrator: tuple[subprocess.Popen[str], int, Publisher],
        cli_env: dict[str, str]) -> None:
    process, port, publisher = orchestrator
    for seq in (1, 2, 5):
        publisher.heartbeat(sign_snapshot(make_snapshot("desk-1", seq=seq), "lab-secret"))
    publisher.heartbeat(sign_snapshot(make_snapshot("rig-1", pool="gpu_rigs",
                                                    vram_available_gb=40.0,
                                                    vram_total_gb=47.99), "lab-secret"))
    publisher.heartbeat(make_snapshot("intruder"))  # unsigned: rejected
    wait_for(lambda: _accepted(port) == 4, 20, "4 heartbeats accepted")
    state = Path(cli_env["CHIFFON_STATE_DIR"])
    with Registry(f"sqlite:///{state / 'registry.sqlite3'}") as registry:
        wait_for(lambda: len(registry.agents()) == 2, 10, "the batch to be committed")

    done = subprocess.run([*CHIFFON, "status", "--json"], env=cli_env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    agents = {a["agent_id"]: a for a in json.loads(done.stdout)}
    assert set(agents) == {"desk-1", "rig-1"}
    desk = agents["desk-1"]
    assert desk["state"] == "online"
    assert 0 <= desk["age_seconds"] < 30
    assert (desk["hostname"], desk["pool"], desk["boot_id"]) == (
        "host-desk-1", "desktop_pool_1", "boot-desk-1")
    assert (desk["seq"], desk["restarts"], desk["missed"]) == (5, 0, 2)
    assert desk["gpu_vram_available_gb"] == 20.5
    assert desk["gpus"][0]["vendor"] == "nvidia"
    assert "signature" not in desk
    metrics = _metrics(port) or ""
    assert 'chiffon_heartbeats_rejected_total{reason="unsigned"} 1.0' in metrics

    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=15)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert "SIGTERM received" in err
    assert "lab-secret" not in err and "guest:guest" not in err, "secrets never logged"


@pytest.fixture
def filled_state(cli_env: dict[str, str]) -> str:
    """A registry in the CLI's state dir with two agents and some history."""
    url = f"sqlite:///{Path(cli_env['CHIFFON_STATE_DIR']) / 'registry.sqlite3'}"
    now = time.time()
    with Registry(url) as registry:
        feeder = Feeder(registry)
        for n in range(1, 40):
            feeder.snapshot(make_snapshot("desk-1", seq=n, load_1min=n / 10,
                                          collected_at=now - 400 + n * 10),
                            received_at=now - 400 + n * 10)
        feeder.snapshot(make_snapshot("rig-1", pool="gpu_rigs", gpu=False),
                        received_at=now - 500)
        feeder.commit()
    return url


def test_status_prints_a_table_and_filters_by_pool(
        filled_state: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--wide"]) == 0
    out = capsys.readouterr().out
    header, desk, rig = out.splitlines()[:3]
    assert header.split() == ["AGENT", "HOST", "POOL", "STATE", "AGE", "CORES", "LOAD",
                              "MEM", "GiB", "GPU", "VRAM", "GiB", "FOREIGN"]
    assert desk.split()[:4] == ["desk-1", "host-desk-1", "desktop_pool_1", "online"]
    assert "20.5/24.0" in desk and "4.1/8" in desk and "3.90" in desk
    assert rig.split()[:4] == ["rig-1", "host-rig-1", "gpu_rigs", "lost"]
    assert "1 of 2 agents online" in out
    assert main(["status", "--json", "--pool", "gpu_rigs"]) == 0
    assert [a["agent_id"] for a in json.loads(capsys.readouterr().out)] == ["rig-1"]


def test_status_shows_gpu_health_unknown_vram_and_foreign_gpu_use(
        cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{Path(cli_env['CHIFFON_STATE_DIR']) / 'registry.sqlite3'}"
    with Registry(url) as registry:
        feeder = Feeder(registry)
        feeder.snapshot(make_snapshot("gamer", gpu_health="degraded", gpu_processes=2,
                                      gpu_foreign_processes=1, gpu_foreign_memory_gb=6.25),
                        received_at=time.time())
        feeder.snapshot(make_snapshot("laptop", vram_total_gb=0.0, vram_available_gb=0.0,
                                      gpu_vram_known=False, gpu_health="ok"),
                        received_at=time.time())
        feeder.commit()
    assert main(["status", "--wide"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:3]}
    assert "nvidia degraded" in rows["gamer"] and rows["gamer"].endswith("1 (6.2 GiB)")
    assert "?/0.0" in rows["laptop"] and rows["laptop"].endswith("-")


def test_history_draws_sparklines_of_load_memory_and_vram(
        filled_state: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history", "desk-1", "--width", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("desk-1 (host-desk-1, pool desktop_pool_1): 39 points")
    load = next(line for line in lines if line.startswith("load 1m"))
    assert "▁" in load and "█" in load and "last 3.90" in load
    assert any(line.startswith("vram avail") for line in lines)


@pytest.mark.parametrize(("argv", "message"), [
    (["history", "nobody"], "no agent 'nobody' in the registry"),
    (["submit", "echo", "{oops"], "payload: is not valid JSON"),
    (["submit", "echo", "--needs", "gpus=1"], "unknown need 'gpus'"),
    (["submit", "echo", "--needs", "cores=lots"], "--needs: cores must be a number"),
    (["submit", "echo", "--needs", "gpu_vram_gb=64"], "no online agent has 64 GiB free VRAM; "
                                                      "best has 20.5 GiB free VRAM (desk-1)"),
    (["status", "--watch", "0"], "--watch needs a positive number"),
])
def test_errors_exit_non_zero_with_one_line(
        filled_state: str, capsys: pytest.CaptureFixture[str], argv: list[str],
        message: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("chiffon: error: ")
    assert message in err


def test_status_on_an_unreachable_postgresql_is_one_line(
        cli_env: dict[str, str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIFFON_DATABASE_URL", "postgresql+psycopg://u:pw@127.0.0.1:1/x")
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "u:**@127.0.0.1:1" in err and ":pw@" not in err


@pytest.mark.integration
def test_submit_to_a_pool_prints_where_the_work_went(
        cli_env: dict[str, str], capsys: pytest.CaptureFixture[str], rabbitmq_url: str
        ) -> None:
    from kombu import Connection

    from chiffon_worker.orchestrator.routing import work_queue

    pool = f"test_pool_{time.time_ns()}"
    try:
        assert main(["submit", "echo", '{"text": "hi"}', "--pool", pool, "--queue-anyway",
                     "--work-id", "w-cli-1"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed == {"work_id": "w-cli-1", "queue": pool, "agent_id": None}
        with Connection(rabbitmq_url) as conn:
            simple = conn.SimpleQueue(work_queue(pool))
            message = simple.get(timeout=10)
            message.ack()
            simple.close()
        assert json.loads(message.body)[0] == [
            {"work_id": "w-cli-1", "work_type": "echo", "payload": {"text": "hi"}}]
    finally:
        with Connection(rabbitmq_url) as conn:
            bound = work_queue(pool)(conn.default_channel)
            bound.delete()
            bound.exchange.delete()


def test_history_png_needs_matplotlib_or_says_so(
        filled_state: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "desk.png"
    code = main(["history", "desk-1", "--png", str(target)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2
        assert "pip install 'chiffon-worker[png]'" in capsys.readouterr().err
    else:
        assert code == 0
        assert target.read_bytes().startswith(b"\x89PNG")


def _read_lines(stream: IO[str], into: list[str]) -> threading.Thread:
    """Append each line of ``stream`` to ``into`` from a daemon thread, until EOF."""
    def pump() -> None:
        for line in stream:
            into.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def test_status_watch_refreshes_until_interrupted(
        filled_state: str, cli_env: dict[str, str]) -> None:
    process = subprocess.Popen([*CHIFFON, "status", "--watch", "0.2"], env=cli_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    reader = _read_lines(process.stdout, lines)
    try:
        wait_for(lambda: "".join(lines).count("1 of 2 agents online") >= 2
                 or process.poll() is not None, 60, "the second refresh of status --watch")
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    reader.join(timeout=15)
    out = "".join(lines)
    assert process.returncode == 0, err
    assert out.count("chiffon status, every 0.2 s") >= 2
    assert out.count("1 of 2 agents online") >= 2


#: Runs ``chiffon`` with the orchestrator extra's modules unimportable, as on a base install.
_WITHOUT_EXTRA = (
    "import sys\n"
    "for name in ('sqlalchemy', 'psycopg', 'prometheus_client', 'orjson'):\n"
    "    sys.modules[name] = None\n"
    "from chiffon_worker.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_agent_commands_work_without_the_orchestrator_extra(cli_env: dict[str, str]) -> None:
    def chiffon(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _WITHOUT_EXTRA, *argv], env=cli_env,
                              capture_output=True, text=True, timeout=60, check=False)

    usage = chiffon("--help")
    assert usage.returncode == 0, usage.stderr
    assert all(name in usage.stdout for name in ("metrics", "status", "history", "submit"))
    metrics = chiffon("metrics", "--json")
    assert metrics.returncode == 0, metrics.stderr
    assert json.loads(metrics.stdout)["agent_id"]
    for command in ("status", "orchestrator", "history"):
        refused = chiffon(command, *(["desk-1"] if command == "history" else []))
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"chiffon: error: chiffon {command} needs the "
                                         "orchestrator extra (")
        assert refused.stderr.endswith("): pip install 'chiffon-worker[orchestrator]'\n")
        assert refused.stderr.count("\n") == 1


def test_sparklines_average_time_buckets_and_leave_offline_stretches_blank() -> None:
    from chiffon_worker.cli.history_charts import bucket_means, sparkline

    times = [0.0, 1.0, 2.0, 3.0, 10.0]
    assert bucket_means(times, [1.0, 3.0, 5.0, 5.0, 8.0], 5) == [2.0, 5.0, None, None, 8.0]
    assert sparkline([0.0, 4.0, None, 8.0]) == "▁▅ █"
    assert sparkline([0.0, 0.0]) == "▁▁"


def test_status_fits_80_columns_with_short_ids_and_says_what_wide_adds(
        cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{Path(cli_env['CHIFFON_STATE_DIR']) / 'registry.sqlite3'}"
    agent_id = "3f2a9c1d-8b7e-5c4d-9e0f-1a2b3c4d5e6f"
    with Registry(url) as registry:
        feeder = Feeder(registry)
        feeder.snapshot(make_snapshot(agent_id, hostname="gaming-desktop-upstairs",
                                      pool="gpu_rigs_basement"), received_at=time.time())
        feeder.commit()
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[1].startswith("3f2a9c1d-8b7 ")
    assert lines[-1].startswith("1 of 1 agents online (") and lines[-1].endswith(": --wide)")
    assert main(["status", "--wide"]) == 0
    assert agent_id in capsys.readouterr().out


def test_status_says_when_the_pool_filter_matched_nothing(
        filled_state: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--pool", "nope"]) == 0
    assert capsys.readouterr().out.strip() == (
        "no agents in pool nope; pools: desktop_pool_1, gpu_rigs")


def test_status_without_a_registry_names_the_path_and_creates_nothing(
        cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(cli_env["CHIFFON_STATE_DIR"]) / "registry.sqlite3"
    assert main(["status"]) == 1
    assert f"chiffon: error: no registry at {path}: " in capsys.readouterr().err
    assert not path.parent.exists()


def test_status_on_another_programs_database_leaves_it_untouched(
        cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "photos.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    os.environ["CHIFFON_DATABASE_URL"] = f"sqlite:///{other}"  # restored by clean_env
    assert main(["status"]) == 1
    assert "is not a chiffon registry" in capsys.readouterr().err
    with sqlite3.connect(other) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
    assert tables == ["photos"]


def test_status_watch_into_a_closed_pipe_ends_quietly(filled_state: str,
                                                      cli_env: dict[str, str]) -> None:
    watch = subprocess.Popen([*CHIFFON, "status", "--watch", "0.2"], env=cli_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert watch.stdout is not None and watch.stderr is not None
    watch.stdout.readline()
    watch.stdout.close()  # as `| head -1` does
    assert watch.wait(timeout=30) == 0
    assert watch.stderr.read() == b""


@pytest.mark.parametrize("name", ["host-desk-1", "desk"])
def test_history_takes_a_hostname_or_an_id_prefix(
        filled_state: str, capsys: pytest.CaptureFixture[str], name: str) -> None:
    assert main(["history", name, "--width", "20"]) == 0
    assert capsys.readouterr().out.startswith("desk-1 (host-desk-1, pool desktop_pool_1)")


def test_the_png_shades_silences_breaks_lines_there_and_draws_from_zero_to_the_total() -> None:
    import math

    from chiffon_worker.cli.history_charts import broken_at_gaps, offline_spans, y_top

    times = [0.0, 30.0, 60.0, 600.0, 630.0]
    assert offline_spans(times, 30.0) == [(60.0, 600.0)]
    xs, ys = broken_at_gaps(times, [1.0, 2.0, 3.0, 4.0, 5.0], [(60.0, 600.0)])
    assert xs == [0.0, 30.0, 60.0, 60.0, 600.0, 630.0]
    assert math.isnan(ys[3]) and ys[:3] == [1.0, 2.0, 3.0] and ys[4:] == [4.0, 5.0]
    assert (y_top([0.99, 1.0, 1.01], 16.0), y_top([20.0], 16.0), y_top([0.0], None)) == (
        16.0, 20.0, 1.0)

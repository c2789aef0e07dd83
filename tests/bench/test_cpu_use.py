"""bench/cpu_use.py: who spent the machine's CPU during a measured block."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.cpu_use import SERVERS, measure_cpu


def _burn(cpu_seconds: float) -> None:
    """Keep this process busy until it has spent ``cpu_seconds`` of CPU."""
    until = time.process_time() + cpu_seconds
    while time.process_time() < until:
        sum(range(1000))


def test_the_consumer_is_this_process_and_counts_its_cpu() -> None:
    with measure_cpu() as use:
        _burn(0.2)
    assert use.consumer_seconds >= 0.2
    assert use.wall_seconds >= use.consumer_seconds * 0.5  # one thread: CPU within wall


def test_a_busy_block_shows_the_machine_busy_and_names_its_cores() -> None:
    with measure_cpu() as use:
        _burn(0.2)
    assert use.cores >= 1
    assert 0.0 < use.busy_fraction <= 1.0
    assert 0.0 <= use.steal_fraction <= use.busy_fraction


def test_cpu_of_another_process_is_not_the_consumers() -> None:
    burner = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    with measure_cpu() as use:
        subprocess.run([sys.executable, "-c", burner], check=True)
    assert use.consumer_seconds < 0.3


def test_per_message_gives_microseconds_for_the_consumer_and_each_server() -> None:
    with measure_cpu() as use:
        _burn(0.1)
    row = use.per_message(1000)
    assert row["consumer_cpu_us_per_message"] == pytest.approx(
        use.consumer_seconds / 1000 * 1e6, abs=0.1)
    assert {f"{kind}_cpu_us_per_message" for kind in SERVERS} <= set(row)
    assert all(row[f"{kind}_cpu_us_per_message"] >= 0 for kind in SERVERS)
    assert 0 < row["machine_busy_percent"] <= 100

"""Run every benchmark and print each measure against its target.

    python -m bench                 # everything, full length (the soak alone is ~11 min)
    python -m bench --quick         # shorter runs of each (about 4 min in all)
    python -m bench --only snapshot,ingest
    python -m bench --report        # just the table, from the JSON already in bench/results

Each benchmark is a script under ``bench/`` writing ``bench/results/<name>.json``; this
runner starts them one after another (they measure the same machine, so never at once)
and then reads the JSON back. Exit status 1 if a target was missed or a benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: name -> (extra arguments for a full run, for a quick run)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "snapshot": ([], ["--iterations", "5000"]),
    "heartbeat": ([], ["--quick"]),
    "ingest": (["--repeat", "3"], ["--messages", "20000"]),
    "soak": ([], ["--quick"]),
    "liveness": ([], ["--quick"]),
    "routing": ([], ["--quick"]),
    "registry": ([], ["--quick"]),
}


@dataclass(frozen=True)
class Measure:
    """One row: where to find the value in a result file, and its target."""

    benchmark: str
    name: str
    unit: str
    target: str
    read: Callable[[dict[str, Any]], float]
    met: Callable[[float], bool]


def _ingest(backend: str) -> Callable[[dict[str, Any]], float]:
    def read(data: dict[str, Any]) -> float:
        for row in data["results"]:
            if row["backend"] == backend:
                return float(row["heartbeats_per_second"])
        raise KeyError(backend)

    return read


def _ingest_ratio(backend: str, ratio: str) -> Callable[[dict[str, Any]], float]:
    """The median ratio of ours to a peer measured in the same repeats (issue 16)."""
    def read(data: dict[str, Any]) -> float:
        return float(data["peers"]["backends"][backend]["summary"][ratio]["median"])

    return read


def _default_footprint(data: dict[str, Any]) -> dict[str, Any]:
    default = data["default"]
    for row in data["idle_footprint"]:
        if (row["pool"], row["concurrency"], row["beat"]) == (
                default["pool"], default["concurrency"], default["beat"]):
            return dict(row)
    raise KeyError("default footprint")


def _liveness(signal: str, key: str) -> Callable[[dict[str, Any]], float]:
    """A median of bench/results/liveness.json (chiffon's seconds, or the ratio to Flower)."""
    def read(data: dict[str, Any]) -> float:
        row = data["results"][signal]
        value = row["ratio_of_medians"] if key == "ratio" else row[key]["median"]
        if value is None:
            raise KeyError(f"{signal} {key}")
        return float(value)

    return read


def _registry(backend: str, measure: str) -> Callable[[dict[str, Any]], float]:
    """A median at 10,000 agents in bench/results/registry.json (this tree's seconds)."""
    def read(data: dict[str, Any]) -> float:
        for row in data["results"]:
            if (row["backend"], row["agents"]) == (backend, 10000):
                return float(row["after"]["seconds"][measure]["median"])
        raise KeyError(f"{backend} {measure}")

    return read


def _routing(backend: str, agents: int) -> Callable[[dict[str, Any]], float]:
    """The median over repetitions of the placement p50 in bench/results/routing.json."""
    def read(data: dict[str, Any]) -> float:
        for row in data["results"]:
            if (row["backend"], row["agents"]) == (backend, agents):
                return float(row["latency"]["placement_p50_ms"]["median"])
        raise KeyError(f"{backend} {agents}")

    return read


MEASURES = [
    Measure("snapshot", "snapshot p50, no GPU", "us", "<= 150",
            lambda d: d["results"]["agent_no_gpu"]["p50_us"], lambda v: v <= 150),
    Measure("snapshot", "snapshot p50, 8 NVML GPUs with processes", "us", "<= 300",
            lambda d: d["results"]["agent_8_nvml_gpus"]["p50_us"], lambda v: v <= 300),
    Measure("snapshot", "snapshot p50, GPU tool hung", "us", "<= 1000",
            lambda d: d["results"]["agent_gpu_tool_hung"]["p50_us"], lambda v: v <= 1000),
    Measure("heartbeat", "start -> first heartbeat (median)", "s", "<= 2",
            lambda d: d["start_to_first_heartbeat"]["seconds_median"], lambda v: v <= 2),
    Measure("heartbeat", "beat emit -> consumer p50", "ms", "<= 10",
            lambda d: d["latency"]["p50_ms"], lambda v: v <= 10),
    Measure("heartbeat", "idle RSS, whole agent", "MiB", "<= 100",
            lambda d: _default_footprint(d)["rss_mib"], lambda v: v <= 100),
    Measure("heartbeat", "idle CPU", "% of a core", "<= 0.2",
            lambda d: _default_footprint(d)["cpu_percent_of_one_core"], lambda v: v <= 0.2),
    Measure("ingest", "ingest, SQLite", "heartbeats/s", ">= 5000", _ingest("sqlite"),
            lambda v: v >= 5000),
    Measure("ingest", "ingest, PostgreSQL", "heartbeats/s", ">= 5000", _ingest("postgresql"),
            lambda v: v >= 5000),
    *(Measure("ingest", f"ingest / {peer}, {name} (median)", "x", target,
              _ingest_ratio(backend, ratio), met)
      for backend, name in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL"))
      for peer, ratio, target, met in (
          ("kombu ack-only floor", "ours_over_kombu_floor", ">= 0.8",
           lambda v: v >= 0.8),
          ("Celery event state", "ours_over_celery_event_state", "> 1", lambda v: v > 1),
          # the same ratio in CPU: what the floor's process spends per message over what
          # ours spends per heartbeat (bench/cpu_use.py); close to the rate ratio when the
          # consumer is the busy part of the machine
          ("kombu floor in CPU (its CPU / ours)", "kombu_floor_cpu_over_ours_cpu", ">= 0.8",
           lambda v: v >= 0.8))),
    Measure("ingest", "2 orchestrators / 1, PostgreSQL (median)", "x", ">= 1.5",
            lambda d: d["orchestrators"]["summary"]["ratios"]["2_over_1"]["median"],
            lambda v: v >= 1.5),
    Measure("soak", "heartbeats lost", "", "== 0",
            lambda d: d["heartbeats_missed"], lambda v: v == 0),
    Measure("soak", "max RSS growth per process", "MiB", "<= 8",
            lambda d: d["worst_rss_growth_mib"], lambda v: v <= 8),
    Measure("soak", "max fd growth per process", "", "<= 0",
            lambda d: d["worst_fd_growth"], lambda v: v <= 0),
    Measure("liveness", "SIGTERM -> chiffon stopped (median)", "s", "<= 1",
            _liveness("SIGTERM", "chiffon_seconds"), lambda v: v <= 1),
    Measure("liveness", "SIGKILL -> chiffon lost (median)", "s", "<= 10",
            _liveness("SIGKILL", "chiffon_seconds"), lambda v: v <= 10),
    Measure("liveness", "SIGSTOP -> chiffon lost (median)", "s", "<= 10",
            _liveness("SIGSTOP", "chiffon_seconds"), lambda v: v <= 10),
    Measure("liveness", "SIGKILL chiffon/Flower (medians)", "x", "<= 1.05",
            _liveness("SIGKILL", "ratio"), lambda v: v <= 1.05),
    Measure("liveness", "SIGSTOP chiffon/Flower (medians)", "x", "<= 1.05",
            _liveness("SIGSTOP", "ratio"), lambda v: v <= 1.05),
    Measure("routing", "placement p50, 1,000 agents, SQLite", "ms", "<= 5",
            _routing("sqlite", 1000), lambda v: v <= 5),
    Measure("routing", "placement p50, 10,000 agents, SQLite", "ms", "<= 20",
            _routing("sqlite", 10000), lambda v: v <= 20),
    Measure("routing", "placement p50, 1,000 agents, PostgreSQL", "ms", "<= 5",
            _routing("postgresql", 1000), lambda v: v <= 5),
    Measure("routing", "placement p50, 10,000 agents, PostgreSQL", "ms", "<= 20",
            _routing("postgresql", 10000), lambda v: v <= 20),
    Measure("registry", "status --json, 10,000 agents, SQLite (process)", "s", "<= 1",
            _registry("sqlite", "status_json"), lambda v: v <= 1),
    Measure("registry", "status --json, 10,000 agents, PostgreSQL (process)", "s", "<= 1",
            _registry("postgresql", "status_json"), lambda v: v <= 1),
    Measure("registry", "/metrics, 10,000 agents, SQLite", "s", "<= 0.5",
            _registry("sqlite", "metrics"), lambda v: v <= 0.5),
    Measure("registry", "/metrics, 10,000 agents, PostgreSQL", "s", "<= 0.5",
            _registry("postgresql", "metrics"), lambda v: v <= 0.5),
]


def run(names: list[str], quick: bool) -> dict[str, int]:
    """Run the benchmarks in turn; returns their exit statuses."""
    statuses: dict[str, int] = {}
    for name in names:
        full, short = BENCHMARKS[name]
        argv = [sys.executable, str(HERE / f"{name}.py"), *(short if quick else full)]
        sys.stderr.write(f"== bench {name}: {' '.join(argv[1:])}\n")
        statuses[name] = subprocess.run(argv, check=False).returncode
    return statuses


def report(names: list[str]) -> tuple[str, bool]:
    """The table of every measure of ``names``, and whether every target was met."""
    rows = [("benchmark", "measure", "value", "unit", "target", "met")]
    all_met = True
    for measure in MEASURES:
        if measure.benchmark not in names:
            continue
        path = RESULTS / f"{measure.benchmark}.json"
        try:
            value = measure.read(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            rows.append((measure.benchmark, measure.name, "-", measure.unit, measure.target,
                         f"no result ({type(exc).__name__})"))
            all_met = False
            continue
        met = measure.met(value)
        all_met &= met
        rows.append((measure.benchmark, measure.name, f"{value:g}", measure.unit,
                     measure.target, "yes" if met else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in rows]
    return "\n".join(lines), all_met


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--report", action="store_true", help="print the table only")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    statuses = {} if args.report else run(names, args.quick)
    table, all_met = report(names)
    sys.stdout.write(table + "\n")
    failed = [name for name, status in statuses.items() if status not in (0, 1)]
    if failed:
        sys.stdout.write(f"benchmarks that failed to run: {', '.join(failed)}\n")
    return 0 if all_met and not failed else 1


if __name__ == "__main__":
    sys.exit(main())

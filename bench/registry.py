"""Reading the registry at fleet scale: ``chiffon status`` and one ``/metrics`` scrape.

For each backend (SQLite in a temporary directory; PostgreSQL in a throwaway schema) and
each fleet size (``--agents``, default 1,000 and 10,000), a fresh registry is filled with
that many agents from realistic heartbeats (``tests/orchestrator/snapshots.random_snapshot``
through the judge and the batch writer, as the consumer stores them), all heard from at
the start. Then ``--repeat`` rounds (default 3), each timing, in turn:

* ``status_json``: ``chiffon status --json`` as a whole process (``python -m
  chiffon_worker.cli``: interpreter start, imports, config, registry open, read, print),
  stdout to a pipe read to the end; wall time from spawn to exit.
* ``status_table``: ``chiffon status`` the same way.
* ``status_json_terminal`` (this tree only): ``chiffon status --json`` with stdout on a
  pseudo-terminal, where it indents and decodes every snapshot (the old way).
* ``metrics``: one ``GET /metrics`` (no Accept header: the text format), timed from the
  request to the last byte, from a ``MetricsServer`` over the same registry in a process
  of its own (started once per fleet, warmed by one scrape); ``metrics_prometheus``: the
  same as Prometheus asks (OpenMetrics, gzip).
* ``sql_floor``: the SELECT behind ``status --json`` (agents with their snapshot text,
  signs, conflict and drain joined, by pool and id) run bare on a DB-API cursor in this
  process, warm: execute and fetch every row.

``process_floor`` is ``chiffon status --json`` on an empty registry of the same backend:
what any status costs before the first row. With ``--baseline-rev REV`` the status and
metrics measures also run on that revision's code (``git archive``; its ``chiffon_worker``
put first on ``PYTHONPATH``), as ``before``. REV must read the registry schema this tree
writes (schema 4 since 46588e6; d0e4b89, the revision before the status and /metrics
work, reads only schema 3), so there is no default baseline.

Each measure is reported as min/median/max over the rounds, ``over_floor`` as the ratio of
its median to the SQL floor's, and ``growth`` as its 10,000-agent median over its
1,000-agent median. Targets, on the median, at 10,000 agents on each backend:
``status --json`` <= 1 s and ``/metrics`` <= 0.5 s. The machine is shared: medians of
few rounds; rerun before trusting a miss by a hair. Writes ``bench/results/registry.json``.

    python bench/registry.py [--agents 1000,10000] [--repeat 3] [--backends sqlite,postgresql]
    python bench/registry.py --quick          # 1,000 and 10,000 agents, 2 rounds, no baseline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pty
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# chiffon_worker is imported inside the functions that use it: a --serve-metrics child
# must first put the tree it serves (the baseline's or this one) on sys.path.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import Backend, fill  # noqa: E402
from bench.trees import baseline_tree  # noqa: E402

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import Registry

RESULTS = ROOT / "bench" / "results"
#: The last commit before status and /metrics were made fast (issue 16, part 5).
#: No baseline unless asked for (see the module docstring).
BASELINE_REV = ""
#: measure -> target at 10,000 agents (median seconds)
TARGETS = {"status_json": 1.0, "metrics": 0.5}
TARGET_AGENTS = 10000
SEED = 16
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
              "text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
    "Accept-Encoding": "gzip"}


# -- the trees measured -----------------------------------------------------------------------

# -- the measures ------------------------------------------------------------------------------

class Chiffon:
    """Runs ``chiffon`` commands of one tree against one registry, in a private home."""

    def __init__(self, tree: Path, url: str, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.tree = tree
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CHIFFON_")}
        self.env.update(PYTHONPATH=str(tree), HOME=str(home),
                        XDG_STATE_HOME=str(home / "state"),
                        XDG_CONFIG_HOME=str(home / "config"),
                        CHIFFON_STATE_DIR=str(home / "chiffon"), CHIFFON_DATABASE_URL=url)

    def timed(self, *argv: str) -> tuple[float, int]:
        """Seconds from spawn to exit of ``chiffon argv`` with stdout read to the end
        through a pipe, and the bytes it wrote."""
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "chiffon_worker.cli", *argv],
                              env=self.env, cwd=self.home, capture_output=True, timeout=300,
                              check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"chiffon {' '.join(argv)} ({self.tree}) failed: "
                             f"{done.stderr.decode(errors='replace')[-2000:]}")
        return elapsed, len(done.stdout)

    def timed_on_terminal(self, *argv: str) -> tuple[float, int]:
        """:meth:`timed` with stdout on a pseudo-terminal (read to the end)."""
        leader, follower = pty.openpty()
        started = time.perf_counter()
        try:
            process = subprocess.Popen([sys.executable, "-m", "chiffon_worker.cli", *argv],
                                       env=self.env, cwd=self.home, stdout=follower,
                                       stderr=subprocess.DEVNULL)
        finally:
            os.close(follower)
        size = 0
        try:
            while True:
                try:
                    chunk = os.read(leader, 1 << 20)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                size += len(chunk)
        finally:
            os.close(leader)
        status = process.wait(timeout=300)
        elapsed = time.perf_counter() - started
        if status != 0:
            raise SystemExit(f"chiffon {' '.join(argv)} on a terminal failed ({status})")
        return elapsed, size


class MetricsProcess:
    """A ``MetricsServer`` of one tree over one registry, in a child process."""

    def __init__(self, tree: Path, backend: Backend) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-metrics", str(tree),
                backend.url, backend.schema or ""]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise SystemExit(f"the metrics server of {tree} did not start: {line!r}")
        self.port = int(line)

    def scrape(self, headers: dict[str, str] | None = None) -> tuple[float, int]:
        """Seconds from the request to the last byte of one ``/metrics``, and the bytes."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics",
                                         headers=headers or {})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            body = response.read()
        return time.perf_counter() - started, len(body)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve_metrics(tree: str, url: str, schema: str) -> None:
    """The child of :class:`MetricsProcess`: serve until stdin closes; print the port."""
    sys.path.insert(0, tree)
    from chiffon_worker.orchestrator.exporter import MetricsServer, OrchestratorCollector
    from chiffon_worker.orchestrator.ingest_counters import IngestStats
    from chiffon_worker.orchestrator.registry import Registry

    registry = Registry(url, schema=schema or None)
    server = MetricsServer(OrchestratorCollector(registry, IngestStats()), 0, "127.0.0.1")
    print(server.port, flush=True)
    try:
        sys.stdin.read()
    finally:
        server.close()
        registry.close()


def sql_floor(registry: Registry) -> Callable[[], tuple[float, int]]:
    """A timer of the bare SELECT behind ``status --json`` on a warm DB-API cursor."""
    from chiffon_worker.orchestrator import sql_schema
    from chiffon_worker.orchestrator.registry import _agents_query

    query = _agents_query(True).order_by(sql_schema.agents.c.pool,
                                         sql_schema.agents.c.agent_id)
    schema_map = {None: registry.schema} if registry.schema else None
    sql = str(query.compile(dialect=registry.engine.dialect, schema_translate_map=schema_map,
                            render_schema_translate=bool(schema_map)))
    connection = registry.engine.raw_connection()

    def run() -> tuple[float, int]:
        started = time.perf_counter()
        cursor = connection.cursor()
        try:
            cursor.execute(sql)
            rows = cursor.fetchall()
        finally:
            cursor.close()
        elapsed = time.perf_counter() - started
        connection.rollback()
        return elapsed, len(rows)

    run()  # warm: connect, plan, cache
    return run


def spread(values: list[float]) -> dict[str, Any]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


def measure_fleet(backend: Backend, registry: Registry, trees: dict[str, Path],
                  workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every measure of one filled registry, ``args.repeat`` rounds, interleaved."""
    seconds: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    sizes: dict[str, dict[str, int]] = {name: {} for name in trees}
    commands = {name: Chiffon(tree, backend.process_url, workdir / f"home-{name}")
                for name, tree in trees.items()}
    servers: dict[str, MetricsProcess] = {}
    try:
        for name, tree in trees.items():
            servers[name] = MetricsProcess(tree, backend)
            servers[name].scrape()  # warm: connect, first query
        floor = sql_floor(registry)
        for rnd in range(args.repeat):
            for name in trees:
                steps: dict[str, Callable[[], tuple[float, int]]] = {
                    "status_json": lambda c=commands[name]: c.timed("status", "--json"),
                    "status_table": lambda c=commands[name]: c.timed("status"),
                    "metrics": servers[name].scrape,
                    "metrics_prometheus":
                        lambda s=servers[name]: s.scrape(PROMETHEUS_HEADERS)}
                if name == "after":
                    steps["status_json_terminal"] = lambda c=commands[name]: \
                        c.timed_on_terminal("status", "--json")
                    steps["sql_floor"] = floor
                for measure, step in steps.items():
                    elapsed, size = step()
                    seconds[name].setdefault(measure, []).append(elapsed)
                    sizes[name][measure] = size
            after = seconds["after"]
            print(f"  round {rnd + 1}: status --json {after['status_json'][-1]:.3f} s, "
                  f"table {after['status_table'][-1]:.3f} s, /metrics "
                  f"{after['metrics'][-1]:.3f} s, floor {after['sql_floor'][-1]:.3f} s"
                  + (f"; before: status --json {seconds['before']['status_json'][-1]:.3f} s,"
                     f" /metrics {seconds['before']['metrics'][-1]:.3f} s"
                     if "before" in seconds else ""), file=sys.stderr)
    finally:
        for server in servers.values():
            server.close()
    result: dict[str, Any] = {}
    floor_median = statistics.median(seconds["after"]["sql_floor"])
    for name in trees:
        result[name] = {
            "seconds": {m: spread(v) for m, v in seconds[name].items()},
            "over_floor": {m: round(statistics.median(v) / floor_median, 1)
                           for m, v in seconds[name].items() if m != "sql_floor"},
            "bytes": sizes[name]}
    result["after"]["rows"] = sizes["after"].pop("sql_floor")
    return result


def process_floor(name: str, trees: dict[str, Path], workdir: Path, repeat: int
                  ) -> dict[str, Any]:
    """``chiffon status --json`` on an empty registry of backend ``name``, per tree."""
    backend = Backend(name, "chiffon-bench-registry-")
    try:
        backend.open().close()
        out: dict[str, Any] = {}
        for tree_name, tree in trees.items():
            command = Chiffon(tree, backend.process_url, workdir / f"home-empty-{tree_name}")
            out[tree_name] = spread([command.timed("status", "--json")[0]
                                     for _ in range(repeat)])
        return out
    finally:
        backend.drop()


# -- the run -----------------------------------------------------------------------------------

def run_backend(name: str, trees: dict[str, Path], workdir: Path,
                args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for agents in args.agents:
        backend = Backend(name, "chiffon-bench-registry-")
        try:
            registry = backend.open()
            try:
                fill_seconds = fill(registry, agents, time.time(), SEED)
                print(f"{name}, {agents} agents (filled in {fill_seconds:.1f} s)",
                      file=sys.stderr)
                row: dict[str, Any] = {"backend": name, "agents": agents,
                                       "fill_seconds": round(fill_seconds, 2)}
                row.update(measure_fleet(backend, registry, trees, workdir, args))
                rows.append(row)
            finally:
                registry.close()
        finally:
            backend.drop()
    return rows


def growth(rows: list[dict[str, Any]], smallest: int, largest: int) -> list[dict[str, Any]]:
    """Per backend and tree: each measure's median at ``largest`` over ``smallest``."""
    out = []
    by_key = {(r["backend"], r["agents"]): r for r in rows}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        small, large = by_key.get((backend, smallest)), by_key.get((backend, largest))
        if small is None or large is None:
            continue
        for tree in ("after", "before"):
            if tree not in small:
                continue
            out.append({"backend": backend, "tree": tree,
                        "agents": [smallest, largest], "ratio_of_medians": {
                            m: round(v["median"] / small[tree]["seconds"][m]["median"], 2)
                            for m, v in large[tree]["seconds"].items()}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="1000,10000",
                        help="fleet sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every measure")
    parser.add_argument("--baseline-rev", default=BASELINE_REV,
                        help="also measure this revision's code as 'before' ('' for none)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, no baseline")
    parser.add_argument("--output", type=Path, default=RESULTS / "registry.json")
    parser.add_argument("--serve-metrics", nargs=3, metavar=("TREE", "URL", "SCHEMA"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_metrics:
        serve_metrics(*args.serve_metrics)
        return
    args.agents = [int(n) for n in args.agents.split(",") if n]
    if args.quick:
        args.repeat, args.baseline_rev = 2, ""
    started = time.time()
    load_before = os.getloadavg()[0]
    results: list[dict[str, Any]] = []
    floors: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="chiffon-bench-registry-") as tmp:
        workdir = Path(tmp)
        trees = {"after": ROOT}
        if args.baseline_rev:
            trees["before"] = baseline_tree(args.baseline_rev, workdir / "baseline")
        for name in filter(None, args.backends.split(",")):
            floors[name] = process_floor(name, trees, workdir, args.repeat)
            results.extend(run_backend(name, trees, workdir, args))
    import psycopg
    import sqlalchemy

    targets = []
    for row in results:
        if row["agents"] != TARGET_AGENTS:
            continue
        for measure, target in TARGETS.items():
            value = row["after"]["seconds"][measure]["median"]
            targets.append({"backend": row["backend"], "agents": row["agents"],
                            "measure": measure, "target_s": target, "value_s": value,
                            "met": value <= target})
    report = {
        "benchmark": "reading the registry at fleet scale: chiffon status (whole process) "
                     "and one /metrics scrape",
        "targets": {f"{m}_median_s_at_{TARGET_AGENTS}_agents": t for m, t in TARGETS.items()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "sqlalchemy": sqlalchemy.__version__,
                    "psycopg": psycopg.__version__,
                    "load_average_1min_before_after": [round(load_before, 2),
                                                       round(os.getloadavg()[0], 2)]},
        "settings": {"agents": args.agents, "repeat": args.repeat,
                     "before": f"git {args.baseline_rev}: status --json decoded and "
                               "indented every snapshot; /metrics through "
                               "prometheus_client's objects" if args.baseline_rev else None,
                     "after": "this tree: status --json compact off a terminal, snapshots "
                              "copied as stored; /metrics written directly"},
        "target_results": targets,
        "all_targets_met": bool(targets) and all(t["met"] for t in targets),
        "process_floor_seconds": floors,
        "growth": growth(results, min(args.agents), max(args.agents)),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    for t in targets:
        print(f"{t['backend']} {t['agents']} agents: {t['measure']} {t['value_s']} s "
              f"(target <= {t['target_s']}) {'met' if t['met'] else 'MISSED'}",
              file=sys.stderr)
    sys.exit(0 if report["all_targets_met"] else 1)


if __name__ == "__main__":
    main()

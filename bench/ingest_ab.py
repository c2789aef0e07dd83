"""Heartbeat ingest now against ingest at an earlier revision: the same heartbeats, alternating.

The machine's speed swings by more than a change is worth (the kombu floor of
``bench/ingest.py`` measured 6,300 to 16,700 messages/s on one machine over two days), so
a change to the consumer is judged by pairs: per pair and backend, one queue is filled
with this tree's heartbeats (today's agent's shape) and drained by the revision's
consumer, then another is filled and drained by this tree's, the order alternating
between pairs. Each drain runs in a child process whose ``chiffon_worker`` is that tree's
(``git archive`` of the revision, :mod:`bench.trees`), through ``bench/ingest.py``'s
``drain`` without step timers, into a fresh registry; every agent must be stored.
Reported per backend: each side's heartbeats/s and its consumer's CPU time per heartbeat
(which other programs sway less), and the ratio now / revision of each within each pair
(min / median / max).

    python bench/ingest_ab.py --rev eb3ddd0          # 5 pairs per backend, ~10 min
    python bench/ingest_ab.py --rev HEAD~3 --pairs 3 --backends sqlite

Writes ``bench/results/ingest_ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kombu.connection import Connection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cpu_use import cpu_model  # noqa: E402
from bench.trees import baseline_tree  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SIDES = ("revision", "now")
#: What each drain reports: its rate, and the CPU time its process took per heartbeat
#: (connecting included), which other programs on the machine sway less than the rate.
MEASURES = ("heartbeats_per_second", "cpu_us_per_heartbeat")


def drain_in_child(tree: Path, backend: str, queue: str, args: argparse.Namespace
                   ) -> dict[str, Any]:
    """In the child: drain ``queue`` with the ``chiffon_worker`` of ``tree`` into a fresh
    ``backend`` registry; returns the rate and what was stored."""
    sys.path.insert(0, str(tree))
    import chiffon_worker

    if Path(chiffon_worker.__file__).resolve().parent.parent != tree.resolve():
        raise SystemExit(f"measured {chiffon_worker.__file__}, not the tree {tree}")
    from bench.ingest import POSTGRES, drain
    from bench.ingest_shared import drop_schema
    from chiffon_worker.orchestrator.registry import Registry

    schema = f"chiffon_ab_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="chiffon-ab-") as workdir:
        registry = (Registry(f"sqlite:///{Path(workdir) / 'registry.sqlite3'}")
                    if backend == "sqlite" else Registry(POSTGRES, schema=schema))
        try:
            cpu = time.process_time()
            result = drain(registry, queue, args.messages, batch_size=args.batch_size,
                           prefetch=args.prefetch, timed=False)
            cpu = time.process_time() - cpu
            stored = len(registry.agents())
        finally:
            registry.close()
            if backend == "postgresql":
                drop_schema(POSTGRES, schema)
    if stored != args.agents:
        raise SystemExit(f"{backend}: {stored} agents stored, expected {args.agents}")
    return {"heartbeats_per_second": result["heartbeats_per_second"],
            "cpu_us_per_heartbeat": round(cpu / args.messages * 1e6, 1),
            "accepted": result["accepted"], "agents_stored": stored}


def one_drain(tree: Path, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fill a fresh queue with this tree's heartbeats, then drain it in a child process
    running ``tree``'s consumer."""
    from bench.ingest import BROKER, delete_queue, fill_queue
    from bench.ingest_peers import wait_for_depth
    from chiffon_worker.wire import heartbeat_queue

    queue = f"chiffon.bench.ab.{uuid.uuid4().hex}"
    try:
        with Connection(BROKER) as conn:
            heartbeat_queue(queue)(conn.default_channel).declare()
        fill_queue(queue, args.messages, args.agents, args.publishers, short_argsrepr=True)
        depth = wait_for_depth(BROKER, queue, args.messages)
        if depth != args.messages:
            raise SystemExit(f"queue holds {depth} messages, expected {args.messages}")
        done = subprocess.run(
            [sys.executable, __file__, "--drain", str(tree), "--backend", backend,
             "--queue", queue, "--messages", str(args.messages), "--agents", str(args.agents),
             "--batch-size", str(args.batch_size), "--prefetch", str(args.prefetch)],
            capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"draining with {tree}: {done.stderr.strip()[-2000:]}")
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        delete_queue(queue)


def summary(pairs: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per measure (heartbeats/s, the consumer's CPU per heartbeat): each side's values
    and the ratio now / revision within each pair."""
    from bench.ingest_peers import spread

    return {measure: {**{side: spread([p[side][measure] for p in pairs]) for side in SIDES},
                      "now_over_revision": spread(
                          [p["now"][measure] / p["revision"][measure] for p in pairs], 3)}
            for measure in MEASURES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="the earlier revision (git rev) to compare with")
    parser.add_argument("--pairs", type=int, default=5, help="pairs per backend")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--agents", type=int, default=6_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--prefetch", type=int, default=2000)
    parser.add_argument("--output", type=Path, default=RESULTS / "ingest_ab.json")
    parser.add_argument("--drain", metavar="TREE", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain:
        print(json.dumps(drain_in_child(Path(args.drain), args.backend, args.queue, args)))
        return
    if not args.rev:
        raise SystemExit("--rev: the revision to compare with is required")
    if args.pairs < 1 or args.messages % args.agents:
        raise SystemExit("need --pairs >= 1 and --messages a multiple of --agents")
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.rev],
                         capture_output=True, text=True, check=False).stdout.strip()
    if not rev:
        raise SystemExit(f"--rev {args.rev}: not a revision of {ROOT}")
    backends = [b for b in args.backends.split(",") if b]
    report: dict[str, Any] = {
        "benchmark": "heartbeat ingest: this tree against an earlier revision, in pairs",
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(),
                    "python": platform.python_version(),
                    "platform": platform.platform()},
        "revision": rev,
        "settings": {"pairs": args.pairs, "messages": args.messages, "agents": args.agents,
                     "batch_size": args.batch_size, "prefetch": args.prefetch,
                     "publishers": args.publishers},
        "backends": {},
    }
    with tempfile.TemporaryDirectory(prefix="chiffon-ab-rev-") as workdir:
        trees = {"revision": baseline_tree(rev, Path(workdir)), "now": ROOT}
        for backend in backends:
            pairs: list[dict[str, dict[str, float]]] = []
            for index in range(args.pairs):
                order = SIDES if index % 2 == 0 else SIDES[::-1]
                pair = {side: one_drain(trees[side], backend, args) for side in order}
                pairs.append(pair)
                before, now = pair["revision"], pair["now"]
                print(f"{backend} pair {index + 1}/{args.pairs}: heartbeats/s revision "
                      f"{before['heartbeats_per_second']:.0f}, now "
                      f"{now['heartbeats_per_second']:.0f}; CPU us per heartbeat revision "
                      f"{before['cpu_us_per_heartbeat']}, now {now['cpu_us_per_heartbeat']}; "
                      f"order {', '.join(order)}", flush=True)
            report["backends"][backend] = summary(pairs)
            for measure in MEASURES:
                ratio = report["backends"][backend][measure]["now_over_revision"]
                print(f"{backend} {measure}: now / {rev} median x{ratio['median']} "
                      f"({ratio['min']}-{ratio['max']})", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""The snapshot cost of this working tree against an earlier revision, in one run.

Runs ``bench/snapshot.py`` of a git revision (checked out in a temporary worktree) and of
this tree, alternating, ``--runs`` times each, and compares the snapshot cost without a
GPU: p50 in microseconds and its ratio to psutil's own calls measured in the same run
(the ratio is what survives a noisy shared machine). Writes
``bench/results/snapshot_compare.json`` with min/median/max of each.

    python bench/snapshot_compare.py --before HEAD~3 [--runs 3] [--iterations 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCENARIO = "agent_no_gpu"


def run_snapshot_bench(tree: Path, iterations: int) -> dict[str, Any]:
    """One run of ``bench/snapshot.py`` in ``tree``; its JSON report."""
    subprocess.run([sys.executable, "bench/snapshot.py", "--iterations", str(iterations)],
                   cwd=tree, check=False, capture_output=True, text=True, timeout=900)
    report: dict[str, Any] = json.loads((tree / "bench" / "results" / "snapshot.json")
                                        .read_text())
    return report


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max, rounded."""
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2),
            "max": round(max(values), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20000)
    args = parser.parse_args()
    before_rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT,
                                check=True, capture_output=True, text=True).stdout.strip()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="chiffon-before-") as tmp:
        worktree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), before_rev],
                       cwd=ROOT, check=True, capture_output=True)
        saved = (RESULTS / "snapshot.json").read_bytes() if (RESULTS / "snapshot.json"
                                                             ).exists() else None
        try:
            for _ in range(args.runs):
                for side, tree in (("before", worktree), ("after", ROOT)):
                    results = run_snapshot_bench(tree, args.iterations)["results"]
                    runs[side].append({
                        "p50_us": results[SCENARIO]["p50_us"],
                        "psutil_p50_us": results["psutil_baseline"]["p50_us"],
                        "ratio_to_psutil_p50": results[SCENARIO]["ratio_to_psutil_p50"]})
        finally:
            if saved is not None:
                (RESULTS / "snapshot.json").write_bytes(saved)
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT,
                           check=False, capture_output=True)
    summary = {side: {key: spread([r[key] for r in rows]) for key in rows[0]}
               for side, rows in runs.items()}
    ratio = summary["after"]["ratio_to_psutil_p50"]["median"] / \
        summary["before"]["ratio_to_psutil_p50"]["median"]
    report = {
        "benchmark": "snapshot_compare",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scenario": SCENARIO,
        "before": before_rev,
        "runs": runs,
        "summary": summary,
        "after_over_before_median_ratio": round(ratio, 3),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "snapshot_compare.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"after / before (median ratio to psutil): {ratio:.3f}; wrote "
          f"{out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

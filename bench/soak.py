"""Soak: 20 agents and the orchestrator on the real RabbitMQ for 10 minutes.

Runs what users run — ``celery -A chiffon_worker worker -B --pool=solo`` per agent
(interval 1 s) and ``chiffon orchestrator`` — in a private RabbitMQ virtual host, samples
every process's RSS and open file descriptors and every agent's heartbeat age, and writes
``bench/results/soak.json`` and ``bench/results/soak.png``.

Targets: 0 heartbeats lost while all parts are up; no RSS or fd growth beyond noise.

    python bench/soak.py                 # 20 agents, 10 minutes
    python bench/soak.py --agents 5 --minutes 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
#: RSS growth (MiB) between the first and last sample that still counts as noise.
RSS_NOISE_MIB = 8.0
#: Seconds after all agents are online before growth is measured from (imports settle).
WARMUP_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Proc:
    """A process we started; its tree (beat child included) is measured together."""

    name: str
    popen: subprocess.Popen[bytes]
    rss_mib: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def sample(self) -> None:
        try:
            parent = psutil.Process(self.popen.pid)
            tree = [parent, *parent.children(recursive=True)]
            rss = sum(p.memory_info().rss for p in tree) / 2**20
            fds = sum(p.num_fds() for p in tree)
        except psutil.Error:
            return
        self.rss_mib.append(round(rss, 2))
        self.fds.append(fds)


def status(env: dict[str, str]) -> list[dict[str, Any]]:
    out = subprocess.run([str(BIN / "chiffon"), "status", "--json"], env=env,
                         capture_output=True, timeout=30, check=True)
    agents: list[dict[str, Any]] = json.loads(out.stdout)
    return agents


def scrape(port: int) -> dict[str, float]:
    """Prometheus counters and gauges by name (labels folded by summing)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def stop(procs: list[Proc]) -> None:
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(5)


def run(agents: int, minutes: float, sample_every: float) -> dict[str, Any]:
    vhost = f"chiffon-soak-{os.getpid()}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    workdir = Path(tempfile.mkdtemp(prefix="chiffon-soak-"))
    metrics_port = free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CHIFFON_")}
    base_env.update({
        "CHIFFON_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        "CHIFFON_STATE_DIR": str(workdir / "state"),
        "CHIFFON_HEARTBEAT_INTERVAL": "1",
        "CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": "5",
        "CHIFFON_METRICS_PORT": str(metrics_port),
        "CHIFFON_AGENT_POOL_NAME": "soak_pool",
        "CHIFFON_WORKER_POOL": "solo",
    })
    procs: list[Proc] = []
    timeline: list[dict[str, Any]] = []
    try:
        log = (workdir / "orchestrator.log").open("wb")
        procs.append(Proc("orchestrator", subprocess.Popen(
            [str(BIN / "chiffon"), "orchestrator"], env=base_env, cwd=workdir,
            stdout=log, stderr=subprocess.STDOUT)))
        for i in range(agents):
            env = dict(base_env, CHIFFON_AGENT_ID=f"soak-{i:02d}")
            agent_log = (workdir / f"agent-{i:02d}.log").open("wb")
            procs.append(Proc(f"agent-{i:02d}", subprocess.Popen(
                [str(BIN / "celery"), "-A", "chiffon_worker", "worker", "-B", "-l", "warning"],
                env=env, cwd=workdir, stdout=agent_log, stderr=subprocess.STDOUT)))
        started = time.monotonic()
        while True:  # wait until every agent is online
            try:
                online = [a for a in status(base_env) if a["state"] == "online"]
            except (subprocess.SubprocessError, ValueError):
                online = []
            if len(online) == agents:
                break
            if time.monotonic() - started > 180:
                raise RuntimeError(f"only {len(online)}/{agents} agents online after 180 s; "
                                   f"logs in {workdir}")
            time.sleep(1)
        startup_seconds = time.monotonic() - started
        time.sleep(WARMUP_SECONDS)
        first = {a["agent_id"]: a for a in status(base_env)}
        counters_first = scrape(metrics_port)
        t0 = time.monotonic()
        end = t0 + minutes * 60
        while time.monotonic() < end:
            rows = status(base_env)
            for proc in procs:
                proc.sample()
            timeline.append({
                "t": round(time.monotonic() - t0, 1),
                "max_age_seconds": max(a["age_seconds"] for a in rows),
                "missed": sum(a["missed"] for a in rows),
                "offline": sum(a["state"] != "online" for a in rows),
                "rss_mib": {p.name: p.rss_mib[-1] for p in procs if p.rss_mib},
                "fds": {p.name: p.fds[-1] for p in procs if p.fds},
            })
            time.sleep(max(0.0, sample_every - (time.monotonic() - t0) % sample_every))
        last = {a["agent_id"]: a for a in status(base_env)}
        counters_last = scrape(metrics_port)
    finally:
        stop(procs)
        rabbitmqctl("delete_vhost", vhost)

    sent = sum(last[a]["seq"] - first[a]["seq"] for a in last)
    missed = sum(last[a]["missed"] - first[a]["missed"] for a in last)
    restarts = sum(last[a]["restarts"] - first[a]["restarts"] for a in last)
    accepted_key = next((k for k in counters_last if "accepted" in k and k.endswith("_total")),
                        None)
    recorded = (counters_last[accepted_key] - counters_first.get(accepted_key, 0.0)
                if accepted_key else sent - missed)
    growth = {
        p.name: {
            "rss_first_mib": p.rss_mib[0], "rss_last_mib": p.rss_mib[-1],
            "rss_growth_mib": round(p.rss_mib[-1] - p.rss_mib[0], 2),
            "fds_first": p.fds[0], "fds_last": p.fds[-1],
            "fd_growth": p.fds[-1] - p.fds[0],
        } for p in procs if p.rss_mib
    }
    worst_rss = max(g["rss_growth_mib"] for g in growth.values())
    worst_fd = max(g["fd_growth"] for g in growth.values())
    max_age = max(row["max_age_seconds"] for row in timeline)
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "soak",
        "agents": agents, "minutes": minutes, "heartbeat_interval_seconds": 1,
        "pool": "solo", "startup_seconds_all_online": round(startup_seconds, 1),
        "heartbeats_sent": sent, "heartbeats_recorded": int(recorded),
        "heartbeats_missed": missed, "restarts_seen": restarts,
        "max_heartbeat_age_seconds": round(max_age, 2),
        "worst_rss_growth_mib": worst_rss, "worst_fd_growth": worst_fd,
        "per_process": growth,
        "targets": {
            "heartbeats_lost": {"value": missed, "target": "== 0", "met": missed == 0},
            "rss_growth_mib": {"value": worst_rss, "target": f"<= {RSS_NOISE_MIB}",
                               "met": worst_rss <= RSS_NOISE_MIB},
            "fd_growth": {"value": worst_fd, "target": "<= 0", "met": worst_fd <= 0},
        },
        "timeline": timeline,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result["timeline"]
    t = [row["t"] / 60 for row in timeline]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for name in timeline[0]["rss_mib"]:
        axes[0].plot(t, [row["rss_mib"].get(name) for row in timeline],
                     linewidth=1.5 if name == "orchestrator" else 0.6,
                     label=name if name == "orchestrator" else None)
    axes[0].set_ylabel("RSS per process tree (MiB)")
    axes[0].legend(loc="upper left")
    for name in timeline[0]["fds"]:
        axes[1].plot(t, [row["fds"].get(name) for row in timeline], linewidth=0.6)
    axes[1].set_ylabel("open fds")
    axes[2].plot(t, [row["max_age_seconds"] for row in timeline], label="max heartbeat age (s)")
    axes[2].plot(t, [row["missed"] for row in timeline], label="missed heartbeats (total)")
    axes[2].set_xlabel("minutes")
    axes[2].legend(loc="upper left")
    fig.suptitle(f"chiffon soak: {result['agents']} agents, interval 1 s, "
                 f"{result['heartbeats_sent']} heartbeats sent, "
                 f"{result['heartbeats_missed']} missed")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds")
    parser.add_argument("--quick", action="store_true", help="5 agents for 1 minute")
    args = parser.parse_args()
    if args.quick:
        args.agents, args.minutes = 5, 1.0
    result = run(args.agents, args.minutes, args.sample_every)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(result, RESULTS / "soak.png")
    except ImportError:
        sys.stderr.write("matplotlib not installed: no soak.png (pip install matplotlib)\n")
    summary = {k: v for k, v in result.items() if k not in ("timeline", "per_process")}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0 if all(t["met"] for t in result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

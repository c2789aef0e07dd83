"""The agent machine's commands: ``chiffon metrics``, ``chiffon config show`` and
``chiffon init-config`` (``--with-secret``: for the orchestrator's host, with a new
heartbeat lab secret). They need only the base install (no orchestrator extra)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
from importlib import resources
from pathlib import Path
from typing import Any

from chiffon_worker.cli.command_types import Subcommands
from chiffon_worker.cli.output import emit, render_table
from chiffon_worker.config import SYSTEM_CONFIG_FILE, USER_CONFIG_RELATIVE, Config
from chiffon_worker.errors import EXIT_OK, ChiffonError
from chiffon_worker.signing import new_lab_secret

log = logging.getLogger(__name__)

GPU_TABLE_HEADERS = ("#", "vendor", "name", "free GiB", "total GiB", "util %", "temp C",
                     "power W", "procs", "source", "health")


def add_agent_commands(subcommands: Subcommands) -> None:
    """Register ``metrics``, ``config show`` and ``init-config``."""
    metrics = subcommands.add_parser("metrics", help="print one snapshot of this machine")
    metrics.add_argument("--json", action="store_true", help="machine-readable JSON")
    metrics.set_defaults(handler=cmd_metrics)

    config = subcommands.add_parser("config", help="inspect the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    config_sub.required = True
    show = config_sub.add_parser("show", help="effective values and their sources")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_config_show)

    init = subcommands.add_parser("init-config", help="write the documented example agent.yml")
    init.add_argument("--system", action="store_true", help=f"write {SYSTEM_CONFIG_FILE}")
    init.add_argument("--path", help="write to this path instead")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("--with-secret", action="store_true",
                      help="for the orchestrator's host: fill in heartbeat_lab_secret with a "
                           "new random secret (then `chiffon signing-key AGENT_ID` gives "
                           "each agent its key)")
    init.set_defaults(handler=cmd_init_config)


# -- chiffon metrics -----------------------------------------------------------------------

def cmd_metrics(args: argparse.Namespace) -> int:
    """Print one snapshot of this machine, as text or (``--json``) as the heartbeat sends it."""
    from chiffon_worker.agents.desktop import DesktopAgent

    config = Config()
    agent = DesktopAgent(config.agent_id, "desktop", config)
    try:
        snap = agent.snapshot(heartbeat=False)
    finally:
        agent.close()
    emit(json.dumps(snap, indent=2, sort_keys=False) if args.json else render_metrics(snap))
    return EXIT_OK


def render_metrics(snap: dict[str, Any]) -> str:
    """A human-readable view of one snapshot."""
    probe = snap["gpu_probe"]
    lines = [
        f"agent      {snap['agent_id']}  ({snap['hostname']}, pool {snap['pool']})",
        f"cpu        {snap['cpu_percent']:.1f}% busy, load {snap['cpu_load_1min']:.2f} / "
        f"{snap['cpu_load_5min']:.2f} / {snap['cpu_load_15min']:.2f}",
        f"cores      {snap['cpu_cores_available']:g} available of "
        f"{snap.get('cpu_cores_effective', snap['cpu_cores_physical']):g} usable "
        f"({snap['cpu_cores_physical']} physical)" + _busy(snap),
        f"memory     {snap['memory_available_gb']:.2f} GiB available of "
        f"{snap['memory_total_gb']:.2f} GiB ({snap['memory_percent']:.1f}% used)",
        f"gpu        {snap['gpu_type']}: {_free_vram(snap)} of "
        f"{snap['gpu_vram_total_gb']:.2f} GiB, {snap['gpu_count']} device(s); probe "
        f"{probe['state']} via {probe['source']}"
        + (f" ({probe['error']})" if probe.get("error") else ""),
    ]
    if snap.get("gpu_health") not in (None, "ok", "none"):
        lines.append(f"gpu health {snap['gpu_health']}: {snap.get('gpu_health_reason')}")
    if snap["gpus"]:
        rows = [[g.get("index"), g.get("vendor"), g.get("name"), g.get("vram_available_gb"),
                 g.get("vram_total_gb"), g.get("utilization_percent"), g.get("temperature_c"),
                 g.get("power_draw_w"), _processes(g), g.get("source"), _health(g)]
                for g in snap["gpus"]]
        lines += ["", render_table(GPU_TABLE_HEADERS, rows)]
    return "\n".join(lines)


def _busy(snap: dict[str, Any]) -> str:
    busy, source = snap.get("cpu_cores_busy"), snap.get("cpu_busy_source")
    if busy is None or source is None:
        return ""
    origin = "the cgroup's usage" if source == "cgroup" else "the 1-minute load"
    return f"; {busy:g} busy by {origin}"


def _free_vram(snap: dict[str, Any]) -> str:
    if snap.get("gpu_vram_known") is False:
        return "free VRAM unknown"
    return f"{snap['gpu_vram_available_gb']:.2f} GiB VRAM free"


def _processes(gpu: dict[str, Any]) -> str:
    """``3 (1 foreign)``; ``-`` where the GPU does not list its processes."""
    processes = gpu.get("processes")
    if not isinstance(processes, list):
        return "-"
    foreign = sum(1 for p in processes if isinstance(p, dict) and p.get("owner") == "foreign")
    return f"{len(processes)} ({foreign} foreign)" if foreign else str(len(processes))


def _health(gpu: dict[str, Any]) -> str:
    health = gpu.get("health") or ("unhealthy" if gpu.get("error") else "ok")
    reason = gpu.get("health_reason") or gpu.get("error")
    return f"{health}: {reason}" if reason and health != "ok" else str(health)


# -- chiffon config show -------------------------------------------------------------------

def cmd_config_show(args: argparse.Namespace) -> int:
    """Print every effective setting (secrets masked) with where its value came from."""
    config = Config()
    values = config.masked()
    if args.json:
        emit(json.dumps({k: {"value": v, "source": config.sources.get(k, "default")}
                         for k, v in values.items()}, indent=2))
        return EXIT_OK
    rows = [[k, v, config.sources.get(k, "default")] for k, v in values.items()]
    emit(render_table(["key", "value", "source"], rows))
    emit()
    emit("files loaded: " + (", ".join(config.files_loaded) or "none (defaults)"))
    return EXIT_OK


# -- chiffon init-config -------------------------------------------------------------------

def example_config_text() -> str:
    """The documented example config shipped with the package (``deploy/agent.yml``)."""
    return resources.files("chiffon_worker").joinpath("data/agent.yml").read_text("utf-8")


#: The example's line that ``--with-secret`` fills in.
LAB_SECRET_LINE = 'heartbeat_lab_secret: ""\n'


def with_lab_secret(text: str, secret: str) -> str:
    """``text`` (the example config) with ``heartbeat_lab_secret`` set to ``secret``."""
    if text.count(LAB_SECRET_LINE) != 1:
        raise ChiffonError("the packaged example config has no blank heartbeat_lab_secret "
                           "line to fill in")
    return text.replace(LAB_SECRET_LINE, "# generated by `chiffon init-config --with-secret`; "
                        "keep this file mode 600\n"
                        f'heartbeat_lab_secret: "{secret}"\n')


def cmd_init_config(args: argparse.Namespace) -> int:
    """Write the example config (mode 600) to the user's, the system's or a given path;
    with ``--with-secret``, holding a new lab secret (:func:`~chiffon_worker.signing.
    new_lab_secret`; never printed)."""
    target = SYSTEM_CONFIG_FILE if args.system else Path.home() / USER_CONFIG_RELATIVE
    if args.path:
        target = Path(args.path)
    if target.exists() and not args.force:
        raise ChiffonError(f"{target} already exists; not overwriting (use --force)")
    text = example_config_text()
    if args.with_secret:
        text = with_lab_secret(text, new_lab_secret())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            mode = _owner_only(handle.fileno(), target)
            handle.write(text)
    except OSError as exc:
        raise ChiffonError(f"cannot write {target}: {exc.strerror or exc}") from None
    emit(f"wrote {target} (mode {mode:o}); edit it, then check with `chiffon config show`")
    if args.with_secret:
        emit("it holds a new heartbeat_lab_secret: give each agent its own key with "
             "`chiffon signing-key AGENT_ID` (its heartbeat_key)")
    return EXIT_OK


def _owner_only(fd: int, target: Path) -> int:
    """Make the open file ``fd`` mode 600 before anything is written to it (an existing file
    overwritten with ``--force`` keeps its mode otherwise); returns the mode it has. Warns
    when others may still read it (the file belongs to someone else)."""
    try:
        os.fchmod(fd, 0o600)
    except OSError as exc:
        log.warning("cannot make %s mode 600: %s", target, exc.strerror or exc)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        log.warning("%s is mode %o: others may read the secrets it holds; chmod 600 it",
                    target, mode)
    return mode

"""The ``chiffon`` command: metrics, config, and (on the orchestrator host) the registry views.

Every subcommand reads the same :class:`~chiffon_worker.config.Config`. Errors print one
line ``chiffon: error: ...`` on stderr and exit non-zero; no tracebacks for expected faults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from chiffon_worker._version import __version__
from chiffon_worker.config import SYSTEM_CONFIG_FILE, USER_CONFIG_RELATIVE, Config
from chiffon_worker.errors import ChiffonError

log = logging.getLogger("chiffon_worker.cli")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2

Handler = Callable[[argparse.Namespace], int]


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [[_format_value(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return "\n".join(lines)


# -- chiffon metrics -----------------------------------------------------------------------

def _cmd_metrics(args: argparse.Namespace) -> int:
    from chiffon_worker.agents.desktop import DesktopAgent

    config = Config()
    agent = DesktopAgent(config.agent_id, "desktop", config)
    try:
        snap = agent.snapshot(heartbeat=False)
    finally:
        agent.close()
    if args.json:
        _print(json.dumps(snap, indent=2, sort_keys=False))
        return EXIT_OK
    _print(render_metrics(snap))
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
        f"({snap['cpu_cores_physical']} physical)",
        f"memory     {snap['memory_available_gb']:.2f} GiB available of "
        f"{snap['memory_total_gb']:.2f} GiB ({snap['memory_percent']:.1f}% used)",
        f"gpu        {snap['gpu_type']}: {snap['gpu_vram_available_gb']:.2f} GiB VRAM free of "
        f"{snap['gpu_vram_total_gb']:.2f} GiB, {snap['gpu_count']} device(s); probe "
        f"{probe['state']} via {probe['source']}"
        + (f" ({probe['error']})" if probe.get("error") else ""),
    ]
    if snap["gpus"]:
        rows = [[g.get("index"), g.get("vendor"), g.get("name"), g.get("vram_available_gb"),
                 g.get("vram_total_gb"), g.get("utilization_percent"), g.get("temperature_c"),
                 g.get("source"), g.get("error")] for g in snap["gpus"]]
        lines += ["", render_table(["#", "vendor", "name", "free GiB", "total GiB", "util %",
                                    "temp C", "source", "error"], rows)]
    return "\n".join(lines)


# -- chiffon config ------------------------------------------------------------------------

def _cmd_config_show(args: argparse.Namespace) -> int:
    config = Config()
    values = config.masked()
    if args.json:
        _print(json.dumps({k: {"value": v, "source": config.sources.get(k, "default")}
                           for k, v in values.items()}, indent=2))
        return EXIT_OK
    rows = [[k, v, config.sources.get(k, "default")] for k, v in values.items()]
    _print(render_table(["key", "value", "source"], rows))
    _print("")
    _print("files loaded: " + (", ".join(config.files_loaded) or "none (defaults)"))
    return EXIT_OK


def example_config_text() -> str:
    """The documented example config shipped with the package (``deploy/agent.yml``)."""
    return resources.files("chiffon_worker").joinpath("data/agent.yml").read_text("utf-8")


def _cmd_init_config(args: argparse.Namespace) -> int:
    target = SYSTEM_CONFIG_FILE if args.system else Path.home() / USER_CONFIG_RELATIVE
    if args.path:
        target = Path(args.path)
    if target.exists() and not args.force:
        raise ChiffonError(f"{target} already exists; not overwriting (use --force)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(example_config_text())
    except OSError as exc:
        raise ChiffonError(f"cannot write {target}: {exc.strerror or exc}") from None
    _print(f"wrote {target} (mode 600); edit it, then check with `chiffon config show`")
    return EXIT_OK


# -- parser and entry point ----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``chiffon`` (subcommands from every part of the project)."""
    parser = argparse.ArgumentParser(prog="chiffon", description="Chiffon homelab agent")
    parser.add_argument("--version", action="version", version=f"chiffon {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    metrics = sub.add_parser("metrics", help="print one snapshot of this machine")
    metrics.add_argument("--json", action="store_true", help="machine-readable JSON")
    metrics.set_defaults(handler=_cmd_metrics)

    config = sub.add_parser("config", help="inspect the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    config_sub.required = True
    show = config_sub.add_parser("show", help="effective values and their sources")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_cmd_config_show)

    init = sub.add_parser("init-config", help="write the documented example agent.yml")
    init.add_argument("--system", action="store_true", help=f"write {SYSTEM_CONFIG_FILE}")
    init.add_argument("--path", help="write to this path instead")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(handler=_cmd_init_config)

    _add_orchestrator_commands(sub)
    return parser


def _add_orchestrator_commands(sub: Any) -> None:
    """Orchestrator-side commands, when that part is installed."""
    try:
        from chiffon_worker.orchestrator.commands import add_commands
    except ImportError:
        return
    add_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``chiffon``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except ChiffonError as exc:
        from chiffon_worker.errors import ConfigError

        sys.stderr.write(f"chiffon: error: {exc}\n")
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

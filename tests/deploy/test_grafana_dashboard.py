"""deploy/grafana/chiffon-fleet.json: an importable Grafana 10/11 dashboard whose every
panel queries the chosen Prometheus data source with valid PromQL reading only metrics and
labels the real exporter serves."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, TARGET_LABELS, Served
from .promql import reads

DASHBOARD = ROOT / "deploy" / "grafana" / "chiffon-fleet.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: schemaVersion written by Grafana 10.0 (37) to 11.x (39-41).
GRAFANA_10_11_SCHEMAS = range(37, 42)
#: Series Prometheus makes itself (not the exporter), with their labels.
PROMETHEUS_SERIES = {"up": set(TARGET_LABELS)}
#: Grafana's macros, and what a check substitutes for them to get plain PromQL.
MACROS = {"$__rate_interval": "1m", "$pool": ".*", "$job": "chiffon"}
_LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)")
_LEGEND_LABELS = re.compile(r"\{\{\s*(\w+)\s*\}\}")
#: Panels that only arrange others.
LAYOUT = {"row"}
#: What the brief asks the dashboard to show: title words, each in some panel's title.
REQUIRED_PANELS = ("liveness", "cores", "memory", "vram", "gpu health", "temperature",
                   "heartbeat age", "rejected", "missed", "write errors", "write time",
                   "conflicts")


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] not in LAYOUT]


def _exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p["targets"]]


def _variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in _dashboard()["templating"]["list"]}


def _variable_queries() -> list[tuple[str, str]]:
    """(selector, label) of each ``label_values(selector, label)`` variable."""
    found = []
    for variable in _variables().values():
        match = _LABEL_VALUES.fullmatch(variable.get("definition", ""))
        if match:
            found.append((match.group(1), match.group(2)))
    return found


def test_the_dashboard_is_grafana_10_or_11_json_with_a_uid_and_title() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] in GRAFANA_10_11_SCHEMAS
    assert dashboard["uid"] == "chiffon-fleet" and dashboard["title"]
    assert dashboard["id"] is None, "an exported id would clash on import"


def test_the_data_source_is_a_variable_of_prometheus_data_sources() -> None:
    datasource = _variables()["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")


def test_the_pool_variable_lists_the_pools_the_agents_are_labelled_with() -> None:
    pool = _variables()["pool"]
    assert pool["type"] == "query" and pool["datasource"] == DATASOURCE
    assert pool["query"] == pool["definition"]
    assert pool["includeAll"] and pool["multi"] and pool["allValue"] == ".*"
    match = _LABEL_VALUES.fullmatch(pool["definition"])
    assert match is not None and match.group(2) == "pool"
    assert "chiffon_agent_" in match.group(1)


def test_every_panel_queries_the_datasource_variable_and_has_a_target() -> None:
    for panel in _panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip() and target["refId"], panel["title"]


def test_panel_ids_are_unique_and_every_panel_is_placed_on_the_24_column_grid() -> None:
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]


@pytest.mark.parametrize("words", REQUIRED_PANELS)
def test_the_dashboard_shows(words: str) -> None:
    assert any(words in p["title"].lower() for p in _panels())


def test_every_expression_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    exprs = _exprs()
    for macro, value in MACROS.items():
        exprs = [e.replace(macro, value) for e in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{n}", "expr": e} for n, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_dashboard_reads_is_served_by_the_exporter(served: Served) -> None:
    used = reads(*_exprs(), *(selector for selector, _ in _variable_queries()))
    known = {**served.labels, **PROMETHEUS_SERIES}
    assert sorted(set(used.metrics) - set(known)) == []


def test_every_label_the_dashboard_matches_groups_by_or_shows_is_served(
        served: Served) -> None:
    used = reads(*_exprs(), *(selector for selector, _ in _variable_queries()))
    known = {**served.labels, **PROMETHEUS_SERIES}
    for metric, labels in used.metrics.items():
        assert labels <= known[metric] | TARGET_LABELS, metric
    every_label = set(TARGET_LABELS).union(*served.labels.values())
    legends = {label for p in _panels() for t in p["targets"]
               for label in _LEGEND_LABELS.findall(t.get("legendFormat", ""))}
    variables = {label for _, label in _variable_queries()}
    assert used.grouping | legends | variables <= every_label


def test_every_label_value_the_dashboard_matches_is_served(served: Served) -> None:
    used = reads(*_exprs())
    for (metric, label), values in used.values.items():
        assert values <= served.values.get((metric, label), set()), (metric, label)

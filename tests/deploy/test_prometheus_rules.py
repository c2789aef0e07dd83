"""deploy/prometheus/chiffon-alerts.yml: valid for promtool, each alert proven by
promtool's unit tests (chiffon-alerts.test.yml) to fire on the series that should fire it
and not on healthy ones, and reading only metrics, labels and label values the real
exporter serves."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from .conftest import ROOT, TARGET_LABELS, Served
from .promql import reads

RULES = ROOT / "deploy" / "prometheus" / "chiffon-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "chiffon-alerts.test.yml"
#: Series Prometheus makes itself (not the exporter), with their labels.
PROMETHEUS_SERIES = {"up": set(TARGET_LABELS)}
#: The orchestrators' scrape job, as docs/orchestrator.md configures it.
JOB = "chiffon"


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_the_alert_rules_pass_promtool_check(promtool: str) -> None:
    result = _promtool(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_every_alert_fires_on_its_series_and_not_on_healthy_ones(promtool: str) -> None:
    result = _promtool(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_show_every_alert_firing_and_holding_back() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
             for case in test["alert_rule_test"]]
    for rule in _alerts():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), \
            f"{rule['alert']} is never shown quiet"


def test_every_alert_waits_has_a_severity_and_names_what_it_is_about() -> None:
    for rule in _alerts():
        name, annotations = rule["alert"], rule["annotations"]
        assert rule.get("for"), f"{name} has no for:"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        text = annotations["summary"] + annotations["description"]
        subject = ("agent_id", "hostname") if "agent_id" in rule["expr"] else ("instance",)
        for label in subject:
            assert f"$labels.{label}" in annotations["summary"] \
                or f"$labels.{label}" in annotations["description"], f"{name}: {label}"
        assert len(text) > 100, f"{name}: say what it means and what to do"


def test_the_orchestrator_down_rule_watches_the_documented_job() -> None:
    [down] = [rule for rule in _alerts() if rule["alert"] == "ChiffonOrchestratorDown"]
    assert reads(down["expr"]).values == {("up", "job"): {JOB}}
    scrape_config = (ROOT / "docs" / "orchestrator.md").read_text(encoding="utf-8")
    assert f"job_name: {JOB}" in scrape_config


def test_every_metric_the_alerts_read_is_served_by_the_exporter(served: Served) -> None:
    used = reads(*(rule["expr"] for rule in _alerts()))
    known = {**served.labels, **PROMETHEUS_SERIES}
    assert sorted(set(used.metrics) - set(known)) == []


def test_every_label_the_alerts_match_or_group_by_is_served(served: Served) -> None:
    used = reads(*(rule["expr"] for rule in _alerts()))
    known = {**served.labels, **PROMETHEUS_SERIES}
    for metric, labels in used.metrics.items():
        assert labels <= known[metric] | TARGET_LABELS, metric
    assert used.grouping <= set(TARGET_LABELS).union(*served.labels.values())


def test_every_label_value_the_alerts_match_is_served(served: Served) -> None:
    used = reads(*(rule["expr"] for rule in _alerts()))
    for (metric, label), values in used.values.items():
        if label in TARGET_LABELS:
            continue  # set by the scrape config, checked against the docs above
        assert values <= served.values.get((metric, label), set()), (metric, label)


@pytest.mark.parametrize(("agent_id", "state"), [
    ("rig", "online"), ("gone", "lost"), ("sleeper", "asleep"), ("clone", "conflict"),
    ("quitter", "stopped")])
def test_the_served_fleet_has_an_agent_in_each_liveness_state(
        served: Served, agent_id: str, state: str) -> None:
    assert served.one_hot("chiffon_agent_liveness", agent_id) == state


def test_the_served_fleet_has_a_gpu_agent_reporting_health_and_temperature(
        served: Served) -> None:
    assert served.one_hot("chiffon_agent_gpu_health", "rig") == "unhealthy"
    assert "chiffon_agent_gpu_temperature_max_celsius" in served.labels


def test_the_name_reader_finds_metrics_labels_and_values_and_skips_functions() -> None:
    found = reads('max by (agent_id) (rate(chiffon_x_total{pool=~"$pool", state="lost"}'
                  '[$__rate_interval])) and on (agent_id) up == 0 or chiffon_bare > 1')
    assert found.metrics == {"chiffon_x_total": {"pool", "state"}, "up": set(),
                             "chiffon_bare": set()}
    assert found.values == {("chiffon_x_total", "state"): {"lost"}}
    assert found.grouping == {"agent_id"}


def test_the_name_reader_takes_word_alternations_as_values_but_not_patterns() -> None:
    found = reads('m{state=~"degraded|unhealthy", host=~"desk-.*", reason!="forged"}')
    assert found.values == {("m", "state"): {"degraded", "unhealthy"},
                            ("m", "reason"): {"forged"}}


def test_the_operations_guide_names_the_rules_and_the_dashboard() -> None:
    docs = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "deploy/prometheus/chiffon-alerts.yml" in docs
    assert "deploy/grafana/chiffon-fleet.json" in docs

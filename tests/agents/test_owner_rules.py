"""The owner rules decide from facts alone: every rule off takes work whatever the owner
does; each rule on says no, with a reason ``chiffon status`` can show, while its fact says
so or cannot be told."""

from __future__ import annotations

import pytest

from chiffon_worker.agents.owner_rules import OwnerFacts, OwnerRules
from chiffon_worker.config import Config

BUSY = OwnerFacts(idle_seconds=3.0, on_battery=True, foreign_gpu_memory_gb=9.5,
                  gpu_temperature_max_c=91.0)
UNKNOWN = OwnerFacts()


def test_with_every_rule_off_the_machine_always_takes_work() -> None:
    rules = OwnerRules()
    assert not rules.active
    assert rules.verdict(BUSY) is None and rules.verdict(UNKNOWN) is None


def test_the_rules_come_from_the_config() -> None:
    config = Config(environ={}, home="/nonexistent", owner_idle_minutes=10,
                    work_on_battery="no", foreign_gpu_memory_below_gb=2,
                    gpu_temperature_below_c=80)
    assert OwnerRules.from_config(config) == OwnerRules(10.0, False, 2.0, 80.0)


def test_owner_input_within_the_idle_minutes_is_owner_busy_with_its_age() -> None:
    rules = OwnerRules(owner_idle_minutes=10)
    assert rules.verdict(OwnerFacts(idle_seconds=12.4)) == "owner-busy (input 12 s ago)"
    assert rules.verdict(OwnerFacts(idle_seconds=600.0)) is None


def test_an_owner_rule_on_a_machine_that_cannot_tell_idle_time_says_no() -> None:
    reason = OwnerRules(owner_idle_minutes=1).verdict(UNKNOWN)
    assert reason is not None and reason.startswith("owner-unknown (")


def test_on_battery_says_no_only_when_the_rule_is_on_and_a_battery_runs_it() -> None:
    rules = OwnerRules(work_on_battery=False)
    assert rules.verdict(OwnerFacts(on_battery=True)) == "on-battery"
    assert rules.verdict(OwnerFacts(on_battery=False)) is None
    assert rules.verdict(OwnerFacts(on_battery=None)) is None, "no battery: mains"


@pytest.mark.parametrize(("held", "reason"), [
    (0.0, None), (1.99, None), (2.0, "foreign-gpu (2.0 GiB held by other programs)"),
    (None, "foreign-gpu-unknown (the GPU does not list its processes)")])
def test_foreign_gpu_memory_at_or_over_the_limit_says_no(held: float | None,
                                                        reason: str | None) -> None:
    rules = OwnerRules(foreign_gpu_memory_below_gb=2)
    assert rules.verdict(OwnerFacts(foreign_gpu_memory_gb=held)) == reason


@pytest.mark.parametrize(("hottest", "reason"), [
    (79.0, None), (84.4, "gpu-hot (84 degC)"),
    (None, "gpu-temperature-unknown (no GPU reports a temperature)")])
def test_a_gpu_at_or_over_the_temperature_says_no(hottest: float | None,
                                                  reason: str | None) -> None:
    assert OwnerRules(gpu_temperature_below_c=80).verdict(
        OwnerFacts(gpu_temperature_max_c=hottest)) == reason


def test_the_first_rule_that_says_no_is_the_reason() -> None:
    rules = OwnerRules(10, False, 2, 80)
    assert rules.verdict(BUSY) == "owner-busy (input 3 s ago)"
    assert rules.verdict(OwnerFacts(idle_seconds=3600, on_battery=True)) == "on-battery"

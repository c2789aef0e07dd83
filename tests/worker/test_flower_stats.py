"""The ``chiffon_*`` entries of a worker's ``stats`` reply (Flower's "Other" tab): what an
agent can take on, flat, units in the key names, intake read now, the rest from the
latest snapshot."""

from __future__ import annotations

import copy
import json
from typing import Any

from chiffon_worker.agents.intake import DRAIN, OWNER, WorkIntake
from chiffon_worker.worker.flower_stats import capacity_stats
from tests.samples import GOOD_SNAPSHOT


def _two_gpu_snapshot() -> dict[str, Any]:
    """A rig with an NVIDIA GPU that tells its free VRAM and an Intel one that does not."""
    snapshot = copy.deepcopy(GOOD_SNAPSHOT)
    snapshot.update(
        cpu_cores_effective=8.0, cpu_cores_busy=0.5, cpu_cores_available=7.5,
        memory_total_gb=31.3, memory_available_gb=18.234, gpu_count=2,
        gpu_health="degraded", gpu_health_reason="gpu 0: sw_power_cap",
        gpu_probe={"state": "stale", "source": "nvml+intel-sysfs", "age_seconds": 31.27,
                   "error": "nvml: timed out"},
        owner_idle_seconds=754.26, on_battery=False, asleep=False, accepting=True,
        accepting_reason=None, work_running=0)
    snapshot["gpus"] = [
        {**snapshot["gpus"][0], "health": "degraded", "health_reason": "sw_power_cap"},
        {"index": 0, "vendor": "intel", "name": "Arc A770", "vram_total_gb": 15.909,
         "vram_available_gb": None, "utilization_percent": None, "temperature_c": None,
         "source": "intel-sysfs", "error": None, "health": "ok", "health_reason": None},
    ]
    return snapshot


def test_cores_and_memory_come_from_the_snapshot_rounded_to_hundredths() -> None:
    shown = capacity_stats(_two_gpu_snapshot(), 3.0, WorkIntake())
    assert (shown["cpu_cores_effective"], shown["cpu_cores_busy"],
            shown["cpu_cores_available"]) == (8.0, 0.5, 7.5)
    assert (shown["memory_total_gb"], shown["memory_available_gb"]) == (31.3, 18.23)


def test_every_gpu_shows_its_vram_total_and_available_by_its_place_in_the_list() -> None:
    shown = capacity_stats(_two_gpu_snapshot(), 3.0, WorkIntake())
    assert shown["gpu_count"] == 2
    assert (shown["gpu0_name"], shown["gpu0_vram_total_gb"], shown["gpu0_vram_available_gb"],
            shown["gpu0_vram_known"]) == ("RTX 4090", 23.99, 23.23, True)
    assert shown["gpu1_name"] == "Arc A770" and shown["gpu1_vram_total_gb"] == 15.91


def test_a_gpu_that_does_not_tell_its_free_vram_shows_it_unknown_not_zero() -> None:
    shown = capacity_stats(_two_gpu_snapshot(), 3.0, WorkIntake())
    assert shown["gpu1_vram_available_gb"] is None
    assert shown["gpu1_vram_known"] is False


def test_gpu_health_and_the_probe_state_are_shown() -> None:
    shown = capacity_stats(_two_gpu_snapshot(), 3.0, WorkIntake())
    assert (shown["gpu_health"], shown["gpu_health_reason"]) == ("degraded",
                                                                 "gpu 0: sw_power_cap")
    assert (shown["gpu0_health"], shown["gpu0_health_reason"]) == ("degraded", "sw_power_cap")
    assert (shown["gpu_probe_state"], shown["gpu_probe_source"], shown["gpu_probe_age_s"],
            shown["gpu_probe_error"]) == ("stale", "nvml+intel-sysfs", 31.3, "nvml: timed out")


def test_a_machine_without_gpu_shows_no_per_gpu_keys() -> None:
    snapshot = copy.deepcopy(GOOD_SNAPSHOT)
    snapshot.update(gpus=[], gpu_count=0, gpu_health="none",
                    gpu_probe={"state": "absent", "source": "none", "age_seconds": 0.0,
                               "error": None})
    shown = capacity_stats(snapshot, 1.0, WorkIntake())
    assert (shown["gpu_count"], shown["gpu_health"], shown["gpu_probe_state"]) == (
        0, "none", "absent")
    assert not [key for key in shown if key.startswith("gpu0_")]


def test_an_accepting_agent_shows_no_hold() -> None:
    shown = capacity_stats(_two_gpu_snapshot(), 3.0, WorkIntake())
    assert (shown["accepting"], shown["hold_reason"], shown["drained"],
            shown["owner_rules_hold"], shown["work_running"]) == (True, None, False, None, 0)


def test_a_drain_shows_at_once_though_the_snapshot_predates_it() -> None:
    intake = WorkIntake()
    intake.stop("drained", DRAIN)
    shown = capacity_stats(_two_gpu_snapshot(), 25.0, intake)  # the snapshot says accepting
    assert (shown["accepting"], shown["hold_reason"], shown["drained"]) == (
        False, "drained", True)


def test_the_owner_rules_hold_is_named_with_its_reason() -> None:
    intake = WorkIntake()
    intake.stop("owner-busy (input 12 s ago)", OWNER)
    shown = capacity_stats(_two_gpu_snapshot(), 3.0, intake)
    assert (shown["accepting"], shown["hold_reason"], shown["drained"],
            shown["owner_rules_hold"]) == (False, "owner-busy (input 12 s ago)", False,
                                           "owner-busy (input 12 s ago)")


def test_a_drain_is_the_hold_reason_while_the_owner_rules_also_hold() -> None:
    intake = WorkIntake()
    intake.stop("on-battery", OWNER)
    intake.stop("drained", DRAIN)
    shown = capacity_stats(_two_gpu_snapshot(), 3.0, intake)
    assert (shown["hold_reason"], shown["owner_rules_hold"]) == ("drained", "on-battery")


def test_running_work_is_counted_now() -> None:
    intake = WorkIntake()
    with intake.running():
        shown = capacity_stats(_two_gpu_snapshot(), 3.0, intake)
    assert shown["work_running"] == 1


def test_the_snapshot_it_came_from_and_its_age_are_shown() -> None:
    shown = capacity_stats(_two_gpu_snapshot(), 12.345, WorkIntake())
    assert (shown["agent_id"], shown["pool"], shown["snapshot_seq"],
            shown["snapshot_age_s"]) == ("rig-1", "desktop_pool_1", 12, 12.3)


def test_the_owner_facts_are_shown_with_units() -> None:
    shown = capacity_stats(_two_gpu_snapshot(), 3.0, WorkIntake())
    assert (shown["owner_idle_s"], shown["on_battery"], shown["asleep"]) == (754.3, False,
                                                                             False)


def test_every_value_is_flat_json_for_one_table_row_each() -> None:
    shown = capacity_stats(_two_gpu_snapshot(), 3.0, WorkIntake())
    assert all(value is None or isinstance(value, str | int | float | bool)
               for value in shown.values()), shown
    assert json.loads(json.dumps(shown)) == shown


def test_quantities_name_their_unit() -> None:
    shown = capacity_stats(_two_gpu_snapshot(), 3.0, WorkIntake())
    amounts = [key for key, value in shown.items()
               if isinstance(value, float) and not key.startswith("cpu_cores_")]
    assert amounts and all(key.endswith(("_gb", "_s")) for key in amounts), amounts

"""The owner rules: when a desktop that someone also uses takes pool work.

The rules come from agent.yml (every one off by default, which is "always take work"):

- ``owner_idle_minutes``: no keyboard or mouse input for at least this long;
- ``work_on_battery: no``: not while running on battery;
- ``foreign_gpu_memory_below_gb``: other programs' GPU processes (a game) hold less GPU
  memory than this;
- ``gpu_temperature_below_c``: the hottest GPU is cooler than this.

:meth:`OwnerRules.verdict` is pure: facts in (:class:`OwnerFacts`), ``None`` (take work)
or the reason not to out. A reason is a short label and a detail, as ``chiffon status``
shows it: ``owner-busy (input 12 s ago)``, ``on-battery``, ``foreign-gpu (3.2 GiB held by
other programs)``, ``gpu-hot (84 degC)``. A rule whose fact this machine cannot tell
(no logind and no readable input device, no GPU temperature) says no, with
``owner-unknown``, ``foreign-gpu-unknown`` or ``gpu-temperature-unknown``: an agent never
offers a machine on a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from chiffon_worker.config import Config

#: The labels a reason starts with (``accepting_reason`` values up to the space).
OWNER_BUSY = "owner-busy"
OWNER_UNKNOWN = "owner-unknown"
ON_BATTERY = "on-battery"
FOREIGN_GPU = "foreign-gpu"
FOREIGN_GPU_UNKNOWN = "foreign-gpu-unknown"
GPU_HOT = "gpu-hot"
GPU_TEMPERATURE_UNKNOWN = "gpu-temperature-unknown"


@dataclass(frozen=True, slots=True)
class OwnerFacts:
    """What the agent knows about its machine's owner now (None: not known here).

    ``idle_seconds``: since the last keyboard or mouse input of any local session;
    ``on_battery``: running on battery (None also means no battery);
    ``foreign_gpu_memory_gb``: GPU memory (GiB) held by processes that are not this
    agent's work; ``gpu_temperature_max_c``: the hottest GPU (degrees Celsius).
    """

    idle_seconds: float | None = None
    on_battery: bool | None = None
    foreign_gpu_memory_gb: float | None = None
    gpu_temperature_max_c: float | None = None


@dataclass(frozen=True, slots=True)
class OwnerRules:
    """The rules of one agent (0 or ``yes``: the rule is off)."""

    owner_idle_minutes: float = 0.0
    work_on_battery: bool = True
    foreign_gpu_memory_below_gb: float = 0.0
    gpu_temperature_below_c: float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> OwnerRules:
        """The rules ``config`` sets."""
        return cls(config.owner_idle_minutes, config.work_on_battery == "yes",
                   config.foreign_gpu_memory_below_gb, config.gpu_temperature_below_c)

    @property
    def active(self) -> bool:
        """Whether any rule is on (off: the agent always takes work, as before)."""
        return self != OwnerRules()

    def verdict(self, facts: OwnerFacts) -> str | None:
        """None when the machine may take pool work, else the first reason it may not."""
        if self.owner_idle_minutes > 0:
            if facts.idle_seconds is None:
                return f"{OWNER_UNKNOWN} (no logind idle hint, no readable input device)"
            if facts.idle_seconds < self.owner_idle_minutes * 60:
                return f"{OWNER_BUSY} (input {facts.idle_seconds:.0f} s ago)"
        if not self.work_on_battery and facts.on_battery:
            return ON_BATTERY
        if self.foreign_gpu_memory_below_gb > 0:
            held = facts.foreign_gpu_memory_gb
            if held is None:
                return f"{FOREIGN_GPU_UNKNOWN} (the GPU does not list its processes)"
            if held >= self.foreign_gpu_memory_below_gb:
                return f"{FOREIGN_GPU} ({held:.1f} GiB held by other programs)"
        if self.gpu_temperature_below_c > 0:
            hottest = facts.gpu_temperature_max_c
            if hottest is None:
                return f"{GPU_TEMPERATURE_UNKNOWN} (no GPU reports a temperature)"
            if hottest >= self.gpu_temperature_below_c:
                return f"{GPU_HOT} ({hottest:.0f} degC)"
        return None

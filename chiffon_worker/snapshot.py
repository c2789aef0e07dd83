"""The heartbeat snapshot (schema 1), declared once: every key, its type, unit and roles.

Each :class:`Field` says what a key holds (JSON types, unit, doc), what a valid value is
(constraints) and where the orchestrator uses it (roles). Everything else is derived
from these tables: validation (``snapshot_validator``, behind
``protocol.validate_snapshot``), the registry's columns (``orchestrator.sql_schema``),
the rows ingest writes, the registry records' metric attributes, the Prometheus gauges
(``orchestrator.exporter``) and the needs routing accepts (``orchestrator.routing``).

Rules every field shares: numbers are JSON numbers (``bool`` is not one), finite, and
not negative unless ``non_negative`` is False. ``_gb`` means GiB (2^30 bytes); times are
unix seconds. A snapshot may carry keys not declared here (newer agents add some);
fields with ``required=False`` may be omitted, so older agents stay valid; the top-level
ones are checked when present (:data:`CHECKED_OPTIONAL_FIELDS`).

This module is a leaf: plain data, no imports from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: The snapshot schema this code reads and writes (the ``schema`` key).
SNAPSHOT_SCHEMA = 1
#: Bytes per GiB: every ``_gb`` value is GiB.
GIB = float(1 << 30)
#: Longest identifier (``agent_id``, ``hostname``, ``pool``, ``boot_id``), characters.
MAX_ID_LENGTH = 256

#: ``gpu_type`` values: the primary GPU's vendor, or ``none`` without a GPU.
GPU_TYPES = ("nvidia", "amd", "intel", "none")
#: ``gpus[i].vendor`` values (a listed device always has a vendor).
GPU_VENDORS = GPU_TYPES[:-1]
#: ``gpu_health`` values: the worst health of the GPUs, ``none`` without a GPU.
GPU_HEALTHS = ("ok", "degraded", "unhealthy", "none")
#: ``gpus[i].health`` values.
DEVICE_HEALTHS = GPU_HEALTHS[:-1]
#: ``gpus[i].processes[j].owner`` values.
PROCESS_OWNERS = ("agent", "foreign", "unknown")
#: ``cpu_busy_source`` values: the host's 1-minute load average, or the cgroup's own usage.
CPU_BUSY_SOURCES = ("load", "cgroup")
#: ``owner_idle_source`` values: logind's idle hint, or the input devices' access times.
OWNER_IDLE_SOURCES = ("logind", "input")
#: ``gpu_probe.state`` values.
PROBE_STATES = ("ok", "stale", "timeout", "error", "absent")

NUMBER: tuple[type, ...] = (int, float)
INTEGER: tuple[type, ...] = (int,)
TEXT: tuple[type, ...] = (str,)
BOOL: tuple[type, ...] = (bool,)
OBJECT: tuple[type, ...] = (dict,)
ARRAY: tuple[type, ...] = (list,)

Section = Literal["envelope", "metric", "gpu", "gpu_probe"]
SqlType = Literal["float", "integer", "bigint", "text", "boolean"]


@dataclass(frozen=True, slots=True)
class Column:
    """A field stored as a column of the registry's agents table.

    ``sql``: ``float`` (double), ``integer`` (32-bit), ``bigint`` (64-bit), ``boolean``
    or ``text`` (at most ``length`` characters). ``history``: also kept, per heartbeat, in the
    history table (a series ``chiffon history`` plots).
    """

    sql: SqlType
    length: int = 0
    primary_key: bool = False
    indexed: bool = False
    history: bool = False


@dataclass(frozen=True, slots=True)
class Gauge:
    """A field exported per agent as a Prometheus gauge.

    ``scale`` turns the snapshot's unit into Prometheus' base unit (GiB -> bytes).
    """

    name: str
    help: str
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class Need:
    """A field work can be routed on: ``needs={key: amount}`` in the field's unit.

    ``total``: the field holding the agent's whole capacity of it, which placements
    (reservations) are counted against."""

    key: str
    noun: str
    total: str


@dataclass(frozen=True, slots=True)
class Field:
    """One snapshot key (see the module docstring for the rules every field shares).

    Constraints: ``non_negative`` (numbers >= 0), ``positive`` (> 0), ``maximum``
    (<= it), ``choices`` (one of these strings), ``nullable`` (null allowed),
    ``identifier`` (non-empty text of at most ``MAX_ID_LENGTH`` characters without
    control characters). Roles: ``column`` (and its ``history``), ``gauge``, ``need``.
    ``label`` is the short lower-case name a status table or chart shows it under (every
    flat metric has one); ``unit`` its unit (``""``: a count or plain number).
    """

    name: str
    section: Section
    types: tuple[type, ...]
    doc: str
    unit: str = ""
    label: str = ""
    required: bool = True
    non_negative: bool = True
    positive: bool = False
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False
    identifier: bool = False
    column: Column | None = None
    gauge: Gauge | None = None
    need: Need | None = None

    @property
    def numeric(self) -> bool:
        """Whether the value is a JSON number."""
        return float in self.types or int in self.types

    @property
    def history(self) -> bool:
        """Whether the registry keeps a history series of this field."""
        return self.column is not None and self.column.history

    @property
    def unit_suffix(self) -> str:
        """The unit as written after a number: ``" GiB"``, ``"%"``, ``" s"`` or ``""``."""
        if not self.unit or self.unit == "%":
            return self.unit
        return " " + self.unit


@dataclass(frozen=True, slots=True)
class Relation:
    """A rule between two fields: ``count_of`` (``field`` == len(``other``)) or
    ``not_above`` (``field`` <= ``other``, within 1e-6 for rounding)."""

    kind: Literal["count_of", "not_above"]
    field: str
    other: str


_ID = Column("text", MAX_ID_LENGTH)
_TIME = Column("float")

#: Top-level keys, in the order they are checked (a snapshot's first problem is reported).
FIELDS: tuple[Field, ...] = (
    # -- the envelope: who sent it, when, and how often to expect the next one
    Field("schema", "envelope", INTEGER, f"snapshot schema version (must be {SNAPSHOT_SCHEMA})"),
    Field("agent_id", "envelope", TEXT, "the agent's stable id", label="agent",
          identifier=True, column=Column("text", MAX_ID_LENGTH, primary_key=True)),
    Field("hostname", "envelope", TEXT, "the machine's host name (for display)",
          label="host", identifier=True, column=_ID),
    Field("pool", "envelope", TEXT, "the pool (work queue) the agent consumes",
          label="pool", identifier=True, column=Column("text", MAX_ID_LENGTH, indexed=True)),
    Field("boot_id", "envelope", TEXT, "changes on every start of the agent", label="boot",
          identifier=True, column=_ID),
    Field("seq", "envelope", INTEGER, "heartbeat number within this boot, from 1 "
          "(0 outside heartbeats)", label="seq", column=Column("bigint")),
    Field("started_at", "envelope", NUMBER, "when the agent process started (agent clock)",
          unit="unix s", label="started", column=_TIME),
    Field("collected_at", "envelope", NUMBER, "when this snapshot was taken (agent clock)",
          unit="unix s", label="collected", column=_TIME),
    Field("heartbeat_interval_seconds", "envelope", NUMBER, "the agent's heartbeat period",
          unit="s", label="interval", positive=True, column=_TIME),
    Field("heartbeat_timeout_seconds", "envelope", NUMBER,
          "silence after which the agent counts as offline", unit="s", label="timeout",
          positive=True, column=_TIME),
    Field("capabilities", "envelope", OBJECT, "what work the agent can do"),
    Field("version", "envelope", TEXT, "chiffon_worker version of the agent"),
    Field("gpus", "envelope", ARRAY, "one object per GPU (see GPU_ENTRY_FIELDS)"),
    Field("gpu_probe", "envelope", OBJECT, "how the GPU reading was obtained "
          "(see GPU_PROBE_FIELDS)"),
    # -- the flat metrics the orchestrator routes on
    Field("cpu_percent", "metric", NUMBER, "CPU busy since the previous snapshot "
          "(the first of a process: since boot)", unit="%", label="cpu busy", maximum=100.0),
    Field("cpu_load_1min", "metric", NUMBER, "1-minute load average", label="load 1m",
          column=Column("float", history=True),
          gauge=Gauge("chiffon_agent_cpu_load_1min", "1-minute load average")),
    Field("cpu_load_5min", "metric", NUMBER, "5-minute load average", label="load 5m"),
    Field("cpu_load_15min", "metric", NUMBER, "15-minute load average", label="load 15m"),
    Field("cpu_cores_physical", "metric", INTEGER, "physical cores (logical where unknown)",
          label="cores", column=Column("integer"),
          gauge=Gauge("chiffon_agent_cpu_cores_physical", "physical cores")),
    Field("cpu_cores_available", "metric", NUMBER, "usable cores minus busy cores "
          "(cpu_cores_busy): on bare metal max(1, usable - 1-minute load); where a quota or "
          "cpuset restricts the agent, max(min(1, usable), usable - the cgroup's own usage "
          "rate); usable: physical, capped by CPU affinity, cpuset and cgroup quota",
          label="cores free",
          column=Column("float", history=True),
          gauge=Gauge("chiffon_agent_cpu_cores_available",
                      "cores free: usable cores - busy cores"),
          need=Need("cores", "free cores", "cpu_cores_physical")),
    Field("memory_percent", "metric", NUMBER, "memory in use", unit="%", label="mem used",
          maximum=100.0),
    Field("memory_available_gb", "metric", NUMBER, "memory available (cgroup-capped)",
          unit="GiB", label="mem avail", column=Column("float", history=True),
          gauge=Gauge("chiffon_agent_memory_available_bytes", "memory available", GIB),
          need=Need("memory_gb", "available memory", "memory_total_gb")),
    Field("memory_total_gb", "metric", NUMBER, "memory total (cgroup-capped)", unit="GiB",
          label="mem total", column=Column("float"),
          gauge=Gauge("chiffon_agent_memory_total_bytes", "memory total", GIB)),
    Field("gpu_vram_total_gb", "metric", NUMBER, "VRAM of the primary GPU (0 without one)",
          unit="GiB", label="vram total", column=Column("float"),
          gauge=Gauge("chiffon_agent_gpu_vram_total_bytes", "VRAM of the primary GPU", GIB)),
    Field("gpu_vram_available_gb", "metric", NUMBER, "free VRAM of the primary GPU "
          "(0 without one)", unit="GiB", label="vram avail",
          column=Column("float", history=True),
          gauge=Gauge("chiffon_agent_gpu_vram_available_bytes", "free VRAM of the primary GPU",
                      GIB),
          need=Need("gpu_vram_gb", "free VRAM", "gpu_vram_total_gb")),
    Field("gpu_type", "metric", TEXT, "vendor of the primary GPU", label="gpu",
          choices=GPU_TYPES, column=Column("text", 16)),
    Field("gpu_count", "metric", INTEGER, "GPUs seen (the length of gpus)", label="gpus"),
    # -- optional keys (as built): documented; checked only when present
    Field("agent_type", "envelope", TEXT, "the agent kind, e.g. desktop", required=False),
    Field("cpu_cores_effective", "metric", NUMBER, "usable cores (physical capped by "
          "affinity and cgroup quota) that cpu_cores_available is derived from",
          required=False),
    Field("cpu_cores_busy", "metric", NUMBER, "busy cores subtracted from the usable ones: "
          "the 1-minute load, or the cgroup's own CPU usage rate where a quota or cpuset "
          "restricts the agent (see cpu_busy_source)", label="cores busy", required=False),
    Field("cpu_busy_source", "metric", TEXT, "where cpu_cores_busy came from: load (host "
          "1-minute load average) or cgroup (the cgroup's usage since the previous "
          "snapshot)", label="busy from", choices=CPU_BUSY_SOURCES, required=False),
    Field("gpu_vram_known", "metric", BOOL, "whether gpu_vram_available_gb is a fact; "
          "false when the primary GPU does not tell its free VRAM (the number is then 0 "
          "and means unknown: routing cannot promise VRAM there)", label="vram known",
          required=False, column=Column("boolean")),
    Field("gpu_health", "metric", TEXT, "the worst health of the GPUs: ok, degraded, "
          "unhealthy, or none without a GPU", label="gpu health", choices=GPU_HEALTHS,
          required=False, column=Column("text", 16)),
    Field("gpu_health_reason", "metric", TEXT, "why gpu_health is not ok, naming the GPU",
          label="gpu health reason", nullable=True, required=False),
    Field("gpu_power_draw_w", "metric", NUMBER, "power drawn by all GPUs (null: no GPU "
          "tells)", unit="W", label="gpu power", nullable=True, required=False,
          column=Column("float"),
          gauge=Gauge("chiffon_agent_gpu_power_draw_watts", "power drawn by all GPUs")),
    Field("gpu_power_limit_w", "metric", NUMBER, "sum of the GPUs' enforced power limits "
          "(null: no GPU tells)", unit="W", label="gpu power limit", nullable=True,
          required=False, column=Column("float"),
          gauge=Gauge("chiffon_agent_gpu_power_limit_watts", "enforced power limits")),
    Field("gpu_processes", "metric", INTEGER, "processes using a GPU (null: no GPU lists "
          "them)", label="gpu procs", nullable=True, required=False,
          column=Column("integer"),
          gauge=Gauge("chiffon_agent_gpu_processes", "processes using a GPU")),
    Field("gpu_foreign_processes", "metric", INTEGER, "GPU processes that are not this "
          "agent's work (a game, an ollama)", label="foreign procs", nullable=True,
          required=False, column=Column("integer"),
          gauge=Gauge("chiffon_agent_gpu_foreign_processes",
                      "GPU processes that are not the agent's work")),
    Field("gpu_foreign_memory_gb", "metric", NUMBER, "GPU memory held by foreign "
          "processes", unit="GiB", label="foreign vram", nullable=True, required=False,
          column=Column("float"),
          gauge=Gauge("chiffon_agent_gpu_foreign_memory_bytes",
                      "GPU memory held by foreign processes", GIB)),
    # -- intake (schema-3 registry columns): whether the agent takes new pool work
    Field("accepting", "metric", BOOL, "whether the agent consumes its pool queue (false: "
          "an operator drained it; it takes no new pool work, its own queue still works)",
          label="accepting", required=False, column=Column("boolean"),
          gauge=Gauge("chiffon_agent_accepting", "1 while the agent takes new pool work "
                      "(0: drained or held by its owner rules)")),
    Field("accepting_reason", "metric", TEXT, "why accepting is false (drained, or the "
          "owner rules: owner-busy, on-battery, foreign-gpu, gpu-hot, with a detail); null "
          "while accepting", label="accepting reason", nullable=True, required=False,
          column=_ID),
    Field("work_running", "metric", INTEGER, "execute_work requests running now on this "
          "agent (null: not counted, the prefork pool runs work in other processes)",
          label="work running", nullable=True, required=False, column=Column("integer")),
    # -- the machine's owner (schema-4 registry columns): is someone using this desktop
    Field("owner_idle_seconds", "metric", NUMBER, "time since the last keyboard or mouse "
          "input of any local session (null: not known here, e.g. a server without "
          "logind or readable input devices)", unit="s", label="owner idle", nullable=True,
          required=False, column=Column("float"),
          gauge=Gauge("chiffon_agent_owner_idle_seconds",
                      "seconds since the owner's last keyboard or mouse input")),
    Field("owner_idle_source", "metric", TEXT, "where owner_idle_seconds came from: "
          "logind (its IdleSinceHint) or input (access times of /dev/input/event*)",
          label="idle source", nullable=True, required=False, choices=OWNER_IDLE_SOURCES),
    Field("on_battery", "metric", BOOL, "running on battery (null: no battery, or not "
          "known)", label="on battery", nullable=True, required=False,
          column=Column("boolean")),
    Field("gpu_temperature_max_c", "metric", NUMBER, "the hottest GPU's temperature (null: "
          "no GPU tells)", unit="degC", label="gpu temp", nullable=True, required=False,
          column=Column("float"),
          gauge=Gauge("chiffon_agent_gpu_temperature_max_celsius",
                      "the hottest GPU's temperature")),
    Field("asleep", "metric", BOOL, "the machine is suspending: the agent's last heartbeat "
          "before sleep says so (logind's PrepareForSleep), and its first after waking says "
          "false", label="asleep", required=False, column=Column("boolean")),
    Field("mac_address", "metric", TEXT, "MAC address of the network interface that "
          "reaches the broker, for Wake-on-LAN (null: not known)", label="mac",
          nullable=True, required=False, column=_ID),
    Field("signature", "envelope", TEXT, "HMAC-SHA256 of the snapshot when "
          "heartbeat_secret is set", required=False),
)

#: Rules between fields, in the order they are checked (after every field on its own).
RELATIONS: tuple[Relation, ...] = (
    Relation("count_of", "gpu_count", "gpus"),
    Relation("not_above", "gpu_vram_available_gb", "gpu_vram_total_gb"),
    Relation("not_above", "memory_available_gb", "memory_total_gb"),
)

#: Keys of each ``gpus`` entry, in the order they are checked.
GPU_ENTRY_FIELDS: tuple[Field, ...] = (
    Field("index", "gpu", INTEGER, "the device's index within its source"),
    Field("vendor", "gpu", TEXT, "nvidia, amd or intel", choices=GPU_VENDORS),
    Field("name", "gpu", TEXT, "the device's model name"),
    Field("vram_total_gb", "gpu", NUMBER, "VRAM", unit="GiB", nullable=True),
    Field("vram_available_gb", "gpu", NUMBER, "free VRAM (null where the platform does "
          "not tell)", unit="GiB", nullable=True),
    Field("utilization_percent", "gpu", NUMBER, "busy", unit="%", nullable=True),
    Field("temperature_c", "gpu", NUMBER, "temperature", unit="degC", nullable=True),
    Field("source", "gpu", TEXT, "the probe that saw it (nvml, nvidia-smi, amd-sysfs, ...)"),
    Field("error", "gpu", TEXT, "why this device alone could not be read", nullable=True,
          required=False),
    Field("uuid", "gpu", TEXT, "the device's UUID where the source tells", nullable=True,
          required=False),
    Field("unified", "gpu", BOOL, "the GPU uses system memory (GB10-class NVIDIA, AMD "
          "APU): its memory figures are what a job can get of the host's", required=False),
    Field("power_draw_w", "gpu", NUMBER, "power drawn", unit="W", nullable=True,
          required=False),
    Field("power_limit_w", "gpu", NUMBER, "enforced power limit", unit="W", nullable=True,
          required=False),
    Field("throttle_reasons", "gpu", ARRAY, "active clock-throttle reasons by name "
          "(null: not told)", nullable=True, required=False),
    Field("ecc_uncorrected_volatile", "gpu", INTEGER, "uncorrected ECC errors since the "
          "driver loaded (null: no ECC)", nullable=True, required=False),
    Field("processes", "gpu", ARRAY, "processes using it: pid, name, memory_gb, owner "
          "(agent, foreign or unknown); null: not told", nullable=True, required=False),
    Field("mig", "gpu", ARRAY, "MIG instances: index, name, uuid, memory_total_gb, "
          "memory_available_gb", required=False),
    Field("field_errors", "gpu", ARRAY, "readings that failed, as 'field: reason'",
          required=False),
    Field("health", "gpu", TEXT, "ok, degraded or unhealthy", choices=DEVICE_HEALTHS,
          required=False),
    Field("health_reason", "gpu", TEXT, "why health is not ok", nullable=True,
          required=False),
)

#: Keys of ``gpu_probe``; only ``state`` is checked (absent counts as not one of them).
GPU_PROBE_FIELDS: tuple[Field, ...] = (
    Field("state", "gpu_probe", TEXT, "ok, stale (last good reading), timeout, error or "
          "absent", choices=PROBE_STATES),
    Field("source", "gpu_probe", TEXT, "the sources that answered, joined with +",
          required=False),
    Field("age_seconds", "gpu_probe", NUMBER, "age of the reading", unit="s",
          required=False),
    Field("error", "gpu_probe", TEXT, "what went wrong", nullable=True, required=False),
)

#: Optional top-level fields checked when present (they fill registry columns or carry
#: choices), in declaration order.
CHECKED_OPTIONAL_FIELDS: tuple[Field, ...] = tuple(
    f for f in FIELDS if not f.required and (f.column is not None or f.choices or f.numeric))
#: Every top-level field by key.
FIELDS_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
#: Required top-level fields (what every schema-1 snapshot carries), in check order.
REQUIRED_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.required)
#: Fields stored as registry columns, in declaration order.
STORED_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.column is not None)
#: Stored metrics: the attributes of a registry record beyond its envelope.
STORED_METRICS: tuple[Field, ...] = tuple(f for f in STORED_FIELDS if f.section == "metric")
#: Fields the registry keeps a history of (one series each).
HISTORY_FIELDS: tuple[Field, ...] = tuple(f for f in STORED_FIELDS if f.history)
#: Fields exported as per-agent Prometheus gauges.
GAUGE_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.gauge is not None)
#: Fields work can be routed on.
NEED_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.need is not None)


def _types_of(section: Section) -> dict[str, tuple[type, ...]]:
    return {f.name: f.types for f in REQUIRED_FIELDS if f.section == section}


#: The envelope every heartbeat carries: key -> JSON types.
SNAPSHOT_ENVELOPE_KEYS: dict[str, tuple[type, ...]] = _types_of("envelope")
#: Flat snapshot keys the orchestrator routes on: key -> JSON types.
SNAPSHOT_METRIC_KEYS: dict[str, tuple[type, ...]] = _types_of("metric")
#: Every required top-level key.
SNAPSHOT_KEYS: tuple[str, ...] = (*SNAPSHOT_ENVELOPE_KEYS, *SNAPSHOT_METRIC_KEYS)
#: Required fields of each ``gpus`` entry: key -> (JSON types, may be null).
GPU_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    f.name: (f.types, f.nullable) for f in GPU_ENTRY_FIELDS if f.required}

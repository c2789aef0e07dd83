"""Liveness and heartbeat sequencing: pure functions, no I/O, no clock reads.

Times are unix seconds (float). "Receipt time" is when the orchestrator received a
heartbeat; it alone decides liveness, so a skewed agent clock cannot make an agent look
alive or dead. The agent's own ``collected_at`` is only compared with the receipt time to
flag clock skew.

Sequencing per agent, given the last accepted heartbeat (``SeqState``):

- no previous heartbeat                          -> ``FIRST``
- ``boot_id`` of an earlier, superseded boot     -> ``STALE_BOOT`` (ignored)
- a new ``boot_id``                              -> ``RESTART``
- same ``boot_id``, later ``started_at``         -> ``RESTART`` (the process restarted and
  its ``seq`` was reset while the boot id was kept, e.g. ``CHIFFON_BOOT_ID`` pinned)
- same ``boot_id``, earlier ``started_at``       -> ``OUT_OF_ORDER`` (an older process)
- same boot and process, ``seq == last + 1``     -> ``NEXT``
- ``seq > last + 1``                             -> ``GAP`` (``seq - last - 1`` missed)
- ``seq == last``                                -> ``DUPLICATE`` (ignored)
- ``seq < last``                                 -> ``OUT_OF_ORDER`` (ignored)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

#: Smallest clock-skew threshold, seconds.
MIN_SKEW_THRESHOLD_SECONDS = 5.0
#: How many superseded boot ids are remembered per agent (to ignore their late heartbeats).
MAX_PAST_BOOT_IDS = 8

State = Literal["online", "offline"]
#: What is known of an agent: ``online`` (a sign of life within its window), ``stopped``
#: (it announced a clean stop), ``lost`` (no sign of life past the window), ``conflict``
#: (two live processes claim its id), ``asleep`` (its newest heartbeat announced that the
#: machine suspends; Wake-on-LAN can wake it).
Liveness = Literal["online", "stopped", "lost", "conflict", "asleep"]
LIVENESS_STATES: tuple[Liveness, ...] = ("online", "stopped", "lost", "conflict", "asleep")

#: A worker whose Celery events stopped is gone after this many event intervals: Celery's
#: and Flower's own rule (``HEARTBEAT_EXPIRE_WINDOW`` is 200 %, 4 s at the default 2 s),
#: on receipt times as Flower does. A capacity heartbeat received after the newest event
#: is a sign of life too, so chiffon says ``lost`` that window after the newest sign of life
#: of either kind: never later than Flower by more than the gap between the two.
EVENT_EXPIRY_INTERVALS = 2.0


class Verdict(StrEnum):
    """How a heartbeat relates to the last accepted one of the same agent."""

    FIRST = "first"
    NEXT = "next"
    GAP = "gap"
    RESTART = "restart"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    STALE_BOOT = "stale_boot"

    @property
    def accepted(self) -> bool:
        """Whether a heartbeat with this verdict updates the registry."""
        return self in _ACCEPTED


_ACCEPTED = frozenset({Verdict.FIRST, Verdict.NEXT, Verdict.GAP, Verdict.RESTART})


@dataclass(frozen=True, slots=True)
class SeqState:
    """What sequencing remembers of an agent's last accepted heartbeat.

    ``started_at`` is the agent process's start (unix seconds, its own clock);
    ``past_boot_ids`` are superseded boots, newest first, at most ``MAX_PAST_BOOT_IDS``.
    """

    boot_id: str
    started_at: float
    seq: int
    past_boot_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Sequencing:
    """The verdict on one heartbeat and how many sequence numbers it shows were missed."""

    verdict: Verdict
    missed: int = 0

    @property
    def accepted(self) -> bool:
        """Whether the heartbeat updates the registry."""
        return self.verdict.accepted


def sequence(prev: SeqState | None, boot_id: str, started_at: float, seq: int) -> Sequencing:
    """Classify a heartbeat (``boot_id``, ``started_at`` s, ``seq``) against ``prev``."""
    if prev is None:
        return Sequencing(Verdict.FIRST)
    if boot_id != prev.boot_id:
        if boot_id in prev.past_boot_ids:
            return Sequencing(Verdict.STALE_BOOT)
        return Sequencing(Verdict.RESTART)
    if started_at > prev.started_at:
        return Sequencing(Verdict.RESTART)
    if started_at < prev.started_at:
        return Sequencing(Verdict.OUT_OF_ORDER)
    if seq == prev.seq + 1:
        return Sequencing(Verdict.NEXT)
    if seq > prev.seq:
        return Sequencing(Verdict.GAP, missed=seq - prev.seq - 1)
    if seq == prev.seq:
        return Sequencing(Verdict.DUPLICATE)
    return Sequencing(Verdict.OUT_OF_ORDER)


def advance(prev: SeqState | None, boot_id: str, started_at: float, seq: int) -> SeqState:
    """The state after accepting a heartbeat; a new boot pushes the old one onto the past."""
    if prev is None:
        return SeqState(boot_id, started_at, seq)
    past = prev.past_boot_ids
    if boot_id != prev.boot_id:
        past = (prev.boot_id, *(b for b in past if b != boot_id))[:MAX_PAST_BOOT_IDS]
    return SeqState(boot_id, started_at, seq, past)


def skew_threshold(interval_seconds: float) -> float:
    """Clock skew (seconds) beyond which an agent is flagged: ``max(5 s, interval)``."""
    return max(MIN_SKEW_THRESHOLD_SECONDS, interval_seconds)


def clock_skew(collected_at: float, received_at: float, interval_seconds: float) -> float | None:
    """``collected_at - received_at`` in seconds when beyond the threshold, else None.

    Positive: the agent's clock runs ahead; negative: behind (or the message waited in a
    queue). Liveness ignores it either way and uses the receipt time.
    """
    skew = collected_at - received_at
    return skew if abs(skew) > skew_threshold(interval_seconds) else None


@dataclass(frozen=True, slots=True)
class SignsOfLife:
    """The Celery worker events seen of an agent (receipt times, unix seconds).

    ``last_event_at``: the newest ``worker-online`` or ``worker-heartbeat``;
    ``event_interval_seconds``: the worker's event heartbeat interval (``freq``);
    ``offline_at``: the newest ``worker-offline`` (a clean stop), if any.
    """

    worker_name: str
    last_event_at: float
    event_interval_seconds: float
    offline_at: float | None = None

    @property
    def window_seconds(self) -> float:
        """How long after the newest event the worker still counts as alive."""
        return self.event_interval_seconds * EVENT_EXPIRY_INTERVALS


def liveness_of(last_received_at: float, timeout_seconds: float, signs: SignsOfLife | None,
                now: float, *, asleep: bool = False) -> Liveness:
    """What is known of an agent at ``now`` (unix seconds).

    ``last_received_at``/``timeout_seconds``: its newest capacity heartbeat and its own
    timeout; ``signs``: its Celery worker events, when the orchestrator has seen any;
    ``asleep``: the newest heartbeat announced that the machine suspends.

    - ``asleep``: announced, and no heartbeat since (the first one after waking says
      ``asleep: false``);

    - ``stopped``: a ``worker-offline`` came after every other event, and no capacity
      heartbeat came well after it (a restart the event listener missed);
    - while events flow (the newest event is no older than the newest heartbeat by more
      than the event window), the event window decides: ``online`` within it of the newest
      sign of life (that event, or a capacity heartbeat received after it), else ``lost``
      (seconds after a crash, a kill or a freeze, as in Flower). A capacity heartbeat
      counts because it, too, proves the process alive: events lag it when the event
      listener reconnects (a RabbitMQ node stopping), and a live agent must not look
      ``lost`` then;
    - otherwise (no events: the listener is not running, or events are off) the capacity
      heartbeat decides: ``online`` within ``timeout_seconds``, else ``lost``.
    """
    if asleep:
        return "asleep"
    if signs is not None:
        window = signs.window_seconds
        offline = signs.offline_at
        if offline is not None and offline >= signs.last_event_at \
                and last_received_at <= offline + window:
            return "stopped"
        if signs.last_event_at + window >= last_received_at:
            newest = max(signs.last_event_at, last_received_at)
            return "online" if now - newest <= window else "lost"
    return "online" if is_online(last_received_at, timeout_seconds, now) else "lost"


#: A superseded boot takes its agent over again once the boot that superseded it sent
#: nothing for this many of its capacity intervals (the superseder is gone).
TAKEOVER_INTERVALS = 1.5
#: A conflict is shown while its last sign is younger than this many capacity intervals.
CONFLICT_INTERVALS = 2.5


def superseder_went_silent(last_received_at: float, interval_seconds: float,
                           now: float) -> bool:
    """Whether the current boot of an agent (newest heartbeat received at
    ``last_received_at``, every ``interval_seconds``) has been silent long enough at ``now``
    that a heartbeat of a superseded boot means that boot is the live one again."""
    return now - last_received_at > interval_seconds * TAKEOVER_INTERVALS


def conflict_is_current(seen_at: float, interval_seconds: float, now: float) -> bool:
    """Whether a second process claiming the agent's id (last heard at ``seen_at``) still
    counts as live at ``now``."""
    return now - seen_at <= interval_seconds * CONFLICT_INTERVALS


def is_online(last_received_at: float, timeout_seconds: float, now: float) -> bool:
    """Online while the newest heartbeat (receipt time) is younger than ``timeout_seconds``."""
    return now - last_received_at < timeout_seconds


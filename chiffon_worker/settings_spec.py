"""How one setting is declared: :func:`setting` on a dataclass field, read back as a :class:`Key`.

A setting is declared exactly once, as a typed field of
:class:`~chiffon_worker.config.Config`::

    heartbeat_interval_seconds: float = setting(
        30.0, "seconds between heartbeats", unit="s", check=bounded(0.1, 86400))

The annotation is its type (``str``, ``int`` or ``float``), the field's default its
default, and the :class:`Setting` in the field's metadata says the rest: unit, doc, check,
whether it is a secret or a URL that may carry a password, extra environment names.
:func:`declared_keys` turns the fields back into name -> :class:`Key`; everything else
(defaults, coercion, checks, masking, environment names, "did you mean", the example-file
test) derives from that.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar, get_type_hints
from urllib.parse import urlsplit

T = TypeVar("T")

#: A check returns None for a good value, else the problem ("must be greater than 0").
Check = Callable[[Any], str | None]
#: The metadata key under which a field's :class:`Setting` is stored.
SPEC = "chiffon.setting"
#: Every setting can be set as ``CHIFFON_<NAME IN CAPITALS>``.
ENV_PREFIX = "CHIFFON_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InvalidValue(ValueError):
    """A raw value cannot become the setting's type; ``str()`` is the problem text."""


@dataclass(frozen=True)
class Setting:
    """What a field's type and default do not say about a setting."""

    #: One line for humans: what the key is for (its unit goes in ``unit``).
    doc: str
    #: Unit of a number, e.g. ``"s"`` for seconds; None where there is none.
    unit: str | None = None
    #: Checked on the effective value (after all layers); None: any value of the type.
    check: Check | None = None
    #: Never shown or logged: masked as ``**``.
    secret: bool = False
    #: A URL that may carry a password: shown with the password masked.
    url: bool = False
    #: Extra environment names, weaker than ``CHIFFON_<NAME>`` when both are set.
    env_aliases: tuple[str, ...] = ()


def setting(default: T, doc: str, *, unit: str | None = None, check: Check | None = None,
            secret: bool = False, url: bool = False, env_aliases: tuple[str, ...] = ()) -> T:
    """Declare a dataclass field as a setting (typed as its default for the type checker)."""
    spec = Setting(doc, unit, check, secret, url, env_aliases)
    return field(default=default, metadata={SPEC: spec})


@dataclass(frozen=True)
class Key:
    """One declared setting, as derived from its field: name, type, default and spec."""

    name: str
    type: type
    default: Any
    spec: Setting

    @property
    def env_names(self) -> tuple[str, ...]:
        """Environment variables that set this key, weakest first (aliases, then the long form)."""
        return (*self.spec.env_aliases, ENV_PREFIX + self.name.upper())

    def coerce(self, value: Any) -> Any:
        """A raw value (YAML scalar or environment text) as this key's type, or InvalidValue."""
        return coerce(self.type, value)


def declared_keys(cls: type) -> dict[str, Key]:
    """Name -> :class:`Key` for every field of ``cls`` declared with :func:`setting`, in order."""
    hints = get_type_hints(cls)
    keys: dict[str, Key] = {}
    for item in fields(cls):
        spec = item.metadata.get(SPEC)
        if spec is None:
            continue
        kind = hints[item.name]
        if kind not in (str, int, float):
            raise TypeError(f"setting {item.name}: unsupported type {kind!r}")
        if item.default is MISSING or type(item.default) is not kind:
            raise TypeError(f"setting {item.name}: default {item.default!r} is not {kind.__name__}")
        keys[item.name] = Key(item.name, kind, item.default, spec)
    return keys


# -- coercion ------------------------------------------------------------------------------


def coerce(kind: type, value: Any) -> Any:
    """Convert ``value`` to ``kind`` (str, int or float) the way every config layer does.

    Text is stripped; numbers may come as YAML numbers or as text (environment), must be
    finite, and an int must be whole. Booleans are never numbers. Raises InvalidValue.
    """
    if value is None:
        raise InvalidValue("has no value (write a value or remove the key)")
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise InvalidValue(f"expected text, got {type(value).__name__}")
        return str(value).strip()
    if isinstance(value, bool):
        raise InvalidValue(f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidValue(f"expected a number, got {value!r}") from None
    if not isinstance(value, int | float):
        raise InvalidValue(f"expected a number, got {type(value).__name__}")
    try:
        finite = math.isfinite(value)
    except OverflowError:
        raise InvalidValue("is too large") from None
    if not finite:
        raise InvalidValue(f"expected a finite number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise InvalidValue(f"expected a whole number, got {value!r}")
        return int(value)
    return float(value)


# -- checks --------------------------------------------------------------------------------


def bounded(low: float, high: float) -> Check:
    """``low <= value <= high`` (in the key's unit)."""

    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}"

    return check


def name_or_blank(value: Any) -> str | None:
    """Blank, or 1-128 of letters, digits, ``.``, ``_``, ``-`` (not starting with ``.-_``)."""
    if value == "" or _NAME_RE.match(value):
        return None
    return "must be 1-128 characters of letters, digits, '.', '_' or '-'"


def nonblank_name(value: Any) -> str | None:
    """Like :func:`name_or_blank`, but blank is refused."""
    return "must not be blank" if value == "" else name_or_blank(value)


def url_with_scheme(*schemes: str) -> Check:
    """Blank, or a URL whose scheme is one of ``schemes``."""

    def check(value: Any) -> str | None:
        if value == "":
            return None
        try:
            scheme = urlsplit(value).scheme
        except ValueError as exc:
            return f"is not a valid URL ({exc})"
        if scheme not in schemes:
            return f"scheme {scheme or '(none)'!r} is not one of {', '.join(schemes)}"
        return None

    return check


def one_of(*choices: str) -> Check:
    """Exactly one of ``choices``."""

    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check

"""What a PromQL expression reads: metric names, the labels it matches or groups by, and the
label values it matches, found by a deliberately simple tokenizer (no PromQL parser).

The rules, explicitly:

- Grafana variables (``$pool``, ``$__rate_interval``) and range/offset brackets
  (``[5m]``) are dropped first; so are quoted strings, once their matchers are read.
- A selector is ``name{matchers}``; each matcher ``label op "value"`` names a label of
  that metric. ``=`` values, and ``=~``/``!=``/``!~`` values that are a plain alternation
  of words (``degraded|unhealthy``), are label values it expects to exist.
- ``by (...)``, ``without (...)``, ``on (...)``, ``ignoring (...)``, ``group_left (...)``
  and ``group_right (...)`` list label names.
- Every other identifier is a metric name unless it is followed by ``(`` (a function or
  an aggregation) or is a PromQL keyword (``and``, ``or``, ``unless``, ``bool``,
  ``offset``, the grouping words). So a misspelt bare metric name is still caught.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: PromQL words that are neither metrics nor functions.
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on",
                      "ignoring", "group_left", "group_right"})

_STRING = r'"(?:[^"\\]|\\.)*"'
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(rf"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*({_STRING})")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_WORDS = re.compile(r"\w+(?:\|\w+)*")


@dataclass
class Reads:
    """What one or more expressions read."""

    #: metric name -> label names matched in its selectors
    metrics: dict[str, set[str]] = field(default_factory=dict)
    #: (metric, label) -> label values matched
    values: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    #: label names in grouping and vector-matching clauses
    grouping: set[str] = field(default_factory=set)

    def add(self, expr: str) -> Reads:
        """Add what ``expr`` reads; returns self."""
        text = _BRACKETS.sub("", expr)
        for match in _SELECTOR.finditer(text):
            name, body = match.group(1), match.group(2)
            if not name:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            labels = self.metrics.setdefault(name, set())
            for label, op, quoted in _MATCHER.findall(body):
                labels.add(label)
                value = quoted[1:-1]
                if "$" in value:
                    continue  # a Grafana variable
                if op == "=" or _WORDS.fullmatch(value):
                    self.values.setdefault((name, label), set()).update(value.split("|"))
        # what is left once selectors' bodies, strings and variables are gone
        text = _VARIABLE.sub(" ", re.sub(_STRING, '""', text))
        text = re.sub(r"\{[^}]*\}", " ", text)
        for match in _GROUPING.finditer(text):
            self.grouping.update(n.strip() for n in match.group(1).split(",") if n.strip())
        text = _GROUPING.sub(" ", text)
        for name, call in _IDENTIFIER.findall(text):
            if not call and name not in KEYWORDS:
                self.metrics.setdefault(name, set())
        return self

    @property
    def labels(self) -> set[str]:
        """Every label name read: in selectors and in grouping clauses."""
        return self.grouping.union(*self.metrics.values())


def reads(*exprs: str) -> Reads:
    """What ``exprs`` read, together."""
    found = Reads()
    for expr in exprs:
        found.add(expr)
    return found

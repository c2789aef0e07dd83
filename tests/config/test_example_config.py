"""deploy/agent.yml documents every declared setting and nothing else; the packaged copy is it.

A key is *documented* when the file names it at the top level, either as an active line
``key: value`` or commented out as ``# key: value`` (a comment whose text starts with a
lower-case snake_case word and a colon). Prose comments start otherwise; one that happened
to look like a key would fail here as an unknown key, never pass silently.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from dynaconf.vendor.ruamel import yaml

from chiffon_worker.config import KEYS, Config

pytestmark = pytest.mark.usefixtures("clean_env")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "agent.yml"
PACKAGED = REPO / "chiffon_worker" / "data" / "agent.yml"
_COMMENTED_KEY = re.compile(r"^#\s*(?P<line>(?P<key>[a-z][a-z0-9_]*):(?:\s.*)?)$")


def active_keys(text: str) -> dict[str, Any]:
    """The file's top-level ``key: value`` lines as YAML reads them."""
    data = yaml.safe_load(text) or {}
    assert isinstance(data, dict), "the example must be a mapping"
    return {str(key): value for key, value in data.items()}


def commented_keys(text: str) -> list[tuple[str, Any]]:
    """(key, value) of every commented-out ``# key: value`` line, in file order."""
    found: list[tuple[str, Any]] = []
    for line in text.splitlines():
        match = _COMMENTED_KEY.match(line.strip())
        if match:
            found.append((match["key"], yaml.safe_load(match["line"])[match["key"]]))
    return found


def documented_keys(text: str) -> set[str]:
    return set(active_keys(text)) | {key for key, _ in commented_keys(text)}


def example_text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


def test_documented_keys_are_active_or_commented_out_lines_but_not_prose() -> None:
    text = ("# Seconds between heartbeats. Rule of thumb: 3x.\n"
            "# Blank: derived from the machine.\n"
            "heartbeat_interval_seconds: 30\n"
            '# broker_url: "redis://127.0.0.1:6379/0"\n'
            "#agent_id: rig-7\n")
    assert documented_keys(text) == {"heartbeat_interval_seconds", "broker_url", "agent_id"}


def test_example_documents_every_declared_key() -> None:
    missing = set(KEYS) - documented_keys(example_text())
    assert not missing, f"{EXAMPLE} does not document {sorted(missing)}"


def test_example_documents_no_unknown_key() -> None:
    unknown = documented_keys(example_text()) - set(KEYS)
    assert not unknown, f"{EXAMPLE} documents keys that are not settings: {sorted(unknown)}"


def test_example_active_values_are_the_built_in_defaults() -> None:
    for key, value in active_keys(example_text()).items():
        assert KEYS[key].coerce(value) == KEYS[key].default, key


def test_example_loads_as_a_config_file_without_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        config = Config(system_file=EXAMPLE)
    assert config.files_loaded == (str(EXAMPLE),)
    assert not caplog.records


@pytest.mark.parametrize(("key", "value"), commented_keys(example_text()))
def test_example_commented_out_values_are_valid(key: str, value: Any) -> None:
    spec = KEYS[key].spec
    coerced = KEYS[key].coerce(value)
    assert spec.check is None or spec.check(coerced) is None


def test_packaged_example_is_the_deploy_example() -> None:
    assert PACKAGED.read_bytes() == EXAMPLE.read_bytes(), (
        f"{PACKAGED} (written by `chiffon init-config`) must be a copy of {EXAMPLE}")

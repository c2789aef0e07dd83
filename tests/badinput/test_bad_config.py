"""Bad config, end to end: the real ``chiffon config show`` and the real agent start.

Every case runs the installed command as a subprocess with HOME in a temporary directory
and a clean environment (no inherited ``CHIFFON_*``), and checks what the user sees:
exit status 2, nothing on stdout, exactly one stderr line ``chiffon: error: SOURCE: KEY:
PROBLEM`` naming the file (or environment variable), the key where there is one, and the
problem; never a traceback. Unit-level checks of ``Config`` live in ``tests/config``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.badinput._support import CELERY, CHIFFON, isolated_env

#: Marks the user config path as a directory instead of a file.
DIRECTORY = object()
HUGE_INT = "1" + "0" * 400  # a YAML integer no float can hold


@dataclass(frozen=True)
class Bad:
    """One bad configuration and the exact outcome the user must see.

    ``source`` is ``{user}`` (``~/.chiffon/agent.yml``), ``{explicit}`` (the file named by
    ``CHIFFON_CONFIG``), ``environment CHIFFON_X`` or ``CHIFFON_CONFIG``. ``problem`` is a
    substring of the line (a tuple: any one of them). Templates may use ``{home}``,
    ``{tmp}``, ``{user}`` and ``{explicit}``.
    """

    id: str
    source: str
    key: str | None
    problem: str | tuple[str, ...]
    user_file: str | bytes | object | None = None
    explicit_file: str | bytes | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    absent: str | None = None  # a path that must not exist afterwards (no code ran)
    secret: str | None = None  # text that must not appear in any output
    xfail: str | None = None


CASES: list[Bad] = [
    # -- YAML the parser cannot read ---------------------------------------------------------
    Bad("yaml_unclosed_flow_list", "{user}", None, "invalid YAML at line 2",
        user_file="agent_pool_name: [a, b\nrabbitmq_port: 5672\n"),
    Bad("yaml_tab_indentation", "{user}", None,
        "invalid YAML at line 2: found character '\\t' that cannot start any token",
        user_file="agent_pool_name: gpu\n\trabbitmq_port: 5672\n"),
    Bad("yaml_unterminated_quote", "{user}", None,
        "invalid YAML at line 2: found unexpected end of stream",
        user_file='agent_pool_name: "gpu\n'),
    Bad("yaml_two_documents_in_explicit_file", "{explicit}", None,
        "but found another document",
        explicit_file="agent_pool_name: a\n---\nagent_pool_name: b\n"),
    Bad("yaml_duplicate_key", "{user}", None, "duplicate key",
        user_file="agent_pool_name: gpu\nagent_pool_name: cpu\n"),
    Bad("yaml_recursive_alias", "{user}", None,
        ("agent_pool_name: expected text, got list", "recursive"),
        user_file="agent_pool_name: &loop [*loop]\n"),
    Bad("top_level_list", "{user}", None, "must be a mapping of key: value lines",
        user_file="- agent_pool_name: gpu\n- rabbitmq_port: 5672\n"),
    Bad("top_level_scalar_in_explicit_file", "{explicit}", None, "must be a mapping",
        explicit_file="42\n"),
    Bad("non_utf8_bytes", "{user}", None, "is not UTF-8 text",
        user_file=b"agent_pool_name: caf\xe9\n"),
    Bad("directory_where_the_user_file_should_be", "{user}", None,
        "cannot read: Is a directory", user_file=DIRECTORY),
    Bad("chiffon_config_missing_file", "CHIFFON_CONFIG", None,
        "{tmp}/missing.yml does not exist", env={"CHIFFON_CONFIG": "{tmp}/missing.yml"}),
    Bad("chiffon_config_is_a_directory", "CHIFFON_CONFIG", None, "{tmp} is a directory",
        env={"CHIFFON_CONFIG": "{tmp}"}),
    Bad("chiffon_config_path_with_newline", "CHIFFON_CONFIG", None, "does not exist",
        env={"CHIFFON_CONFIG": "{tmp}/no\nsuch.yml"}),
    # -- YAML that must never run code ------------------------------------------------------
    Bad("unsafe_python_object_apply_tag", "{user}", None,
        "invalid YAML at line 1: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'",
        user_file="agent_pool_name: !!python/object/apply:os.system ['touch {tmp}/pwned']\n",
        absent="{tmp}/pwned"),
    Bad("unsafe_tag_with_unsafe_loader_requested_by_env", "{user}", None,
        "could not determine a constructor",
        user_file="agent_pool_name: !!python/object/apply:os.system ['touch {tmp}/pwned']\n",
        env={"YAML_LOADER_FOR_DYNACONF": "unsafe_load"}, absent="{tmp}/pwned"),
    Bad("unsafe_python_name_tag", "{user}", None, "could not determine a constructor",
        user_file="rabbitmq_host: !!python/name:os.system\n"),
    Bad("dynaconf_int_token_is_not_plain_yaml", "{user}", "heartbeat_interval_seconds",
        "expected a number, got '@int fast'",
        user_file='heartbeat_interval_seconds: "@int fast"\n'),
    Bad("dynaconf_format_token_is_not_plain_yaml", "{user}", "agent_pool_name",
        "letters, digits",
        user_file='agent_pool_name: "@format {this.missing}"\n'),
    Bad("dynaconf_read_file_token_is_not_plain_yaml", "{user}", "agent_pool_name",
        "letters, digits",
        user_file='agent_pool_name: "@read_file /etc/hostname"\n'),
    # -- wrong types and values in a file -----------------------------------------------------
    Bad("interval_with_a_unit", "{user}", "heartbeat_interval_seconds",
        "expected a number, got '30s'", user_file="heartbeat_interval_seconds: 30s\n"),
    Bad("interval_zero", "{user}", "heartbeat_interval_seconds",
        "must be between 0.1 and 86400 (got 0.0)", user_file="heartbeat_interval_seconds: 0\n"),
    Bad("timeout_negative", "{user}", "heartbeat_timeout_seconds",
        "must be between 0.1 and 604800 (got -90.0)",
        user_file="heartbeat_timeout_seconds: -90\n"),
    Bad("interval_nan", "{user}", "heartbeat_interval_seconds",
        "expected a finite number, got nan", user_file="heartbeat_interval_seconds: .nan\n"),
    Bad("timeout_inf", "{user}", "heartbeat_timeout_seconds",
        "expected a finite number, got inf", user_file="heartbeat_timeout_seconds: .inf\n"),
    Bad("gpu_timeout_float_overflow", "{user}", "gpu_detection_timeout_seconds",
        "expected a finite number, got inf", user_file="gpu_detection_timeout_seconds: 1e999\n"),
    Bad("port_integer_too_large_for_a_float", "{user}", "rabbitmq_port",
        ("too large", "must be between 1 and 65535"),
        user_file=f"rabbitmq_port: {HUGE_INT}\n"),
    Bad("timeout_shorter_than_interval", "{user}", "heartbeat_timeout_seconds",
        "30 s is shorter than heartbeat_interval_seconds 60 s (from {user})",
        user_file="heartbeat_interval_seconds: 60\nheartbeat_timeout_seconds: 30\n"),
    Bad("port_zero", "{user}", "rabbitmq_port", "must be between 1 and 65535 (got 0)",
        user_file="rabbitmq_port: 0\n"),
    Bad("port_above_65535", "{user}", "rabbitmq_port",
        "must be between 1 and 65535 (got 65536)", user_file="rabbitmq_port: 65536\n"),
    Bad("port_with_protocol_suffix", "{user}", "rabbitmq_port",
        "expected a number, got '5672/tcp'", user_file='rabbitmq_port: "5672/tcp"\n'),
    Bad("port_boolean", "{user}", "rabbitmq_port", "expected a number, got True",
        user_file="rabbitmq_port: true\n"),
    Bad("metrics_port_negative", "{user}", "metrics_port",
        "must be between 0 and 65535 (got -1)", user_file="metrics_port: -1\n"),
    Bad("concurrency_zero", "{user}", "worker_concurrency",
        "must be between 1 and 1024 (got 0)", user_file="worker_concurrency: 0\n"),
    Bad("pool_blank", "{user}", "agent_pool_name", "must not be blank",
        user_file='agent_pool_name: ""\n'),
    Bad("pool_only_spaces", "{user}", "agent_pool_name", "must not be blank",
        user_file='agent_pool_name: "   "\n'),
    Bad("pool_without_value", "{user}", "agent_pool_name",
        "has no value (write a value or remove the key)", user_file="agent_pool_name:\n"),
    Bad("pool_amqp_wildcard", "{user}", "agent_pool_name",
        "must be 1-128 characters of letters, digits, '.', '_' or '-' (got 'gpu.*')",
        user_file='agent_pool_name: "gpu.*"\n'),
    Bad("pool_non_ascii", "{user}", "agent_pool_name", "(got 'pööl')",
        user_file="agent_pool_name: pööl\n"),
    Bad("pool_mapping", "{user}", "agent_pool_name", "expected text, got dict",
        user_file="agent_pool_name: {name: gpu}\n"),
    Bad("agent_id_with_slash", "{user}", "agent_id", "letters, digits, '.', '_' or '-'",
        user_file='agent_id: "rig/7"\n'),
    Bad("agent_id_leading_dash", "{user}", "agent_id", "(got '-rig')",
        user_file='agent_id: "-rig"\n'),
    Bad("agent_id_129_characters", "{user}", "agent_id", "must be 1-128 characters",
        user_file="agent_id: " + "a" * 129 + "\n"),
    Bad("broker_url_http_scheme", "{user}", "broker_url",
        "scheme 'http' is not one of amqp, amqps, pyamqp, redis, rediss, memory",
        user_file='broker_url: "http://127.0.0.1:5672//"\n'),
    Bad("broker_url_without_scheme", "{user}", "broker_url", "scheme '(none)' is not one of",
        user_file='broker_url: "127.0.0.1:5672"\n'),
    Bad("broker_url_password_is_not_echoed", "{user}", "broker_url", "scheme 'http'",
        user_file='broker_url: "http://chiffon:hunter2@mq.lab:5672//"\n', secret="hunter2"),
    Bad("broker_url_broken_ipv6_host", "{user}", "broker_url", "is not a valid URL",
        user_file='broker_url: "amqp://[::1:5672//"\n'),
    Bad("database_url_mysql", "{user}", "database_url",
        "scheme 'mysql' is not one of sqlite, postgresql, postgresql+psycopg",
        user_file='database_url: "mysql://db.lab/chiffon"\n'),
    Bad("worker_pool_unknown", "{user}", "worker_pool", "must be one of solo, threads, prefork",
        user_file="worker_pool: processes\n"),
    # -- bad values in the environment ----------------------------------------------------------
    Bad("env_short_interval_text", "environment CHIFFON_HEARTBEAT_INTERVAL",
        "heartbeat_interval_seconds", "expected a number, got 'soon'",
        env={"CHIFFON_HEARTBEAT_INTERVAL": "soon"}),
    Bad("env_short_interval_empty", "environment CHIFFON_HEARTBEAT_INTERVAL",
        "heartbeat_interval_seconds", "expected a number, got ''",
        env={"CHIFFON_HEARTBEAT_INTERVAL": ""}),
    Bad("env_short_interval_negative", "environment CHIFFON_HEARTBEAT_INTERVAL",
        "heartbeat_interval_seconds", "must be between 0.1 and 86400 (got -5.0)",
        env={"CHIFFON_HEARTBEAT_INTERVAL": "-5"}),
    Bad("env_long_interval_nan", "environment CHIFFON_HEARTBEAT_INTERVAL_SECONDS",
        "heartbeat_interval_seconds", "expected a finite number, got nan",
        env={"CHIFFON_HEARTBEAT_INTERVAL_SECONDS": "NaN"}),
    Bad("env_long_name_wins_and_is_validated", "environment CHIFFON_HEARTBEAT_INTERVAL_SECONDS",
        "heartbeat_interval_seconds", "must be between 0.1 and 86400 (got 0.0)",
        env={"CHIFFON_HEARTBEAT_INTERVAL": "30", "CHIFFON_HEARTBEAT_INTERVAL_SECONDS": "0"}),
    Bad("env_timeout_minus_inf", "environment CHIFFON_HEARTBEAT_TIMEOUT_SECONDS",
        "heartbeat_timeout_seconds", "expected a finite number, got -inf",
        env={"CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": "-inf"}),
    Bad("env_timeout_shorter_than_file_interval",
        "environment CHIFFON_HEARTBEAT_TIMEOUT_SECONDS", "heartbeat_timeout_seconds",
        "30 s is shorter than heartbeat_interval_seconds 60 s (from {user})",
        user_file="heartbeat_interval_seconds: 60\n",
        env={"CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": "30"}),
    Bad("env_short_agent_id_with_space", "environment CHIFFON_AGENT_ID", "agent_id",
        "(got 'rig 7')", env={"CHIFFON_AGENT_ID": "rig 7"}),
    Bad("env_short_agent_id_with_newline", "environment CHIFFON_AGENT_ID", "agent_id",
        "(got 'rig\\n7')", env={"CHIFFON_AGENT_ID": "rig\n7"}),
    Bad("env_pool_blank", "environment CHIFFON_AGENT_POOL_NAME", "agent_pool_name",
        "must not be blank", env={"CHIFFON_AGENT_POOL_NAME": ""}),
    Bad("env_port_out_of_range", "environment CHIFFON_RABBITMQ_PORT", "rabbitmq_port",
        "must be between 1 and 65535 (got 99999)", env={"CHIFFON_RABBITMQ_PORT": "99999"}),
    Bad("env_port_hex", "environment CHIFFON_RABBITMQ_PORT", "rabbitmq_port",
        "expected a number, got '0x1628'", env={"CHIFFON_RABBITMQ_PORT": "0x1628"}),
    Bad("env_port_fraction", "environment CHIFFON_RABBITMQ_PORT", "rabbitmq_port",
        "expected a whole number, got 5672.5", env={"CHIFFON_RABBITMQ_PORT": "5672.5"}),
    Bad("env_broker_url_ftp", "environment CHIFFON_BROKER_URL", "broker_url",
        "scheme 'ftp' is not one of", env={"CHIFFON_BROKER_URL": "ftp://mq.lab/"}),
    Bad("env_database_url_broken_ipv6_host", "environment CHIFFON_DATABASE_URL",
        "database_url", "is not a valid URL",
        env={"CHIFFON_DATABASE_URL": "postgresql://[db.lab/chiffon"}),
    Bad("env_log_level_unknown", "environment CHIFFON_LOG_LEVEL", "log_level",
        "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        env={"CHIFFON_LOG_LEVEL": "loud"}),
    # -- the owner rules: a mistake must not leave the machine offered to all comers ----------
    Bad("owner_rule_misspelled", "{user}", "owner_idel_minutes",
        "unknown owner rule; did you mean 'owner_idle_minutes'?",
        user_file="owner_idel_minutes: 10\n"),
    Bad("owner_rule_unknown", "{user}", "owner_gaming", "unknown owner rule",
        user_file="owner_gaming: true\n"),
    Bad("owner_idle_minutes_negative", "{user}", "owner_idle_minutes",
        "must be between 0 and 10080 (got -5.0)", user_file="owner_idle_minutes: -5\n"),
    Bad("gpu_temperature_as_text", "{user}", "gpu_temperature_below_c",
        "expected a number, got 'hot'", user_file="gpu_temperature_below_c: hot\n"),
    Bad("work_on_battery_unknown", "{user}", "work_on_battery", "must be one of yes, no",
        user_file="work_on_battery: sometimes\n"),
]
BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES), "duplicate case ids"


def _params(cases: list[Bad]) -> list[Any]:
    """pytest params named by case id; a known defect is a strict xfail with its reason."""
    return [pytest.param(case, id=case.id,
                         marks=[pytest.mark.xfail(strict=True, reason=case.xfail)]
                         if case.xfail else []) for case in cases]


@dataclass
class Prepared:
    """A case materialised in a temporary directory."""

    case: Bad
    cwd: Path
    env: dict[str, str]
    subst: dict[str, str]

    def fill(self, template: str) -> str:
        return _fill(template, self.subst)


def _fill(template: str, subst: dict[str, str]) -> str:
    """Replace the ``{home}``-style placeholders (and nothing else: YAML has braces too)."""
    for name, value in subst.items():
        template = template.replace("{" + name + "}", value)
    return template


def prepare(case: Bad, tmp_path: Path) -> Prepared:
    home, state, cwd = tmp_path / "home", tmp_path / "state", tmp_path / "cwd"
    for directory in (home, state, cwd):
        directory.mkdir()
    user = home / ".chiffon" / "agent.yml"
    explicit = tmp_path / "explicit.yml"
    subst = {"home": str(home), "tmp": str(tmp_path), "user": str(user),
             "explicit": str(explicit)}
    env = {name: _fill(value, subst) for name, value in case.env.items()}
    if case.user_file is DIRECTORY:
        user.mkdir(parents=True)
    elif case.user_file is not None:
        user.parent.mkdir(parents=True)
        _write(user, case.user_file, subst)
    if case.explicit_file is not None:
        _write(explicit, case.explicit_file, subst)
        env["CHIFFON_CONFIG"] = str(explicit)
    return Prepared(case, cwd, isolated_env(home, state, env), subst)


def _write(path: Path, content: object, subst: dict[str, str]) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        assert isinstance(content, str)
        path.write_text(_fill(content, subst), encoding="utf-8")


def assert_one_line_error(prepared: Prepared, proc: subprocess.CompletedProcess[str]) -> None:
    """Exit 2, empty stdout, one ``chiffon: error: SOURCE: KEY: PROBLEM`` line, no traceback."""
    case = prepared.case
    shown = f"exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert proc.returncode == 2, shown
    assert proc.stdout == "", shown
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, shown
    line = lines[0]
    prefix = f"chiffon: error: {prepared.fill(case.source)}: "
    if case.key:
        prefix += f"{case.key}: "
    assert line.startswith(prefix), f"expected prefix {prefix!r}\n{shown}"
    problems = case.problem if isinstance(case.problem, tuple) else (case.problem,)
    assert any(prepared.fill(p) in line[len(prefix):] for p in problems), shown
    if case.secret:
        assert case.secret not in proc.stdout + proc.stderr, shown
    if case.absent:
        assert not Path(prepared.fill(case.absent)).exists(), "a YAML tag ran code"


def run_bounded(command: list[str], prepared: Prepared,
                timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in its own session; past ``timeout`` kill the whole group (a worker
    that wrongly came up has a beat child) and return what it printed, exit status -9."""
    with subprocess.Popen(command, cwd=prepared.cwd, env=prepared.env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, encoding="utf-8",
                          errors="replace", start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("case", _params(CASES))
def test_chiffon_config_show_rejects_bad_config_in_one_line(case: Bad, tmp_path: Path) -> None:
    prepared = prepare(case, tmp_path)
    proc = run_bounded([CHIFFON, "config", "show"], prepared, timeout=60)
    assert_one_line_error(prepared, proc)


#: A few of the cases again, through the real agent start.
WORKER_CASES = [
    "interval_with_a_unit",
    "env_short_agent_id_with_space",
    "chiffon_config_missing_file",
    "unsafe_python_object_apply_tag",
    "yaml_duplicate_key",
    "broker_url_broken_ipv6_host",
    "owner_rule_misspelled",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", _params([BY_ID[name] for name in WORKER_CASES]))
def test_agent_start_with_bad_config_exits_quickly_in_one_line(case: Bad,
                                                              tmp_path: Path) -> None:
    prepared = prepare(case, tmp_path)
    # A unique node name: should the config wrongly be accepted, the worker must not clash
    # with (or steal the pidbox of) another agent running on this machine.
    command = [CELERY, "-A", "chiffon_worker", "worker", "-B",
               "-n", f"badinput-{uuid.uuid4().hex[:8]}@%h"]
    started = time.monotonic()
    proc = run_bounded(command, prepared, timeout=15)
    assert time.monotonic() - started < 15, f"the agent was still running after 15 s: {proc}"
    assert_one_line_error(prepared, proc)
    assert list(prepared.cwd.iterdir()) == [], "the failed start littered its working directory"

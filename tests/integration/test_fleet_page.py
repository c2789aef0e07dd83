"""The fleet page in a real browser: headless Chromium driven over the DevTools protocol
(``--remote-debugging-pipe``: no port, no websocket client), looking at a real
``chiffon orchestrator`` on a private vhost that forged heartbeats feed.

The browser stays open across a change in the fleet, so the page is seen to redraw by
itself: the document that showed the first state (marked by the test) shows the second.
Screenshots at 1280x800 and at a phone's width are written under the test's temp dir and,
when ``CHIFFON_SCREENSHOT_DIR`` is set, copied there. A missing Chromium skips the test
locally and fails it under ``CI=true``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.wire import HEARTBEAT_QUEUE
from tests.conftest import missing_service
from tests.integration.helpers import READY_TIMEOUT_S, agent_environment, unique
from tests.integration.private_rabbit import free_port
from tests.orchestrator.conftest import Publisher
from tests.orchestrator.snapshots import make_snapshot
from tests.orchestrator_process import (
    CHIFFON,
    FOLLOWING_EVENTS,
    Orchestrator,
    VhostUnavailable,
    private_vhost,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

#: Debian's package; FACTS.md gives the flags that work on these machines.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--window-size=1280,800", "--remote-debugging-pipe")
#: A hostname an attacker could send: markup that would run if the page parsed it.
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
#: What the page shows of each agent, read in the browser: pools in order, and per pool
#: its agents' id, hostname (as text), liveness and VRAM cell.
READ_FLEET = """
Array.from(document.querySelectorAll("section.pool")).map(section => ({
  pool: section.querySelector(".pool-name").textContent,
  agents: Array.from(section.querySelectorAll("tr[data-agent-id]")).map(row => ({
    id: row.dataset.agentId,
    host: row.querySelector(".host").textContent,
    state: row.querySelector(".state").textContent,
    vram: row.querySelector(".c-vram").textContent,
  })),
}))
"""


class DevTools:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe``: JSON messages ending
    in NUL, commands written to the browser's fd 3, answers and events read from its fd 4."""

    def __init__(self, executable: str, user_data_dir: Path, log_path: Path) -> None:
        to_browser, self._writer = os.pipe()
        self._reader, from_browser = os.pipe()
        # the browser's ends above 9, so that moving them to 3 and 4 overwrites neither
        to_browser, from_browser = (_above_nine(to_browser), _above_nine(from_browser))
        with log_path.open("wb") as log:
            # bash (dash takes one-digit fds only) moves the pipe ends to fds 3 and 4,
            # where Chromium looks for them
            self.process = subprocess.Popen(
                ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser} '
                 f'{to_browser}<&- {from_browser}>&-',
                 executable, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}",
                 "about:blank"],
                pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT)
        os.close(to_browser)
        os.close(from_browser)
        self.log_path = log_path
        self._buffer = b""
        self._next_id = 0

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and return its result (events in between are dropped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._writer, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise AssertionError(f"{method}: {answer['error']}")
                    return dict(answer["result"])
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._reader], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"Chromium did not answer {method} in {timeout:g} s:\n"
                                     f"{self.log_path.read_text(errors='replace')[-3000:]}")
            chunk = os.read(self._reader, 1 << 20)
            if not chunk:
                raise AssertionError("Chromium closed its DevTools pipe:\n"
                                     f"{self.log_path.read_text(errors='replace')[-3000:]}")
            self._buffer += chunk

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.call("Browser.close", timeout=10)
                self.process.wait(10)
            except (AssertionError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)
        os.close(self._writer)
        os.close(self._reader)


def _above_nine(fd: int) -> int:
    """``fd`` moved to the lowest free descriptor above 9 (the old one closed)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


@dataclass
class Tab:
    """One page of the browser, attached in flat mode."""

    devtools: DevTools
    session: str

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when a promise)."""
        result = self.devtools.call("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True},
            self.session)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, width: int, height: int, mobile: bool, path: Path) -> Path:
        """A PNG of the viewport at ``width`` x ``height`` CSS pixels."""
        self.devtools.call("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
            self.session)
        wait_until(lambda: self.evaluate("window.innerWidth") == width, 10,
                   f"the page laid out at {width} px")
        data = self.devtools.call("Page.captureScreenshot", {"format": "png"},
                                  self.session)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextmanager
def chromium(tmp: Path) -> Iterator[DevTools]:
    """A headless Chromium, or a skip (locally) / failure (CI) where there is none."""
    executable = shutil.which("chromium") or CHROMIUM
    if not Path(executable).is_file():
        missing_service(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    browser = DevTools(executable, tmp / "chromium-profile", tmp / "chromium.log")
    try:
        yield browser
    finally:
        browser.close()


def open_tab(browser: DevTools, url: str) -> Tab:
    target = browser.call("Target.createTarget", {"url": url})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})
    return Tab(browser, session["sessionId"])


@dataclass
class Fleet:
    """A running orchestrator serving the fleet page, and a way to feed it heartbeats."""

    registry_url: str
    port: int
    publisher: Publisher
    orchestrator: Orchestrator

    def agents_known(self) -> set[str]:
        with Registry(self.registry_url, read_only=True) as registry:
            return registry.agent_ids()

    def fleet_json(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/fleet.json",
                                    timeout=10) as response:
            return dict(json.loads(response.read()))


@pytest.fixture(scope="module")
def fleet(rabbitmq_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """``chiffon orchestrator`` on a private vhost with its metrics port open."""
    tmp = tmp_path_factory.mktemp("fleet-page")
    state, port = tmp / "orchestrator-state", free_port()
    try:
        with private_vhost(rabbitmq_url) as url:
            env = agent_environment(tmp / "home", {
                "CHIFFON_BROKER_URL": url, "CHIFFON_STATE_DIR": str(state),
                "CHIFFON_LOG_LEVEL": "INFO"})
            log_path = tmp / "orchestrator.log"
            with log_path.open("wb") as log:
                popen = subprocess.Popen(
                    [str(CHIFFON), "orchestrator", "--metrics-port", str(port),
                     "--metrics-addr", "127.0.0.1"],
                    env=env, stdout=log, stderr=subprocess.STDOUT)
            orchestrator = Orchestrator(popen, log_path)
            publisher = Publisher(url, HEARTBEAT_QUEUE)
            try:
                wait_until(lambda: FOLLOWING_EVENTS in orchestrator.log()
                           or popen.poll() is not None, READY_TIMEOUT_S,
                           "the orchestrator to start")
                assert popen.poll() is None, orchestrator.log()
                yield Fleet(f"sqlite:///{state / 'registry.sqlite3'}", port, publisher,
                            orchestrator)
            finally:
                publisher.close()
                orchestrator.stop()
    except VhostUnavailable as exc:
        missing_service(str(exc))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, from its IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def keep_screenshots(*paths: Path) -> None:
    """Copy the screenshots to ``CHIFFON_SCREENSHOT_DIR`` when it is set."""
    target = os.environ.get("CHIFFON_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy2(path, Path(target) / path.name)


def test_the_fleet_page_shows_the_orchestrators_agents_by_pool_and_redraws_when_one_changes(
        fleet: Fleet, tmp_path: Path) -> None:
    desks, rigs = unique("desks"), unique("rigs")
    desk, hostile, rig = unique("desk"), unique("hostile"), unique("rig")
    intel = {"index": 0, "vendor": "intel", "name": "Intel Arc A770", "vram_total_gb": 16.0,
             "vram_available_gb": None, "utilization_percent": None, "temperature_c": None,
             "source": "sysfs"}
    fleet.publisher.heartbeat(make_snapshot(desk, pool=desks, hostname="desk-one"))
    fleet.publisher.heartbeat(make_snapshot(hostile, pool=desks, hostname=HOSTILE))
    fleet.publisher.heartbeat(make_snapshot(
        rig, pool=rigs, hostname="rig-one", gpu_type="intel", gpu_vram_known=False,
        gpu_vram_available_gb=0.0, gpu_vram_total_gb=16.0, gpus=[intel]))
    wait_until(lambda: {desk, hostile, rig} <= fleet.agents_known(), 20,
               "the orchestrator to record three agents")

    with chromium(tmp_path) as browser:
        tab = open_tab(browser, f"http://127.0.0.1:{fleet.port}/?poll=1")
        shown = wait_until(lambda: tab.evaluate(READ_FLEET) or None, 20,
                           "the page to draw the fleet")
        # the agents the orchestrator knows, grouped by pool (pools in name order)
        assert [p["pool"] for p in shown] == sorted([desks, rigs])
        by_id = {a["id"]: (p["pool"], a) for p in shown for a in p["agents"]}
        assert set(by_id) == fleet.agents_known()
        assert {agent: pool for agent, (pool, _) in by_id.items()} == {
            desk: desks, hostile: desks, rig: rigs}
        assert all(a["state"] == "online" for _, a in by_id.values())
        # a hostile hostname is shown as text and runs nothing
        assert by_id[hostile][1]["host"] == HOSTILE
        assert tab.evaluate("typeof window.__pwned") == "undefined"
        assert tab.evaluate("document.querySelectorAll('main img, main script').length") == 0
        # VRAM the agent cannot tell is unknown, not zero
        assert "unknown" in by_id[rig][1]["vram"] and "0.0" not in by_id[rig][1]["vram"]

        wide = tab.screenshot(1280, 800, False, tmp_path / "fleet-1280x800.png")
        assert png_size(wide) == (1280, 800)
        assert tab.evaluate("document.documentElement.scrollWidth") <= 1280

        # the fleet changes while the page stays open: the desk goes to sleep, a new rig
        # appears; the same document (marked now) redraws by itself
        tab.evaluate("window.__sameDocument = true")
        draws = tab.evaluate("window.chiffonFleet.draws")
        newcomer = unique("rig")
        fleet.publisher.heartbeat(make_snapshot(desk, pool=desks, hostname="desk-one", seq=2,
                                                asleep=True))
        fleet.publisher.heartbeat(make_snapshot(newcomer, pool=rigs, hostname="rig-two"))

        def redrawn() -> list[dict[str, Any]] | None:
            now = {a["id"]: a for p in tab.evaluate(READ_FLEET) for a in p["agents"]}
            changed = newcomer in now and now[desk]["state"] == "asleep"
            return list(now.values()) if changed else None

        wait_until(redrawn, 20, "the open page to show the desk asleep and the new rig")
        assert tab.evaluate("window.__sameDocument") is True
        assert tab.evaluate("window.chiffonFleet.draws") > draws
        assert tab.evaluate("performance.getEntriesByType('navigation').length") == 1

        phone = tab.screenshot(390, 844, True, tmp_path / "fleet-390x844.png")
        assert png_size(phone) == (390, 844)
        # on a phone the rows are cards: no table header, nothing wider than the screen
        assert tab.evaluate("getComputedStyle(document.querySelector('thead')).display") \
            == "none"
        assert tab.evaluate("document.documentElement.scrollWidth") <= 390
    keep_screenshots(wide, phone)


@pytest.mark.parametrize(("asked", "polled_every"), [
    pytest.param("1e308", 3600, id="huge: capped (a longer browser timer fires at once)"),
    pytest.param("0.001", 5, id="under a second: the server's advice"),
    pytest.param("abc", 5, id="not a number: the server's advice"),
])
def test_the_page_polls_within_bounds_whatever_the_url_asks(
        fleet: Fleet, tmp_path: Path, asked: str, polled_every: float) -> None:
    with chromium(tmp_path) as browser:
        tab = open_tab(browser, f"http://127.0.0.1:{fleet.port}/?poll={asked}")
        scheduled = "window.chiffonFleet && window.chiffonFleet.pollSeconds"
        wait_until(lambda: tab.evaluate(scheduled), 20, "the page to schedule its next poll")
        assert tab.evaluate("window.chiffonFleet.pollSeconds") == polled_every
        assert tab.evaluate("window.chiffonFleet.polls") == 1


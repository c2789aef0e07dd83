"""A private three-node RabbitMQ cluster on this machine, for tests that stop one node.

Each node is a private node as in :mod:`tests.integration.private_rabbit`: its own name
(``rN-<tag>@localhost``), AMQP port and Erlang distribution port (picked free per run),
its own directories (owned by the ``rabbitmq`` user, to whom the server drops
privileges) and its own config file (``/etc/rabbitmq/rabbitmq.conf`` pins the listener).
The nodes share the machine's epmd and Erlang cookie (never stopped or changed here).
``r2`` and ``r3`` join ``r1`` (``stop_app``, ``join_cluster``, ``start_app``).

:attr:`PrivateCluster.url` lists the three nodes for kombu's failover
(``amqp://...:P1//;amqp://...:P2//;amqp://...:P3//``); :meth:`PrivateCluster.node_url`
names one node alone. Measured here (2 cores): three nodes up and joined in 15-18 s; one
node stops in about 3.5 s (its client connections close about 3 s after the stop is asked)
and is back in the cluster 4-6.5 s after it is started again; all three down in about 4 s.

``rabbitmqctl stop PIDFILE`` on a node that is already stopped waits forever, so every
``rabbitmqctl`` call has a timeout, a stop is only asked of a node whose pid file exists,
and :meth:`PrivateCluster.destroy` kills whatever is left of a node's Erlang VM by its pid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.integration.private_rabbit import available, free_port, port_open

log = logging.getLogger(__name__)

__all__ = ["NODES", "ClusterNode", "PrivateCluster", "available"]

#: Nodes in the cluster (a quorum of 2 survives one stopped node).
NODES = 3
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CTL_TIMEOUT_S = 60.0


class ClusterNode:
    """One node of a :class:`PrivateCluster`: ``start()``, ``stop()``, ``destroy()``."""

    def __init__(self, index: int, tag: str, root: Path) -> None:
        self.index = index
        self.nodename = f"r{index}-{tag}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.base = root / f"r{index}"
        self.pid_file = self.base / "pid"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (self.base / "mnesia").mkdir(parents=True)
        (self.base / "log").mkdir()
        (self.base / "plugins").write_text("[].\n")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n")

    def env(self) -> dict[str, str]:
        """The environment ``rabbitmq-server`` and ``rabbitmqctl`` need for this node."""
        env = dict(os.environ)
        env.update({
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
        })
        return env

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT_S,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <this node> args``, bounded by ``timeout`` seconds."""
        done = subprocess.run(["rabbitmqctl", "-n", self.nodename, *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.nodename} {' '.join(args)}: exit "
                               f"{done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
        return done

    @property
    def running(self) -> bool:
        """Whether the node's AMQP port accepts connections."""
        return port_open(self.port)

    def launch(self) -> None:
        """``rabbitmq-server -detached`` (returns at once; see :meth:`wait_booted`)."""
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=CTL_TIMEOUT_S)

    def wait_booted(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until the node has written its pid file and its AMQP port accepts."""
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.nodename} wrote no pid file in {timeout:g} s; "
                                   f"logs in {self.base / 'log'}")
            time.sleep(0.05)
        self.ctl("wait", "--timeout", f"{max(1, int(deadline - time.monotonic()))}",
                 str(self.pid_file), timeout=timeout + 5)
        while not self.running:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.nodename} not listening on {self.port} after "
                                   f"{timeout:g} s; logs in {self.base / 'log'}")
            time.sleep(0.05)

    def start(self, timeout: float = START_TIMEOUT_S) -> float:
        """Start the node again (it rejoins its cluster); returns the monotonic time its
        AMQP port accepted."""
        self.launch()
        self.wait_booted(timeout)
        return time.monotonic()

    def pid(self) -> int | None:
        """The node's Erlang VM pid from its pid file (None: no file)."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the node and wait until its VM has exited (a stopped node: nothing)."""
        pid = self.pid()
        if pid is None:
            return
        self.ctl("stop", str(self.pid_file), timeout=timeout, check=False)
        self._wait_gone(pid, timeout)

    def _wait_gone(self, pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _alive(pid) or self.running:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.nodename} (pid {pid}) still running after "
                                   f"{timeout:g} s")
            time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)

    def destroy(self) -> None:
        """Stop the node however it can be stopped (bounded); its VM is killed if needed."""
        pid = self.pid()
        if pid is None:
            return
        try:
            self.stop(timeout=15)
        except (TimeoutError, subprocess.TimeoutExpired) as exc:
            log.warning("killing %s: %s", self.nodename, exc)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            self.pid_file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive (the node is detached: init reaps it)
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class PrivateCluster:
    """Three private RabbitMQ nodes joined into one cluster.

    ``start()`` boots them and joins them; ``nodes[i].stop()`` / ``nodes[i].start()`` take
    one down and bring it back; ``destroy()`` stops every node and removes their files.
    Its files live in a fresh directory under the system temp dir (pytest's are private to
    root, and the server runs as ``rabbitmq``).
    """

    def __init__(self, size: int = NODES) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.root = Path(tempfile.mkdtemp(prefix="chiffon-cluster-"))
        self.nodes = [ClusterNode(index, self.tag, self.root) for index in range(1, size + 1)]
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.root)], check=True)
        self.root.chmod(0o755)

    @property
    def url(self) -> str:
        """Every node's URL, ``;``-separated: kombu's (and Celery's) failover list."""
        return ";".join(node.url for node in self.nodes)

    def node_url(self, index: int) -> str:
        """The URL of node ``rN`` alone (``index`` counts from 1)."""
        return self.nodes[index - 1].url

    def start(self) -> float:
        """Boot every node (in parallel) and join them; returns the seconds it took."""
        began = time.monotonic()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.launch(), self.nodes))
            list(pool.map(lambda node: node.wait_booted(), self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            # prints a harmless "Failed to create a tracked connection table" error
            node.ctl("join_cluster", first.nodename)
            node.ctl("start_app")
        self.wait_members(len(self.nodes))
        return time.monotonic() - began

    def running_members(self) -> list[str]:
        """The running nodes of the cluster, as a live node sees them."""
        for node in self.nodes:
            if not node.running:
                continue
            done = node.ctl("cluster_status", "--formatter", "json", check=False, timeout=30)
            if done.returncode == 0:
                return list(json.loads(done.stdout).get("running_nodes", []))
        return []

    def wait_members(self, count: int, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until ``count`` nodes run in the cluster."""
        deadline = time.monotonic() + timeout
        while len(members := self.running_members()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster runs {members}, not {count} nodes, after "
                                   f"{timeout:g} s")
            time.sleep(0.2)

    def destroy(self) -> None:
        """Stop every node (in parallel, bounded) and remove all their files."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.destroy(), self.nodes))
        shutil.rmtree(self.root, ignore_errors=True)

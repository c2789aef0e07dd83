"""``ProcessLocal``: one value per process, built on first use and again after ``fork``."""

from __future__ import annotations

import os

from chiffon_worker.process_local import ProcessLocal


class Built:
    """A value that remembers the process that built it."""

    def __init__(self) -> None:
        self.pid = os.getpid()


def test_the_value_is_built_once_per_process() -> None:
    local: ProcessLocal[Built] = ProcessLocal(Built)
    assert local.get() is local.get()


def test_nothing_is_built_before_first_use() -> None:
    local: ProcessLocal[Built] = ProcessLocal(Built)
    assert local.peek() is None


def test_a_forked_child_builds_its_own_value() -> None:
    local: ProcessLocal[Built] = ProcessLocal(Built)
    parent_value = local.get()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it got a fresh value, then leave at once
        child_value = local.get()
        fresh = child_value is not parent_value and child_value.pid == os.getpid()
        os.write(write, b"1" if fresh and local.peek() is child_value else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert local.get() is parent_value


def test_set_pins_a_value_and_reset_forgets_it() -> None:
    local: ProcessLocal[Built] = ProcessLocal(Built)
    pinned = Built()
    local.set(pinned)
    assert local.get() is pinned
    local.reset()
    assert local.peek() is None
    assert local.get() is not pinned

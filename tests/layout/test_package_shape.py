"""What installing and importing the package gives: ``chiffon_worker.app`` is always the
Celery app, and no top-level module but ``chiffon_worker`` goes into site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

_IMPORT_EVERYTHING_THEN_APP = """
import importlib, pkgutil, chiffon_worker
for info in pkgutil.walk_packages(chiffon_worker.__path__, "chiffon_worker."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
from celery import Celery
from chiffon_worker import app
import chiffon_worker as package
assert isinstance(app, Celery), type(app)
assert package.app is app
print("ok", app.main)
"""


def _run_python(code: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_STATE_HOME": str(home / "state")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=120, check=False)


def test_chiffon_worker_app_is_the_celery_app_even_after_every_submodule_is_imported(
        tmp_path: Path) -> None:
    done = _run_python(_IMPORT_EVERYTHING_THEN_APP, tmp_path, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok chiffon_worker"


def test_importing_the_package_builds_no_app_and_reads_no_config(tmp_path: Path) -> None:
    code = ("import sys, chiffon_worker\n"
            "assert 'celery' not in sys.modules, 'celery imported'\n"
            "assert 'chiffon_worker.config' not in sys.modules, 'config imported'\n")
    done = _run_python(code, tmp_path, tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_the_wheel_installs_no_top_level_module_but_chiffon_worker(project_wheel: Path) -> None:
    with zipfile.ZipFile(project_wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"chiffon_worker"}

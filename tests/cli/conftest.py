"""Run the `flagtree` command line in a subprocess, as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Variables that would change what the CLI compiles: the tests set targets explicitly instead.
_FLAGTREE_ENVIRONMENT = ("FLAGTREE_TARGET", "FLAGTREE_DUMP_DIR")


def console_script() -> str | None:
    """The installed `flagtree` script: beside this interpreter (a venv not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "flagtree"
    if beside.is_file():
        return str(beside)
    return shutil.which("flagtree")


def _run(*args: str, script: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    if script:
        command = [console_script()]
        assert command[0], "no installed `flagtree` console script"
    else:
        command = [sys.executable, "-m", "flagtree_py.cli.main"]
    environment = {k: v for k, v in os.environ.items() if k not in _FLAGTREE_ENVIRONMENT}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=environment)


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli("demo", "--json")` -> CompletedProcess (text stdout/stderr); `script=True` uses the console script."""
    return _run


@pytest.fixture(scope="session")
def flagtree_script() -> str | None:
    """Path of the installed `flagtree` console script, or None where the package is not installed."""
    return console_script()

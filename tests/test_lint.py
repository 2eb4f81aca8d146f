"""Lint and types are part of the test command: ruff over the code and its
tests, mypy --strict over the sans-IO layers and the host layer, mypy over
the rest (configuration in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STRICT = ["vmemdev/protocol", "vmemdev/vhost", "vmemdev/virtio_mem", "vmemdev/host"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff():
    result = run("ruff", "check", "vmemdev", "tests", "bench", "fuzz", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("args", [["--strict", *STRICT], ["vmemdev"]], ids=["strict-layers", "package"])
def test_mypy(args):
    result = run("mypy", *args)
    assert result.returncode == 0, result.stdout + result.stderr

"""vmemdev.testing as another project uses it: the lab, the fixtures, the assertions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmemdev.testing.assertions import (
    assert_allocated_at_most_plugged,
    assert_allocation_within_plugged,
    cgroup_charge,
)
from vmemdev.testing.lab import Lab

MiB = 1 << 20
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "test_host_accounting.py"


def test_the_example_passes_in_a_project_of_its_own(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "test_example.py")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_assertions_catch_memory_outside_plugged_blocks(vmemdev_lab):
    vmemdev_lab.resize("64M")
    assert_allocation_within_plugged(vmemdev_lab)
    # Something (a buggy guest, a broken discard) leaves data in an unplugged block.
    vmemdev_lab.frontend.ram.write(vmemdev_lab.region_addr + 512 * MiB, b"x" * 4096)
    with pytest.raises(AssertionError, match="outside the plugged blocks"):
        assert_allocation_within_plugged(vmemdev_lab)
    vmemdev_lab.frontend.ram.write(vmemdev_lab.region_addr + 600 * MiB, b"x" * (8 * MiB))
    with pytest.raises(AssertionError, match="host allocated"):
        assert_allocated_at_most_plugged(vmemdev_lab)
    assert vmemdev_lab.accounting()["allocated_outside_plugged"] == 4096 + 8 * MiB


def test_cgroup_charge_follows_a_preallocating_daemon(memory_cgroup):
    child_cgroup = memory_cgroup.path
    with Lab(daemon_args=("--prealloc", "--cgroup", child_cgroup), guest_touches=False,
             cgroup_procs=os.path.join(child_cgroup, "cgroup.procs")) as lab:
        with cgroup_charge(child_cgroup) as charge:
            lab.resize("256M")
        assert 256 * MiB <= charge.delta <= 256 * MiB + 8 * MiB
        with cgroup_charge(child_cgroup) as charge:
            lab.resize(0)
        assert -256 * MiB - 8 * MiB <= charge.delta <= -256 * MiB + 8 * MiB

"""pytest fixtures for host-side memory-accounting tests (loaded automatically).

- ``vmemdev_lab``: a running daemon with an attached simulated guest (1 GiB
  region, 2 MiB blocks); see vmemdev.testing.lab.Lab.
- ``vmemdev_lab_factory``: call it with Lab's keyword arguments for other
  geometries, daemon options (``daemon_args=("--prealloc",)``) or a cgroup.
"""

from __future__ import annotations

import pytest

from .lab import Lab


@pytest.fixture
def vmemdev_lab_factory():
    labs: list[Lab] = []

    def make(**kwargs) -> Lab:
        lab = Lab(**kwargs)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()


@pytest.fixture
def vmemdev_lab(vmemdev_lab_factory) -> Lab:
    return vmemdev_lab_factory()

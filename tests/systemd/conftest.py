"""The real-systemd tier: opt-in with VMEMDEV_SYSTEMD=1 (README, "Real systemd tests").

Without VMEMDEV_SYSTEMD=1 every test marked ``systemd`` is deselected
(``./dev test`` stays fast and needs no root). With it, a missing, out of date
or unbootable lab FAILS the tests with the reason: CI asked for them, so they
must not quietly skip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from . import lab as lablib

ENV = "VMEMDEV_SYSTEMD"
TIMINGS: dict[str, list[float]] = {}
FAILED: list[str] = []  # test ids: the container's work directory is kept when one failed


def systemd_requested() -> bool:
    return os.environ.get(ENV) == "1"


def pytest_collection_modifyitems(config, items):
    if systemd_requested():
        return
    selected, deselected = [], []
    for item in items:
        (deselected if item.get_closest_marker("systemd") else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"systemd: {len(deselected)} real-systemd test(s) deselected: they boot systemd 252 in a "
                f"container (root, scripts/systemdlab provision); run them with {ENV}=1 "
                f"./dev test -q -m systemd tests/systemd")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and item.get_closest_marker("systemd"):
        FAILED.append(item.nodeid)


@pytest.fixture(scope="session")
def container():
    """One booted container for the tier, powered off at the end (its logs kept on failure)."""
    if os.geteuid() != 0:
        pytest.fail(f"{ENV}=1 but not root: systemd-nspawn and nsenter need root", pytrace=False)
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"{ENV}=1 but {tool} is missing: run scripts/systemdlab provision "
                        f"(it installs systemd-container)", pytrace=False)
    try:
        info = lablib.lab_info()
    except Exception as exc:
        pytest.fail(f"{ENV}=1 but the systemd lab is not usable: {exc}\n"
                    f"set it up with: scripts/systemdlab provision", pytrace=False)
    if not info["up_to_date"]:
        pytest.fail("the systemd lab's vmemdev or units differ from this checkout: "
                    "run scripts/systemdlab provision", pytrace=False)
    workdir = Path(tempfile.mkdtemp(prefix="vmemdev-systemdlab-"))
    box = lablib.Container(info, workdir)
    try:
        box.boot()
    except Exception as exc:
        pytest.fail(f"the systemd lab does not boot: {exc}\n(nspawn's output: {box.log_path})", pytrace=False)
    TIMINGS.setdefault("boot to running (s)", []).append(box.boot_seconds)
    try:
        yield box
    finally:
        if FAILED:  # what the container's journal says, for the failed tests
            (workdir / "journal.txt").write_text(box.sh("journalctl", "--no-pager", check=False).stdout)
        box.poweroff()
        if FAILED:
            print(f"\n[systemd] the journal and nspawn's output are kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TIMINGS:
        return
    tr = terminalreporter
    tr.section("vmemdev under systemd 252: timings")
    for name, values in TIMINGS.items():
        shown = ", ".join(f"{v:.3f}" for v in values)
        tr.write_line(f"{name}: {shown}" + (f" (median {sorted(values)[len(values) // 2]:.3f})"
                                             if len(values) > 1 else ""))

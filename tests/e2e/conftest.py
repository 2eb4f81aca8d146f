"""The e2e tier: opt-in with VMEMDEV_E2E=1 (see README, "Real-guest tests (e2e)").

Without VMEMDEV_E2E=1 every test marked ``e2e`` is deselected (``./dev test``
stays fast and needs no root, no QEMU). With it, a missing or unusable
guestlab FAILS the tests with the reason: CI asked for them, so they must not
quietly skip.
"""

from __future__ import annotations

import os
import platform
import time

import pytest

from . import harness

ENV = "VMEMDEV_E2E"
TIMINGS_FILE = harness.REPO / "tests" / "e2e" / "last-timings.json"


def e2e_requested() -> bool:
    return os.environ.get(ENV) == "1"


def pytest_collection_modifyitems(config, items):
    if e2e_requested():
        return
    selected, deselected = [], []
    for item in items:
        (deselected if item.get_closest_marker("e2e") else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"e2e: {len(deselected)} real-guest test(s) deselected: they boot QEMU and a Linux "
                f"guest (root, scripts/guestlab provision); run them with {ENV}=1 "
                f"./dev test -m e2e tests/e2e")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def guestlab_info():
    """The provisioned guestlab, or a failure that says what to do."""
    if os.geteuid() != 0:
        pytest.fail(f"{ENV}=1 but not root: QEMU runs chrooted through scripts/guestlab "
                    f"(chroot, mount namespaces) and needs root", pytrace=False)
    try:
        info = harness.guestlab_info()
    except Exception as exc:
        pytest.fail(f"{ENV}=1 but the guestlab is not usable: {exc}\n"
                    f"set it up with: scripts/guestlab provision", pytrace=False)
    if info.get("up_to_date") is False:
        pytest.fail("the guestlab cache is out of date with its recipe (scripts/guestlab, "
                    "tests/e2e/guest/init): run scripts/guestlab provision", pytrace=False)
    versions = info["versions"]
    harness.LAB_VERSIONS.update(qemu=versions["qemu"], guest_kernel=versions["kernel_release"],
                                guest_kernel_package=versions["kernel_package"])
    if versions["broken_promise"]:
        pytest.fail(f"the guest lab is not what README.md promises: {versions['broken_promise']}",
                    pytrace=False)
    return info


@pytest.fixture
def lab(request, guestlab_info):
    """One test's world: a work directory; the test starts the device and
    the guest with lab.start(...). Torn down whatever happened: QEMU killed,
    the daemon stopped with SIGTERM (must exit 0), region files removed; the
    work directory (logs, console) is kept when the test failed."""
    lab = harness.Lab(guestlab_info, request.node.name)
    try:
        yield lab
    finally:
        call = getattr(request.node, "rep_call", None)
        passed = call is not None and call.passed
        xfailed = call is not None and call.skipped and hasattr(call, "wasxfail")
        # (h) on every test that left its guest running: the guest logged no
        # virtio_mem error and the daemon no error.
        late = None
        if passed and lab.guest is not None and lab.guest.alive():
            try:
                lab.check_guest_clean("at the end of the test")
                lab.check_daemon_clean("at the end of the test")
            except AssertionError as exc:
                late = str(exc)
        keep = not (passed or xfailed) or late is not None
        problems = lab.close(keep=keep)
        if late:
            problems.insert(0, late)
        if keep:
            print(f"\n[e2e] logs kept in {lab.workdir}")
        if problems and passed:
            pytest.fail("\n".join(problems), pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not harness.TIMINGS and not harness.NOTES:
        return
    tr = terminalreporter
    tr.section("vmemdev e2e: timings (seconds), vmemdev vs QEMU's virtio-mem-pci")
    lab = harness.LAB_VERSIONS
    tr.write_line(f"lab: QEMU {lab.get('qemu')}, guest Linux {lab.get('guest_kernel')}")
    tr.write_line(harness.timings_table())
    if harness.NOTES:
        tr.write_line("")
        tr.write_line("observations:")
        for n in harness.NOTES:
            tr.write_line(f"  - {n}")
    tr.write_line(f"(written to {TIMINGS_FILE})")


def pytest_sessionstart(session):
    session.config._e2e_t0 = time.monotonic()


def pytest_sessionfinish(session, exitstatus):
    if not harness.TIMINGS:
        return
    meta = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tier_seconds": round(time.monotonic() - session.config._e2e_t0, 1),
            "exitstatus": int(exitstatus), "host": platform.node(),
            "cpus": os.cpu_count(), **harness.LAB_VERSIONS}
    try:
        harness.write_timings(TIMINGS_FILE, meta)
    except OSError:
        pass

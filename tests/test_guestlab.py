"""scripts/guestlab's version promise: the QEMU and Linux versions README.md
says the real-guest lab installs are the ones guestlab enforces."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_guestlab():
    # The script has no .py suffix: load it by path (importing runs nothing but definitions).
    loader = importlib.machinery.SourceFileLoader("guestlab", str(REPO / "scripts" / "guestlab"))
    spec = importlib.util.spec_from_loader("guestlab", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


guestlab = _load_guestlab()


def test_readme_states_the_promised_versions():
    readme = (REPO / "README.md").read_text()
    stated = re.findall(r"It installs QEMU (\S+) and Linux (\S+) from Debian", readme)
    promised = guestlab.PROMISED
    assert stated == [(promised["QEMU"], promised["Linux"])], (
        f"README.md says the lab installs {stated}, scripts/guestlab PROMISED is {promised}")


@pytest.mark.parametrize("qemu, kernel", [("11.1.3", "7.2.13+deb14-amd64"), ("11.1.3", "7.2.0-1-amd64")])
def test_versions_within_the_promise(qemu, kernel, monkeypatch):
    monkeypatch.setattr(guestlab, "PROMISED", {"QEMU": "11.1.3", "Linux": "7.2"})
    assert guestlab.broken_promise(qemu, kernel) is None


@pytest.mark.parametrize("qemu, kernel, expected", [
    ("11.1.4", "7.2.13+deb14-amd64", "QEMU 11.1.4 installed, README.md promises QEMU 11.1.3"),
    ("11.1", "7.2.1-amd64", "QEMU 11.1 installed, README.md promises QEMU 11.1.3"),
    ("11.1.3", "7.3.1+deb14-amd64", "Linux 7.3.1+deb14-amd64 installed, README.md promises Linux 7.2"),
    ("11.1.3", "7.20.1-amd64", "Linux 7.20.1-amd64 installed, README.md promises Linux 7.2"),
    ("12.0.0", "6.12.9-amd64", "QEMU 12.0.0 installed, README.md promises QEMU 11.1.3; "
                               "Linux 6.12.9-amd64 installed, README.md promises Linux 7.2"),
])
def test_versions_outside_the_promise_are_named(qemu, kernel, expected, monkeypatch):
    monkeypatch.setattr(guestlab, "PROMISED", {"QEMU": "11.1.3", "Linux": "7.2"})
    assert guestlab.broken_promise(qemu, kernel) == expected


def test_provision_fails_on_a_broken_promise(monkeypatch):
    monkeypatch.setattr(guestlab, "PROMISED", {"QEMU": "11.1.3", "Linux": "7.2"})
    stamp = {"qemu": {"version": "11.2.0"}, "kernel": {"release": "7.2.13+deb14-amd64"}}
    with pytest.raises(guestlab.GuestlabError, match=r"^QEMU 11\.2\.0 installed, README\.md promises QEMU 11\.1\.3$"):
        guestlab.check_promise(stamp)

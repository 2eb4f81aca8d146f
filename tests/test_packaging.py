"""An sdist and a wheel build from this tree and install into a fresh venv where the daemon starts."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tarfile
import time
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd, **kw):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # Build from a copy without build artefacts, as from a clean clone.
    src = tmp_path_factory.mktemp("src") / "vmemdev"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "*.so", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", "_native.c"))
    run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", out, src, timeout=600)
    return out


def test_sdist_carries_the_c_sources_and_tests(dists):
    sdist = next(dists.glob("vmemdev-*.tar.gz"))
    names = tarfile.open(sdist).getnames()
    for needed in ("native/vmemshim.c", "native/vmemshim.h", "native/build_shim.py", "setup.py",
                   "vmemdev/protocol/vhost_user.py", "systemd/vmemdev@.service"):
        assert any(n.endswith(needed) for n in names), needed


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installs_into_a_fresh_venv_and_the_daemon_starts(dists, tmp_path, kind):
    artefact = next(dists.glob("vmemdev-*.whl" if kind == "wheel" else "vmemdev-*.tar.gz"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = env_dir / "bin" / "pip"
    run(pip, "install", "-q", artefact, timeout=600)
    vmemdev = env_dir / "bin" / "vmemdev"
    caps = run(vmemdev, "--print-capabilities")
    assert '"virtio-id": 24' in caps.stdout
    # The shim is compiled and importable from the installed package (not this tree).
    run(env_dir / "bin" / "python", "-c",
        "import vmemdev.host.native, vmemdev.host._native, sys; "
        "assert 'site-packages' in vmemdev.host._native.__file__, vmemdev.host._native.__file__",
        cwd=tmp_path)
    sock = tmp_path / "vm0.sock"
    proc = subprocess.Popen([vmemdev, "serve", "--socket-path", sock], stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "vm0.ctl").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        status = run(vmemdev, "ctl", "--control-socket", tmp_path / "vm0.ctl", "--json", "status")
        assert '"frontend": "waiting"' in status.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0

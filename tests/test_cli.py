"""The command line as a user and systemd run it: a real process, real signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import trio

from vmemdev.errors import ConfigError
from vmemdev.sizes import format_size, parse_size
from vmemdev.testing.frontend import Frontend

VMEMDEV = [sys.executable, "-m", "vmemdev"]


def run(*args, timeout=20):
    return subprocess.run(VMEMDEV + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "text, value",
    [("512M", 512 << 20), ("4G", 4 << 30), ("4g", 4 << 30), ("2m", 2 << 20), ("1.5G", 3 << 29),
     ("0x100000000", 1 << 32), ("1073741824", 1 << 30), ("4096B", 4096), ("1T", 1 << 40), ("64K", 65536)],
)
def test_sizes_in_qemus_spelling(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "1Q", "-1G", "0x10M", "1.3B", "2 G G", "1e9", "16E"])
def test_bad_sizes(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_format_size_round_trips():
    for n in (0, 4096, 2 << 20, 3 << 20, 1 << 30, 5 << 40, 12345):
        assert parse_size(format_size(n)) == n


def test_print_capabilities_ignores_everything_else():
    result = run("serve", "--region-size", "bogus", "--print-capabilities")
    assert result.returncode == 0
    caps = json.loads(result.stdout)
    assert caps["virtio-id"] == 24 and caps["type"] == "memory"


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--block-size", "3M"], "power of two"),
        (["--block-size", "2K"], "power of two >= 4K"),
        (["--region-size", "1.5Q"], "is not a size"),
        (["--region-size", "1G", "--requested-size", "2G"], "larger than the region"),
        (["--requested-size", "3K"], "not a multiple of the block size"),
        (["--region-addr", "0x100001000"], "not a multiple of the block size"),
        (["--node-id", "70000"], "16 bits"),
        (["--memmap-rescue", "0"], "memmap rescue margin must be positive (or 'off')"),
        (["--memmap-rescue", "lots"], "memmap rescue margin"),
    ],
)
def test_bad_values_exit_2_with_one_line(tmp_path, args, reason):
    result = run("serve", "--socket-path", str(tmp_path / "s"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], result.stderr
    assert not (tmp_path / "s").exists()


def test_serve_needs_a_socket():
    result = run("serve")
    assert result.returncode == 2 and "--socket-path" in result.stderr


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_exits_promptly_and_cleanly_on_signals(tmp_path, signum):
    path = tmp_path / "vm0.sock"
    proc = subprocess.Popen(VMEMDEV + ["serve", "--socket-path", str(path)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(path.exists)
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0  # a hang fails here, not a slow machine
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert f"received {signal.Signals(signum).name}, exiting" in err
    assert not path.exists()  # the socket file is removed


async def test_serve_on_an_inherited_listening_socket(tmp_path):
    """--fd N, as systemd socket activation passes it."""
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    proc = subprocess.Popen(VMEMDEV + ["serve", "--fd", str(listener.fileno()), "--requested-size", "128M"],
                            pass_fds=[listener.fileno()], stderr=subprocess.PIPE, text=True)
    listener.close()
    fe = Frontend(path)
    try:
        with trio.fail_after(10):
            await fe.realize()
            cfg = await fe.get_config()
        assert cfg.requested_size == 128 << 20
    finally:
        await fe.close()
        fe.release()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert "serving virtio-mem on fd" in proc.stderr.read()


def test_a_busy_socket_path_is_reported(tmp_path):
    path = tmp_path / "notasocket"
    path.write_text("x")
    result = run("serve", "--socket-path", str(path))
    assert result.returncode == 1 and "exists and is not a socket" in result.stderr
    assert path.read_text() == "x"


def test_backend_program_convention_without_the_serve_word(tmp_path):
    """QEMU's tooling starts backends as `BINARY --socket-path PATH` (or --fd)."""
    path = tmp_path / "vm3.sock"
    proc = subprocess.Popen(VMEMDEV + ["--socket-path", str(path), "--log-level", "debug"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(path.exists)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    assert "vmemdev[vm3] INFO" in proc.stderr.read()

"""The control socket: commands, errors, events, limits, and hostile clients."""

from __future__ import annotations

import os
import random
import socket
import stat
import subprocess
import sys
import tempfile

import pytest
import trio

from vmemdev.client import AsyncClient, ControlError
from vmemdev.host import native
from vmemdev.protocol.virtio_mem import ResponseType
from vmemdev.testing.guest import SimulatedLinuxGuest

from .conftest import A, B, MiB, R, attach, settle, start_daemon

ACK, NACK, BUSY = ResponseType.ACK, ResponseType.NACK, ResponseType.BUSY


async def daemon_with_control(nursery, tmp_path, **options):
    service, path = await start_daemon(nursery, tmp_path, control=True, **options)
    return service, path, str(tmp_path / "vm0.ctl")


async def wait_until(predicate, timeout=20.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_greeting_and_queries(nursery, tmp_path):
    service, path, ctl = await daemon_with_control(nursery, tmp_path, requested=256 * MiB)
    client = await AsyncClient.connect(ctl)
    assert client.greeting["protocol"] == 1 and "events" in client.greeting["capabilities"]
    assert "resize" in await client.execute("query-commands")
    status = await client.execute("query-status")
    assert status["geometry"] == {"addr": A, "region_size": R, "block_size": B, "node_id": 0}
    assert (status["requested_size"], status["plugged_size"], status["frontend"]) == (256 * MiB, 0, "waiting")
    assert await client.execute("query-limits") == {"memory.max": None, "memory.high": None}
    await client.aclose()


async def test_socket_file_mode_is_private(nursery, tmp_path):
    _, _, ctl = await daemon_with_control(nursery, tmp_path)
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600


@pytest.mark.parametrize(
    "line, cls, desc",
    [
        (b"not json", "GenericError", "invalid JSON"),
        (b"[1, 2]", "GenericError", "must be a JSON object"),
        (b'{"execute": "frobnicate"}', "CommandNotFound", "frobnicate"),
        (b'{"execute": "resize"}', "InvalidArgument", "needs the argument 'size'"),
        (b'{"execute": "resize", "arguments": {"size": "12Q"}}', "InvalidArgument", "not a size"),
        (b'{"execute": "resize", "arguments": {"size": true}}', "InvalidArgument", "must be a size"),
        (b'{"execute": "resize", "arguments": {"size": -5}}', "InvalidArgument", "negative"),
        (b'{"execute": "resize", "arguments": {"size": "3M"}}', "InvalidArgument", "not a multiple of the block size"),
        (b'{"execute": "resize", "arguments": {"size": "2G"}}', "InvalidArgument", "larger than the region"),
        (b'{"execute": "resize", "arguments": {"size": 1, "x": 2}}', "InvalidArgument", "takes no argument"),
        (b'{"execute": "set-limit", "arguments": {"name": "memory.low", "value": 0}}', "InvalidArgument", "one of"),
        (b'{"execute": "query-status", "bogus": 1}', "GenericError", "unknown member"),
    ],
)
async def test_bad_requests_get_clear_errors_and_the_connection_survives(nursery, tmp_path, line, cls, desc):
    service, path, ctl = await daemon_with_control(nursery, tmp_path)
    stream = await trio.open_unix_socket(ctl)
    client = AsyncClient(stream)
    await client._read()  # greeting
    await stream.send_all(line + b"\n")
    reply = await client._read()
    assert reply["error"]["class"] == cls and desc in reply["error"]["desc"], reply
    assert (await client.execute("query-version"))["protocol"] == 1
    assert service.device.requested_size == 0
    await client.aclose()


async def test_resize_notifies_and_reports_events(nursery, tmp_path):
    service, path, ctl = await daemon_with_control(nursery, tmp_path)
    fe = await attach(nursery, service, path)
    guest = SimulatedLinuxGuest(fe)
    await nursery.start(guest.run)
    client = await AsyncClient.connect(ctl)
    assert await client.execute("resize", size="256M") == {"requested_size": 256 * MiB, "changed": True,
                                                           "hot_add_failures": 0}
    names = []
    with trio.fail_after(10):
        while "REQUESTED_REACHED" not in names:
            names.append((await client.next_event())["event"])
    assert "CONFIG_CHANGE_SENT" in names
    assert fe.config_changes == 1
    stats = await client.execute("query-stats")
    assert stats["requests"]["PLUG"]["ACK"] == 2  # two 64-block requests, as Linux sends
    assert stats["latency_us"]["samples"] >= 2 and stats["latency_us"]["p50"] > 0
    acct = await client.execute("query-accounting")
    assert acct["plugged_size"] == 256 * MiB
    assert acct["host_allocated"] == 256 * MiB  # the simulated guest wrote every page
    assert acct["allocated_outside_plugged"] == 0
    assert acct["memmap"]["linux_memory_blocks_used"] == 2
    assert acct["memmap"]["memmap_bytes"] == 4 * MiB
    await client.execute("resize", size=0)
    await wait_until(lambda: service.device.plugged_size == 0)
    stats = await client.execute("query-stats")
    assert stats["bytes_discarded"] == 256 * MiB
    assert (await client.execute("query-accounting"))["host_allocated"] == 0
    await client.aclose()


async def test_memory_max_nacks_plugs_and_lowers_requested(nursery, tmp_path):
    service, path, ctl = await daemon_with_control(nursery, tmp_path, requested=256 * MiB)
    fe = await attach(nursery, service, path)
    client = await AsyncClient.connect(ctl)
    assert await fe.plug(A, 64) == ACK
    await client.execute("set-limit", name="memory.max", value="192M")
    assert service.device.requested_size == 192 * MiB  # lowered to the new maximum
    # Plugs that would pass memory.max are NACKed, with the reason counted.
    assert await fe.plug(A + 64 * B, 64) == NACK
    assert await fe.plug(A + 64 * B, 32) == ACK  # exactly memory.max
    assert await fe.plug(A + 96 * B, 1) == NACK
    stats = await client.execute("query-stats")
    assert sum(stats["nacks_by_reason"].values()) == 2
    with pytest.raises(ControlError, match="above memory.max"):
        await client.execute("resize", size="256M")
    # Lowering memory.max below plugged lowers requested: the guest is asked to unplug.
    await client.execute("set-limit", name="memory.max", value="64M")
    assert service.device.requested_size == 64 * MiB
    assert service.device.plugged_size == 192 * MiB  # nothing is taken behind the guest's back
    assert await fe.unplug(A + 32 * B, 64) == ACK
    await client.execute("set-limit", name="memory.max", value="max")
    assert await client.execute("resize", size="512M")
    await client.aclose()


async def test_memory_max_holds_under_concurrent_resizes(nursery, tmp_path):
    # A guest that never writes what it plugs looks like one onlining movable; with the
    # front-end's 64 MiB of RAM the default memmap reserve would leave it no ceiling.
    service, path, ctl = await daemon_with_control(nursery, tmp_path, memmap_reserve=0)
    fe = await attach(nursery, service, path)
    guest = SimulatedLinuxGuest(fe, touch=False)
    await nursery.start(guest.run)
    admin = await AsyncClient.connect(ctl)
    await admin.execute("set-limit", name="memory.max", value="384M")
    violations = []

    async def resizer(seed):
        rng = random.Random(seed)
        client = await AsyncClient.connect(ctl)
        for _ in range(40):
            size = rng.randrange(0, 512) * B
            try:
                await client.execute("resize", size=size)
                assert size <= 384 * MiB
            except ControlError as exc:
                assert size > 384 * MiB and "memory.max" in exc.desc
            if service.device.plugged_size > 384 * MiB or service.device.requested_size > 384 * MiB:
                violations.append((service.device.plugged_size, service.device.requested_size))
            await trio.sleep(rng.random() * 0.02)
        await client.aclose()

    async with trio.open_nursery() as inner:
        for seed in range(4):
            inner.start_soon(resizer, seed)
    assert not violations
    await admin.execute("resize", size="384M")
    await wait_until(lambda: service.device.plugged_size == 384 * MiB)
    await admin.aclose()


async def test_memory_high_lowers_requested_and_says_so(nursery, tmp_path):
    service, path, ctl = await daemon_with_control(nursery, tmp_path, requested=256 * MiB)
    fe = await attach(nursery, service, path)
    guest = SimulatedLinuxGuest(fe)  # writes what it plugs: footprint = plugged
    await nursery.start(guest.run)
    await wait_until(lambda: service.device.plugged_size == 256 * MiB)
    client = await AsyncClient.connect(ctl)
    await client.execute("set-limit", name="memory.high", value="128M")
    assert service.device.requested_size == 128 * MiB
    await wait_until(lambda: service.device.plugged_size == 128 * MiB)
    events = [e["event"] for e in await client.execute("query-events")]
    assert "MEMORY_HIGH_EXCEEDED" in events
    assert fe.dimm_allocated() == 128 * MiB
    await client.aclose()


async def test_prealloc_populates_before_ack_and_rolls_back_on_failure(nursery, tmp_path):
    service, path, ctl = await daemon_with_control(nursery, tmp_path, requested=256 * MiB, prealloc=True)
    fe = await attach(nursery, service, path)
    assert await fe.plug(A, 16) == ACK
    assert fe.dimm_allocated() == 16 * B  # allocated before the guest touched anything
    with native.inject_fault("fallocate", 12):  # ENOMEM
        assert await fe.plug(A + 16 * B, 16) == BUSY
    assert fe.dimm_allocated() == 16 * B  # nothing left behind
    assert service.device.plugged_size == 16 * B
    client = await AsyncClient.connect(ctl)
    stats = await client.execute("query-stats")
    assert stats["bytes_preallocated"] == 16 * B
    assert stats["requests"]["PLUG"] == {"ACK": 1, "BUSY": 1}
    assert await fe.unplug(A, 16) == ACK
    assert fe.dimm_allocated() == 0
    await client.aclose()


async def test_two_clients_both_see_events(nursery, tmp_path):
    service, path, ctl = await daemon_with_control(nursery, tmp_path)
    one, two = await AsyncClient.connect(ctl), await AsyncClient.connect(ctl)
    await one.execute("resize", size="64M")
    for client in (one, two):
        with trio.fail_after(5):
            event = await client.next_event()
        assert event["event"] == "CONFIG_CHANGE_SENT" and event["data"]["requested"] == 64 * MiB
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
    await one.aclose()
    await two.aclose()


async def test_hostile_clients_do_not_hurt_the_device_or_others(nursery, tmp_path, caplog):
    service, path, ctl = await daemon_with_control(nursery, tmp_path)
    fe = await attach(nursery, service, path)
    good = await AsyncClient.connect(ctl)
    idle = [await trio.open_unix_socket(ctl) for _ in range(20)]  # connect and never speak
    # A huge line without a newline: answered with an error, then closed.
    huge = await trio.open_unix_socket(ctl)
    await huge.receive_some(4096)
    with trio.move_on_after(5):
        try:
            await huge.send_all(b"x" * (200 * 1024))
        except trio.BrokenResourceError:
            pass
    data = b""
    with trio.fail_after(5):
        try:
            while chunk := await huge.receive_some(4096):
                data += chunk
        except trio.BrokenResourceError:
            pass  # closed with our bytes unread: the kernel may reset instead of delivering
    assert b"longer than" in data or b"" == data
    await wait_until(lambda: "sent a line over" in caplog.text, 5)
    # A client that never reads while thousands of events are published.
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.connect(ctl)
    await settle()
    for i in range(3000):
        service.resize((i % 100 + 1) * B)
    # The device and the good client are unaffected.
    with trio.fail_after(5):
        assert (await good.execute("query-status"))["requested_size"] == service.device.requested_size
        assert (await fe.get_config()).requested_size == service.device.requested_size
    await wait_until(lambda: "TooSlowError" in caplog.text, 20)  # the deaf client is dropped
    deaf.close()
    for s in idle:
        await s.aclose()
    await good.aclose()


async def test_too_many_clients_are_refused(nursery, tmp_path, caplog):
    service, path = await start_daemon(nursery, tmp_path)
    from vmemdev.daemon.control_server import ControlServer

    server = ControlServer(service, str(tmp_path / "small.ctl"), max_clients=2)
    await nursery.start(server.run)
    keep = [await AsyncClient.connect(server.path) for _ in range(2)]
    stream = await trio.open_unix_socket(server.path)
    with trio.fail_after(5):
        data = await stream.receive_some(4096)
    assert b"too many clients" in data
    await stream.aclose()
    for c in keep:
        await c.aclose()


def _client_as(uid: int, gid: int, ctl: str) -> subprocess.CompletedProcess:
    code = (
        "import os, socket, sys\n"
        f"os.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(5)\n"
        "s.connect(sys.argv[1]); print(s.recv(4096).decode() or 'CLOSED')\n"
    )
    return subprocess.run([sys.executable, "-c", code, ctl], capture_output=True, text=True, timeout=20)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to test other users")
async def test_peers_are_checked_with_so_peercred(nursery, tmp_path, caplog):
    service, path = await start_daemon(nursery, tmp_path)
    from vmemdev.daemon.control_server import ControlServer

    shared = tempfile.mkdtemp(prefix="vmemdev-peercred-")
    os.chmod(shared, 0o755)  # other users must be able to reach the socket file
    open_server = ControlServer(service, os.path.join(shared, "grp.ctl"), group="nogroup")
    await nursery.start(open_server.run)
    assert stat.S_IMODE(os.stat(open_server.path).st_mode) == 0o660
    os.chmod(open_server.path, 0o666)  # let the kernel pass the connect: SO_PEERCRED must stop it
    nogroup = 65534
    allowed = await trio.to_thread.run_sync(_client_as, 65534, nogroup, open_server.path)
    assert '"vmemdev"' in allowed.stdout, allowed.stderr
    refused = await trio.to_thread.run_sync(_client_as, 4242, 4242, open_server.path)
    assert "CLOSED" in refused.stdout, refused.stderr
    assert "control client refused: pid" in caplog.text and "uid 4242" in caplog.text

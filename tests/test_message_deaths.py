"""kill -9 of `vmemdev serve --state-file` under `vmemdev hold` inside a
vhost-user message, at each step (daemon/inflight.py): the message stays on
the socket until it is handled, so the successor finds it; the front-end,
which keeps its connection as QEMU does, gets exactly one reply to every
message that has one, and the state is the one the messages made. Real
processes and fds; each message of the handshake, a memory change and a
guest reset kills the serving process once at the step under test."""

from __future__ import annotations

import re
import select

import pytest
import trio

from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.vhost_user import Request
from vmemdev.protocol.virtio_mem import BlockState, ResponseType
from vmemdev.testing.frontend import Frontend

from .test_resume import A, Held, MiB

DIED = re.compile(r"worker \d+ died \(signal SIGKILL\)")


class Rearming(Frontend):
    """Arms the crash point again before each message it sends: every
    message reaching the point kills the serving process once."""

    def __init__(self, sock: str, marker_dir) -> None:
        super().__init__(sock)
        self.marker_dir = marker_dir
        self.sent = 0

    async def send_raw(self, data: bytes, fds=()) -> None:
        for marker in self.marker_dir.iterdir():
            marker.unlink()
        self.sent += 1
        await super().send_raw(data, fds)


def nothing_unread(fe: Frontend) -> bool:
    poll = select.poll()
    poll.register(fe.sock.fileno(), select.POLLIN)
    return not poll.poll(100)


@pytest.mark.parametrize("point, replied_only", [
    ("message-applied", False),  # applied and saved, not taken off the socket: handled again
    ("reply-owed", True),  # the reply kept, the message not taken off: taken off, the kept reply sent
    ("message-consumed", True),  # taken off, the reply not sent: the kept reply sent
])
async def test_a_death_inside_any_message_is_a_pause(tmp_path, nursery, point, replied_only):
    markers = tmp_path / "crashed"
    markers.mkdir()
    held = Held(tmp_path, env={"VMEMDEV_CRASH_POINT": f"{point}:{markers}"},
                hold_args=("--max-restart-delay", "0.1"))  # dozens of deaths in a row
    try:
        fe = Rearming(held.sock, markers)
        with trio.fail_after(120):
            await fe.realize()
            nursery.start_soon(fe.watch_backend_channel)
            await fe.start()
            assert await fe.plug(A, 4) == ResponseType.ACK
            assert (await fe.get_config()).plugged_size == 8 * MiB
            # A memory change as QEMU makes it: the device's region out and in again.
            dimm = fe.ram.regions[-1]
            await fe.call_ack(Request.REM_MEM_REG, vu.encode_single_region(dimm.describe()), [dimm.fd])
            await fe.call_ack(Request.ADD_MEM_REG, vu.encode_single_region(dimm.describe()), [dimm.fd])
            # A guest reset: the ring stopped and started again.
            base = await fe.stop()
            assert base == fe.ring.avail_idx
            await fe.start()
            assert await fe.state(A, 4) == (ResponseType.ACK, BlockState.PLUGGED)
            assert await fe.plug(A + 8 * MiB, 2) == ResponseType.ACK
        deaths = len(DIED.findall(held.log()))
        replies = sum(1 for entry in fe.log if entry[0] == "backend->frontend")
        # Each message that reached the point killed a process once (the front-end does
        # not wait for a message without a reply, so such a one may meet a point already hit).
        assert deaths >= replies if replied_only else deaths >= replies > 10
        assert nothing_unread(fe)  # never a second reply
        status = held.ctl("status")
        assert status["plugged_size"] == 12 * MiB and status["resumed"]["count"] == deaths
        assert fe.dimm_allocated() == 0  # no host work without --prealloc
        await fe.close()
        fe.release()
        assert held.stop() == 0
    finally:
        held.kill()

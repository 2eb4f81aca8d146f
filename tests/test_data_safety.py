"""Model-based data safety through the real socket, ring and shim.

Long random sequences of PLUG / UNPLUG / UNPLUG_ALL / STATE, resizes,
memory.max changes, device resets (ring stop/start, SET_STATUS 0) and
memory-table changes, against a reference model. After every step:
plugged = popcount x block, the backing's allocated extents lie in plugged
blocks, and what the guest wrote into each plugged block is unchanged.
"""

from __future__ import annotations

import logging

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vmemdev.errors import ConfigError
from vmemdev.host import native
from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.virtio_mem import BlockState, ResponseType
from vmemdev.virtio_mem.model import Geometry

from .threaded import ThreadedDevice

MiB = 1 << 20
B = 2 * MiB
A = 1 << 32
NBLOCKS = 48  # 96 MiB region: every step can check every block
ACK, NACK, ERROR = ResponseType.ACK, ResponseType.NACK, ResponseType.ERROR
USABLE_EXTENT_BLOCKS = 128  # 256 MiB / 2 MiB: usable is the whole region once requested > 0

STATS = {"sequences": 0, "steps": 0}


def pattern(block: int, generation: int) -> bytes:
    return bytes([block & 0xFF, generation & 0xFF, 0x5A, 0xA5]) * 1024  # 4 KiB


class DataSafety(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        logging.disable(logging.CRITICAL)
        self.dev = ThreadedDevice(Geometry(A, NBLOCKS * B, B))
        self.fe = self.dev.fe
        self.plugged: dict[int, int] = {}  # block -> generation of what the guest wrote
        self.requested = 0
        self.max: int | None = None
        self.usable = 0
        self.generation = 0
        STATS["sequences"] += 1

    def teardown(self):
        self.dev.close()
        logging.disable(logging.NOTSET)

    # --- helpers -----------------------------------------------------------

    def _request(self, method, *args):
        return self.dev.call(getattr(self.fe, method), *args)

    def _write_block(self, block: int) -> None:
        self.generation += 1
        data = pattern(block, self.generation)
        gpa = A + block * B
        self.fe.ram.write(gpa, data)  # first and last page of the block: enough to see a discard
        self.fe.ram.write(gpa + B - 4096, data)
        self.plugged[block] = self.generation

    def _limit(self) -> int:
        return self.requested if self.max is None else min(self.requested, self.max)

    # --- guest requests ----------------------------------------------------

    @rule(first=st.integers(-2, NBLOCKS + 2), nb=st.integers(0, 12))
    def plug(self, first, nb):
        answer = self._request("plug", A + first * B, nb)
        blocks = set(range(first, first + nb))
        in_range = nb > 0 and first >= 0 and first + nb <= self.usable // B
        if not in_range:
            assert answer == ERROR
        elif (len(self.plugged) + nb) * B > self._limit():
            assert answer == NACK
        elif blocks & set(self.plugged):
            assert answer == ERROR
        else:
            assert answer == ACK
            for block in blocks:
                self._write_block(block)

    @rule(first=st.integers(-2, NBLOCKS + 2), nb=st.integers(0, 12))
    def unplug(self, first, nb):
        answer = self._request("unplug", A + first * B, nb)
        blocks = set(range(first, first + nb))
        in_range = nb > 0 and first >= 0 and first + nb <= self.usable // B
        if in_range and blocks <= set(self.plugged):
            assert answer == ACK
            for block in blocks:
                del self.plugged[block]
        else:
            assert answer == ERROR

    @rule()
    def unplug_all(self):
        assert self._request("unplug_all") == ACK
        self.plugged.clear()
        self.usable = min(NBLOCKS * B, self.requested + 256 * MiB) if self.requested else 0

    @rule(first=st.integers(0, NBLOCKS - 1), nb=st.integers(1, 8))
    def state(self, first, nb):
        answer, state = self._request("state", A + first * B, nb)
        if first + nb > self.usable // B:
            assert answer == ERROR
            return
        inside = len(set(range(first, first + nb)) & set(self.plugged))
        expected = BlockState.PLUGGED if inside == nb else BlockState.UNPLUGGED if inside == 0 else BlockState.MIXED
        assert (answer, state) == (ACK, expected)

    # --- the operator -------------------------------------------------------

    @rule(blocks=st.integers(0, NBLOCKS))
    def resize(self, blocks):
        size = blocks * B
        try:
            self.dev.call_sync(self.dev.service.resize, size)
        except ConfigError:
            assert self.max is not None and size > self.max
            return
        self.requested = size
        if size:
            self.usable = max(self.usable, min(NBLOCKS * B, size + 256 * MiB))

    @rule(blocks=st.one_of(st.none(), st.integers(0, NBLOCKS)))
    def set_memory_max(self, blocks):
        value = None if blocks is None else blocks * B
        self.dev.call_sync(self.dev.service.set_limit, "memory.max", value)
        self.max = value
        if value is not None and self.requested > value:
            self.requested = value  # lowered so the guest unplugs; nothing taken from it

    # --- the VMM ------------------------------------------------------------------

    @rule()
    def device_reset(self):
        """A guest reboot as QEMU drives it: ring stop, status 0, start again."""
        async def reset():
            await self.fe.stop()
            await self.fe.call(vu.Request.SET_STATUS, vu.encode_u64(0))
            await self.fe.start()

        self.dev.call(reset)

    @rule()
    def new_memory_table(self):
        self.dev.call(self.fe.send_memory, True)

    # --- invariants ------------------------------------------------------------

    @invariant()
    def nothing_is_lost(self):
        STATS["steps"] += 1
        self._check_plugged_size()
        for start, length in native.data_extents(self.fe.ram.dimm_fd):
            for block in range(start // B, (start + length - 1) // B + 1):
                assert block in self.plugged, f"host data in unplugged block {block}"
        for block, generation in self.plugged.items():
            gpa = A + block * B
            expected = pattern(block, generation)
            assert self.fe.ram.read(gpa, 4096) == expected, f"plugged block {block} changed"
            assert self.fe.ram.read(gpa + B - 4096, 4096) == expected, f"plugged block {block} changed"


    def _check_plugged_size(self) -> None:
        device = self.dev.service.device.model
        assert device.plugged_size == device.bitmap.count * B == len(self.plugged) * B


TestDataSafety = DataSafety.TestCase
TestDataSafety.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                   suppress_health_check=list(HealthCheck))

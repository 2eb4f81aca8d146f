"""A simulated Linux virtio_mem driver, for tests and the demo.

It reacts to the device as drivers/virtio/virtio_mem.c does in sub-block
mode: UNPLUG_ALL at probe when something is plugged, plugs toward
requested_size in requests of at most one Linux memory block (128 MiB),
lowest addresses first, unplugs from the top when requested falls (keeping
nothing in a range from the moment it asks to unplug it: Linux takes the
range's pages out of use first, its data moved elsewhere, and gives them
back unused when the UNPLUG is refused), retries
NACK by re-reading config, backs off on BUSY, and stops for good on ERROR
("device marked broken"). Plugged memory is written like RAM a guest uses,
so the host footprint is real.

``onlining`` says where each added memory block's memmap (2 MiB per 128 MiB)
goes, as Linux 7.2 measured: "kernel" writes it into memory plugged before
(the host sees it at once), "movable" takes it from boot memory. With
``kernel_memory`` (bytes of free boot memory), a block whose memmap does not
fit is rolled back like Linux does ("adding memory failed: -12": the plug is
undone by an UNPLUG of the same range) and tried again later; removing a
memory block whose memmap came from boot memory gives those 2 MiB back.
"""

from __future__ import annotations

import logging

import trio

from ..errors import PeerError
from ..protocol import virtio_mem as vm
from ..protocol.virtio_mem import ResponseType
from ..virtio_mem.memmap import LINUX_MEMORY_BLOCK, MEMMAP_PER_MEMORY_BLOCK
from .frontend import Frontend

log = logging.getLogger(__name__)



class DeviceBroken(PeerError):
    """The device answered what a Linux driver takes as fatal (ERROR)."""


class SimulatedLinuxGuest:
    def __init__(self, frontend: Frontend, touch: bool = True, busy_backoff: float = 0.05,
                 onlining: str = "movable", kernel_memory: int | None = None):
        if onlining not in ("movable", "kernel"):
            raise ValueError(f"onlining {onlining!r}: movable or kernel")
        self.fe = frontend
        self.touch = touch
        self.onlining = onlining
        self.kernel_memory = kernel_memory
        self.add_failures = 0
        self.busy_backoff = busy_backoff
        self.plugged: set[int] = set()  # block indexes
        self.memmap_from_boot: set[int] = set()  # memory blocks (index // chunk) whose memmap took kernel memory
        self.config = vm.Config(0, 0, 0, 0, 0, 0, 0)  # read at probe
        self.busy_count = 0

    async def probe(self) -> None:
        self.config = await self.fe.get_config()
        if self.config.plugged_size:
            while (resp := await self.fe.unplug_all()) == ResponseType.BUSY:
                await trio.sleep(self.busy_backoff)
            if resp != ResponseType.ACK:
                raise DeviceBroken(f"UNPLUG_ALL answered {ResponseType(resp).name}")
        self.plugged.clear()
        if self.kernel_memory is not None:  # everything is removed: every memmap freed
            self.kernel_memory += MEMMAP_PER_MEMORY_BLOCK * len(self.memmap_from_boot)
        self.memmap_from_boot.clear()
        self.config = await self.fe.get_config()

    def _chunk(self) -> int:
        return max(1, LINUX_MEMORY_BLOCK // self.config.block_size)

    def _block_gpa(self, index: int) -> int:
        return self.config.addr + index * self.config.block_size

    def _pattern(self, index: int) -> bytes:
        return index.to_bytes(8, "little") * 512  # 4 KiB

    def _write_block(self, index: int) -> None:
        bs = self.config.block_size
        data = self._pattern(index) * (bs // 4096)
        self.fe.ram.write(self._block_gpa(index), data)

    def check_contents(self) -> None:
        """Every plugged block still holds what the guest wrote into it."""
        if not self.touch:
            return
        for index in sorted(self.plugged):
            data = self.fe.ram.read(self._block_gpa(index), self.config.block_size)
            if data != self._pattern(index) * (self.config.block_size // 4096):
                raise AssertionError(f"plugged block {index} lost its contents")

    async def reconcile(self) -> None:
        """Plug or unplug until plugged_size matches requested_size (or the device says no)."""
        while True:
            self.config = cfg = await self.fe.get_config()
            bs = cfg.block_size
            plugged = len(self.plugged) * bs
            if plugged < cfg.requested_size:
                if not await self._plug_step(min(self._chunk(), (cfg.requested_size - plugged) // bs)):
                    return
            elif plugged > cfg.requested_size:
                if not await self._unplug_step(min(self._chunk(), (plugged - cfg.requested_size) // bs)):
                    return
            else:
                return

    def _first_free_run(self, want: int) -> tuple[int, int]:
        """Lowest unplugged run, kept inside one Linux memory block."""
        chunk = self._chunk()
        usable = self.config.usable_region_size // self.config.block_size
        index = 0
        while index in self.plugged:
            index += 1
        limit = min(usable, (index // chunk + 1) * chunk)
        n = 0
        while n < want and index + n < limit and index + n not in self.plugged:
            n += 1
        return index, n

    async def _plug_step(self, want: int) -> bool:
        index, n = self._first_free_run(want)
        if n == 0:
            return False
        chunk = self._chunk()
        opens = index % chunk == 0 and not any(i in self.plugged for i in range(index, index + chunk))
        resp = await self.fe.plug(self._block_gpa(index), n)
        if resp != ResponseType.ACK:
            return self._not_acked("PLUG", resp)
        if opens and not await self._add_memory_block(index, n):
            return False
        self.plugged.update(range(index, index + n))
        if self.touch:
            for i in range(index, index + n):
                self._write_block(i)
        return True

    async def _add_memory_block(self, index: int, n: int) -> bool:
        """Linux adds the memory block after plugging its first blocks; False: rolled back."""
        chunk = self._chunk()
        earlier = sorted(i for i in self.plugged if i // chunk != index // chunk)
        in_region = self.onlining == "kernel" and earlier
        if not in_region and self.kernel_memory is not None:
            if self.kernel_memory < MEMMAP_PER_MEMORY_BLOCK:
                self.add_failures += 1
                resp = await self.fe.unplug(self._block_gpa(index), n)
                if resp != ResponseType.ACK:
                    self._not_acked("UNPLUG", resp)
                return False
            self.kernel_memory -= MEMMAP_PER_MEMORY_BLOCK
        if not in_region:
            self.memmap_from_boot.add(index // chunk)
        if in_region and not self.touch:  # the memmap lands in memory onlined before
            gpa = self._block_gpa(earlier[-1] - earlier[-1] % chunk)
            self.fe.ram.write(gpa, b"\xa5" * min(MEMMAP_PER_MEMORY_BLOCK, self.config.block_size * chunk))
        return True

    async def _unplug_step(self, want: int) -> bool:
        top = max(self.plugged)
        chunk = self._chunk()
        floor = (top // chunk) * chunk
        n = 1
        while n < want and top - n >= floor and top - n in self.plugged:
            n += 1
        start = top - n + 1
        # Linux takes the range's pages out of use (moves their data away)
        # before it asks: from here the guest keeps nothing there.
        self.plugged.difference_update(range(start, start + n))
        resp = await self.fe.unplug(self._block_gpa(start), n)
        if resp == ResponseType.ACK:
            self._removed(start // chunk)
            return True
        self.plugged.update(range(start, start + n))  # still plugged: back in use, written afresh
        if self.touch:
            for i in range(start, start + n):
                self._write_block(i)
        return self._not_acked("UNPLUG", resp)

    def _removed(self, memory_block: int) -> None:
        """A memory block with nothing plugged left is removed: its memmap is freed."""
        chunk = self._chunk()
        if any(i // chunk == memory_block for i in self.plugged):
            return
        if memory_block in self.memmap_from_boot:
            self.memmap_from_boot.discard(memory_block)
            if self.kernel_memory is not None:
                self.kernel_memory += MEMMAP_PER_MEMORY_BLOCK

    def _not_acked(self, what: str, resp: int) -> bool:
        if resp == ResponseType.ERROR:
            raise DeviceBroken(f"{what} answered ERROR: the Linux driver marks the device broken")
        if resp == ResponseType.BUSY:
            self.busy_count += 1
        log.info("%s answered %s", what, ResponseType(resp).name)
        return False  # NACK: re-read config on the next change; BUSY: retry later

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Probe, then reconcile after every config change (and retry BUSY)."""
        await self.probe()
        await self.reconcile()
        task_status.started()
        while True:
            with trio.move_on_after(max(self.busy_backoff, 0.5)):
                await self.fe.wait_config_change()
            await self.reconcile()

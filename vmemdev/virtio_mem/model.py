"""The virtio-mem device model: pure logic, no I/O.

It owns the block bitmap and the sizes in config space, decides what a
guest request means, and changes state only through ``commit`` once the I/O
layer has done the host-side work (discarding, later preallocating). The
validation order is QEMU's, which the Linux driver relies on::

    range invalid -> ERROR; PLUG over requested -> NACK;
    blocks not in the opposite state -> ERROR; host failure -> BUSY; ACK

Device resets (ring stop/start, SET_STATUS 0, RESET_DEVICE) never touch
this state: plugged memory stays plugged and keeps its contents.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ..errors import ConfigError
from ..protocol.virtio_mem import (
    BlockState,
    Config,
    MemRequest,
    MemResponse,
    RequestType,
    ResponseType,
)
from ..sizes import format_size as fs
from .bitmap import BlockBitmap

MiB = 1 << 20
PAGE_SIZE = 4096
# QEMU's VIRTIO_MEM_USABLE_EXTENT on x86: the guest may plug anywhere in
# [addr, addr + usable), usable = requested + 256 MiB rounded to blocks.
USABLE_EXTENT = 256 * MiB
U64_LIMIT = 1 << 64


@dataclass(frozen=True)
class Geometry:
    """What is fixed for the device's life."""

    addr: int
    region_size: int
    block_size: int
    node_id: int = 0

    def __post_init__(self) -> None:
        bs = self.block_size
        if bs < PAGE_SIZE or bs & (bs - 1):
            raise ConfigError(f"block size {fs(bs)} must be a power of two >= 4K")
        if self.addr % bs:
            raise ConfigError(f"region address {self.addr:#x} is not a multiple of the block size")
        if self.region_size <= 0 or self.region_size % bs:
            raise ConfigError(
                f"region size {fs(self.region_size)} must be a positive multiple of the block size {fs(bs)}"
            )
        if self.addr + self.region_size > U64_LIMIT:
            raise ConfigError("region ends beyond 2^64")
        if not 0 <= self.node_id <= 0xFFFF:
            raise ConfigError(f"node id {self.node_id} does not fit in 16 bits")

    @property
    def nblocks(self) -> int:
        return self.region_size // self.block_size


def check_block_multiple(what: str, value: int, block_size: int) -> None:
    """The one check that a size sits on the device's block grid."""
    if value < 0 or value % block_size:
        raise ConfigError(f"{what} {fs(value)} is not a multiple of the block size {fs(block_size)}")


# --- decisions: what a request needs before it can be answered --------------


@dataclass(frozen=True)
class Answer:
    """Answer now; nothing changes."""

    response: MemResponse


@dataclass(frozen=True)
class Plug:
    first_block: int
    nb_blocks: int
    addr: int
    size: int


@dataclass(frozen=True)
class Unplug:
    first_block: int
    nb_blocks: int
    addr: int
    size: int


@dataclass(frozen=True)
class UnplugAll:
    plugged_size: int  # what was plugged when decided (0: nothing to discard)


Decision = Answer | Plug | Unplug | UnplugAll

ERROR = Answer(MemResponse(ResponseType.ERROR))
NACK = Answer(MemResponse(ResponseType.NACK))
ACK = MemResponse(ResponseType.ACK)
BUSY = MemResponse(ResponseType.BUSY)


class DeviceRecord(Protocol):
    """What a successor process needs of the model (``VirtioMemModel.to_record``)."""

    @property
    def geometry(self) -> Geometry: ...
    @property
    def requested_size(self) -> int: ...
    @property
    def usable_region_size(self) -> int: ...
    @property
    def bitmap(self) -> BlockBitmap: ...  # its take_window() tells what changed since the last save
    @property
    def changes(self) -> int: ...  # grows with every change of the above: "changed since the last save?" is one compare


def _geometry_text(g: object) -> str:
    try:
        addr, size, block = (int(v) for v in g)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return repr(g)
    return f"{addr:#x} + {fs(size)}, block {fs(block)}"


class VirtioMemModel:
    def __init__(self, geometry: Geometry, requested_size: int = 0):
        self.geometry = geometry
        self.bitmap = BlockBitmap(geometry.nblocks)
        self.requested_size = 0
        self.usable_region_size = 0
        self.changes = 0  # bumped by every change of the bitmap or the sizes (DeviceRecord)
        self.set_requested_size(requested_size)

    # --- sizes ---------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def plugged_size(self) -> int:
        return self.bitmap.count * self.geometry.block_size

    def config(self) -> Config:
        g = self.geometry
        return Config(
            block_size=g.block_size,
            node_id=g.node_id,
            addr=g.addr,
            region_size=g.region_size,
            usable_region_size=self.usable_region_size,
            plugged_size=self.plugged_size,
            requested_size=self.requested_size,
        )

    def _usable_for(self, requested: int) -> int:
        if requested == 0:
            return 0
        size = min(self.geometry.region_size, requested + USABLE_EXTENT)
        return -(-size // self.block_size) * self.block_size

    def check_requested_size(self, size: int) -> None:
        """Raise ConfigError with the reason if ``size`` cannot be requested."""
        if not isinstance(size, int) or size < 0:
            raise ConfigError(f"requested size {size!r} must be a non-negative integer")
        check_block_multiple("requested size", size, self.block_size)
        if size > self.geometry.region_size:
            raise ConfigError(
                f"requested size {fs(size)} is larger than the region ({fs(self.geometry.region_size)})"
            )

    def set_requested_size(self, size: int) -> bool:
        """Set requested_size; True when config space changed (notify the driver).

        usable_region_size only grows here, as in QEMU: the driver may be
        using blocks beyond the new requested size until it unplugs them.
        """
        self.check_requested_size(size)
        usable = max(self.usable_region_size, self._usable_for(size))
        changed = size != self.requested_size or usable != self.usable_region_size
        self.requested_size = size
        self.usable_region_size = usable
        self.changes += changed
        return changed

    # --- saved state (a successor process resumes from it) ---------------------

    def to_record(self) -> DeviceRecord:
        """The state a successor needs, as a view: the model itself, read with
        the device lock held (nothing is copied on the per-request path)."""
        return self

    def restore(self, record: object) -> None:
        """Take a saved state of this geometry; raises ValueError naming what
        does not fit (then nothing is changed).

        ``record``: a dict with requested_size, usable_region_size and bitmap
        (bytes, or hex as state format 1 has it), and optionally geometry
        ([addr, region_size, block_size], which must be this device's)."""
        keys = {"requested_size", "usable_region_size", "bitmap"}
        if not isinstance(record, dict) or not keys <= set(record) <= keys | {"geometry"}:
            raise ValueError("device state: expected requested_size, usable_region_size and bitmap")
        if "geometry" in record:
            g = self.geometry
            mine = [g.addr, g.region_size, g.block_size]
            if list(record["geometry"]) != mine:
                raise ValueError(f"device state: saved for region {_geometry_text(record['geometry'])}, "
                                 f"this device is {_geometry_text(mine)}")
        requested, usable, bits = record["requested_size"], record["usable_region_size"], record["bitmap"]
        try:
            self.check_requested_size(requested)
        except ConfigError as exc:
            raise ValueError(f"device state: {exc}") from exc
        if not isinstance(usable, int) or isinstance(usable, bool) or not 0 <= usable <= self.geometry.region_size \
                or usable % self.block_size or usable < self._usable_for(requested):
            raise ValueError(f"device state: usable_region_size {usable!r} does not fit this device")
        if isinstance(bits, str):
            try:
                bits = bytes.fromhex(bits)
            except ValueError as exc:
                raise ValueError(f"device state: bitmap: {exc}") from exc
        if not isinstance(bits, (bytes, bytearray)):
            raise ValueError("device state: bitmap must be bytes or a hex string")
        try:
            bitmap = BlockBitmap.from_bytes(self.geometry.nblocks, bytes(bits))
        except ValueError as exc:
            raise ValueError(f"device state: bitmap: {exc}") from exc
        self.bitmap, self.requested_size, self.usable_region_size = bitmap, requested, usable
        self.changes += 1

    # --- requests ------------------------------------------------------------

    def _range(self, addr: int, nb_blocks: int) -> tuple[int, int] | None:
        """(first block, size) of a valid range, or None (ERROR)."""
        bs = self.block_size
        size = nb_blocks * bs
        start = self.geometry.addr
        if addr % bs or nb_blocks == 0 or addr + size > U64_LIMIT:
            return None
        if addr < start or addr + size > start + self.usable_region_size:
            return None
        return (addr - start) // bs, size

    def decide(self, request: MemRequest) -> Decision:
        kind = request.type
        if kind == RequestType.UNPLUG_ALL:
            return UnplugAll(self.plugged_size)
        if kind not in (RequestType.PLUG, RequestType.UNPLUG, RequestType.STATE):
            raise ValueError(f"unknown request type {kind}")  # caller logs a driver bug
        rng = self._range(request.addr, request.nb_blocks)
        if rng is None:
            return ERROR
        first, size = rng
        nb = request.nb_blocks
        plugged_in_range = self.bitmap.count_range(first, nb)
        if kind == RequestType.STATE:
            state = (
                BlockState.PLUGGED
                if plugged_in_range == nb
                else BlockState.UNPLUGGED
                if plugged_in_range == 0
                else BlockState.MIXED
            )
            return Answer(MemResponse(ResponseType.ACK, state))
        if kind == RequestType.PLUG:
            if self.plugged_size + size > self.requested_size:
                return NACK
            if plugged_in_range:
                return ERROR
            return Plug(first, nb, request.addr, size)
        if plugged_in_range != nb:
            return ERROR
        return Unplug(first, nb, request.addr, size)

    def commit(self, decision: Plug | Unplug | UnplugAll) -> MemResponse:
        """Apply a decision whose host-side work succeeded; answer ACK."""
        if isinstance(decision, Plug):
            if self.bitmap.count_range(decision.first_block, decision.nb_blocks):
                raise RuntimeError("plug commit over plugged blocks")  # a bug of ours
            self.bitmap.set_range(decision.first_block, decision.nb_blocks)
        elif isinstance(decision, Unplug):
            if self.bitmap.count_range(decision.first_block, decision.nb_blocks) != decision.nb_blocks:
                raise RuntimeError("unplug commit over unplugged blocks")
            self.bitmap.clear_range(decision.first_block, decision.nb_blocks)
        else:
            self.bitmap.clear_all()
            # The one place usable_region_size may shrink (no notification).
            self.usable_region_size = self._usable_for(self.requested_size)
        self.changes += 1
        return ACK

    def block_addr(self, index: int) -> int:
        return self.geometry.addr + index * self.block_size

    def plugged_ranges(self) -> Iterator[tuple[int, int]]:
        """Yield (gpa, size) of each run of plugged blocks (costs the region)."""
        for start, n in self.bitmap.runs():
            yield self.block_addr(start), n * self.block_size

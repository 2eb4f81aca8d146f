"""vhost-user wire format (QEMU docs/interop/vhost-user.rst), sans-IO.

Every message is a 12-byte header in host byte order::

    struct { u32 request; u32 flags; u32 size; } + u8 payload[size]

with up to 8 file descriptors attached as SCM_RIGHTS. This module turns
(header, payload, fds) into a typed, frozen ``Message`` with its payload
validated exactly (size, fd count), and builds replies. It knows nothing
about sockets or session state: feature gating and ring-index checks need
the session and live in ``vmemdev.vhost.engine``.

construct gives the readable definitions; the 12-byte header is on the hot
path (every GET_CONFIG a vCPU waits for) and uses a precompiled struct.Struct.
``tests/test_protocol_vhost_user.py`` checks that both agree.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

import construct as cs

from ..errors import PeerError

MAX_FDS = 8
MAX_PAYLOAD = 4096  # the largest message we accept (SET_MEM_TABLE is 264 bytes)
MAX_CONFIG_SIZE = 256
BASELINE_MEM_REGIONS = 8  # SET_MEM_TABLE limit
VRING_NOFD_MASK = 0x100
VRING_IDX_MASK = 0xFF


class Request(enum.IntEnum):
    """Front-end to back-end requests (the numbers are the wire values)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end to front-end requests, sent on the SET_BACKEND_REQ_FD socket."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class Flags(enum.IntFlag):
    VERSION = 0x1  # protocol version 1, bits 0-1
    REPLY = 0x4
    NEED_REPLY = 0x8


VERSION_MASK = 0x3
REPLY_FLAGS = Flags.VERSION | Flags.REPLY  # QEMU accepts exactly 0x5


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    SHMEM = 1 << 20


# Virtio transport feature bits that matter to a vhost-user back-end.
VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

# --- readable definitions (construct) -------------------------------------

HeaderStruct = cs.Struct("request" / cs.Int32un, "flags" / cs.Int32un, "size" / cs.Int32un)
U64Struct = cs.Struct("value" / cs.Int64un)
VringStateStruct = cs.Struct("index" / cs.Int32un, "num" / cs.Int32un)
VringAddrStruct = cs.Struct(
    "index" / cs.Int32un,
    "flags" / cs.Int32un,
    "desc_user_addr" / cs.Int64un,
    "used_user_addr" / cs.Int64un,
    "avail_user_addr" / cs.Int64un,
    "log_guest_addr" / cs.Int64un,
)
MemoryRegionStruct = cs.Struct(
    "guest_phys_addr" / cs.Int64un,
    "memory_size" / cs.Int64un,
    "userspace_addr" / cs.Int64un,
    "mmap_offset" / cs.Int64un,
)
MemTableStruct = cs.Struct(
    "nregions" / cs.Int32un,
    "padding" / cs.Int32un,
    "regions" / cs.Array(cs.this.nregions, MemoryRegionStruct),
)
SingleMemRegionStruct = cs.Struct("padding" / cs.Int64un, "region" / MemoryRegionStruct)
ConfigStruct = cs.Struct(
    "offset" / cs.Int32un,
    "size" / cs.Int32un,
    "flags" / cs.Int32un,
    "data" / cs.Bytes(cs.this.size),
)

# --- hot path (precompiled struct) ----------------------------------------

HEADER = struct.Struct("=III")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
VRING_ADDR = struct.Struct("=IIQQQQ")
MEMORY_REGION = struct.Struct("=QQQQ")
CONFIG_HEADER = struct.Struct("=III")


# --- typed payloads ---------------------------------------------------------


@dataclass(frozen=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: a ring index and its eventfd (None = polling)."""

    index: int
    fd: int | None


@dataclass(frozen=True)
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.memory_size


@dataclass(frozen=True)
class MemTable:
    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True)
class ConfigSpace:
    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class Message:
    """One decoded front-end message. ``fds`` are owned by the receiver."""

    request: int
    flags: int
    body: object = None
    fds: tuple[int, ...] = field(default=())

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & Flags.NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"UNKNOWN({request})"


# --- decoding ---------------------------------------------------------------

# Payload layout and fd count of every request we understand.
_EMPTY = ("empty", 0)
_U64 = ("u64", 0)
_STATE = ("state", 0)
_LAYOUTS: dict[int, tuple[str, int]] = {
    Request.GET_FEATURES: _EMPTY,
    Request.SET_FEATURES: _U64,
    Request.SET_OWNER: _EMPTY,
    Request.RESET_OWNER: _EMPTY,
    Request.SET_MEM_TABLE: ("mem_table", -1),
    Request.SET_VRING_NUM: _STATE,
    Request.SET_VRING_ADDR: ("addr", 0),
    Request.SET_VRING_BASE: _STATE,
    Request.GET_VRING_BASE: _STATE,
    Request.SET_VRING_KICK: ("file", -1),
    Request.SET_VRING_CALL: ("file", -1),
    Request.SET_VRING_ERR: ("file", -1),
    Request.GET_PROTOCOL_FEATURES: _EMPTY,
    Request.SET_PROTOCOL_FEATURES: _U64,
    Request.GET_QUEUE_NUM: _EMPTY,
    Request.SET_VRING_ENABLE: _STATE,
    Request.SET_BACKEND_REQ_FD: ("empty", 1),
    Request.GET_CONFIG: ("config", 0),
    Request.SET_CONFIG: ("config", 0),
    Request.RESET_DEVICE: _EMPTY,
    Request.GET_MAX_MEM_SLOTS: _EMPTY,
    Request.ADD_MEM_REG: ("single_region", 1),
    Request.REM_MEM_REG: ("single_region", -1),
    Request.SET_STATUS: _U64,
    Request.GET_STATUS: _EMPTY,
}

# Requests whose reply is part of the request itself (not REPLY_ACK).
REQUESTS_WITH_REPLY = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
        Request.GET_INFLIGHT_FD,
        Request.GET_SHARED_OBJECT,
        Request.SET_DEVICE_STATE_FD,
        Request.CHECK_DEVICE_STATE,
        Request.POSTCOPY_ADVISE,
        Request.IOTLB_MSG,
        Request.SET_LOG_BASE,
    }
)


def is_known(request: int) -> bool:
    return request in _LAYOUTS


def parse_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(request, flags, size) from 12 bytes; checks version and size bound."""
    request, flags, size = HEADER.unpack_from(data)
    if flags & VERSION_MASK != Flags.VERSION:
        raise PeerError(
            f"{request_name(request)}: unsupported protocol version in flags {flags:#x}"
        )
    if size > MAX_PAYLOAD:
        raise PeerError(
            f"{request_name(request)}: payload size {size} exceeds {MAX_PAYLOAD}"
        )
    return request, flags, size


def _expect_size(request: int, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise PeerError(
            f"{request_name(request)}: payload is {len(payload)} bytes, expected {size}"
        )


def _expect_fds(request: int, fds: tuple[int, ...], count: int) -> None:
    if len(fds) != count:
        raise PeerError(
            f"{request_name(request)}: came with {len(fds)} file descriptors, expected {count}"
        )


def _region(raw: tuple[int, int, int, int], request: int) -> MemoryRegion:
    region = MemoryRegion(*raw)
    if region.memory_size == 0:
        raise PeerError(f"{request_name(request)}: memory region of size 0")
    if region.gpa_end > 1 << 64 or region.userspace_addr + region.memory_size > 1 << 64:
        raise PeerError(f"{request_name(request)}: memory region wraps around 2^64")
    return region


def decode(request: int, flags: int, payload: bytes, fds: tuple[int, ...]) -> Message:
    """Validate and decode one message. Raises PeerError.

    The caller still owns ``fds`` when this raises and must close them.
    """
    layout = _LAYOUTS.get(request)
    if layout is None:
        raise PeerError(f"unknown or unsupported request {request_name(request)}")
    kind, nfds = layout
    body: object = None
    if kind == "empty":
        _expect_size(request, payload, 0)
    elif kind == "u64":
        _expect_size(request, payload, U64.size)
        (body,) = U64.unpack(payload)
    elif kind == "state":
        _expect_size(request, payload, VRING_STATE.size)
        body = VringState(*VRING_STATE.unpack(payload))
    elif kind == "addr":
        _expect_size(request, payload, VRING_ADDR.size)
        body = VringAddr(*VRING_ADDR.unpack(payload))
    elif kind == "file":
        _expect_size(request, payload, U64.size)
        (value,) = U64.unpack(payload)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise PeerError(f"{request_name(request)}: unknown bits in {value:#x}")
        nofd = bool(value & VRING_NOFD_MASK)
        _expect_fds(request, fds, 0 if nofd else 1)
        body = VringFile(value & VRING_IDX_MASK, None if nofd else fds[0])
    elif kind == "mem_table":
        if len(payload) < 8:
            raise PeerError("SET_MEM_TABLE: payload shorter than its 8-byte header")
        (nregions,) = U32.unpack_from(payload)
        if not 1 <= nregions <= BASELINE_MEM_REGIONS:
            raise PeerError(
                f"SET_MEM_TABLE: {nregions} regions, expected 1..{BASELINE_MEM_REGIONS}"
            )
        _expect_size(request, payload, 8 + nregions * MEMORY_REGION.size)
        _expect_fds(request, fds, nregions)
        body = MemTable(
            tuple(
                _region(MEMORY_REGION.unpack_from(payload, 8 + i * MEMORY_REGION.size), request)
                for i in range(nregions)
            )
        )
    elif kind == "single_region":
        _expect_size(request, payload, 8 + MEMORY_REGION.size)
        if request == Request.REM_MEM_REG:
            if len(fds) > 1:  # QEMU sends none; some front-ends send the region's fd
                _expect_fds(request, fds, 1)
        body = _region(MEMORY_REGION.unpack_from(payload, 8), request)
    elif kind == "config":
        if len(payload) < CONFIG_HEADER.size:
            raise PeerError(f"{request_name(request)}: payload shorter than 12 bytes")
        offset, size, cflags = CONFIG_HEADER.unpack_from(payload)
        if size > MAX_CONFIG_SIZE:
            raise PeerError(f"{request_name(request)}: config size {size} > 256")
        _expect_size(request, payload, CONFIG_HEADER.size + size)
        body = ConfigSpace(offset, size, cflags, bytes(payload[CONFIG_HEADER.size :]))
    if nfds >= 0 and kind != "file":
        _expect_fds(request, fds, nfds)
    return Message(request, flags, body, fds)


# --- encoding ---------------------------------------------------------------


def encode(request: int, payload: bytes = b"", flags: int = Flags.VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, REPLY_FLAGS)


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def encode_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def encode_vring_addr(addr: VringAddr) -> bytes:
    return VRING_ADDR.pack(
        addr.index,
        addr.flags,
        addr.desc_user_addr,
        addr.used_user_addr,
        addr.avail_user_addr,
        addr.log_guest_addr,
    )


def encode_region(region: MemoryRegion) -> bytes:
    return MEMORY_REGION.pack(
        region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset
    )


def encode_mem_table(regions: list[MemoryRegion]) -> bytes:
    return struct.pack("=II", len(regions), 0) + b"".join(encode_region(r) for r in regions)


def encode_single_region(region: MemoryRegion) -> bytes:
    return U64.pack(0) + encode_region(region)


def encode_config(offset: int, data: bytes, flags: int = 0) -> bytes:
    return CONFIG_HEADER.pack(offset, len(data), flags) + data

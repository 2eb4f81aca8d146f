"""virtio-mem wire structures (VIRTIO spec, "Memory Device", device ID 24).

All fields are little-endian. The request and response structs are read
from and written to guest memory for every request, so the hot path uses
precompiled ``struct.Struct``; the construct definitions document the same
layouts and a test checks that both agree::

    struct virtio_mem_config {            struct virtio_mem_req {
        le64 block_size;                      le16 type;  le16 padding[3];
        le16 node_id;  u8 padding[6];         le64 addr;
        le64 addr;                            le16 nb_blocks; le16 padding[3];
        le64 region_size;                 };
        le64 usable_region_size;          struct virtio_mem_resp {
        le64 plugged_size;                    le16 type;  le16 padding[3];
        le64 requested_size;                  le16 state;
    };                                    };
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import construct as cs

DEVICE_ID = 24
CONFIG_SIZE = 56
REQUEST_SIZE = 24
RESPONSE_SIZE = 10


class Feature(enum.IntFlag):
    """virtio-mem feature bits."""

    ACPI_PXM = 1 << 0
    UNPLUGGED_INACCESSIBLE = 1 << 1
    PERSISTENT_SUSPEND = 1 << 2


class RequestType(enum.IntEnum):
    PLUG = 0
    UNPLUG = 1
    UNPLUG_ALL = 2
    STATE = 3


class ResponseType(enum.IntEnum):
    ACK = 0
    NACK = 1
    BUSY = 2
    ERROR = 3


class BlockState(enum.IntEnum):
    PLUGGED = 0
    UNPLUGGED = 1
    MIXED = 2


ConfigStruct = cs.Struct(
    "block_size" / cs.Int64ul,
    "node_id" / cs.Int16ul,
    "padding" / cs.Padding(6),
    "addr" / cs.Int64ul,
    "region_size" / cs.Int64ul,
    "usable_region_size" / cs.Int64ul,
    "plugged_size" / cs.Int64ul,
    "requested_size" / cs.Int64ul,
)
RequestStruct = cs.Struct(
    "type" / cs.Int16ul,
    "padding" / cs.Padding(6),
    "addr" / cs.Int64ul,
    "nb_blocks" / cs.Int16ul,
    "padding2" / cs.Padding(6),
)
ResponseStruct = cs.Struct("type" / cs.Int16ul, "padding" / cs.Padding(6), "state" / cs.Int16ul)

CONFIG = struct.Struct("<QH6xQQQQQ")
REQUEST = struct.Struct("<H6xQH6x")
RESPONSE = struct.Struct("<H6xH")


@dataclass(frozen=True)
class Config:
    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int
    plugged_size: int
    requested_size: int

    def pack(self) -> bytes:
        return CONFIG.pack(
            self.block_size,
            self.node_id,
            self.addr,
            self.region_size,
            self.usable_region_size,
            self.plugged_size,
            self.requested_size,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Config:
        return cls(*CONFIG.unpack_from(data))


@dataclass(frozen=True)
class MemRequest:
    type: int
    addr: int
    nb_blocks: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> MemRequest:
        return cls(*REQUEST.unpack_from(data))

    def pack(self) -> bytes:
        return REQUEST.pack(self.type, self.addr, self.nb_blocks)


@dataclass(frozen=True)
class MemResponse:
    type: int
    state: int = 0

    def pack(self) -> bytes:
        return RESPONSE.pack(self.type, self.state)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> MemResponse:
        return cls(*RESPONSE.unpack_from(data))

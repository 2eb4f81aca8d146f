"""A test-only virtio device: proves that ``vhost.Engine`` and the daemon's
connection serve any device, not just virtio-mem.

One queue; each request's readable bytes come back reversed in its writable
buffers. Config space is 8 bytes: ``le32 requests_served; le32 magic``.
"""

from __future__ import annotations

import struct

from vmemdev.errors import PeerError

ECHO_DEVICE_ID = 0xFFFE  # not a registered virtio device ID
ECHO_FEATURE_LOUD = 1 << 3  # a device feature bit of its own
MAGIC = 0xEC40EC40
CONFIG = struct.Struct("<II")


class EchoDevice:
    device_id = ECHO_DEVICE_ID
    num_queues = 1
    features = ECHO_FEATURE_LOUD
    max_request = 24

    def __init__(self) -> None:
        self.served = 0
        self.accepted_features: int | None = None
        self.enabled_calls = 0

    def set_features(self, features: int) -> None:
        self.accepted_features = features

    def read_config(self, offset: int, size: int) -> bytes | None:
        if offset + size > CONFIG.size:
            return None
        return CONFIG.pack(self.served, MAGIC)[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        raise PeerError("echo config is read-only")

    def rings_enabled(self) -> None:
        self.enabled_calls += 1

    def serve(self, data: bytes, writable: int) -> bytes:
        self.served += 1
        return data[::-1][:writable]


async def serve_one(path: str) -> None:
    """The daemon's own connection class serving one front-end with this device."""
    from vmemdev.daemon.connection import FrontendConnection
    from vmemdev.daemon.sockets import accept, bind_unix_listener
    from vmemdev.host.system import SystemHost
    from vmemdev.vhost.engine import MAX_MEM_SLOTS, RingRequest

    device = EchoDevice()

    def serve(request: RingRequest) -> bytes:
        return device.serve(request.data, request.writable)

    listener = await bind_unix_listener(path)
    print("ready", flush=True)
    sock = await accept(listener)
    listener.close()
    connection = FrontendConnection(sock, device, SystemHost.guest_memory(MAX_MEM_SLOTS), serve)
    await connection.run()


if __name__ == "__main__":  # python -m tests.echo_device SOCKET_PATH
    import sys

    import trio

    trio.run(serve_one, sys.argv[1])

"""One exception tree for the whole package.

No construct, cffi or Trio exception crosses a layer: each layer converts
what it catches into one of these, chained with ``raise ... from``.
"""


class VmemdevError(Exception):
    """Base of every error vmemdev raises on purpose."""


class ConfigError(VmemdevError):
    """A bad command-line value or device configuration (exit status 2)."""


class ProtocolError(VmemdevError):
    """Base for vhost-user protocol violations."""


class PeerProtocolError(ProtocolError):
    """The front-end (or the guest, through the ring) broke the protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to produce something the protocol does not allow."""


class GuestMemoryError(PeerProtocolError):
    """An address or length from the peer is outside the mapped guest memory."""


class NativeError(VmemdevError):
    """A syscall made through the native shim failed.

    Carries the errno and the range so the log can say exactly what failed.
    """

    def __init__(self, op: str, errno: int, offset: int = 0, length: int = 0):
        import os

        self.op = op
        self.errno = errno
        self.offset = offset
        self.length = length
        super().__init__(
            f"{op} failed at offset {offset:#x} length {length:#x}: "
            f"{os.strerror(errno)} (errno {errno})"
        )

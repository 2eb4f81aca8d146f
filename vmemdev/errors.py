"""One exception tree for the whole package, split by whose fault it is.

    VmemdevError
    ├── PeerError       the front-end (QEMU) or the guest broke the protocol
    │   └── GuestMemoryError   an address from the peer is outside shared memory
    ├── HostError       the host refused: a syscall failed, a cgroup cannot be read
    │   └── NativeError        a call through the cffi shim failed (errno, range)
    └── OperatorError   the operator asked for something impossible
        └── ConfigError        a bad command-line value or device setting (exit 2)

No construct, cffi or Trio exception crosses a layer: each layer converts
what it catches into one of these, chained with ``raise ... from``.
"""

from __future__ import annotations

import os


class VmemdevError(Exception):
    """Base of every error vmemdev raises on purpose."""


class PeerError(VmemdevError):
    """The front-end (or the guest, through the ring) broke the protocol."""


class GuestMemoryError(PeerError):
    """An address or length from the peer is outside the mapped guest memory."""


class HostError(VmemdevError):
    """The host could not do what was asked."""


class NativeError(HostError):
    """A syscall made through the native shim failed; carries the errno and the range."""

    def __init__(self, op: str, errno: int, offset: int = 0, length: int = 0):
        self.op = op
        self.errno = errno
        self.offset = offset
        self.length = length
        self.done = 0  # punch_ranges: input ranges fully done before the failure
        super().__init__(
            f"{op} failed at offset {offset:#x} length {length:#x}: "
            f"{os.strerror(errno)} (errno {errno})"
        )


class OperatorError(VmemdevError):
    """The operator (command line, control socket) asked for something impossible."""


class ConfigError(OperatorError):
    """A bad command-line value or device configuration (exit status 2)."""

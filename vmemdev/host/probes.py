"""Read-only views of host memory, for the testing toolkit and tools outside host/."""

import errno
import fcntl
import os
import stat

from ..errors import NativeError
from . import native
from .native import allocated_bytes, buffer_address, data_extents

__all__ = ["allocated_bytes", "buffer_address", "data_extents", "same_file"]


def same_file(a: int, b: int) -> bool:
    """Whether fds ``a`` and ``b`` are one open file description, as systemd's
    same_fd() decides: kcmp(2) KCMP_FILE; without kcmp, the same inode (never
    for devices) and the same file status flags."""
    try:
        return native.same_file(a, b)
    except NativeError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EACCES):
            raise
    sa, sb = os.fstat(a), os.fstat(b)
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino):
        return False
    if stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
        return False
    return fcntl.fcntl(a, fcntl.F_GETFL) == fcntl.fcntl(b, fcntl.F_GETFL)

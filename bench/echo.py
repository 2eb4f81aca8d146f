"""The far side of the ping-pong baselines, run as its own process.

    python -m bench.echo c-eventfd HELPER_SO IN_FD OUT_FD     blocking read/write loop in C
    python -m bench.echo py-eventfd IN_FD OUT_FD              the same in plain Python (blocking os.read)
    python -m bench.echo trio-eventfd IN_FD OUT_FD            one Trio task: wait_readable, read, write
    python -m bench.echo trio2-eventfd IN_FD OUT_FD           the daemon's shape: a watcher task wakes a worker task
    python -m bench.echo c-socket HELPER_SO FD SIZE           recv SIZE bytes / send them back, in C
    python -m bench.echo py-socket FD SIZE                    the same in plain Python (blocking socket)
    python -m bench.echo trio-socket FD SIZE                  the same with a Trio socket, as the daemon's reader

No device work anywhere: these are the floors for a C process, a Python
process, and a Python + Trio process (the daemon's runtime).
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys


def c_eventfd(helper: str, in_fd: int, out_fd: int) -> None:
    lib = ctypes.CDLL(helper)
    lib.bh_eventfd_echo(in_fd, out_fd)


def c_socket(helper: str, fd: int, size: int) -> None:
    lib = ctypes.CDLL(helper)
    lib.bh_socket_echo(fd, size)


def py_eventfd(in_fd: int, out_fd: int) -> None:
    os.set_blocking(in_fd, True)
    while True:
        os.eventfd_read(in_fd)
        os.eventfd_write(out_fd, 1)


def py_socket(fd: int, size: int) -> None:
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    while True:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                return
            data += chunk
        sock.sendall(data)


def trio_eventfd(in_fd: int, out_fd: int) -> None:
    import trio

    os.set_blocking(in_fd, False)

    async def main():
        while True:
            await trio.lowlevel.wait_readable(in_fd)
            os.eventfd_read(in_fd)
            os.eventfd_write(out_fd, 1)

    trio.run(main)


def trio2_eventfd(in_fd: int, out_fd: int) -> None:
    import trio

    os.set_blocking(in_fd, False)

    async def main():
        wakeup = trio.Event()
        state = {"wakeup": wakeup}

        async def watcher():  # as the daemon's kick watcher: read, poke the worker
            while True:
                await trio.lowlevel.wait_readable(in_fd)
                os.eventfd_read(in_fd)
                state["wakeup"].set()

        async def worker():  # as the daemon's ring worker: wake, answer
            while True:
                await state["wakeup"].wait()
                state["wakeup"] = trio.Event()
                os.eventfd_write(out_fd, 1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            nursery.start_soon(worker)

    trio.run(main)


def trio_socket(fd: int, size: int) -> None:
    import trio

    async def main():
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        while True:
            data = b""
            while len(data) < size:
                chunk = await sock.recv(size - len(data))
                if not chunk:
                    return
                data += chunk
            view = memoryview(data)
            while view:
                view = view[await sock.send(view):]

    trio.run(main)


def main(argv: list[str]) -> int:
    kind, *args = argv
    if kind == "c-eventfd":
        c_eventfd(args[0], int(args[1]), int(args[2]))
    elif kind == "py-eventfd":
        py_eventfd(int(args[0]), int(args[1]))
    elif kind == "trio-eventfd":
        trio_eventfd(int(args[0]), int(args[1]))
    elif kind == "trio2-eventfd":
        trio2_eventfd(int(args[0]), int(args[1]))
    elif kind == "py-socket":
        py_socket(int(args[0]), int(args[1]))
    elif kind == "c-socket":
        c_socket(args[0], int(args[1]), int(args[2]))
    elif kind == "trio-socket":
        trio_socket(int(args[0]), int(args[1]))
    else:
        print(f"unknown echo kind {kind}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(0)

"""The daemon's main loop: the vhost-user listener (one front-end at a time),
the control socket, the memory.high monitor, systemd status and signals.

Each accepted front-end is served by a ``FrontendConnection``; nothing a
peer sends can stop the daemon.

Reconnect policy: the device (its bitmap, sizes and the memory plugged
blocks live in) outlives a front-end connection. A new front-end sees the
same plugged_size; a Linux guest driver that finds plugged memory at probe
sends UNPLUG_ALL first, which discards through the new memory table.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import trio

from ..errors import ConfigError, VmemdevError
from ..sizes import format_size
from . import systemd
from .connection import FrontendConnection
from .control_server import ControlServer, describe
from .runtime import DeviceRuntime
from .sockets import accept, bind_unix_listener
from .trace import Tracer

log = logging.getLogger(__name__)


def _unlink_if_present(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def _leaves(group: BaseException) -> Iterator[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        for exc in group.exceptions:
            yield from _leaves(exc)
    else:
        yield group


async def serve_listener(
    listener: trio.socket.SocketType,
    runtime: DeviceRuntime,
    *,
    tracer: Tracer | None = None,
    resumed: FrontendConnection | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve front-ends one at a time, in the order they connected (after
    ``resumed``, the connection a dead process was serving, if any).

    A front-end that connects while another is attached waits in the
    listen backlog: it is accepted, and served, once the first has gone (a
    quick reconnect after a close is never reset), and it cannot disturb the
    attached one meanwhile."""
    async def handle(connection: FrontendConnection) -> None:
        log.info("front-end connected")
        runtime.events.publish("FRONTEND_CONNECTED")
        try:
            await connection.run()
        except* Exception as group:  # one front-end's failure never stops the daemon
            expected = all(isinstance(e, (VmemdevError, OSError)) for e in _leaves(group))
            log.error("front-end connection ended by an error: %s", describe(group),
                      exc_info=not expected)
        finally:
            runtime.disconnected()
            runtime.events.publish("FRONTEND_DISCONNECTED", plugged=runtime.device.plugged_size)
            log.info(
                "front-end detached; device keeps plugged=%d requested=%d",
                runtime.device.plugged_size,
                runtime.device.requested_size,
            )

    task_status.started()
    if resumed is not None:
        await handle(resumed)
    while True:
        sock = await accept(listener)
        await handle(runtime.connect(sock, tracer))


def status_line(runtime: DeviceRuntime) -> str:
    d = runtime.device
    return (f"plugged {format_size(d.plugged_size)}, requested {format_size(d.requested_size)}, "
            f"front-end {'attached' if runtime.frontend_attached else 'waiting'}")


async def report_status(runtime: DeviceRuntime, interval: float = 1.0) -> None:
    """Keep systemd's STATUS= (systemctl status) current."""
    last = None
    while True:
        line = status_line(runtime)
        if line != last:
            systemd.notify("STATUS=" + line)
            last = line
        await trio.sleep(interval)


async def serve(
    runtime: DeviceRuntime,
    *,
    socket_path: str | None = None,
    listen_fd: int | None = None,
    trace_path: str | None = None,
    control: ControlServer | None = None,
    resumed: FrontendConnection | None = None,
    handle_signals: bool = True,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the device (and its control socket) until cancelled or SIGTERM/SIGINT.

    ``handle_signals=False`` lets an embedding program (or a test running Trio
    outside the main thread) keep signals to itself.
    """
    # Signals first: from the moment the socket exists, SIGTERM means a clean exit.
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT)) \
            if handle_signals else None
        if listen_fd is not None:
            listener = trio.socket.from_stdlib_socket(socket.socket(fileno=listen_fd))
            where = f"fd {listen_fd}" if socket_path is None else f"{socket_path} (inherited fd {listen_fd})"
            if socket_path is not None:
                stack.callback(_unlink_if_present, socket_path)
        elif socket_path is not None:
            listener = await bind_unix_listener(socket_path)
            where = socket_path
            stack.callback(_unlink_if_present, socket_path)
            # A service manager that keeps fds (systemd's store, `vmemdev hold`) hands
            # this socket to the next process if this one dies: the path stays served.
            systemd.store_fds("vhost-user", [listener.fileno()])
        else:
            raise ConfigError("serve needs a socket path or a listening fd")
        stack.callback(listener.close)
        runtime.listener_fd = listener.fileno()  # an upgrade in place hands it over
        g = runtime.geometry
        log.info(
            "serving virtio-mem on %s: region %#x+%#x, block %#x, requested %#x",
            where, g.addr, g.region_size, g.block_size, runtime.device.requested_size,
        )
        tracer = Tracer.open(trace_path) if trace_path else None
        if tracer:
            stack.callback(tracer.close)
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_listener, listener, runtime, tracer=tracer,
                                                  resumed=resumed))
            if control is not None:
                await nursery.start(control.run)
            await nursery.start(runtime.monitor)
            nursery.start_soon(report_status, runtime)
            systemd.notify("READY=1")
            task_status.started()
            if signals is None:
                await trio.sleep_forever()
            async for signum in signals:
                log.info("received %s, exiting", signal.Signals(signum).name)
                systemd.notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break

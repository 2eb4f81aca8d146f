"""Control commands: what each one does to a device's ``DeviceRuntime``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import __version__
from ..errors import ConfigError
from ..protocol.control import COMMANDS, PROTOCOL_VERSION, Command, CommandError
from ..virtio_mem.device import VirtioMem
from .runtime import DeviceRuntime

READS: dict[str, Callable[[VirtioMem], Any]] = {
    "query-limits": VirtioMem.limits_report,
    "query-stats": lambda device: device.stats.to_json(),
    "query-accounting": VirtioMem.accounting,
}


def execute(runtime: DeviceRuntime, command: Command) -> Any:
    """The ``return`` value of one command; raises CommandError."""
    name, args = command.name, command.arguments
    try:
        if name == "query-version":
            return {"version": __version__, "protocol": PROTOCOL_VERSION}
        if name == "query-commands":
            return sorted(COMMANDS)
        if name == "query-status":
            return runtime.status()
        if name in READS:
            with runtime.lock:  # the device, as the connection's thread leaves it
                return READS[name](runtime.device)
        if name == "query-events":
            return [event.to_json() for event in runtime.events.history]
        if name == "resize":  # `resize --wait` fails on the next hot-add failure after this
            return runtime.resize(args["size"], force=args.get("force", False))
        if name == "set-memmap-reserve":
            with runtime.lock:
                runtime.device.set_memmap_reserve(args["value"])
                return runtime.device.memmap_status()
        if name == "set-memmap-rescue":
            with runtime.lock:
                runtime.device.set_memmap_rescue(args["margin"])
                return runtime.device.memmap_status()
        if name == "set-limit":
            runtime.set_limit(args["name"], args["value"])
            with runtime.lock:
                return runtime.device.limits.to_json()
    except ConfigError as exc:
        raise CommandError("InvalidArgument", str(exc)) from exc
    except OSError as exc:
        raise CommandError("GenericError", f"host error: {exc}") from exc
    raise CommandError("CommandNotFound", f"the command {name} has not been found")

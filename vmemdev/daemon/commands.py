"""Control commands: what each one does to a ``DeviceService``. No I/O here."""

from __future__ import annotations

from .. import __version__
from ..errors import ConfigError
from ..protocol.control import COMMANDS, PROTOCOL_VERSION, Command, CommandError
from .service import DeviceService


def execute(service: DeviceService, command: Command):
    """The ``return`` value of one command; raises CommandError."""
    name, args = command.name, command.arguments
    try:
        if name == "query-version":
            return {"version": __version__, "protocol": PROTOCOL_VERSION}
        if name == "query-commands":
            return sorted(COMMANDS)
        if name == "query-status":
            return service.status()
        if name == "query-limits":
            out = service.limits.to_json()
            if service.cgroup is not None:
                reading = service.cgroup.read()
                out["cgroup"] = {"path": service.cgroup.path, "version": service.cgroup.version,
                                 "limit": reading.limit, "usage": reading.usage}
            return out
        if name == "query-stats":
            return service.stats.to_json()
        if name == "query-accounting":
            return service.accounting()
        if name == "query-events":
            return [event.to_json() for event in service.events.history]
        if name == "resize":
            changed = service.resize(args["size"])
            return {"requested_size": service.device.requested_size, "changed": changed}
        if name == "set-limit":
            service.set_limit(args["name"], args["value"])
            return service.limits.to_json()
    except ConfigError as exc:
        raise CommandError("InvalidArgument", str(exc)) from exc
    except OSError as exc:
        raise CommandError("GenericError", f"host error: {exc}") from exc
    raise CommandError("CommandNotFound", f"the command {name} has not been found")

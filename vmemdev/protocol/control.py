"""The control protocol: JSON lines in the style of QMP, sans-IO.

On connect the daemon sends a greeting::

    {"vmemdev": {"version": "0.1.0", "protocol": 1, "capabilities": ["events"]}}

then answers one JSON object per line::

    -> {"execute": "resize", "arguments": {"size": "512M"}, "id": 7}
    <- {"return": {...}, "id": 7}
    <- {"error": {"class": "InvalidArgument", "desc": "..."}, "id": 7}

and, interleaved, sends events::

    <- {"event": "CONFIG_CHANGE_SENT", "data": {...},
        "timestamp": {"seconds": 1700000000, "microseconds": 12}}

Unlike QMP there is no capabilities negotiation: commands work at once.
The command set is versioned by ``PROTOCOL_VERSION``; additions keep it,
changes to existing commands bump it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, OperatorError
from ..sizes import parse_size

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024  # a request line longer than this closes the connection

# command -> {argument: (kind, required)}; kinds: "size", "size-or-max", "size-or-auto",
# "size-or-off", "limit-name", "bool"
COMMANDS: dict[str, dict[str, tuple[str, bool]]] = {
    "query-version": {},
    "query-commands": {},
    "query-status": {},
    "query-limits": {},
    "query-stats": {},
    "query-accounting": {},
    "query-events": {},
    "resize": {"size": ("size", True), "force": ("bool", False)},
    "set-memmap-reserve": {"value": ("size-or-auto", True)},
    "set-memmap-rescue": {"margin": ("size-or-off", True)},
    "set-limit": {"name": ("limit-name", True), "value": ("size-or-max", True)},
    "upgrade": {},  # re-execute the installed version in place; answered just before
}
LIMIT_NAMES = ("memory.max", "memory.high")


class CommandError(OperatorError):
    """An error answered to the client: QMP-style class and description."""

    def __init__(self, cls: str, desc: str, ident: object = None):
        self.cls = cls
        self.desc = desc
        self.id = ident
        super().__init__(f"{cls}: {desc}")


@dataclass(frozen=True)
class Command:
    name: str
    arguments: dict[str, Any]
    id: object = None


def _convert(name: str, kind: str, value: Any) -> Any:
    try:
        if kind == "size":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ConfigError(f"'{name}' must be a size (bytes, or a string like '512M')")
            if isinstance(value, int):
                if value < 0:
                    raise ConfigError(f"'{name}' must not be negative")
                return value
            return parse_size(value, name)
        if kind == "size-or-max":
            if value in (None, "max"):
                return None
            return _convert(name, "size", value)
        if kind == "size-or-auto":
            if value in (None, "auto"):
                return None
            return _convert(name, "size", value)
        if kind == "size-or-off":
            if value == "off":
                return None
            return _convert(name, "size", value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"'{name}' must be true or false")
            return value
        if kind == "limit-name":
            if value not in LIMIT_NAMES:
                raise ConfigError(f"'{name}' must be one of {', '.join(LIMIT_NAMES)}")
            return value
    except ConfigError as exc:
        raise CommandError("InvalidArgument", str(exc)) from exc
    raise AssertionError(kind)


def parse_command(line: bytes) -> Command:
    """Decode one request line; raises CommandError (with the id when known)."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError("GenericError", f"invalid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise CommandError("GenericError", "a request must be a JSON object")
    ident = obj.get("id")
    try:
        name = obj.get("execute")
        if not isinstance(name, str):
            raise CommandError("GenericError", "missing 'execute'")
        schema = COMMANDS.get(name)
        if schema is None:
            raise CommandError("CommandNotFound", f"the command {name} has not been found")
        unknown = set(obj) - {"execute", "arguments", "id"}
        if unknown:
            raise CommandError("GenericError", f"unknown member(s) {sorted(unknown)}")
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            raise CommandError("GenericError", "'arguments' must be an object")
        extra = set(args) - set(schema)
        if extra:
            raise CommandError("InvalidArgument", f"{name} takes no argument(s) {sorted(extra)}")
        converted = {}
        for arg, (kind, required) in schema.items():
            if arg not in args:
                if required:
                    raise CommandError("InvalidArgument", f"{name} needs the argument '{arg}'")
                continue
            converted[arg] = _convert(arg, kind, args[arg])
        return Command(name, converted, ident)
    except CommandError as exc:
        exc.id = ident
        raise


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def greeting(version: str) -> bytes:
    return _line({"vmemdev": {"version": version, "protocol": PROTOCOL_VERSION,
                              "capabilities": ["events"]}})


def encode_return(value: Any, ident: object = None) -> bytes:
    out: dict[str, Any] = {"return": value}
    if ident is not None:
        out["id"] = ident
    return _line(out)


def encode_error(cls: str, desc: str, ident: object = None) -> bytes:
    out: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
    if ident is not None:
        out["id"] = ident
    return _line(out)


def encode_event(event_json: dict[str, Any]) -> bytes:
    return _line(event_json)

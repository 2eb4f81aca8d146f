"""Command line: ``vmemdev serve`` (the daemon) and ``vmemdev demo``.

Usage errors exit 2 with a one-line reason, as argparse does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import trio

from .. import __version__
from ..daemon import keeper, systemd
from ..daemon.handover import HANDOVER_ENV
from ..daemon.storedfds import StoredFds
from ..errors import ConfigError, VmemdevError
from ..sizes import format_size, parse_size
from ..vhost.engine import OFFERED_PROTOCOL_FEATURES, TRANSPORT_FEATURES
from ..virtio_mem.device import VirtioMem
from ..virtio_mem.headroom import DEFAULT_BAND, HeadroomRule
from ..virtio_mem.limits import LIMIT_NAMES, MEMORY_HIGH, MEMORY_MAX, Limits
from ..virtio_mem.model import Geometry, check_block_multiple
from ..virtio_mem.protection import DEFAULT_RESCUE_MARGIN

DEFAULT_REGION_ADDR = 0x1_0000_0000
DEFAULT_REGION_SIZE = "1G"
DEFAULT_BLOCK_SIZE = "2M"


def _size_arg(what: str):
    def parse(text: str) -> int:
        try:
            return parse_size(text, what)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _rescue_arg(text: str) -> int | None:
    if text == "off":
        return None
    size = _size_arg("memmap rescue margin")(text)
    if size <= 0:
        raise argparse.ArgumentTypeError("memmap rescue margin must be positive (or 'off')")
    return size


def _limit_arg(what: str):
    def parse(text: str) -> int | None:
        if text == "max":
            return None
        return _size_arg(what)(text)

    return parse


def default_control_socket(args) -> str | None:
    if args.control_socket:
        return None if args.control_socket == "none" else args.control_socket
    if args.socket_path:
        base = args.socket_path[:-5] if args.socket_path.endswith(".sock") else args.socket_path
        return base + ".ctl"
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    return os.path.join(runtime.split(":")[0], "vmemdev.ctl") if runtime else None


def capabilities() -> dict:
    return {
        "type": "memory",
        "virtio-id": VirtioMem.device_id,
        "version": __version__,
        "features": [],
        "virtio-features": f"{TRANSPORT_FEATURES | VirtioMem.features:#x}",
        "protocol-features": f"{OFFERED_PROTOCOL_FEATURES:#x}",
        "state-formats": list(keeper.READS),  # what `ctl upgrade` checks before re-executing us
    }


def _device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region-addr", type=_size_arg("region address"), default=DEFAULT_REGION_ADDR,
                   help="guest-physical address of the device region (default 0x100000000)")
    p.add_argument("--region-size", type=_size_arg("region size"), default=parse_size(DEFAULT_REGION_SIZE),
                   help=f"size of the device region (default {DEFAULT_REGION_SIZE})")
    p.add_argument("--block-size", type=_size_arg("block size"), default=parse_size(DEFAULT_BLOCK_SIZE),
                   help=f"plug granularity, a power of two >= 4K (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--requested-size", type=_size_arg("requested size"), default=0,
                   help="memory the guest is asked to plug at start (default 0)")
    p.add_argument("--node-id", type=int, default=0, help="NUMA node (ACPI proximity domain), default 0")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ctl_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """Accepted before or after the ctl command; the command's copy only overrides."""
    keep: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    p.add_argument("--control-socket", metavar="PATH",
                   help="default: $VMEMDEV_CONTROL_SOCKET, or the only /run/vmemdev/*.ctl",
                   **({"default": None} | keep))
    p.add_argument("--json", action="store_true", help="machine-readable output",
                   **({"default": False} | keep))


def _logging_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """Accepted before or after the command; the command's copy only overrides."""
    keep: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="default: info for serve, warning for demo", **({"default": None} | keep))
    p.add_argument("--log-format", choices=["text", "json"],
                   help="text lines (journald priorities when run by systemd) or JSON lines",
                   **({"default": "text"} | keep))
    p.add_argument("--instance", help="name in every log line (default: from the socket name)",
                   **({"default": None} | keep))


COMMANDS = ("serve", "ctl", "demo", "hold")


def backend_convention(argv: list[str]) -> list[str]:
    """`vmemdev --socket-path P ...` (how QEMU tooling starts backends) means `serve`."""
    if any(a in COMMANDS for a in argv):
        return argv
    if any(a.split("=")[0] in ("--socket-path", "--fd") for a in argv):
        return ["serve", *argv]
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vmemdev", description="virtio-mem vhost-user backend")
    parser.add_argument("--version", action="version", version=f"vmemdev {__version__}")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the backend's capabilities as JSON and exit")
    _logging_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)

    serve = sub.add_parser("serve", help="serve one virtio-mem device to a vhost-user front-end")
    _logging_options(serve, defaults=False)
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket-path", help="Unix socket to listen on")
    where.add_argument("--fd", type=int,
                       help="an already listening socket (default with socket activation: LISTEN_FDS)")
    serve.add_argument("--print-capabilities", action="store_true",
                       help="print the backend's capabilities as JSON and exit")
    serve.add_argument("--trace-file", metavar="PATH",
                       help="append every vhost-user message to PATH as JSON lines (debugging)")
    serve.add_argument("--control-socket", metavar="PATH",
                       help="control socket (default: the vhost-user socket's name with .ctl; "
                            "with --fd, $RUNTIME_DIRECTORY/vmemdev.ctl if set); 'none' disables it")
    serve.add_argument("--control-group", metavar="GROUP",
                       help="let members of GROUP use the control socket (mode 0660)")
    serve.add_argument("--memory-max", type=_limit_arg(MEMORY_MAX), default=None,
                       help="never let plugged memory exceed this (SIZE or 'max')")
    serve.add_argument("--memory-high", type=_limit_arg(MEMORY_HIGH), default=None,
                       help="ask the guest to shrink when the host footprint exceeds this")
    serve.add_argument("--cgroup", metavar="PATH",
                       help="the VM's memory cgroup (v1 or v2): plugs need headroom in it")
    serve.add_argument("--cgroup-band", type=_size_arg("cgroup band"), default=DEFAULT_BAND, metavar="SIZE",
                       help="with --cgroup, room a plug must leave free for charge batches and the "
                            f"growth of the cgroup's processes (default {format_size(DEFAULT_BAND)})")
    serve.add_argument("--memmap-reserve", type=_size_arg("memmap reserve"), default=None, metavar="SIZE",
                       help="boot memory a guest that onlines movable keeps for itself; its memmap "
                            "ceiling is 64 x (boot memory - SIZE) (default: half the boot memory, "
                            "at least 192M)")
    serve.add_argument("--memmap-observe", choices=["on", "off"], default="on",
                       help="infer the guest's onlining from the region's allocation (default on); "
                            "'off' for a front-end that is not a Linux guest: no memmap ceiling, cap "
                            "or rescue then")
    serve.add_argument("--state-file", metavar="PATH",
                       help="keep the attached front-end's connection resumable by a successor "
                            "(under `vmemdev hold` or systemd's fd store): its state is kept in PATH "
                            "(a tmpfs, e.g. /run/vmemdev/vm0.state)")
    serve.add_argument("--memmap-rescue", type=_rescue_arg, default=DEFAULT_RESCUE_MARGIN, metavar="SIZE|off",
                       help="when a guest that onlines movable fails to add memory, lower its requested "
                            "size so that it removes memory blocks worth SIZE of memmap (2M per 128M) "
                            f"and stops retrying (default {format_size(DEFAULT_RESCUE_MARGIN)}); 'off' "
                            "only reports the failure")
    serve.add_argument("--prealloc", action="store_true",
                       help="allocate plugged blocks on the host before acknowledging a plug")
    _device_options(serve)

    ctl = sub.add_parser("ctl", help="talk to a running daemon through its control socket")
    _ctl_options(ctl, defaults=True)
    cmds = ctl.add_subparsers(dest="ctl_command", required=True, parser_class=Parser)
    cmds.add_parser("status", help="geometry, sizes, front-end, limits, footprint")
    resize = cmds.add_parser("resize", help="set the requested size")
    resize.add_argument("size", help="e.g. 512M, 4G")
    resize.add_argument("--wait", action="store_true", help="follow the guest until it gets there")
    resize.add_argument("--force", action="store_true",
                        help="ask for it even above the guest's memmap ceiling")
    resize.add_argument("--timeout", type=float, default=300.0, help="give up after S seconds (300)")
    resize.add_argument("--stall", type=float, default=60.0,
                        help="fail when plugged has not moved for S seconds (60)")
    setp = cmds.add_parser("set", help="set a limit: memory.max or memory.high, SIZE or 'max'")
    setp.add_argument("name", choices=LIMIT_NAMES)
    setp.add_argument("value")
    get = cmds.add_parser("get", help="show one limit (or all)")
    get.add_argument("name", nargs="?", choices=LIMIT_NAMES)
    cmds.add_parser("limits", help="limits and the cgroup's usage")
    reserve = cmds.add_parser("reserve", help="set the memmap reserve: SIZE or 'auto' (the default)")
    reserve.add_argument("value")
    rescue = cmds.add_parser("rescue", help="set the memmap rescue margin: SIZE or 'off'")
    rescue.add_argument("margin")
    cmds.add_parser("stats", help="request counters, latency, bytes discarded/preallocated")
    cmds.add_parser("accounting", help="plugged vs host-allocated, memmap estimate")
    upgrade = cmds.add_parser("upgrade", help="re-execute the installed vmemdev in place, keeping the "
                                              "attached connection (needs serve --state-file)")
    upgrade.add_argument("--no-wait", dest="wait", action="store_false",
                         help="do not wait for the new version to serve")
    upgrade.add_argument("--timeout", type=float, default=60.0, help="give up waiting after S seconds (60)")
    events = cmds.add_parser("events", help="recent events; --follow for new ones")
    events.add_argument("--follow", "-f", action="store_true")
    for command in cmds.choices.values():  # `ctl status --json` as well as `ctl --json status`
        _ctl_options(command, defaults=False)

    hold = sub.add_parser("hold", help="run a worker (e.g. `vmemdev serve ...`), keep the fds it stores "
                                       "and restart it with them when it dies")
    _logging_options(hold, defaults=False)
    hold.add_argument("--max-fds", type=int, default=64, help="fds kept at most (64)")
    hold.add_argument("--max-restart-delay", type=float, default=5.0, metavar="SECONDS",
                      help="the restart delay doubles from 0.1 s while the worker keeps dying, up to this (5)")
    hold.add_argument("worker", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                      help="the worker's command line")

    demo = sub.add_parser("demo", help="serve a device to a built-in simulated QEMU + Linux guest")
    _logging_options(demo, defaults=False)
    _device_options(demo)
    demo.add_argument("--steps", default="256M,768M,128M,0",
                      help="requested sizes to walk through (default 256M,768M,128M,0)")
    return parser


def _geometry(parser: argparse.ArgumentParser, args) -> Geometry:
    try:
        return Geometry(args.region_addr, args.region_size, args.block_size, args.node_id)
    except ConfigError as exc:
        parser.error(str(exc))


def _resume(runtime, state_file: str | None, fds: dict[str, int]):
    """The connection a dead predecessor (or, after an upgrade in place, this
    process before its execve) was serving, when its fds were kept for us;
    exits 2 naming the file when its state cannot be used."""
    log = logging.getLogger("vmemdev")
    reason = os.environ.pop(HANDOVER_ENV, None) or "restart"
    if state_file is None:
        return None
    if "conn" not in fds:  # nothing to resume: a state file left over describes no live connection
        for stale in keeper.state_files(state_file):
            if os.path.exists(stale):
                log.info("no kept connection: removing the stale state %s", stale)
                os.unlink(stale)
        StoredFds().adopt(fds, {})  # entries of a connection that was never saved
        return None
    from ..vhost.snapshot import StateError

    try:
        return runtime.resume(keeper.load(state_file), fds, reason=reason)
    except StateError as exc:
        log.error("cannot resume the front-end's connection: %s. The saved state was not used and "
                  "no memory was discarded; the kept connection is dropped when this process exits. "
                  "To start afresh, stop the service and remove %s.", exc, state_file)
        raise SystemExit(2) from exc


def instance_name(args) -> str:
    if args.instance:
        return args.instance
    path = getattr(args, "socket_path", None)
    if path:
        name = os.path.basename(path)
        return name[:-5] if name.endswith(".sock") else name
    return os.environ.get("VMEMDEV_INSTANCE", "vmemdev")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--print-capabilities" in argv:  # the vhost-user convention: ignore everything else
        print(json.dumps(capabilities()))
        return 0
    parser = build_parser()
    args = parser.parse_args(backend_convention(argv))
    if args.command is None:
        parser.error("a command is needed: serve, ctl, hold or demo")
    if args.command == "ctl":
        from . import ctl

        return ctl.run(args)
    systemd.setup_logging(args.log_level or ("info" if args.command in ("serve", "hold") else "warning"),
                          instance_name(args), args.log_format)
    if args.command == "hold":
        from ..daemon.holder import FdStore, Holder

        worker = args.worker[1:] if args.worker[:1] == ["--"] else args.worker
        if not worker:
            parser.error("hold needs the worker's command after --, e.g. "
                         "`vmemdev hold -- vmemdev serve --socket-path PATH ...`")
        if args.max_fds < 1:
            parser.error("--max-fds must be at least 1")
        if not 0.1 <= args.max_restart_delay <= 3600:
            parser.error("--max-restart-delay must be between 0.1 and 3600 seconds")
        return Holder(worker, FdStore(args.max_fds), args.max_restart_delay).run()
    geometry = _geometry(parser, args)
    from ..daemon.runtime import DeviceRuntime
    from ..host.cgroup import Cgroup

    try:
        limits = Limits()
        cgroup = None
        if args.command == "serve":
            limits = Limits(args.memory_max, args.memory_high)
            for name in LIMIT_NAMES:
                value = limits.get(name)
                if value is not None:
                    check_block_multiple("--" + name.replace(".", "-"), value, geometry.block_size)
            cgroup = Cgroup(args.cgroup) if args.cgroup else None
        runtime = DeviceRuntime(geometry, args.requested_size, limits=limits, cgroup=cgroup,
                                headroom=HeadroomRule(getattr(args, "cgroup_band", DEFAULT_BAND)),
                                prealloc=getattr(args, "prealloc", False),
                                memmap_reserve=getattr(args, "memmap_reserve", None),
                                memmap_rescue=getattr(args, "memmap_rescue", DEFAULT_RESCUE_MARGIN),
                                memmap_observe=getattr(args, "memmap_observe", "on") == "on",
                                state_file=getattr(args, "state_file", None))
    except ConfigError as exc:
        parser.error(str(exc))
    if args.command == "serve":
        runtime.argv = argv  # an upgrade in place re-executes the installed version with them
        activated = systemd.listen_fds() if args.fd is None or HANDOVER_ENV in os.environ else {}
        resumed = _resume(runtime, args.state_file, activated)
        if "vhost-user" in activated:  # socket activation, or kept for us by a service manager
            args.fd = activated["vhost-user"]
        elif args.socket_path is None and args.fd is None:
            if not activated:
                parser.error("serve needs --socket-path PATH, --fd N or systemd socket activation")
            args.fd = next(iter(activated.values()))
        if args.fd is not None and args.fd < 0:
            parser.error("--fd must be a non-negative file descriptor")
        from ..daemon.control_server import ControlServer
        from ..daemon.vhost_server import serve

        try:
            control_path = default_control_socket(args)
            control = ControlServer(runtime, control_path, args.control_group) if control_path else None
            if control is None:
                logging.getLogger("vmemdev").warning("no control socket: resize and limits are not available")
            trio.run(lambda: serve(runtime, socket_path=args.socket_path, listen_fd=args.fd,
                                   trace_path=args.trace_file, control=control, resumed=resumed))
        except VmemdevError as exc:
            logging.getLogger("vmemdev").error("%s", exc)
            return 1
        return 0
    from .demo import run_demo

    try:
        steps = [parse_size(s, "step") for s in args.steps.split(",") if s.strip()]
        for step in steps:
            runtime.device.check_requested_size(step)
    except ConfigError as exc:
        parser.error(str(exc))
    return trio.run(run_demo, runtime, steps)


if __name__ == "__main__":
    sys.exit(main())

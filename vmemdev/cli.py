"""Command line: ``vmemdev serve`` (the daemon) and ``vmemdev demo``.

Usage errors exit 2 with a one-line reason, as argparse does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import trio

from . import __version__
from .backend import OFFERED_FEATURES, OFFERED_PROTOCOL_FEATURES
from .device import Geometry
from .errors import ConfigError, VmemdevError
from .sizes import parse_size

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


def capabilities() -> dict:
    return {
        "type": "memory",
        "virtio-id": 24,
        "version": __version__,
        "features": [],
        "virtio-features": f"{OFFERED_FEATURES:#x}",
        "protocol-features": f"{OFFERED_PROTOCOL_FEATURES:#x}",
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vmemdev", description="virtio-mem vhost-user backend")
    parser.add_argument("--version", action="version", version=f"vmemdev {__version__}")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the backend's capabilities as JSON and exit")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="default: info for serve, warning for demo")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)

    serve = sub.add_parser("serve", help="serve one virtio-mem device to a vhost-user front-end")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket-path", help="Unix socket to listen on")
    where.add_argument("--fd", type=int, help="an already listening socket (e.g. from systemd)")
    serve.add_argument("--print-capabilities", action="store_true",
                       help="print the backend's capabilities as JSON and exit")
    serve.add_argument("--trace-file", metavar="PATH",
                       help="append every vhost-user message to PATH as JSON lines (debugging)")
    _device_options(serve)

    demo = sub.add_parser("demo", help="serve a device to a built-in simulated QEMU + Linux guest")
    _device_options(demo)
    demo.add_argument("--steps", default="256M,768M,128M,0",
                      help="requested sizes to walk through (default 256M,768M,128M,0)")
    return parser


def _geometry(parser: argparse.ArgumentParser, args) -> Geometry:
    try:
        return Geometry(args.region_addr, args.region_size, args.block_size, args.node_id)
    except ConfigError as exc:
        parser.error(str(exc))


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s vmemdev %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--print-capabilities" in argv:  # the vhost-user convention: ignore everything else
        print(json.dumps(capabilities()))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is needed: serve or demo")
    setup_logging(args.log_level or ("info" if args.command == "serve" else "warning"))
    geometry = _geometry(parser, args)
    from .service import DeviceService

    try:
        service = DeviceService(geometry, args.requested_size)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.command == "serve":
        if args.socket_path is None and args.fd is None:
            parser.error("serve needs --socket-path PATH or --fd N")
        if args.fd is not None and args.fd < 0:
            parser.error("--fd must be a non-negative file descriptor")
        from .server import serve

        try:
            trio.run(lambda: serve(service, socket_path=args.socket_path, listen_fd=args.fd,
                                   trace_path=args.trace_file))
        except VmemdevError as exc:
            logging.getLogger("vmemdev").error("%s", exc)
            return 1
        return 0
    from .demo import run_demo

    try:
        steps = [parse_size(s, "step") for s in args.steps.split(",") if s.strip()]
        for step in steps:
            service.device.check_requested_size(step)
    except ConfigError as exc:
        parser.error(str(exc))
    return trio.run(run_demo, service, steps)


if __name__ == "__main__":
    sys.exit(main())

"""Where the daemon's time goes on the vCPU-bound paths, phase by phase.

    .venv/bin/python -m bench.phases [--n 20000] [--out bench/results/phases.json]

The daemon's own objects (``vhost.Engine``, ``virtio_mem.VirtioMem``,
``host.GuestMemory`` over memfds, the C shim's ring accesses) driven in
this process with no socket and no wake-up: what is measured is the Python
and C the serving thread runs per request once ``poll()`` has returned, the
part no change of scheduler can remove. Medians of ``--n`` calls each,
timed with perf_counter_ns around each phase, in ``--rounds`` rounds; the
round with the least total is reported (this shared machine sometimes runs a
whole round 1.5x slower), with every round's total beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from vmemdev.host.fake import FakeHost
from vmemdev.host.memory import GuestMemory
from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol import virtio_mem as vm
from vmemdev.protocol.vhost_user import Flags, Request
from vmemdev.protocol.virtqueue import DESC_F_NEXT, DESC_F_WRITE
from vmemdev.testing.frontend import GuestRam, Ring
from vmemdev.vhost.engine import MAX_MEM_SLOTS, OFFERED_PROTOCOL_FEATURES, TRANSPORT_FEATURES, Engine
from vmemdev.virtio_mem.device import VirtioMem
from vmemdev.virtio_mem.model import Geometry

MiB = 1 << 20
ADDR = 1 << 32
ns = time.perf_counter_ns


def _send(engine: Engine, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> bytes | None:
    return engine.handle(vu.decode(request, int(Flags.VERSION), payload, fds)).reply


def _attached() -> tuple[Engine, VirtioMem, GuestRam, Ring]:
    """An engine and a virtio-mem device after QEMU's handshake, ring 0 running."""
    device = VirtioMem(Geometry(ADDR, 1 << 30, 2 * MiB), 1 << 30, host=FakeHost())
    engine = Engine(device, GuestMemory(MAX_MEM_SLOTS))
    ram = GuestRam(64 * MiB, ADDR, 1 << 30)
    ring = Ring(ram, 256)
    _send(engine, Request.SET_OWNER)
    _send(engine, Request.SET_FEATURES, vu.encode_u64(TRANSPORT_FEATURES | device.features))
    _send(engine, Request.SET_PROTOCOL_FEATURES, vu.encode_u64(int(OFFERED_PROTOCOL_FEATURES)))
    fds = tuple(os.dup(r.fd) for r in ram.regions)
    _send(engine, Request.SET_MEM_TABLE, vu.encode_mem_table([r.describe() for r in ram.regions]), fds)
    _send(engine, Request.SET_VRING_NUM, vu.encode_vring_state(0, ring.num))
    _send(engine, Request.SET_VRING_BASE, vu.encode_vring_state(0, 0))
    _send(engine, Request.SET_VRING_ADDR, vu.encode_vring_addr(ring.addr_message(0)))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    _send(engine, Request.SET_VRING_KICK, vu.encode_u64(0), (kick,))
    os.close(kick)
    _send(engine, Request.SET_VRING_ENABLE, vu.encode_vring_state(0, 1))
    device.attach(engine.memory)
    return engine, device, ram, ring


def state_phases(n: int) -> dict[str, float]:
    engine, device, ram, ring = _attached()
    req, resp = ram.alloc(32, 8), ram.alloc(16, 8)
    ram.write(req, vm.MemRequest(vm.RequestType.STATE, ADDR, 1).pack())
    ring.write_desc(0, req, vm.REQUEST_SIZE, DESC_F_NEXT, 1)
    ring.write_desc(1, resp, vm.RESPONSE_SIZE, DESC_F_WRITE, 0)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    phases: dict[str, list[int]] = {"take (pop head, walk and check the chain, gather)": [],
                                    "device (parse, decide, stats, response)": [],
                                    "complete (scatter, publish used)": [],
                                    "eventfd_write + eventfd_read (no waiter)": []}
    cols = list(phases.values())
    gc.disable()
    try:
        for _ in range(n):
            ring.publish(0)
            t0 = ns()
            request = engine.take(0, device.max_request)
            t1 = ns()
            assert request is not None
            step = device.begin(request.data, request.writable)
            t2 = ns()
            assert isinstance(step, bytes)
            engine.complete(request, step)
            t3 = ns()
            os.eventfd_write(efd, 1)
            os.eventfd_read(efd)
            t4 = ns()
            cols[0].append(t1 - t0)
            cols[1].append(t2 - t1)
            cols[2].append(t3 - t2)
            cols[3].append(t4 - t3)
            assert ring.pop_used() is not None
    finally:
        gc.enable()
        os.close(efd)
        engine.close()
        ram.close()
    return {k: statistics.median(v) / 1e3 for k, v in phases.items()}


def get_config_phases(n: int) -> dict[str, float]:
    engine, _, ram, _ = _attached()
    payload = vu.encode_config(0, bytes(vm.CONFIG_SIZE))
    header = vu.HEADER.pack(Request.GET_CONFIG, int(Flags.VERSION), len(payload))
    phases: dict[str, list[int]] = {"parse header": [], "decode body": [],
                                    "engine + device (read_config)": [], "encode reply": []}
    cols = list(phases.values())
    gc.disable()
    try:
        for _ in range(n):
            t0 = ns()
            request, flags, _size = vu.parse_header(header)
            t1 = ns()
            msg = vu.decode(request, flags, payload, ())
            t2 = ns()
            reply = engine.handle(msg).reply
            t3 = ns()
            assert reply is not None
            vu.encode_reply(request, reply)
            t4 = ns()
            for col, d in zip(cols, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                col.append(d)
    finally:
        gc.enable()
        engine.close()
        ram.close()
    return {k: statistics.median(v) / 1e3 for k, v in phases.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/phases.json")
    args = ap.parse_args()
    state_rounds = [state_phases(args.n) for _ in range(args.rounds)]
    config_rounds = [get_config_phases(args.n) for _ in range(args.rounds)]
    state = min(state_rounds, key=lambda r: sum(r.values()))
    config = min(config_rounds, key=lambda r: sum(r.values()))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"command": f".venv/bin/python -m bench.phases --n {args.n} --rounds {args.rounds}",
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "git": git,
              "machine": f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "load": os.getloadavg(), "n": args.n, "unit": "µs, median of n, best round",
              "round totals": {"STATE": [round(sum(r.values()), 2) for r in state_rounds],
                               "GET_CONFIG": [round(sum(r.values()), 2) for r in config_rounds]},
              "STATE": state, "STATE total": sum(state.values()),
              "GET_CONFIG": config, "GET_CONFIG total": sum(config.values())}
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    for name in ("STATE", "GET_CONFIG"):
        totals = ", ".join(f"{t:.1f}" for t in result["round totals"][name])
        print(f"{name}: {result[name + ' total']:.1f} µs per request in the serving thread's Python "
              f"(best of {args.rounds} rounds: {totals})")
        for phase, us in result[name].items():
            print(f"  {us:6.1f}  {phase}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

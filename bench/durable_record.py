"""What saving a request's state costs, with no socket and no daemon around it.

    .venv/bin/python -m bench.durable_record [--n 20000] [--dir /dev/shm]

The daemon's own model (``virtio_mem.VirtioMemModel``) and keeper
(``daemon.keeper.ConnectionKeeper``) in this process, on files in ``--dir``
(tmpfs by default, as the systemd unit keeps the state in /run). Per
request: commit a one-block PLUG or UNPLUG in the model (not timed), then
time what ``FrontendConnection._answer`` does to save it:

- ``record``: the per-request save of this version
  (``DeviceRecordFile.answer``: a slot of PATH.dev written through its
  shared mapping, the changed bitmap bytes copied);
- ``file (format 1)``: what the previous version did (the whole state as
  JSON, the bitmap in hex, written to a new file renamed over the old one),
  reproduced here for comparison.

For regions of 1 GiB, 1 TiB and 16 TiB with 2 MiB blocks (bitmaps of 64
bytes, 64 KiB, 1 MiB). Medians of ``--n`` saves, best of ``--rounds``
rounds (this machine is shared). Also: writing both files anew (the
first save of a connection, and a change too large for a slot), an
UNPLUG_ALL's save with every block plugged (a zero window over the whole
bitmap) and reading the state back (what a successor does once).

    .venv/bin/python -m bench.durable_record --drain [--n 20000] [--rounds 5]

times ``FrontendConnection._drain`` for one PLUG, STATE and UNPLUG of a 2 MiB
block (never-touched: 256 PLUGs, 256 STATEs, then 256 UNPLUGs, over again), the daemon's
engine, device (fake host: no punch) and connection objects in this process
with no socket and no wake-up, without and with a state file on tmpfs,
alternately per round; the difference is what ``--state-file`` adds to the
serving thread's Python per request (STATE changes nothing: it should add nothing).

    .venv/bin/python -m bench.durable_record --message [--n 20000] [--rounds 5]

times ``FrontendConnection._serve_message`` for one GET_CONFIG sent over a
socketpair by this process (the peek, the engine, the journal's steps, the
consume and the send; the reply read back after the clock stops), without
and with a state file on tmpfs, alternately per round: what the message
journal adds to the vCPU-bound config read.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator

from vmemdev.daemon import devrecord, keeper
from vmemdev.vhost.snapshot import EngineRecord
from vmemdev.virtio_mem.model import Geometry, Plug, Unplug, UnplugAll, VirtioMemModel

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
ADDR = 1 << 32
ENGINE = EngineRecord(1, 2, True, 15, ((0, 1 << 20, 0x7000_0000_0000, 0),), ())
ANSWER_REQUEST = bytes(24)
ANSWER_RESPONSE = bytes(10)
ns = time.perf_counter_ns


def _format1_save(path: str, engine: EngineRecord, model: VirtioMemModel, answer: keeper.SavedAnswer) -> None:
    """The previous version's save, as it was (keeper.py before format 2)."""
    text = json.dumps({"format": 1, "engine": engine.to_obj(),
                       "device": {"requested_size": model.requested_size,
                                  "usable_region_size": model.usable_region_size,
                                  "bitmap": model.bitmap.to_bytes().hex()},
                       "answer": answer.to_json()})
    temporary = path + ".new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.rename(temporary, path)


def _toggle(model: VirtioMemModel, i: int) -> None:
    """A one-block PLUG, then its UNPLUG, alternately, over the first 1024 blocks."""
    block = (i // 2) % min(1024, model.geometry.nblocks)
    addr = model.block_addr(block)
    bs = model.block_size
    model.commit(Plug(block, 1, addr, bs) if i % 2 == 0 else Unplug(block, 1, addr, bs))


def measure(region: int, n: int, rounds: int, directory: str) -> dict[str, float]:
    model = VirtioMemModel(Geometry(ADDR, region, 2 * MiB), min(region, 1 << 40))
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "bench.state")
        k = keeper.ConnectionKeeper(path)
        k.save(ENGINE, model.to_record())
        record = k.device_record
        assert record is not None
        for name in ("record", "file (format 1)"):
            best = None
            for _ in range(rounds):
                samples = []
                for i in range(n if name == "record" else max(n // 20, 200)):
                    _toggle(model, i)
                    answer = (0, i & 0xFFFF, ANSWER_REQUEST, ANSWER_RESPONSE, (i + 1) & 0xFFFF)
                    if name == "record":
                        t = ns()
                        record.answer(model.to_record(), *answer)
                        samples.append(ns() - t)
                    else:
                        t = ns()
                        _format1_save(path + ".f1", ENGINE, model, keeper.SavedAnswer(*answer))
                        samples.append(ns() - t)
                model.bitmap.take_touched()
                med = statistics.median(samples) / 1000
                best = med if best is None else min(best, med)
            out[f"{name} µs"] = best
        # UNPLUG_ALL with every block plugged: a zero window over the whole bitmap.
        model.commit(Plug(0, model.geometry.nblocks, ADDR, region))
        t = ns()
        k.save(ENGINE, model.to_record())  # all of the bitmap changed: PATH.dev anew (and PATH)
        out["whole files anew µs"] = (ns() - t) / 1000
        record = k.device_record
        assert record is not None
        model.commit(UnplugAll(model.plugged_size))
        t = ns()
        saved = record.answer(model.to_record(), 0, 0, ANSWER_REQUEST, ANSWER_RESPONSE, 1)
        out["UNPLUG_ALL of all blocks µs"] = (ns() - t) / 1000
        assert saved is True  # a zero window fits a slot
        t = ns()
        state = keeper.load(path)
        out["load (a successor, once) µs"] = (ns() - t) / 1000
        assert state.device["bitmap"] == model.bitmap.to_bytes()
        out["PATH.dev bytes"] = os.path.getsize(path + ".dev")
        out["bitmap bytes"] = devrecord.bitmap_length(model.geometry.nblocks)
        k.forget()
    return out


KINDS = ("PLUG", "STATE", "UNPLUG")  # --drain: in this order, 256 of each, over again


@contextlib.contextmanager
def _connection(persist: bool, directory: str) -> Iterator[tuple]:
    """The daemon's engine, device (fake host: no punch) and connection in
    this process, after QEMU's handshake, on one end of a socketpair, with a
    state file in ``directory`` when ``persist``: yields (connection, device,
    guest RAM, ring, the socketpair's other end)."""
    import logging
    import socket

    from bench import phases
    from vmemdev.daemon.connection import FrontendConnection
    from vmemdev.host.fake import FakeHost
    from vmemdev.virtio_mem.device import VirtioMem

    logging.disable(logging.WARNING)
    # The bench's daemons run with --memmap-observe off (bench/common.py): so does this device.
    phases.VirtioMem = lambda g, r, host: VirtioMem(g, r, host=FakeHost(), memmap_observe=False)  # type: ignore
    engine, device, ram, ring = phases._attached()
    a, b = socket.socketpair()

    def serve(request):  # DeviceRuntime.serve_request without the lock
        step = device.begin(request.data, request.writable)
        if not isinstance(step, bytes):
            step = device.finish(step, step.run(device.host))
        return step

    tmp = tempfile.TemporaryDirectory(dir=directory)
    persistence = None
    if persist:
        persistence = keeper.Persistence(
            keeper.ConnectionKeeper(os.path.join(tmp.name, "bench.state")), record=device.model.to_record)
    conn = FrontendConnection(a, device, engine.memory, serve, persistence=persistence)
    conn.engine = engine
    conn.persist(fds=False)
    try:
        yield conn, device, ram, ring, b
    finally:
        if persistence is not None:
            persistence.keeper.forget()
        conn.close()
        b.close()
        ram.close()
        tmp.cleanup()


def drain(persist: bool, n: int, directory: str) -> list[float]:
    """Median µs of _drain for each of KINDS."""
    from vmemdev.protocol import virtio_mem as vm
    from vmemdev.protocol.virtqueue import DESC_F_NEXT, DESC_F_WRITE

    with _connection(persist, directory) as (conn, device, ram, ring, _):
        resp = ram.alloc(16, 8)
        kinds = tuple(vm.RequestType[k] for k in KINDS)
        reqs = {}
        for kind in kinds:
            for block in range(256):
                r = ram.alloc(32, 8)
                ram.write(r, vm.MemRequest(kind, ADDR + block * 2 * MiB, 1).pack())
                reqs[kind, block] = r
        samples: list[list[int]] = [[] for _ in kinds]
        fds = conn.rings[0]
        cycle = 256 * len(kinds)
        n = -(-n // cycle) * cycle  # whole cycles: the blocks end unplugged
        gc.disable()
        try:
            for i in range(n):
                phase = (i // 256) % len(kinds)
                ring.write_desc(0, reqs[kinds[phase], i % 256], vm.REQUEST_SIZE, DESC_F_NEXT, 1)
                ring.write_desc(1, resp, vm.RESPONSE_SIZE, DESC_F_WRITE, 0)
                ring.publish(0)
                t = ns()
                conn._drain(fds)
                samples[phase].append(ns() - t)
                assert ring.pop_used() is not None
        finally:
            gc.enable()
        assert device.model.plugged_size == 0
    return [statistics.median(s) / 1000 for s in samples]


def message(persist: bool, n: int, directory: str) -> float:
    """Median µs of _serve_message for a GET_CONFIG."""
    from vmemdev.protocol import vhost_user as vu
    from vmemdev.protocol import virtio_mem as vm

    get_config = vu.encode(vu.Request.GET_CONFIG, vu.encode_config(0, bytes(vm.CONFIG_SIZE)))
    with _connection(persist, directory) as (conn, _, _, _, peer):
        samples = []
        gc.disable()
        try:
            for _ in range(n):
                peer.sendall(get_config)
                t = ns()
                conn._serve_message()
                samples.append(ns() - t)
                reply = peer.recv(4096)
        finally:
            gc.enable()
        assert reply[:4] == get_config[:4] and len(reply) == len(get_config), reply
    return statistics.median(samples) / 1000


def _header(args: argparse.Namespace, mode: str) -> None:
    print(f"# python -m bench.durable_record{mode} --n {args.n} --rounds {args.rounds} --dir {args.dir}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")


def main_message(args: argparse.Namespace) -> int:
    _header(args, " --message")
    print("| round | GET_CONFIG without µs | GET_CONFIG with µs | + µs |")
    print("|---|---|---|---|")
    plus = []
    for i in range(args.rounds):
        without = message(False, args.n, args.dir)
        with_ = message(True, args.n, args.dir)
        plus.append(with_ - without)
        print(f"| {i + 1} | {without:.2f} | {with_:.2f} | {plus[-1]:+.2f} |")
    print(f"| median | | | {statistics.median(plus):+.2f} |")
    return 0


def main_drain(args: argparse.Namespace) -> int:
    _header(args, " --drain")
    print("| round | " + " | ".join(f"{k} without µs | {k} with µs | + µs" for k in KINDS) + " |")
    print("|---" * (1 + 3 * len(KINDS)) + "|")
    plus: list[list[float]] = [[] for _ in KINDS]
    for i in range(args.rounds):
        without = drain(False, args.n, args.dir)
        with_ = drain(True, args.n, args.dir)
        for k in range(len(KINDS)):
            plus[k].append(with_[k] - without[k])
        print(f"| {i + 1} | " + " | ".join(f"{without[k]:.2f} | {with_[k]:.2f} | {plus[k][-1]:+.2f}"
                                         for k in range(len(KINDS))) + " |")
    print("| median |" + " |".join(f" | | {statistics.median(p):+.2f}" for p in plus) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.durable_record", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--drain", action="store_true", help="time _drain with and without a state file")
    ap.add_argument("--message", action="store_true", help="time a GET_CONFIG's _serve_message, likewise")
    args = ap.parse_args(argv)
    if args.drain:
        return main_drain(args)
    if args.message:
        return main_message(args)
    _header(args, "")
    rows = []
    for label, region in (("1 GiB", GiB), ("1 TiB", TiB), ("16 TiB", 16 * TiB)):
        rows.append((label, measure(region, args.n, args.rounds, args.dir)))
    columns = list(rows[0][1])
    print("| region (2 MiB blocks) | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, values in rows:
        print(f"| {label} | " + " | ".join(f"{values[c]:.2f}" if "µs" in c else f"{values[c]:,}"
                                          for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

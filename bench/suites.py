"""The benchmarks. Each returns a JSON-able dict; targets go to ``run.target``.

Every subject is measured in the same run as its baseline, interleaved
(A B / B A ... or rotating rounds), and the report gives medians and the
median of the per-pair ratios, so load from other tenants hits both sides.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vmemdev.host import native

from . import client as C
from .common import (
    BLOCK,
    BenchError,
    Daemon,
    GiB,
    Helper,
    MiB,
    TiB,
    lat_summary,
    median,
    mem_available,
    populate_checked,
    proc_status,
    spawn_echo,
    stop_process,
)

REQ_BLOCKS = 64  # what the Linux driver sends: one 128 MiB memory block per request
REQ_BYTES = REQ_BLOCKS * BLOCK
ADDR = 0x1_0000_0000


@dataclass
class Run:
    quick: bool
    helper: Helper
    targets: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def target(self, bench: str, what: str, value: float, limit: float, kind: str, unit: str = "",
               note: str = "") -> bool:
        met = value >= limit if kind == ">=" else value <= limit
        self.targets.append({"bench": bench, "what": what, "value": value, "target": f"{kind} {limit:g}{unit}",
                             "unit": unit, "met": bool(met), "note": note})
        return met


def _gc_off():
    gc.collect()
    gc.disable()


def _dimm_addr(fe) -> int:
    return native.buffer_address(fe.ram.dimm)


def _assert_alloc(fe, expected: int, what: str) -> None:
    got = native.allocated_bytes(fe.ram.dimm_fd)
    if got != expected:
        raise BenchError(f"{what}: the DIMM holds {got} bytes, expected {expected}")


async def _session(daemon: Daemon, body):
    """Attach a front-end to `daemon`, run `body(fe)` (sync), detach."""
    fe = await C.attach(daemon.socket_path, daemon.region_addr, daemon.region_size)
    try:
        return body(fe)
    finally:
        await fe.close()
        fe.release()


def in_session(daemon: Daemon, body):
    return trio.run(_session, daemon, body)


async def _sessions(daemons: list[Daemon], body):
    fes = []
    try:
        for d in daemons:
            fes.append(await C.attach(d.socket_path, d.region_addr, d.region_size))
        return body(fes)
    finally:
        for fe in fes:
            await fe.close()
            fe.release()


def in_sessions(daemons: list[Daemon], body):
    """Several daemons, one front-end each, attached together (for interleaved comparisons)."""
    return trio.run(_sessions, daemons, body)


# --- 1. unplug throughput --------------------------------------------------------


def _plug_all(rc: C.RingClient, size: int, nb: int = REQ_BLOCKS) -> None:
    for off in range(0, size, nb * BLOCK):
        rc.ack(C.PLUG, ADDR + off, min(nb, (size - off) // BLOCK))


def _unplug_timed(rc: C.RingClient, size: int, nb: int) -> tuple[int, list[int]]:
    """Unplug [0, size) in nb-block requests; (wall ns first publish -> last used, per-request ns)."""
    per = []
    t0 = time.perf_counter_ns()
    for off in range(0, size, nb * BLOCK):
        per.append(rc.ack(C.UNPLUG, ADDR + off, min(nb, (size - off) // BLOCK)))
    return time.perf_counter_ns() - t0, per


def _fit_size(want: int, reserve: int = 2 * GiB, unit: int = REQ_BYTES) -> tuple[int, str | None]:
    """`want`, or what fits in MemAvailable minus `reserve` (no swap here: never squeeze)."""
    avail = mem_available()
    if avail - want >= reserve:
        return want, None
    fit = max(0, (avail - reserve) // unit) * unit
    if fit < unit:
        raise BenchError(f"only {avail / GiB:.1f} GiB available: cannot populate even {_name(unit)}")
    return fit, (f"scaled down from {_name(want)} to {_name(fit)}: MemAvailable was "
                 f"{avail / GiB:.1f} GiB (keeping {reserve / GiB:.0f} GiB free, no swap)")


def unplug_throughput(run: Run) -> dict:
    sizes = [GiB] if run.quick else [GiB, 16 * GiB]
    reps = 2 if run.quick else 3
    h = run.helper
    out: dict = {"baseline": "C helper (bench/helper.c): fallocate(PUNCH_HOLE|KEEP_SIZE) of the same 128 MiB "
                             "ranges in a tight loop, timed in C",
                 "populate": "MADV_POPULATE_WRITE, 2 threads, through the front-end's mapping of the DIMM",
                 "sizes": []}
    for want in sizes:
        size, note = _fit_size(want)
        if note:
            run.notes.append("unplug throughput: " + note)
        with Daemon(region_size=size, requested_size=size) as d:
            def body(fe):
                rc = C.RingClient(fe)
                addr = _dimm_addr(fe)
                subj, raw, ratios, per_req = [], [], [], []
                for rep in range(reps):
                    order = ("subject", "raw") if rep % 2 == 0 else ("raw", "subject")
                    t = {}
                    for kind in order:
                        if kind == "subject":
                            _plug_all(rc, size)
                            populate_checked(h, addr, size)
                            _assert_alloc(fe, size, "after populate")
                            _gc_off()
                            try:
                                t[kind], per = _unplug_timed(rc, size, REQ_BLOCKS)
                            finally:
                                gc.enable()
                            per_req += per
                        else:
                            populate_checked(h, addr, size)
                            _assert_alloc(fe, size, "after populate")
                            t[kind] = h.punch(fe.ram.dimm_fd, 0, size, REQ_BYTES)
                        _assert_alloc(fe, 0, f"after {kind} unplug")
                    subj.append(size / t["subject"] * 1e9 / GiB)
                    raw.append(size / t["raw"] * 1e9 / GiB)
                    ratios.append(t["raw"] / t["subject"])
                return {"size": size, "requested": want, "reps": reps, "requests": size // REQ_BYTES,
                        "vmemdev_gib_s": subj, "raw_gib_s": raw, "ratio": ratios,
                        "vmemdev_gib_s_median": median(subj), "raw_gib_s_median": median(raw),
                        "ratio_median": median(ratios), "per_request": lat_summary(per_req)}
            res = in_session(d, body)
        out["sizes"].append(res)
        run.target("1 unplug", f"{_name(size)} unplug through the vring / raw punch (same ranges)",
                   res["ratio_median"], 0.8, ">=", "", note or "")
    out["curve"] = unplug_curve(run)
    return out


def unplug_curve(run: Run) -> dict:
    """Throughput vs request size (blocks per request), 1 GiB: per-request overhead made visible."""
    size, note = _fit_size(GiB)
    if note:
        run.notes.append("unplug curve: " + note)
    nbs = [1, 64, 512] if run.quick else [1, 4, 16, 64, 256, 512]
    reps = 1 if run.quick else 5
    h = run.helper
    rows = []
    with Daemon(region_size=size, requested_size=size) as d:
        def body(fe):
            rc = C.RingClient(fe)
            addr = _dimm_addr(fe)
            for nb in nbs:
                subj, raw = [], []
                for rep in range(reps):
                    for kind in (("subject", "raw") if rep % 2 == 0 else ("raw", "subject")):
                        if kind == "subject":
                            _plug_all(rc, size, nb)
                            populate_checked(h, addr, size)
                            _gc_off()
                            try:
                                ns, _ = _unplug_timed(rc, size, nb)
                            finally:
                                gc.enable()
                            subj.append(size / ns * 1e9 / GiB)
                        else:
                            populate_checked(h, addr, size)
                            raw.append(size / h.punch(fe.ram.dimm_fd, 0, size, nb * BLOCK) * 1e9 / GiB)
                        _assert_alloc(fe, 0, "after unplug")
                rows.append({"blocks_per_request": nb, "request_bytes": nb * BLOCK,
                             "vmemdev_gib_s": median(subj), "raw_gib_s": median(raw),
                             "ratio": median([a / b for a, b in zip(subj, raw)])})
        in_session(d, body)
    return {"size": size, "reps": reps, "rows": rows}


# --- 2. preallocating plug --------------------------------------------------------


def prealloc_plug(run: Run) -> dict:
    size, note = _fit_size(GiB)
    if note:
        run.notes.append("preallocating plug: " + note)
    reps = 2 if run.quick else 5
    h = run.helper
    kinds = ["vmemdev --prealloc", "fallocate(0), 128 MiB calls", "fallocate(0), one call",
             "POPULATE_WRITE 1 thread", "POPULATE_WRITE 2 threads"]
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    ratios = []
    with Daemon(region_size=size, requested_size=size, extra=("--prealloc",)) as d:
        def body(fe):
            rc = C.RingClient(fe)
            addr = _dimm_addr(fe)
            fd = fe.ram.dimm_fd
            for rep in range(reps):
                order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
                t = {}
                for kind in order:
                    if kind.startswith("vmemdev"):
                        _gc_off()
                        try:
                            t0 = time.perf_counter_ns()
                            for off in range(0, size, REQ_BYTES):
                                rc.ack(C.PLUG, ADDR + off, REQ_BLOCKS)
                            ns = time.perf_counter_ns() - t0
                        finally:
                            gc.enable()
                        _assert_alloc(fe, size, "after the preallocating plug")
                        for off in range(0, size, REQ_BYTES):
                            rc.ack(C.UNPLUG, ADDR + off, REQ_BLOCKS)
                    elif kind.startswith("fallocate(0), 128"):
                        ns = h.fallocate(fd, 0, size, REQ_BYTES)
                        _assert_alloc(fe, size, kind)
                        h.punch(fd, 0, size)
                    elif kind.startswith("fallocate(0), one"):
                        ns = h.fallocate(fd, 0, size, 0)
                        _assert_alloc(fe, size, kind)
                        h.punch(fd, 0, size)
                    else:
                        ns = h.populate(addr, size, 1 if "1 thread" in kind else 2)
                        _assert_alloc(fe, size, kind)
                        h.punch(fd, 0, size)
                    _assert_alloc(fe, 0, f"after undoing {kind}")
                    t[kind] = ns
                    samples[kind].append(size / ns * 1e9 / GiB)
                ratios.append(t["fallocate(0), 128 MiB calls"] / t["vmemdev --prealloc"])
        in_session(d, body)
    res = {"size": size, "reps": reps, "requests": size // REQ_BYTES,
           "baseline": "C helper: fallocate(0) of the same 128 MiB ranges (the method the daemon uses); "
                       "POPULATE_WRITE rows for reference (they also zero the pages, which fallocate defers "
                       "to the guest's first touch)",
           "gib_s": {k: median(v) for k, v in samples.items()}, "samples_gib_s": samples,
           "ratio_vs_fallocate": ratios, "ratio_median": median(ratios)}
    run.target("2 prealloc", f"{_name(size)} --prealloc plug / raw fallocate(0) (same ranges)", res["ratio_median"], 0.8, ">=")
    return res


# --- 3, 4, 6. round trips and idle footprint (one daemon process) ---------------


PP_C = "eventfd ping-pong, C echo"
PP_PY = "eventfd ping-pong, Python echo (blocking)"
PP_TRIO = "eventfd ping-pong, Trio echo (1 task)"
PP_TRIO2 = "eventfd ping-pong, Trio echo (2 tasks, the daemon's shape)"
SE_C = "socket echo, C"
SE_PY = "socket echo, Python (blocking)"
SE_TRIO = "socket echo, Trio"


def _eventfd_pair():
    return (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))


def _pin(pid: int, cpus: set[int]) -> None:
    """Move every thread of `pid` to `cpus` (threads created later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass


def rotated(items: list, r: int) -> list:
    """``items`` from the r-th on, then the rest: each round starts elsewhere."""
    i = r % len(items)
    return items[i:] + items[:i]


def place(cpus: tuple[set[int], set[int]], pids) -> None:
    """This thread on ``cpus[0]``, every thread of ``pids`` on ``cpus[1]``."""
    os.sched_setaffinity(0, cpus[0])
    for pid in pids:
        _pin(pid, cpus[1])


def placements() -> dict[str, tuple[set[int], set[int]]]:
    """name -> (CPUs of the measuring thread, CPUs of the daemon / echo process)."""
    allowed = sorted(os.sched_getaffinity(0))
    out = {"unpinned": (set(allowed), set(allowed))}
    if len(allowed) >= 2:
        out["same CPU"] = ({allowed[0]}, {allowed[0]})
        out["different CPUs"] = ({allowed[0]}, {allowed[1]})
    return out


PLACEMENT_NOTE = (
    "Placement matters on this VM: a wake-up across vCPUs costs tens of µs more than one on the same "
    "vCPU, and the scheduler picks either, so each kind is measured in three placements, rotating per "
    "round: unpinned (the scheduler's choice), same CPU (measuring thread, daemon and echoes pinned to "
    "one CPU) and different CPUs (measuring thread on one, daemon / echo on another, as QEMU and the "
    "daemon on separate cores). Targets are checked for the two pinned placements.")


def _trio_idle_rss() -> dict:
    """RSS of a Python process that imported Trio and sleeps: the floor for any Trio daemon."""
    p = subprocess.Popen([sys.executable, "-c", "import trio; trio.run(trio.sleep_forever)"],
                         stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        return proc_status(p.pid)
    finally:
        stop_process(p)


def request_loops(rc: C.RingClient, fsock: socket.socket, size: int, gmsg: bytes) -> dict:
    """The timed loops of one attached daemon: kind -> f(n) -> n samples (ns).
    ``size``: its region, plugged by nothing else."""
    reply_size = 12 + 12 + 56
    blk = ADDR + size - BLOCK  # a block nobody touches: plug/unplug do no memory work

    def check_config(reply: bytes):
        if len(reply) != reply_size or reply[:4] != gmsg[:4]:
            raise BenchError(f"GET_CONFIG reply {reply[:16].hex()}...")

    nblocks = size // BLOCK
    plugged = [0]  # blocks plugged from the region's start

    def ring_loop(kind):
        def f(n):
            out = []
            _gc_off()
            try:
                if kind == "STATE":
                    for _ in range(n):
                        out.append(rc.ack(C.STATE, ADDR, 1))
                elif kind == "PLUG":
                    # Distinct blocks, one per request; when all are plugged an
                    # untimed UNPLUG_ALL (nothing populated) starts over.
                    for _ in range(n):
                        if plugged[0] == nblocks:
                            rc.ack(C.UNPLUG_ALL)
                            plugged[0] = 0
                        out.append(rc.ack(C.PLUG, ADDR + plugged[0] * BLOCK, 1))
                        plugged[0] += 1
                else:  # UNPLUG of a plugged, never-touched block: punch in a worker thread
                    if plugged[0] == nblocks:
                        rc.ack(C.UNPLUG_ALL)
                        plugged[0] = 0
                    for _ in range(n):
                        rc.ack(C.PLUG, blk, 1)
                        out.append(rc.ack(C.UNPLUG, blk, 1))
            finally:
                gc.enable()
            return out
        return f

    return {"STATE": ring_loop("STATE"), "PLUG (no prealloc)": ring_loop("PLUG"),
            "UNPLUG (unpopulated block)": ring_loop("UNPLUG"),
            "GET_CONFIG": lambda n: C.socket_roundtrips(fsock, gmsg, reply_size, n, check_config)}


def roundtrips(run: Run) -> dict:
    rounds, per_round = (3, 200) if run.quick else (20, 500)
    h = run.helper
    size = GiB
    res: dict = {}
    # The far sides of the baselines, each its own process.
    gmsg = C.get_config_message()
    efd = {k: _eventfd_pair() for k in ("c", "py", "trio", "trio2")}
    sp = {k: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for k in ("c", "py", "trio")}
    for ours, _ in sp.values():
        ours.setblocking(False)
    echoes = []
    for k, (kick, call) in efd.items():
        args = ((h.path,) if k == "c" else ()) + (str(kick), str(call))
        echoes.append(spawn_echo(f"{k}-eventfd", (kick, call), *args))
    for k, (_, theirs) in sp.items():
        args = ((h.path,) if k == "c" else ()) + (str(theirs.fileno()), str(len(gmsg)))
        echoes.append(spawn_echo(f"{k}-socket", (theirs.fileno(),), *args))
        theirs.close()
    try:
        time.sleep(0.5)  # let the echo processes import and block
        for p in echoes:
            if p.poll() is not None:
                raise BenchError(f"an echo process exited with {p.returncode}")
        with Daemon(region_size=size, requested_size=size) as d:
            def body(fe):
                rc = C.RingClient(fe)
                fsock = C.frontend_socket(fe)
                idle_attached = d.status()
                loops = {
                    **request_loops(rc, fsock, size, gmsg),
                    PP_C: lambda n: C.eventfd_pingpong(*efd["c"], n),
                    PP_PY: lambda n: C.eventfd_pingpong(*efd["py"], n),
                    PP_TRIO: lambda n: C.eventfd_pingpong(*efd["trio"], n),
                    PP_TRIO2: lambda n: C.eventfd_pingpong(*efd["trio2"], n),
                    SE_C: lambda n: C.socket_roundtrips(sp["c"][0], gmsg, len(gmsg), n),
                    SE_PY: lambda n: C.socket_roundtrips(sp["py"][0], gmsg, len(gmsg), n),
                    SE_TRIO: lambda n: C.socket_roundtrips(sp["trio"][0], gmsg, len(gmsg), n),
                }
                # Warm up every path (imports, caches, the daemon's worker thread).
                for f in loops.values():
                    f(50)
                places = placements()
                pids = [d.pid] + [p.pid for p in echoes]
                samples = {(pl, k): [] for pl in places for k in loops}
                names, pnames = list(loops), list(places)
                try:
                    for r in range(rounds):
                        for pl in rotated(pnames, r):
                            place(places[pl], pids)
                            for k in rotated(names, r):
                                samples[(pl, k)] += loops[k](per_round)
                finally:
                    place(places["unpinned"], pids)
                after = d.status()
                daemon_stats = d.control("query-stats")
                fsock.close()
                return samples, idle_attached, after, daemon_stats
            samples, idle_attached, after, daemon_stats = in_session(d, body)
            res["daemon_pid_status_attached"] = idle_attached
            res["daemon_pid_status_after_load"] = after
            res["daemon_reported_latency_us"] = daemon_stats.get("latency_us")
    finally:
        for p in echoes:
            stop_process(p)
        for pair in efd.values():
            for fd in pair:
                os.close(fd)
        for ours, _ in sp.values():
            ours.close()
    res["samples_ns"] = {f"{k} [{pl}]": v for (pl, k), v in samples.items()}
    res["placements"] = {pl: {"measuring": sorted(a), "peer": sorted(b)} for pl, (a, b) in placements().items()}
    res["placement_note"] = PLACEMENT_NOTE
    res["summary"] = {pl: {} for pl in res["placements"]}
    for (pl, k), v in samples.items():
        res["summary"][pl][k] = lat_summary(v)
    res["rounds"], res["per_round"] = rounds, per_round
    checked = [pl for pl in res["summary"] if pl != "unpinned"] or ["unpinned"]
    for pl in checked:
        s = res["summary"][pl]
        base = s[PP_TRIO]
        others = ", ".join(f"{s[k]['p50_us']:.0f} µs {name}" for k, name in
                           ((PP_C, "C"), (PP_PY, "Python"), (PP_TRIO2, "Trio 2-task")))
        for kind in ("STATE", "PLUG (no prealloc)"):
            v = s[kind]
            run.target("3 round trip", f"{kind} p50 / Trio eventfd ping-pong p50 [{pl}]", v["p50_us"] / base["p50_us"],
                       2, "<=", "x", f"ping-pong p50 {base['p50_us']:.0f} µs; others: {others}")
            run.target("3 round trip", f"{kind} p50 [{pl}]", v["p50_us"], 100, "<=", " µs")
            run.target("3 round trip", f"{kind} p99 [{pl}]", v["p99_us"], 500, "<=", " µs",
                       f"same-run ping-pong p99: Trio {base['p99_us']:.0f} µs, C {s[PP_C]['p99_us']:.0f} µs")
        # Issue 13's targets: against the plain-Python floors (a blocking
        # eventfd ping-pong, a socket echo), both peers in separate processes.
        for kind, floor, ratio in (("STATE", PP_PY, 2), ("GET_CONFIG", SE_PY, 1.5)):
            v, f = s[kind], s[floor]
            run.target("13 vCPU path", f"{kind} p50 / {floor} p50 [{pl}]", v["p50_us"] / f["p50_us"], ratio, "<=", "x",
                       f"{v['p50_us']:.0f} µs vs {f['p50_us']:.0f} µs")
            run.target("13 vCPU path", f"{kind} p99 / {floor} p99 [{pl}]", v["p99_us"] / f["p99_us"], 4, "<=", "x",
                       f"{v['p99_us']:.0f} µs vs {f['p99_us']:.0f} µs")
        g = s["GET_CONFIG"]
        run.target("4 GET_CONFIG", f"GET_CONFIG p50 [{pl}]", g["p50_us"], 50, "<=", " µs",
                   f"{g['p50_us'] / s[SE_TRIO]['p50_us']:.1f}x the Trio socket echo, "
                   f"{g['p50_us'] / s[SE_PY]['p50_us']:.1f}x Python, {g['p50_us'] / s[SE_C]['p50_us']:.1f}x C; "
                   f"p99 {g['p99_us']:.0f} µs")
    return res


def footprint(run: Run, rt: dict | None) -> dict:
    """6. Idle footprint; uses the round-trip session's daemon if it ran."""
    res: dict = {"trio_sleeper": _trio_idle_rss()}
    if rt and "daemon_pid_status_attached" in rt:
        res["attached_idle"] = rt["daemon_pid_status_attached"]
        res["after_load"] = rt["daemon_pid_status_after_load"]
    else:
        with Daemon(region_size=GiB, requested_size=GiB) as d:
            res["attached_idle"] = in_session(d, lambda fe: (time.sleep(0.5), d.status())[1])
    worst = max(res["attached_idle"]["VmRSS"], res.get("after_load", {}).get("VmRSS", 0))
    run.target("6 footprint", "daemon RSS, one device attached (max of idle / after the round-trip runs)", worst / MiB,
               40, "<=", " MiB")
    return res


# --- 5. scale ----------------------------------------------------------------------


def scale(run: Run) -> dict:
    sizes = [GiB, TiB, 16 * TiB]
    starts = 2 if run.quick else 5
    n_state = 300 if run.quick else 2000
    n_ua = 30 if run.quick else 200
    reps_full = 1 if run.quick else 3
    h = run.helper
    # Start-up: interleaved over sizes, plus the interpreter's own start as the anchor.
    startup: dict[str, list[float]] = {"python -c pass": [], "python -c 'import vmemdev.cli.main, vmemdev.daemon.vhost_server'": []}
    for s in sizes:
        startup[_name(s)] = []
    for _ in range(starts):
        for cmd, key in ((["-c", "pass"], "python -c pass"),
                         (["-c", "import vmemdev.cli.main, vmemdev.daemon.vhost_server, vmemdev.daemon.control_server"],
                          "python -c 'import vmemdev.cli.main, vmemdev.daemon.vhost_server'")):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *cmd], check=True)
            startup[key].append(time.perf_counter() - t0)
        for s in sizes:
            d = Daemon(region_size=s, requested_size=GiB)
            startup[_name(s)].append(d.startup_s)
            d.stop()
    work, note = _fit_size(GiB)
    if note:
        run.notes.append("scale, UNPLUG_ALL with memory plugged: " + note)
    # All three regions at once (three daemons, three front-ends), measured in
    # rotating rounds so machine noise hits every size alike.
    rounds = 3 if run.quick else 10
    daemons = []
    try:
        for s in sizes:
            daemons.append(Daemon(region_size=s, requested_size=GiB))

        def body(fes):
            rcs = [C.RingClient(fe) for fe in fes]
            # One placement for every size (measuring thread and daemons on one CPU): across
            # vCPUs a wake-up costs several times more, and which one the scheduler picks
            # would otherwise decide the comparison (see the round-trip section).
            cpu = {min(os.sched_getaffinity(0))}
            allowed = os.sched_getaffinity(0)
            os.sched_setaffinity(0, cpu)
            for d in daemons:
                _pin(d.pid, cpu)
            try:
                return measure(fes, rcs)
            finally:
                os.sched_setaffinity(0, allowed)
                for d in daemons:
                    _pin(d.pid, allowed)

        def measure(fes, rcs):
            time.sleep(0.2)
            per = [{"region": s, "name": _name(s), "status_attached": d.status(), "state": [], "ua_empty": [],
                    "state_rounds": [], "ua_empty_rounds": [],
                    "raw_empty": [], "ua_1g": [], "raw_1g": []} for s, d in zip(sizes, daemons)]
            for rc in rcs:
                rc.ack(C.STATE, ADDR, REQ_BLOCKS)
            for r in range(rounds):
                order = list(range(len(sizes)))
                order = order[r % len(order):] + order[:r % len(order)]
                for i in order:
                    rc, fe, row, s = rcs[i], fes[i], per[i], sizes[i]
                    _gc_off()
                    try:
                        batch = [rc.ack(C.STATE, ADDR, REQ_BLOCKS) for _ in range(n_state // rounds)]
                    finally:
                        gc.enable()
                    row["state"] += batch
                    row["state_rounds"].append(median(batch))
                    batch = []
                    for j in range(max(1, n_ua // rounds)):
                        for kind in (("subject", "raw") if (r + j) % 2 == 0 else ("raw", "subject")):
                            if kind == "subject":
                                batch.append(rc.ack(C.UNPLUG_ALL))
                            else:
                                row["raw_empty"].append(h.punch(fe.ram.dimm_fd, 0, s))
                    row["ua_empty"] += batch
                    row["ua_empty_rounds"].append(median(batch))
                    if r < reps_full:
                        for kind in (("subject", "raw") if r % 2 == 0 else ("raw", "subject")):
                            populate_checked(h, _dimm_addr(fe), work)
                            if kind == "subject":
                                _plug_all(rc, work)
                                row["ua_1g"].append(rc.ack(C.UNPLUG_ALL))
                            else:
                                row["raw_1g"].append(h.punch(fe.ram.dimm_fd, 0, s))
                            _assert_alloc(fe, 0, "after UNPLUG_ALL")
            out = []
            for row, d in zip(per, daemons):
                out.append({"region": row["region"], "name": row["name"], "status_attached": row["status_attached"],
                            "status_after": d.status(), "state_64_blocks": lat_summary(row["state"]),
                            "unplug_all_empty": lat_summary(row["ua_empty"]),
                            "state_round_medians_us": [x / 1000 for x in row["state_rounds"]],
                            "unplug_all_empty_round_medians_us": [x / 1000 for x in row["ua_empty_rounds"]],
                            "raw_punch_region_empty": lat_summary(row["raw_empty"]),
                            "unplug_all_1g": lat_summary(row["ua_1g"]),
                            "raw_punch_region_1g": lat_summary(row["raw_1g"])})
            return out

        rows = in_sessions(daemons, body)
    finally:
        for d in daemons:
            d.stop()
    res = {"startup_s": {k: median(v) for k, v in startup.items()}, "startup_samples_s": startup, "rows": rows,
           "work": work,
           "notes": "region = a sparse memfd DIMM of that size; requested 1 GiB; UNPLUG_ALL punches the whole "
                    "region in one call (as the daemon does), the raw baseline makes the same call from C; "
                    f"'plugged' = {_name(work)} plugged and populated first; the three daemons run side by side, "
                    "measured in rotating rounds, with the measuring thread and the daemons pinned to one CPU"}
    base = rows[0]
    def per_round(r, key):  # median over rounds of (this size / 1 GiB), both measured in the same round
        return median([a / b for a, b in zip(r[key], base[key])])

    for r in rows[1:]:
        run.target("5 scale", f"STATE p50 at {r['name']} / at 1 GiB (median of per-round ratios)",
                   per_round(r, "state_round_medians_us"), 1.5, "<=", "x", "cost must not grow with the region")
        run.target("5 scale", f"UNPLUG_ALL, nothing plugged, at {r['name']} / at 1 GiB (median of per-round ratios)",
                   per_round(r, "unplug_all_empty_round_medians_us"), 1.5, "<=", "x",
                   "the kernel's work is the same (see the raw punch columns)")
        g = r["unplug_all_1g"]["p50_us"] / base["unplug_all_1g"]["p50_us"]
        run.target("5 scale", f"UNPLUG_ALL, {_name(work)} plugged, at {r['name']} / at 1 GiB", g, 1.5, "<=", "x",
                   "the kernel's work is the same (see the raw punch columns)")
        g = r["status_attached"]["VmRSS"] / base["status_attached"]["VmRSS"]
        run.target("5 scale", f"daemon RSS at {r['name']} / at 1 GiB", g, 1.5, "<=", "x")
        pairs = [a / b for a, b in zip(startup[r["name"]], startup[_name(GiB)])]
        run.target("5 scale", f"start-up at {r['name']} / at 1 GiB (median of per-round ratios)", median(pairs),
                   1.5, "<=", "x")
    return res


def _name(size: int) -> str:
    for unit, n in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB)):
        if size >= n and size % n == 0:
            return f"{size // n} {unit}"
    return str(size)


# --- 7. real guest ---------------------------------------------------------------


def e2e(run: Run) -> dict:
    root = Path(__file__).resolve().parent.parent
    found = sorted(set(glob.glob(str(root / "tests" / "e2e" / "**" / "*timings*.json"), recursive=True)
                       + glob.glob("/tmp/vmemdev-guestlab/**/*timings*.json", recursive=True)),
                   key=os.path.getmtime, reverse=True)
    if not found:
        return {"status": "not run", "searched": ["tests/e2e/**/*timings*.json", "/tmp/vmemdev-guestlab/**/*timings*.json"]}
    path = found[0]
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        return {"status": f"unreadable: {exc}", "path": path}
    return {"status": "found", "path": path, "mtime": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                    time.localtime(os.path.getmtime(path))),
            "data": data}

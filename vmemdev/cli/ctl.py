"""``vmemdev ctl``: the operator's side of the control socket.

Human-readable output by default, ``--json`` for scripts. Exit status: 0 on
success, 1 when the daemon refused the command or a wait failed, 2 on usage
errors.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

from ..client import Client, ControlError
from ..errors import VmemdevError
from ..protocol.control import LIMIT_NAMES
from ..sizes import format_size

RUN_DIR = "/run/vmemdev"


def find_control_socket(explicit: str | None) -> str:
    """--control-socket, $VMEMDEV_CONTROL_SOCKET, or the only *.ctl in /run/vmemdev."""
    if explicit:
        return explicit
    if os.environ.get("VMEMDEV_CONTROL_SOCKET"):
        return os.environ["VMEMDEV_CONTROL_SOCKET"]
    found = sorted(glob.glob(os.path.join(RUN_DIR, "*.ctl")))
    if len(found) == 1:
        return found[0]
    if not found:
        raise VmemdevError(f"no control socket in {RUN_DIR}: give --control-socket PATH")
    raise VmemdevError(f"several daemons ({', '.join(found)}): give --control-socket PATH")


def size_or_dash(n) -> str:
    return "-" if n is None else format_size(n)


def limit_value(value: int | None) -> str:
    return "max" if value is None else format_size(value)


def human_status(s: dict) -> str:
    g = s["geometry"]
    lim = s["limits"]
    lines = [
        f"region      {g['addr']:#x} + {format_size(g['region_size'])}, block {format_size(g['block_size'])}, node {g['node_id']}",
        f"plugged     {format_size(s['plugged_size'])}",
        f"requested   {format_size(s['requested_size'])}",
        f"usable      {format_size(s['usable_region_size'])}",
        f"front-end   {s['frontend']}{'' if s['backed'] or s['frontend'] != 'attached' else ' (device region NOT shared: plugs answer BUSY)'}",
        f"host alloc  {size_or_dash(s['host_allocated'])}",
        "limits      " + ", ".join(f"{name} {limit_value(lim[name])}" for name in LIMIT_NAMES),
    ]
    lines += human_memmap(s["memmap"], s["hot_add_failures"])
    if s.get("cgroup"):
        lines.append(f"cgroup      {s['cgroup']}")
    if s.get("prealloc"):
        lines.append("prealloc    on")
    return "\n".join(lines)


ONLINING = {
    "movable": "movable (no memmap appeared in the region as blocks were added)",
    "kernel": "kernel zone (2M of memmap appeared in the region per block added)",
    "movable-so-far": ("movable so far (no memmap appeared in the region yet, but an auto-movable guest "
                       "onlines its first ~3 x boot memory movable too: no ceiling yet)"),
    "mixed": "mixed, as auto-movable does (memmap in the region for some blocks)",
    "unknown": "unknown (too few memory blocks added since the guest's driver probed)",
}


def human_memmap(m: dict, failures: dict) -> list[str]:
    lines = [
        f"onlining    {ONLINING.get(m['onlining'], m['onlining'])}, inferred",
        f"memmap      {format_size(m['memmap_bytes'])} for {m['linux_memory_blocks_used']} memory blocks: "
        f"{format_size(m['held_in_region'])} held in the region (measured), "
        f"{format_size(m['charged_to_boot_memory'])} charged to boot memory (estimated)",
    ]
    if m["ceiling"] is None:
        lines.append("ceiling     - (no front-end: boot memory unknown)")
    else:
        reserve = f"{format_size(m['reserve'])}{' (default)' if m['reserve_default'] else ''}"
        lines.append(f"ceiling     {format_size(m['ceiling'])} = 64 x (boot {format_size(m['boot_memory'])} "
                     f"- reserve {reserve}), "
                     + ("enforced: the guest onlines movable" if m["applies"]
                        else "not enforced: only for a guest seen onlining movable"))
    p = m.get("protection")
    if p is not None:
        lines.append("protection  " + ("forced past the ceiling by the operator; " if m.get("forced") else "")
                     + (f"rescue on (margin {format_size(p['rescue_margin'])})" if p["rescue"] else "rescue off")
                     + f", {p['caps']} cap(s), {p['rescues']} rescue(s)")
        if p["last"]:
            lines.append(f"            last {p['last']['action']}: {p['last']['reason']}")
    last = failures["last"]
    if last:
        lines.append(f"hot-add     {failures['total']} failed ({failures['count']} since the last resize), "
                     f"last {last['addr']:#x}+{format_size(last['size'])}: the guest could not add it")
    return lines


def human_stats(s: dict) -> str:
    lines = ["requests:"]
    for kind, outcomes in s["requests"].items():
        lines.append(f"  {kind:<11}" + "  ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    if not s["requests"]:
        lines.append("  none yet")
    lat = s["latency_us"]
    lines.append(f"latency     p50 {lat['p50']} us, p99 {lat['p99']} us, max {lat['max']} us "
                 f"({lat['samples']} samples)")
    lines.append(f"discarded   {format_size(s['bytes_discarded'])}")
    lines.append(f"prealloc    {format_size(s['bytes_preallocated'])}")
    nacks = s["nacks_by_reason"]
    lines.append("NACKs       " + (", ".join(f"{k} {v}" for k, v in nacks.items()) or "none"))
    busy = s.get("busy_by_reason", {})
    lines.append("BUSY        " + (", ".join(f"{k} {v}" for k, v in busy.items()) or "none"))
    lines.append(f"hot-add     {s['hot_add_failures']} failed (memory blocks the guest plugged, "
                 "could not add, and rolled back)")
    return "\n".join(lines)


def human_accounting(a: dict) -> str:
    m = a["memmap"]
    lines = [
        f"plugged               {format_size(a['plugged_size'])}",
        f"host allocated        {size_or_dash(a['host_allocated'])}",
        f"allocated extents     {len(a['allocated_extents']) if a['allocated_extents'] is not None else '-'}",
        f"outside plugged       {size_or_dash(a['allocated_outside_plugged'])} (must be 0)",
        f"guest memmap          {format_size(m['memmap_bytes'])} for {m['linux_memory_blocks_used']} Linux memory blocks "
        f"(the guest gains all {format_size(m['guest_gain'])} it plugged)",
        f"  onlining            {m['onlining']} (inferred from the region's allocation as blocks were added)",
        f"  held in the region  {format_size(m['held_in_region'])} (measured)",
        f"  charged to boot     {format_size(m['charged_to_boot_memory'])} (estimated)",
    ]
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    if value is None:
        return "max"
    return format_size(value) if value % (1 << 20) == 0 else f"{value / (1 << 20):.1f}M"


def human_limits(lim: dict) -> str:
    out = [f"{name:<12} {limit_value(lim[name])}" for name in LIMIT_NAMES]
    if "cgroup" in lim:
        c = lim["cgroup"]
        binding = "" if c["limited_by"] in (None, c["path"]) else f", limited by {c['limited_by']}"
        out += [f"cgroup       {c['path']} (v{c['version']}{binding})",
                f"  limit                          {_mib(c['limit'])}",
                f"  usage (what the kernel checks) {_mib(c['usage'])}",
                f"  guest RAM not yet allocated    {_mib(c['committed'])} (plugged {_mib(c['unallocated_plugged'])}, "
                f"other {_mib(c['unallocated_other'])}, + kernel overhead)",
                f"  band                           {_mib(c['band'])}",
                f"  room for the next plug         {_mib(c['room'])}"]
    return "\n".join(out)


def human_event(e: dict) -> str:
    ts = time.strftime("%H:%M:%S", time.localtime(e["timestamp"]["seconds"]))
    data = " ".join(f"{k}={format_size(v) if isinstance(v, int) and k != 'nb_blocks' and not isinstance(v, bool) else v}"
                    for k, v in e["data"].items())
    return f"{ts}.{e['timestamp']['microseconds'] // 1000:03d} {e['event']} {data}".rstrip()


def progress_bar(plugged: int, requested: int, start: int, width: int = 30) -> str:
    span = abs(requested - start) or 1
    done = min(abs(plugged - start), span) / span
    filled = int(done * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {format_size(plugged)} -> {format_size(requested)}"


def wait_for_requested(client: Client, timeout: float, stall: float, out, failures_before: int = 0,
                       asked: int | None = None) -> int:
    """Follow plugged toward requested; 0 when reached, 1 with the reason otherwise
    (at once when the guest fails to add memory after ``failures_before``, or
    when the daemon's memmap protection lowered the size ``asked``)."""
    deadline = time.monotonic() + timeout
    status = client.execute("query-status")
    start = status["plugged_size"]
    last_change, last_plugged = time.monotonic(), start
    busy0 = client.execute("query-stats")["requests"]
    tty = out.isatty()
    while True:
        status = client.execute("query-status")
        plugged, requested = status["plugged_size"], status["requested_size"]
        if tty:
            out.write("\r" + progress_bar(plugged, requested, start))
            out.flush()
        protection = status["memmap"].get("protection") or {}
        lowered = (asked is not None and requested < asked
                   and (protection.get("last") or {}).get("requested") == requested)
        if plugged == requested and not lowered:
            out.write(("\n" if tty else "") + f"reached {format_size(requested)}\n")
            return 0
        now = time.monotonic()
        if plugged != last_plugged:
            last_plugged, last_change = plugged, now
        reason = None
        failures = status["hot_add_failures"]
        if failures["total"] > failures_before and failures["last"]:
            last = failures["last"]
            reason = (f"the guest plugged {last['addr']:#x}+{format_size(last['size'])} and rolled it back "
                      f"after {last['seconds'] * 1000:.0f} ms ({last['count']} time(s)): {last['cause']}")
            if (protection.get("last") or {}).get("action") == "rescue":
                reason += "; " + protection["last"]["reason"]
        elif lowered and plugged == requested:
            reason = protection["last"]["reason"]
        elif status["frontend"] != "attached":
            reason = "no front-end is attached"
        elif now - last_change > stall:
            stats = client.execute("query-stats")
            reason = f"the guest made no progress for {stall:.0f} s ({describe_refusals(busy0, stats)})"
        elif now > deadline:
            reason = f"timed out after {timeout:.0f} s"
        if reason:
            out.write(("\n" if tty else "") +
                      f"stopped at plugged {format_size(plugged)} of requested {format_size(requested)}: {reason}\n")
            return 1
        time.sleep(0.1)


def describe_refusals(before: dict, after: dict) -> str:
    parts = []
    for kind in ("PLUG", "UNPLUG", "UNPLUG_ALL"):
        a, b = after["requests"].get(kind, {}), before.get(kind, {})
        for outcome in ("NACK", "BUSY", "ERROR"):
            n = a.get(outcome, 0) - b.get(outcome, 0)
            if n:
                parts.append(f"{n} {kind} {outcome}")
    if after["nacks_by_reason"]:
        parts.append("NACK reasons: " + ", ".join(f"{k} {v}" for k, v in after["nacks_by_reason"].items()))
    if after.get("busy_by_reason"):
        parts.append("BUSY reasons: " + ", ".join(f"{k} {v}" for k, v in after["busy_by_reason"].items()))
    return "; ".join(parts) or "no requests refused: is the guest driver loaded and onlining memory?"


def _status_or_none(path: str) -> dict | None:
    try:
        with Client(path, timeout=5) as client:
            return client.execute("query-status")
    except (VmemdevError, OSError):
        return None


def wait_for_upgrade(path: str, started: float, timeout: float) -> dict:
    """The new process's status once it serves (its start time is after
    ``started``); raises VmemdevError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = _status_or_none(path)  # None: not listening yet, or the old process closing
        if status is not None and status["started"] > started:
            return status
        if time.monotonic() > deadline:
            raise VmemdevError(f"the upgraded daemon did not answer on {path} within {timeout:.0f} s: "
                               "see its log (journalctl -u vmemdev@NAME)")
        time.sleep(0.05)


def upgrade(client: Client, path: str, args) -> int:
    before = client.execute("query-status")
    t0 = time.monotonic()
    plan = client.execute("upgrade")
    said = f"pid {plan['pid']}: vmemdev {plan['from']} -> {plan['to']}, front-end {plan['frontend']}"
    if not args.wait:
        return _emit(args, plan, lambda p: "re-executing " + said)
    after = wait_for_upgrade(path, before["started"], args.timeout)
    result = {**plan, "seconds": round(time.monotonic() - t0, 3), "status": after}
    if after["pid"] != plan["pid"]:  # a crash-restart, not the execve we asked for
        print(f"vmemdev ctl: the daemon came back as pid {after['pid']}, not {plan['pid']}: it did not "
              "re-execute but was restarted (see its log)", file=sys.stderr)
        return 1
    return _emit(args, result, lambda r: f"upgraded in place, {said}: serving again after {r['seconds']:.2f} s")


def run(args) -> int:
    try:
        path = find_control_socket(args.control_socket)
        with Client(path) as client:
            if args.ctl_command == "upgrade":
                return upgrade(client, path, args)
            return _run(client, args)
    except ControlError as exc:
        print(f"vmemdev ctl: {exc.desc}", file=sys.stderr)
        return 1
    except VmemdevError as exc:
        print(f"vmemdev ctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _emit(args, value, human) -> int:
    print(json.dumps(value, indent=2) if args.json else human(value))
    return 0


def _run(client: Client, args) -> int:
    cmd = args.ctl_command
    if cmd == "status":
        return _emit(args, client.execute("query-status"), human_status)
    if cmd in ("limits", "get"):
        value = client.execute("query-limits")
        if cmd == "get" and args.name:
            value = {args.name: value[args.name]}
            return _emit(args, value, lambda v: f"{args.name} {size_or_dash(v[args.name]) if v[args.name] is not None else 'max'}")
        return _emit(args, value, human_limits)
    if cmd == "stats":
        return _emit(args, client.execute("query-stats"), human_stats)
    if cmd == "accounting":
        return _emit(args, client.execute("query-accounting"), human_accounting)
    if cmd == "set":
        value = client.execute("set-limit", name=args.name, value=args.value)
        return _emit(args, value, human_limits)
    if cmd == "reserve":
        value = client.execute("set-memmap-reserve", value=args.value)
        return _emit(args, value, lambda m: "\n".join(human_memmap(m, {"last": None})))
    if cmd == "rescue":
        value = client.execute("set-memmap-rescue", margin=args.margin)
        return _emit(args, value, lambda m: "\n".join(human_memmap(m, {"last": None})))
    if cmd == "resize":
        extra = {"force": True} if args.force else {}
        result = client.execute("resize", size=args.size, **extra)
        if not args.wait:
            return _emit(args, result, lambda r: f"requested {format_size(r['requested_size'])}"
                         + ("" if r["changed"] else " (unchanged)"))
        return wait_for_requested(client, args.timeout, args.stall, sys.stdout, result["hot_add_failures"],
                                  result["requested_size"])
    if cmd == "events":
        for event in client.execute("query-events"):
            print(json.dumps(event) if args.json else human_event(event), flush=True)
        client.sock.settimeout(None)  # following waits as long as it takes
        while args.follow:
            event = client.next_event()
            print(json.dumps(event) if args.json else human_event(event), flush=True)
        return 0
    raise AssertionError(cmd)

"""latest.md (tables), latest.json, and plots when matplotlib is installed."""

from __future__ import annotations

import json
import os

from .common import MiB


def _f(x, digits=2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != x:
            return "–"
        return f"{x:.{digits}f}"
    return str(x)


def _mib(b) -> str:
    return "–" if b is None else f"{b / MiB:.1f}"


def _table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(out)


def cdf_points(samples_ns: list[int], n: int = 200) -> list[float]:
    """n quantiles in µs (kept in the JSON instead of every sample)."""
    if not samples_ns:
        return []
    us = sorted(x / 1000 for x in samples_ns)
    return [us[min(len(us) - 1, int(i / (n - 1) * (len(us) - 1)))] for i in range(n)]


def markdown(result: dict) -> str:
    m = result["meta"]
    b = result["benchmarks"]
    L = [f"# vmemdev benchmarks ({'quick' if m['quick'] else 'full'} run)", "",
         f"- command: `{m['command']}`",
         f"- date: {m['date']}, duration {m['duration_s']:.0f} s, git {m['host'].get('git')}",
         f"- host: {m['host']['kernel']}, {m['host']['cpus']} CPUs, {m['host']['mem_total'] / 2**30:.1f} GiB RAM "
         f"({m['host']['mem_available'] / 2**30:.1f} available at start), swap {m['host']['swap_total'] // MiB} MiB, "
         f"Python {m['host']['python']}",
         f"- daemon: `{m.get('daemon')}` (a separate process; front-end and baselines in the bench process)",
         f"- load before: `{m['uptime_before']}`",
         f"- load after:  `{m['uptime_after']}`",
         "- method: every subject runs in the same process session as its baseline, interleaved "
         "(alternating order per repetition, rotating order per round for latencies); medians reported; "
         "throughput ratios are the median of per-pair ratios.", ""]
    for note in result.get("notes", []):
        L.append(f"- **note:** {note}")
    if result.get("errors"):
        L += ["", "## Crashed benchmarks", ""]
        L += [f"- **{k}**: `{v.splitlines()[-1] if v else v}`" for k, v in result["errors"].items()]
    L += ["", "## Targets", "",
          _table(["#", "measure", "value", "target", "met"],
                 [[t["bench"], t["what"], f"{_f(t['value'])}{t['unit']}", t["target"],
                   ("yes" if t["met"] else "**MISSED**") + (f" ({t['note']})" if t["note"] else "")]
                  for t in result["targets"]]), ""]

    if "unplug" in b:
        u = b["unplug"]
        L += ["## 1. Unplug throughput (populated memory, 64-block = 128 MiB requests)", "",
              f"Baseline: {u['baseline']}. Populated with {u['populate']} before each run (not timed). "
              "vmemdev time: from publishing the first request to reading the last used element.", "",
              _table(["size", "requests", "vmemdev GiB/s", "raw punch GiB/s", "ratio (median of pairs)",
                      "per-request p50 ms", "reps"],
                     [[f"{s['size'] / 2**30:g} GiB", s["requests"], s["vmemdev_gib_s_median"], s["raw_gib_s_median"],
                       s["ratio_median"], s["per_request"]["p50_us"] / 1000, s["reps"]] for s in u["sizes"]]), ""]
        c = u.get("curve")
        if c:
            L += [f"Request size vs throughput ({c['size'] / 2**30:g} GiB, raw = C punch in calls of the same size):", "",
                  _table(["blocks / request", "request", "vmemdev GiB/s", "raw GiB/s", "ratio (median of pairs)"],
                         [[r["blocks_per_request"], f"{r['request_bytes'] // MiB} MiB", r["vmemdev_gib_s"],
                           r["raw_gib_s"], r["ratio"]] for r in c["rows"]]), ""]
            if result.get("plots", {}).get("unplug_curve"):
                L += [f"![unplug throughput vs request size]({result['plots']['unplug_curve']})", ""]
    if "prealloc" in b:
        p = b["prealloc"]
        L += [f"## 2. Preallocating plug ({p['size'] / 2**30:g} GiB in {p['requests']} requests of 64 blocks)", "",
              f"Baseline: {p['baseline']}.", "",
              _table(["method", "GiB/s", "vmemdev / method"],
                     [[k, v, p["gib_s"]["vmemdev --prealloc"] / v] for k, v in p["gib_s"].items()]),
              "", f"Ratio vs fallocate(0) in the same ranges, median of {p['reps']} pairs: "
                  f"**{_f(p['ratio_median'])}**.", ""]
    if "roundtrip" in b:
        r = b["roundtrip"]
        summ = r["summary"]
        pls = list(summ)
        kinds = list(next(iter(summ.values())))
        L += ["## 3–4. Round trips (daemon in its own process, front-end in the bench process)", "",
              f"{r['rounds']} rounds × {r['per_round']} of each kind in each placement "
              f"(n = {r['rounds'] * r['per_round']} per cell), rotating order; the same waiting code on the "
              "measuring side for every row (poll on the call eventfd / socket, then a nonblocking read). "
              "Ring requests: publish → kick → used → call. The eventfd ping-pongs and socket echoes run "
              "between this process and a separate echo process: C (blocking read/write), plain Python "
              "(blocking), Trio with one task (wait_readable → read → write: the floor of the daemon's "
              "runtime, **the baseline of the 2× target**), and Trio with the daemon's two-task shape (a "
              "watcher task wakes a worker through an Event). GET_CONFIG and the socket echoes move 80 bytes "
              "each way (12-byte header + 68-byte payload).", "", r.get("placement_note", ""), "",
              _table(["request"] + [f"{pl} {q}" for pl in pls for q in ("p50 µs", "p99 µs")],
                     [[k] + [summ[pl][k][q] for pl in pls for q in ("p50_us", "p99_us")] for k in kinds]), ""]
        lat = r.get("daemon_reported_latency_us")
        if lat:
            L += [f"The daemon's own view (`vmemdev ctl stats`, service time inside the daemon, last "
                  f"{lat['samples']} requests): p50 {lat['p50']} µs, p99 {lat['p99']} µs.", ""]
        if result.get("plots", {}).get("latency_cdf"):
            L += [f"![round-trip latency CDF]({result['plots']['latency_cdf']})", ""]
    if "scale" in b:
        sc = b["scale"]
        L += ["## 5. Scale (sparse memfd regions)", "", sc["notes"] + ".", "",
              _table(["region", "start-up ms", "RSS MiB", "VmPTE KiB", "fds", "STATE(64) p50 µs",
                      "UNPLUG_ALL empty p50 µs", "raw punch of empty region µs", "UNPLUG_ALL plugged ms",
                      "raw punch plugged ms"],
                     [[row["name"], sc["startup_s"][row["name"]] * 1000, row["status_attached"]["VmRSS"] / MiB,
                       row["status_attached"].get("VmPTE", 0) / 1024, row["status_attached"]["fds"],
                       row["state_64_blocks"]["p50_us"], row["unplug_all_empty"]["p50_us"],
                       row["raw_punch_region_empty"]["p50_us"], row["unplug_all_1g"]["p50_us"] / 1000,
                       row["raw_punch_region_1g"]["p50_us"] / 1000] for row in sc["rows"]]), "",
              "Start-up anchors (same run): " + ", ".join(
                  f"`{k}` {v * 1000:.0f} ms" for k, v in sc["startup_s"].items() if k.startswith("python")) + ".",
              ""]
    if "footprint" in b:
        f = b["footprint"]
        rows = []
        for label, key in (("vmemdev, device attached, idle", "attached_idle"),
                           ("vmemdev, after the round-trip runs", "after_load"),
                           ("`python -c 'import trio; trio.run(trio.sleep_forever)'`", "trio_sleeper")):
            if key in f:
                st = f[key]
                rows.append([label, _mib(st.get("VmRSS")), _mib(st.get("RssAnon")), _mib(st.get("RssFile")),
                             _mib(st.get("RssShmem")), _mib(st.get("Pss")), st.get("fds"), st.get("Threads")])
        L += ["## 6. Idle footprint (1 GiB region, one front-end attached)", "",
              _table(["process", "RSS MiB", "anon", "file", "shmem", "PSS MiB", "fds", "threads"], rows), ""]
    L += ["## 7. Real guest, side by side (e2e tier)", ""]
    e = b.get("e2e", {"status": "not run"})
    if e.get("status") != "found":
        L += [f"**Not run** ({e.get('status')}): no `*timings*.json` under tests/e2e or /tmp/vmemdev-guestlab. "
              "Run the e2e tier (`./dev test -m e2e` with the guest lab) and re-run the bench.", ""]
    else:
        L += [f"From `{e['path']}` (written {e['mtime']}, by the e2e tier, not by this run):", ""]
        L += _e2e_table(e["data"])
    return "\n".join(L) + "\n"


def _e2e_table(data) -> list[str]:
    t = data.get("timings") if isinstance(data, dict) else None
    if isinstance(t, dict) and all(isinstance(v, dict) for v in t.values()):
        rows = []
        for scenario, metrics in t.items():
            for metric, vals in metrics.items():
                if isinstance(vals, dict):
                    v, q = vals.get("vmemdev"), vals.get("qemu")
                    ratio = v / q if isinstance(v, (int, float)) and isinstance(q, (int, float)) and q else None
                    rows.append([scenario, metric, v, q, ratio])
        if rows:
            rows = [[a, b, _f(v, 3), _f(q, 3), r] for a, b, v, q, r in rows]
            out = [_table(["scenario", "metric (s)", "vmemdev", "QEMU virtio-mem-pci", "ratio"], rows), ""]
            if data.get("notes"):
                out += ["Notes: " + "; ".join(map(str, data["notes"]))
                        if isinstance(data["notes"], list) else f"Notes: {data['notes']}", ""]
            return out
    return ["```json", json.dumps(data, indent=2)[:4000], "```", ""]


def plots(result: dict, samples: dict | None, out_dir: str, stem: str = "latest") -> dict:
    """PNG plots, or {} with a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result.setdefault("notes", []).append("no plots: matplotlib is not installed (pip install matplotlib)")
        return {}
    made = {}
    b = result["benchmarks"]
    curve = b.get("unplug", {}).get("curve")
    if curve and curve["rows"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        x = [r["request_bytes"] / MiB for r in curve["rows"]]
        ax.plot(x, [r["raw_gib_s"] for r in curve["rows"]], "o-", label="raw punch from C (same call sizes)")
        ax.plot(x, [r["vmemdev_gib_s"] for r in curve["rows"]], "s-", label="vmemdev UNPLUG through the vring")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("request size (MiB); the Linux driver sends 128 MiB")
        ax.set_ylabel("GiB/s (populated memfd)")
        ax.set_title(f"Unplug throughput vs request size ({curve['size'] / 2**30:g} GiB)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        name = f"{stem}-unplug-curve.png"
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        made["unplug_curve"] = name
    if samples:
        groups: dict[str, dict[str, list[int]]] = {}
        for key, v in samples.items():
            kind, _, place = key.rpartition(" [")
            groups.setdefault(place.rstrip("]"), {})[kind] = v
        kinds_all = list(dict.fromkeys(k for g in groups.values() for k in g))
        colors = {k: plt.get_cmap("tab20")(i % 20) for i, k in enumerate(kinds_all)}
        fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 5.8), sharey=True, squeeze=False)
        for ax, (place, kinds) in zip(axes[0], groups.items()):
            for k, v in kinds.items():
                if not v:
                    continue
                us = sorted(x / 1000 for x in v)
                ys = [(i + 1) / len(us) for i in range(len(us))]
                baseline = "ping-pong" in k or "echo" in k
                ax.plot(us, ys, "--" if baseline else "-", color=colors[k], label=k)
            ax.set_xscale("log")
            ax.set_xlabel("round trip (µs)")
            ax.set_title(f"{place} (p50 per kind in latest.md)")
            ax.grid(True, alpha=0.3, which="both")
        axes[0][0].set_ylabel("fraction of requests")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
        fig.suptitle("Round-trip latency CDF: vmemdev (solid) vs ping-pong / echo baselines (dashed)")
        fig.tight_layout(rect=(0, 0.14, 1, 1))
        name = f"{stem}-latency-cdf.png"
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        made["latency_cdf"] = name
    return made

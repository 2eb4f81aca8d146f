"""Loading recorded vhost-user conversations (tests/data/*.jsonl)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data"
QEMU_11_1_CAPTURE = DATA / "qemu-11.1.3-linux-7.2-virtio-mem.jsonl"  # QEMU vs a minimal backend
# QEMU 11.1.3 + Linux 7.2 against vmemdev itself (tests/e2e/record_capture.py).
VMEMDEV_CAPTURE = DATA / "vmemdev-qemu-11.1.3-linux-7.2.jsonl"
ALL_CAPTURES = (QEMU_11_1_CAPTURE, VMEMDEV_CAPTURE)


@dataclass(frozen=True)
class Captured:
    frontend: bool  # frontend->backend
    request: int
    flags: int
    payload: bytes
    nfds: int


def load(path: Path = QEMU_11_1_CAPTURE) -> list[Captured]:
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        if d.get("channel", "main") != "main":
            continue
        out.append(
            Captured(
                d["dir"] == "frontend->backend",
                d["request"],
                d["flags"],
                bytes.fromhex(d["payload"]),
                d["nfds"],
            )
        )
    return out

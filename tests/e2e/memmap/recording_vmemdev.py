#!/usr/bin/env python3
"""``vmemdev`` with every guest request it answers appended to a JSON-lines file.

    VMEMDEV_RECORD_REQUESTS=PATH recording_vmemdev.py serve ...

Used as ``VMEMDEV_E2E_BIN`` by record_sequences.py. One line per answered
request: ``t`` (monotonic seconds), ``type``, ``addr``, ``nb_blocks``,
``response``, ``requested_before`` (when the request arrived: the operator's
resizes happen between lines, the daemon's own cap or rescue within one),
the device's ``requested`` and ``plugged`` after it, and ``allocated``: the
device region's host allocation read right after it (what the memmap
observation samples; null when it cannot be read).
"""

from __future__ import annotations

import json
import os
import sys
import time

from vmemdev.cli.main import main
from vmemdev.protocol import virtio_mem as vm
from vmemdev.virtio_mem import device

OUT = open(os.environ["VMEMDEV_RECORD_REQUESTS"], "a", buffering=1, encoding="utf-8")
_begin, _finish = device.VirtioMem.begin, device.VirtioMem.finish


def _write(dev: device.VirtioMem, data: bytes, response: bytes, requested_before: int) -> None:
    if len(data) < vm.REQUEST_SIZE or not response:
        return
    req = vm.MemRequest.unpack(data)
    OUT.write(json.dumps({
        "t": round(time.monotonic(), 6), "type": vm.RequestType(req.type).name,
        "addr": req.addr, "nb_blocks": req.nb_blocks,
        "response": vm.ResponseType(response[0]).name, "requested_before": requested_before,
        "requested": dev.requested_size, "plugged": dev.plugged_size,
        "allocated": dev._region_allocated(),
    }) + "\n")


def begin(self, data, writable):
    before = self.requested_size
    step = _begin(self, data, writable)
    if isinstance(step, bytes):
        _write(self, data, step, before)
    else:
        step.recorded_request = (data, before)  # type: ignore[attr-defined]
    return step


def finish(self, work, error):
    response = _finish(self, work, error)
    data, before = work.recorded_request
    _write(self, data, response, before)
    return response


device.VirtioMem.begin = begin  # type: ignore[method-assign]
device.VirtioMem.finish = finish  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())

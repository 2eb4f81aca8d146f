"""Recording a vhost-user conversation as JSON lines (``serve --trace-file``).

One object per message, in the format of tests/data/*.jsonl: ``dir``,
``request``, ``flags``, ``payload`` (hex, the bytes after the header),
``nfds``, ``t`` (seconds), and ``channel`` ("main" or "backend" for the
SET_BACKEND_REQ_FD socket). Guest memory contents are never recorded.
"""

from __future__ import annotations

import json
import time
from typing import TextIO


class Tracer:
    def __init__(self, stream: TextIO):
        self._stream = stream

    @classmethod
    def open(cls, path: str) -> Tracer:
        return cls(open(path, "a", buffering=1, encoding="utf-8"))

    def record(self, frontend: bool, request: int, flags: int, payload: bytes, nfds: int,
               channel: str = "main") -> None:
        self._stream.write(json.dumps({
            "dir": "frontend->backend" if frontend else "backend->frontend",
            "request": request,
            "flags": flags,
            "payload": payload.hex(),
            "nfds": nfds,
            "t": time.time(),
            "channel": channel,
        }) + "\n")

    def close(self) -> None:
        self._stream.close()

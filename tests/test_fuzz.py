"""The fuzz targets (fuzz/targets.py) under hypothesis, and a replay of the
coverage-guided corpus and of every crash ever found (fuzz/corpus, fuzz/crashes)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.targets import TARGETS

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
fuzz_settings = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.CRITICAL)  # every bad input is logged; not needed here
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("name", sorted(TARGETS))
@fuzz_settings
@given(data=st.binary(max_size=2048))
def test_target_random_bytes(name, data):
    TARGETS[name](data)


@fuzz_settings
@given(num=st.sampled_from([1, 2, 4, 8, 16, 32]), last=st.integers(0, 0xFFFF),
       avail_idx=st.integers(0, 0xFFFF), descs=st.lists(
           st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 7),
                     st.integers(0, 40)), max_size=32),
       heads=st.lists(st.integers(0, 40), max_size=32))
def test_virtqueue_structured(num, last, avail_idx, descs, heads):
    """Well-formed layouts with hostile values: near-valid addresses reach deeper code."""
    import struct

    from fuzz.targets import HIGH_GPA, RAM_SIZE, RING_GPA

    table = b""
    for addr, length, flags, nxt in (descs + [(0, 0, 0, 0)] * num)[:num]:
        # Half the addresses are steered into or around the regions.
        if addr % 2:
            addr = [RING_GPA, HIGH_GPA, RING_GPA + RAM_SIZE - 8, HIGH_GPA - 4][addr % 4] + (addr >> 60)
        table += struct.pack("<QIHH", addr, length % 64, flags, nxt)
    ring = struct.pack("<HH", 0, avail_idx) + b"".join(struct.pack("<H", h) for h in (heads + [0] * num)[:num])
    TARGETS["virtqueue"](bytes([num.bit_length() - 1]) + struct.pack("<H", last) + table + ring)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_saved_inputs_replay(name):
    """Every corpus input and every crash ever found still runs clean."""
    paths = [p for kind in ("corpus", "crashes") for p in sorted((FUZZ / kind / name).glob("*"))]
    assert paths, f"fuzz/corpus/{name} is empty: nothing to replay"
    for path in paths:
        TARGETS[name](path.read_bytes())


def test_readme_states_the_corpus_size():
    """The README's count of corpus inputs is the number of files in fuzz/corpus
    (it had drifted: 365 stated, 356 there). Fuzzing adds inputs: update the README."""
    readme = (FUZZ.parent / "README.md").read_text()
    stated = re.findall(r"the corpus \((\d+) inputs\)", readme)
    files = sum(1 for p in (FUZZ / "corpus").rglob("*") if p.is_file())
    assert len(stated) == 1, f"README.md should state the corpus size once as 'the corpus (N inputs)': {stated}"
    assert int(stated[0]) == files, f"README.md says the corpus has {stated[0]} inputs, fuzz/corpus has {files} files"


# --- the whole session: random message sequences through the real dispatcher ---------

import os  # noqa: E402
import socket  # noqa: E402

from vmemdev.daemon.runtime import DeviceRuntime  # noqa: E402
from vmemdev.daemon.vhost_wire import ConnectionClosed  # noqa: E402
from vmemdev.protocol import vhost_user as vu  # noqa: E402
from vmemdev.virtio_mem.model import Geometry  # noqa: E402

_KNOWN = [int(r) for r in vu.Request]
message = st.tuples(
    st.one_of(st.sampled_from(_KNOWN), st.integers(0, 60)),
    st.sampled_from([1, 9]),  # with and without NEED_REPLY
    st.one_of(st.binary(max_size=96),
              st.builds(lambda i, n: vu.encode_vring_state(i, n), st.integers(0, 3), st.integers(0, 70000)),
              st.builds(lambda v: vu.encode_u64(v), st.integers(0, 2**64 - 1))),
    st.lists(st.sampled_from(["eventfd", "memfd", "socket"]), max_size=3),
)


def _make_fd(kind: str) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "memfd":
        fd = os.memfd_create("fuzz")
        os.ftruncate(fd, 1 << 20)
        return fd
    a, b = socket.socketpair()
    a.close()
    return b.detach()


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=st.lists(message, max_size=25))
def test_random_message_sequences_never_escape_the_session(messages):
    """Any sequence: each message is answered, ignored, or ends that connection;
    never an unexpected exception, and every fd we sent is closed or kept by the session."""
    baseline = len(os.listdir("/proc/self/fd"))

    service = DeviceRuntime(Geometry(1 << 32, 1 << 30, 2 << 20), 256 << 20)
    ours, theirs = socket.socketpair()
    conn = service.connect(ours)
    try:
        for request, flags, payload, kinds in messages:
            fds = tuple(_make_fd(k) for k in kinds)
            try:
                with conn.lock:  # as the serving thread holds it
                    reply = conn._dispatch(request, flags, payload, fds)
            except ConnectionClosed:
                break
            assert reply is None or isinstance(reply, bytes)
    finally:
        conn.close()  # its socket and every fd it kept
        theirs.close()
    assert len(os.listdir("/proc/self/fd")) == baseline

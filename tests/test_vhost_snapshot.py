"""A connection's state taken from one engine and restored into a new one, as
a successor process would: the new engine serves the same guest RAM and ring,
resuming from the used index, with no handshake. Bad records are refused."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmemdev.host.memory import GuestMemory
from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.vhost_user import Request
from vmemdev.vhost.engine import MAX_MEM_SLOTS
from vmemdev.vhost.rings import RingState
from vmemdev.vhost.snapshot import EngineRecord, StateError, restore, snapshot

from .echo_device import EchoDevice
from .test_vhost_engine import Lab


@pytest.fixture
def lab():
    lab = Lab()
    yield lab
    lab.close()


def successor(lab: Lab, record: EngineRecord):
    """What a new process would build: its own memory, the kept region fds."""
    fds = [os.dup(r.fd) for r in lab.ram.regions]
    return restore(EchoDevice(), GuestMemory(MAX_MEM_SLOTS), EngineRecord.from_json(record.to_json()), fds)


def test_a_restored_engine_serves_the_same_ring_from_the_used_index(lab):
    lab.start()
    lab.post(b"one")
    assert lab.serve_all() == 1 and lab.ring.pop_used() is not None
    # A second request is taken, and the process dies before answering it.
    lab.post(b"two")
    taken = lab.engine.take(0, lab.device.max_request)
    assert taken is not None and taken.data == b"two"
    record = snapshot(lab.engine)
    engine = successor(lab, record)
    try:
        assert engine.features == lab.engine.features and engine.status == lab.engine.status
        assert engine.protocol_features == lab.engine.protocol_features and engine.owner
        assert engine.rings[0].state is RingState.RUNNING and engine.rings[0].ready
        again = engine.take(0, lab.device.max_request)
        assert again is not None and again.head == taken.head and again.data == b"two"
        engine.complete(again, b"answer")
        assert lab.ring.pop_used() == (taken.head, 6)
        assert engine.take(0, lab.device.max_request) is None  # nothing else pending
        # GET_CONFIG answers from the device as before.
        out = engine.handle(vu.decode(Request.GET_CONFIG, int(vu.Flags.VERSION),
                                      vu.encode_config(0, bytes(4)), ()))
        assert out.reply is not None
    finally:
        engine.close()


def test_a_stopped_ring_stays_stopped(lab):
    lab.configure_ring()  # addresses set, no kick fd: not started
    engine = successor(lab, snapshot(lab.engine))
    try:
        assert engine.rings[0].state is RingState.STOPPED and not engine.rings[0].ready
        assert engine.rings[0].num == lab.ring.num
    finally:
        engine.close()


def test_the_record_must_fit_the_kept_fds_and_the_device(lab):
    lab.start()
    record = snapshot(lab.engine)
    n = len(record.regions)
    with pytest.raises(StateError, match=f"{n} memory regions but 0 fds"):
        restore(EchoDevice(), GuestMemory(MAX_MEM_SLOTS), record, [])
    too_small = [os.memfd_create("too-small") for _ in range(n)]  # empty files: cannot map
    try:
        with pytest.raises(StateError, match="cannot be mapped again"):
            restore(EchoDevice(), GuestMemory(MAX_MEM_SLOTS), record, too_small)
    finally:
        for fd in too_small:
            os.close(fd)


VALID = EngineRecord(1, 2, True, 15, ((0, 1 << 20, 0x7000_0000_0000, 0),), ()).to_json()


@pytest.mark.parametrize("text, message", [
    (VALID[:-5], "invalid JSON"),
    ("[]", "expected an object"),
    (VALID.replace('"format": 1', '"format": 2'), "format 2; this version reads 1"),
    (VALID.replace('"status": 15', '"status": -1'), "status: -1 is not an integer"),
    (VALID.replace('"owner": true', '"owner": 1'), "owner: 1 is not true or false"),
    (VALID.replace('"rings": []', '"rings": [{"num": 8}]'), r"rings\[0\]: keys"),
    (VALID.replace(', "status": 15', ""), "keys"),
    (b"\xff\xfe", "invalid JSON"),
])
def test_bad_records_are_refused_with_the_reason(text, message):
    with pytest.raises(StateError, match=message):
        EngineRecord.from_json(text)


def test_a_ring_state_that_does_not_exist_is_refused():
    ring = {"num": 8, "addr": None, "state": "flying", "broken_reason": None}
    text = json.dumps({**json.loads(VALID), "rings": [ring]})
    with pytest.raises(StateError, match="'flying' is not one of"):
        EngineRecord.from_json(text)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       st.integers(0, len(VALID)), st.binary(max_size=8))
def test_mutated_records_give_a_record_or_a_state_error(noise, at, insert):
    for text in (noise, VALID.encode()[:at] + insert + VALID.encode()[at:]):
        try:
            EngineRecord.from_json(text)
        except StateError:
            pass

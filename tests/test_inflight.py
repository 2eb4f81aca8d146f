"""PATH.msg, the journal of the vhost-user message in flight, on a real
file: each step reads back as written, from another mapping (as a successor
reads it); a damaged journal is refused naming the file, never read as
"nothing in flight"."""

from __future__ import annotations

import os

import pytest

from vmemdev.daemon import inflight
from vmemdev.protocol import vhost_user as vu
from vmemdev.vhost.snapshot import StateError


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "vm0.state.msg")


def test_each_step_reads_back_from_another_mapping(path):
    writer = inflight.InFlight(path)
    reader = inflight.InFlight(path)
    assert reader.read() == (inflight.IDLE, 0, 0, b"")
    writer.applying()
    assert reader.read()[0] == inflight.APPLYING
    reply = vu.encode_reply(24, bytes(range(40)))
    writer.owed(24, 36, reply)
    assert reader.read() == (inflight.OWED, 24, 36, reply)
    writer.sending()
    assert reader.read()[0] == inflight.SENDING
    writer.idle()
    assert reader.read()[0] == inflight.IDLE
    writer.close()
    reader.close()


@pytest.mark.parametrize("offset, value, message", [
    (0, b"XXXXXXXX", "not a message journal"),
    (8, (9).to_bytes(4, "little"), "step 9 is not one of"),
    (inflight.HEAD.size + 3, b"\xff", "fails its crc"),
    (16, (1 << 20).to_bytes(4, "little"), "out of bounds"),
    (12, (23).to_bytes(4, "little"), "not one to request 23"),
])
def test_a_damaged_journal_is_refused_naming_it(path, offset, value, message):
    journal = inflight.InFlight(path)
    journal.owed(24, 36, vu.encode_reply(24, bytes(range(40))))
    journal.close()
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, value, offset)
    os.close(fd)
    with pytest.raises(StateError, match=f"{path}: .*{message}"):
        inflight.InFlight(path).read()


def test_a_journal_of_another_size_is_refused(path):
    with open(path, "wb") as f:
        f.write(b"\0" * 100)
    with pytest.raises(StateError, match=f"{path}: 100 bytes"):
        inflight.InFlight(path)

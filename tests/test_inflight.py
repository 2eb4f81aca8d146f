"""PATH.msg, the journal of the vhost-user message in flight, on a real
file: each step reads back as written, from another mapping (as a successor
reads it); a damaged journal is refused naming the file, never read as
"nothing in flight"."""

from __future__ import annotations

import os
import socket

import pytest

from vmemdev.daemon import inflight, vhost_wire
from vmemdev.host import native
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


def test_the_shim_and_the_journal_agree_on_the_steps():
    assert native.JOURNAL_STEPS == {"idle": inflight.IDLE, "reply owed": inflight.OWED,
                                    "sending": inflight.SENDING}


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 56, 68, 200, vu.MAX_PAYLOAD])
def test_the_shims_kept_reply_passes_zlibs_crc(path, size):
    """The shim computes the kept reply's crc32 itself; the reader checks it with zlib's."""
    writer = inflight.InFlight(path)
    reply = vu.encode_reply(24, bytes(i * 7 % 251 for i in range(size)))
    writer.owed(24, 80, reply)
    assert inflight.InFlight(path).read() == (inflight.OWED, 24, 80, reply)
    writer.close()


def _peeked(front: socket.socket, back: socket.socket, io, message: bytes) -> int:
    front.sendall(message)
    peeked = vhost_wire.peek_message(back, lambda: None, lambda: False, io)
    assert peeked is not None
    return peeked[4]


def test_the_message_path_steps_as_a_successor_reads_them(path):
    """finish_message's steps, one call each (as with the tests' crash
    points): the reply kept (a reader checks its crc), the message taken off
    the socket, "sending", the reply on its way; then a whole call."""
    writer = inflight.InFlight(path)
    reader = inflight.InFlight(path)
    front, back = socket.socketpair()
    back.setblocking(False)
    io = vhost_wire.message_io()
    config = vu.encode(vu.Request.GET_CONFIG, vu.encode_config(0, bytes(56)))
    reply = vu.encode_reply(vu.Request.GET_CONFIG, vu.encode_config(0, bytes(range(56))))
    length = _peeked(front, back, io, config)
    assert length == len(config)
    journal = writer.shim.pointer
    assert vhost_wire.finish_message(back, io, journal, 24, length, reply, lambda: None, native.MSG_KEEP) == 0
    assert reader.read() == (inflight.OWED, 24, length, reply)
    assert vhost_wire.head_message(back) == (24, length)  # still on the socket
    vhost_wire.finish_message(back, io, journal, 24, length, reply, lambda: None, native.MSG_CONSUME)
    assert vhost_wire.head_message(back) is None
    assert reader.read()[0] == inflight.OWED
    sent = vhost_wire.finish_message(back, io, journal, 24, length, reply, lambda: None, native.MSG_SEND)
    assert sent == len(reply) and reader.read()[0] == inflight.SENDING
    assert front.recv(4096) == reply
    # All steps in one call; then a message without a reply ends IDLE.
    length = _peeked(front, back, io, config)
    assert vhost_wire.finish_message(back, io, journal, 24, length, reply, lambda: None) == len(reply)
    assert reader.read()[0] == inflight.SENDING and front.recv(4096) == reply
    length = _peeked(front, back, io, vu.encode(vu.Request.SET_OWNER))
    assert vhost_wire.finish_message(back, io, journal, 3, length, b"", lambda: None) == 0
    assert reader.read()[0] == inflight.IDLE and vhost_wire.head_message(back) is None
    # Without a journal: the socket steps only.
    length = _peeked(front, back, io, config)
    assert vhost_wire.finish_message(back, io, None, 24, length, reply, lambda: None) == len(reply)
    assert front.recv(4096) == reply and reader.read()[0] == inflight.IDLE
    for closing in (writer, reader, front, back):
        closing.close()


def test_a_front_end_gone_mid_message_is_a_closed_connection():
    front, back = socket.socketpair()
    back.setblocking(False)
    io = vhost_wire.message_io()
    length = _peeked(front, back, io, vu.encode(vu.Request.GET_FEATURES))
    front.close()
    with pytest.raises(vhost_wire.ConnectionClosed, match="cannot answer the front-end"):
        vhost_wire.finish_message(back, io, None, 1, length, vu.encode_reply(1, bytes(8)), lambda: None)
    back.close()


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

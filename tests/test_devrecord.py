"""The state file and the device record (PATH, PATH.dev) on real files: every
save reads back as the model it was taken from; a save interrupted at any
byte reads back as the state before it or the state after it, never a mix;
truncated, corrupted, foreign, mismatched and wrong-geometry files are
refused with a StateError naming the file; the previous format still loads."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmemdev.daemon import devrecord, keeper
from vmemdev.vhost.snapshot import EngineRecord, StateError
from vmemdev.virtio_mem.model import Geometry, Plug, Unplug, UnplugAll, VirtioMemModel

MiB = 1 << 20
GiB = 1 << 30
A = 1 << 32
ENGINE = EngineRecord(1, 2, True, 15, ((0, 1 << 20, 0x7000_0000_0000, 0),), ())


class Stop(Exception):
    pass


def model(region: int = GiB, requested: int = 512 * MiB) -> VirtioMemModel:
    return VirtioMemModel(Geometry(A, region, 2 * MiB), requested)


def plug(m: VirtioMemModel, first: int, n: int) -> None:
    m.commit(Plug(first, n, m.block_addr(first), n * m.block_size))


def unplug(m: VirtioMemModel, first: int, n: int) -> None:
    m.commit(Unplug(first, n, m.block_addr(first), n * m.block_size))


def answer(i: int) -> tuple[int, int, bytes, bytes, int]:
    return (0, i, bytes([i % 256]) * 24, bytes([1]) * 10, i + 1)


def restored(path: str, geometry: Geometry | None = None) -> tuple[VirtioMemModel, keeper.SavedState]:
    state = keeper.load(path)
    m = VirtioMemModel(geometry or Geometry(A, GiB, 2 * MiB))
    m.restore(state.device)
    return m, state


def same(a: VirtioMemModel, b: VirtioMemModel) -> bool:
    return (a.bitmap.to_bytes(), a.requested_size, a.usable_region_size) == \
        (b.bitmap.to_bytes(), b.requested_size, b.usable_region_size)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "vm0.state")


def test_each_save_reads_back_as_the_model(path):
    m = model()
    k = keeper.ConnectionKeeper(path)
    k.save(ENGINE, m.to_record())
    steps = [lambda: plug(m, 0, 4), lambda: plug(m, 100, 64), lambda: unplug(m, 1, 2),
             lambda: m.set_requested_size(768 * MiB), lambda: plug(m, 300, 1), lambda: m.commit(UnplugAll(0)),
             lambda: plug(m, 511, 1)]
    for i, step in enumerate(steps):
        step()
        assert k.save_device(m.to_record(), answer(i))
        r, state = restored(path)
        assert same(r, m)
        assert state.answer == keeper.SavedAnswer(*answer(i))
        assert state.engine == ENGINE
    k.save(ENGINE, m.to_record())  # a message: the answer goes
    assert restored(path)[1].answer is None
    k.forget()
    assert not os.listdir(os.path.dirname(path))


def test_an_answer_that_changed_nothing_writes_nothing(path):
    m = model()
    k = keeper.ConnectionKeeper(path)
    m.set_requested_size(768 * MiB)
    m.set_requested_size(512 * MiB)  # usable stays at 1G until an UNPLUG_ALL
    k.save(ENGINE, m.to_record())
    dev = k.device_record
    assert dev is not None
    before = open(path + ".dev", "rb").read()
    assert dev.answer(m.to_record(), *answer(1)) is None  # a STATE
    m.set_requested_size(512 * MiB)  # the same size: no change
    assert dev.answer(m.to_record(), *answer(2)) is None
    assert open(path + ".dev", "rb").read() == before
    m.commit(UnplugAll(0))  # nothing plugged: no bitmap byte written, but usable shrinks
    assert m.usable_region_size == 768 * MiB
    assert dev.answer(m.to_record(), *answer(3)) is True
    r, state = restored(path)
    assert same(r, m) and state.answer == keeper.SavedAnswer(*answer(3))


def test_a_slot_torn_at_any_byte_reads_as_the_state_before(path, monkeypatch):
    """kill -9 while the payload is being copied: any prefix of it may be in
    the file, the crc is the old one. Read back, the state is the previous one."""
    m = model()
    k = keeper.ConnectionKeeper(path)
    k.save(ENGINE, m.to_record())
    plug(m, 0, 8)
    k.save_device(m.to_record(), answer(1))
    before = open(path + ".dev", "rb").read()
    expected = restored(path)[0]

    plug(m, 40, 3)
    dev = k.device_record
    assert dev is not None

    def stop(name: str) -> None:
        if name == "record-payload":
            raise Stop

    dev._crash = stop
    with pytest.raises(Stop):
        k.save_device(m.to_record(), answer(2))
    after = open(path + ".dev", "rb").read()
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    assert changed and max(changed) - min(changed) < devrecord.SLOT_SIZE
    lo, hi = min(changed), max(changed) + 1
    for cut in range(lo, hi + 1):  # the first (cut - lo) changed bytes written, in order
        torn = after[:cut] + before[cut:]
        with open(path + ".dev", "wb") as f:
            f.write(torn)
        r, state = restored(path)
        assert same(r, expected), cut
        assert state.answer == keeper.SavedAnswer(*answer(1))


def test_a_slot_complete_but_not_yet_copied_to_the_bitmap_reads_as_the_state_after(path):
    m = model()
    k = keeper.ConnectionKeeper(path)
    k.save(ENGINE, m.to_record())
    plug(m, 0, 8)
    k.save_device(m.to_record(), answer(1))
    unplug(m, 2, 4)

    def stop(name: str) -> None:
        if name == "record-crc":
            raise Stop

    assert k.device_record is not None
    k.device_record._crash = stop
    with pytest.raises(Stop):
        k.save_device(m.to_record(), answer(2))
    raw = open(path + ".dev", "rb").read()
    assert raw[devrecord.BITMAP_OFFSET] == 0xFF  # the file's bitmap is the old one
    r, state = restored(path)
    assert same(r, m) and r.bitmap.to_bytes()[0] == 0b11000011
    assert state.answer == keeper.SavedAnswer(*answer(2))


def test_an_unplug_all_of_a_large_region_saves_zeros_not_the_bitmap(path):
    m = model(16 << 40, 1 << 40)
    k = keeper.ConnectionKeeper(path)
    k.save(ENGINE, m.to_record())
    plug(m, 0, 65535)
    plug(m, 65535, 65535)
    plug(m, 8_000_000, 8)
    assert not k.save_device(m.to_record(), None)  # a window this large does not fit a slot: nothing saved,
    k.save(ENGINE, m.to_record())  # so the caller saves everything: PATH.dev anew, under the same id
    r, _ = restored(path, m.geometry)
    assert same(r, m) and r.plugged_size == (2 * 65535 + 8) * 2 * MiB
    m.commit(UnplugAll(m.plugged_size))
    k.save_device(m.to_record(), answer(3))
    r, state = restored(path, m.geometry)
    assert same(r, m) and r.plugged_size == 0 and state.answer is not None


def test_a_successor_keeps_the_pairing_and_the_pending_answer(path):
    m = model()
    k = keeper.ConnectionKeeper(path)
    k.save(ENGINE, m.to_record())
    plug(m, 0, 4)
    k.save_device(m.to_record(), answer(7))
    ident = json.load(open(path))["device"]["id"]
    r, state = restored(path)
    successor = keeper.ConnectionKeeper(path)
    successor.save(ENGINE, r.to_record(), state.answer)  # what a resumed connection does first
    assert json.load(open(path))["device"]["id"] == ident
    r2, state2 = restored(path)
    assert same(r2, m) and state2.answer == keeper.SavedAnswer(*answer(7))


def test_the_previous_format_still_loads(path):
    m = model()
    plug(m, 3, 5)
    saved = keeper.SavedAnswer(*answer(4))
    with open(path, "w") as f:
        json.dump({"format": 1, "engine": ENGINE.to_obj(),
                   "device": {"requested_size": m.requested_size, "usable_region_size": m.usable_region_size,
                              "bitmap": m.bitmap.to_bytes().hex()},
                   "answer": saved.to_json()}, f)
    r, state = restored(path)
    assert same(r, m) and state.answer == saved
    # A successor of the new version writes its own format, keeping the answer.
    k = keeper.ConnectionKeeper(path)
    k.save(ENGINE, r.to_record(), state.answer)
    assert json.load(open(path))["format"] == keeper.FORMAT
    r2, state2 = restored(path)
    assert same(r2, m) and state2.answer == saved


def _saved(path: str) -> VirtioMemModel:
    m = model()
    k = keeper.ConnectionKeeper(path)
    k.save(ENGINE, m.to_record())
    plug(m, 0, 4)
    k.save_device(m.to_record(), answer(1))
    return m


def _rewrite(path: str, edit) -> None:
    raw = bytearray(open(path, "rb").read())
    raw = edit(raw)
    with open(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw[:100], "truncated"),
    (lambda raw: raw[:-1], "truncated or padded"),
    (lambda raw: raw + b"\0", "truncated or padded"),
    (lambda raw: b"x" + raw[1:], "bad magic"),
    (lambda raw: raw[:20] + b"\x09" + raw[21:], "header checksum"),
    (lambda raw: bytes(len(raw)), "bad magic"),
])
def test_a_damaged_device_record_is_refused_naming_it(path, edit, message):
    _saved(path)
    _rewrite(path + ".dev", edit)
    with pytest.raises(StateError, match=message) as info:
        keeper.load(path)
    assert str(info.value).startswith(path + ".dev: ")


def test_a_record_with_no_valid_slot_is_refused(path):
    _saved(path)
    for slot in range(devrecord.SLOTS):
        offset = devrecord.HEADER_SIZE + slot * devrecord.SLOT_SIZE + 10
        _rewrite(path + ".dev", lambda raw, o=offset: raw[:o] + bytes([raw[o] ^ 0xFF]) + raw[o + 1:])
    with pytest.raises(StateError, match="no valid record in either slot"):
        keeper.load(path)


def test_a_record_of_another_connection_is_refused(path, tmp_path):
    _saved(path)
    other = str(tmp_path / "other.state")
    _saved(other)
    os.replace(other + ".dev", path + ".dev")
    with pytest.raises(StateError, match="belongs to another connection"):
        keeper.load(path)


def test_the_state_must_name_its_own_record(path):
    _saved(path)
    raw = json.load(open(path))
    raw["device"]["file"] = "../elsewhere.dev"
    json.dump(raw, open(path, "w"))
    with pytest.raises(StateError, match=f"{path}: .*vm0.state.dev"):
        keeper.load(path)


def test_a_missing_record_is_refused(path):
    _saved(path)
    os.unlink(path + ".dev")
    with pytest.raises(StateError, match=f"{path}.dev: cannot read"):
        keeper.load(path)


def test_a_record_of_another_geometry_is_refused(path):
    _saved(path)
    state = keeper.load(path)
    other = VirtioMemModel(Geometry(A, GiB, 4 * MiB))  # another block size
    with pytest.raises(ValueError, match="saved for region 0x100000000 \\+ 1G, block 2M"):
        other.restore(state.device)
    bigger = VirtioMemModel(Geometry(A, 2 * GiB, 2 * MiB))
    with pytest.raises(ValueError, match="saved for region"):
        bigger.restore(state.device)


_VALID: dict[str, bytes] = {}


def _valid(tmp_path_factory) -> tuple[bytes, bytes]:
    if not _VALID:
        path = str(tmp_path_factory.mktemp("valid") / "vm0.state")
        m = _saved(path)
        k = keeper.ConnectionKeeper(path)
        k.save(ENGINE, m.to_record())
        plug(m, 9, 2)
        k.save_device(m.to_record(), answer(2))
        _VALID["json"] = open(path, "rb").read()
        _VALID["dev"] = open(path + ".dev", "rb").read()
    return _VALID["json"], _VALID["dev"]


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_mutated_device_records_give_a_state_or_a_state_error(tmp_path_factory, data):
    """Whatever the bytes, the result is a state this geometry can take (or
    refuses with ValueError), or a StateError: never another exception."""
    text, dev = _valid(tmp_path_factory)
    where = data.draw(st.sampled_from(["header", "slots", "bitmap", "anywhere"]))
    bounds = {"header": (0, 80), "slots": (devrecord.HEADER_SIZE, devrecord.BITMAP_OFFSET),
              "bitmap": (devrecord.BITMAP_OFFSET, len(dev)), "anywhere": (0, len(dev))}[where]
    at = data.draw(st.integers(*bounds))
    insert = data.draw(st.binary(max_size=8))
    cut = data.draw(st.booleans())
    mutated = dev[:at] + insert + dev[at + (len(insert) if cut else 0):]
    directory = tmp_path_factory.mktemp("fuzz")
    path = str(directory / "vm0.state")
    open(path, "wb").write(text)
    open(path + ".dev", "wb").write(mutated)
    try:
        state = keeper.load(path)
    except StateError:
        return
    m = VirtioMemModel(Geometry(A, GiB, 2 * MiB))
    try:
        m.restore(state.device)
    except ValueError:
        pass


def test_a_format_2_state_finds_its_fds_under_the_roles_names():
    """Before format 3 the fd store entries carried the roles' names, those
    of one file joined ("mem0+mem1"); a successor of that release finds
    them so, and refuses a state whose entries are not all kept."""
    state = keeper.SavedState(ENGINE, {}, None)
    store = {"vhost-user": 3, "conn": 4, "mem0+mem1": 5, "kick0": 6, "backend": 7}
    assert state.entry_names(store) == {"conn": "conn", "mem0": "mem0+mem1", "mem1": "mem0+mem1",
                                        "kick0": "kick0", "backend": "backend"}
    named = keeper.SavedState(ENGINE, {}, None, fdnames={"conn": "conn", "mem0": "mem0@4", "kick0": "kick0@2"})
    with pytest.raises(StateError, match="the fd store lacks kick0@2, mem0@4"):
        named.entry_names(store)

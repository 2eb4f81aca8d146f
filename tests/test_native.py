"""The native façade against real memfds: st_blocks and SEEK_DATA are the truth."""

import errno
import mmap
import os
from pathlib import Path

import pytest

from vmemdev.errors import NativeError
from vmemdev.host import native
from vmemdev.host.interface import Backing
from vmemdev.host.system import SystemHost

PAGE = mmap.PAGESIZE
B = 2 << 20  # virtio-mem block size; exact counts even if shmem uses THP
NBLOCKS = 8
SIZE = NBLOCKS * B


def _shmem_uses_small_pages() -> bool:
    """Page-granular allocation counts are exact only without shmem THP."""
    base = Path("/sys/kernel/mm/transparent_hugepage")

    def selected(p: Path) -> str:
        return p.read_text().split("[")[1].split("]")[0]

    try:
        top = selected(base / "shmem_enabled")
        sizes = [selected(p) for p in base.glob("hugepages-*/shmem_enabled")]
    except (OSError, IndexError):
        return True  # no THP support at all
    return top in ("never", "deny", "advise") and all(
        s in ("never", "inherit", "advise") for s in sizes
    )


small_pages = pytest.mark.skipif(
    not _shmem_uses_small_pages(), reason="shmem THP makes allocation coarser than a page"
)


@pytest.fixture
def fd():
    fd = os.memfd_create("vmemdev-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


@pytest.fixture
def mem(fd):
    m = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    yield m
    m.close()  # also proves no buffer export was left behind


@pytest.fixture
def addr(mem):
    return native.buffer_address(mem)


def touch(mem, offset, length):
    mem[offset : offset + length] = b"\x5a" * length


def test_touch_allocates_and_extents_match(fd, mem):
    assert native.allocated_bytes(fd) == 0
    assert native.data_extents(fd) == []
    touch(mem, B, B)
    touch(mem, 4 * B, 2 * B)
    assert native.allocated_bytes(fd) == 3 * B
    assert native.data_extents(fd) == [(B, B), (4 * B, 2 * B)]


def test_punch_hole_frees_exactly_the_range(fd, mem):
    touch(mem, 0, SIZE)
    assert native.allocated_bytes(fd) == SIZE
    native.punch_hole(fd, 2 * B, B)
    assert native.allocated_bytes(fd) == SIZE - B
    assert native.data_extents(fd) == [(0, 2 * B), (3 * B, SIZE - 3 * B)]
    assert os.fstat(fd).st_size == SIZE  # KEEP_SIZE
    # read(), not the mapping: a read fault on a shmem hole allocates a page.
    assert os.pread(fd, B, 2 * B) == bytes(B)
    native.punch_hole(fd, 0, 0)  # zero length: no-op
    assert native.allocated_bytes(fd) == SIZE - B


def test_data_extents_clips_to_window(fd, mem):
    touch(mem, 0, 3 * B)
    assert native.data_extents(fd, B // 2, B + B // 2) == [(B // 2, B)]
    assert native.data_extents(fd, 4 * B) == []
    assert native.data_extents(fd, B, B) == []
    assert native.data_extents(fd, 0, 100 * SIZE) == [(0, 3 * B)]  # past EOF is fine


@small_pages
def test_data_extents_grows_its_buffer(fd, mem):
    # 300 one-page extents: more than the first buffer holds.
    for i in range(300):
        touch(mem, 2 * i * PAGE, PAGE)
    assert native.data_extents(fd) == [(2 * i * PAGE, PAGE) for i in range(300)]


def test_punch_ranges_merges_adjacent_blocks(fd, mem):
    touch(mem, 0, SIZE)
    # blocks 1..5 adjacent (one merged punch) and block 7 alone
    native.punch_ranges(fd, ((i * B, B) for i in (1, 2, 3, 4, 5, 7)))
    assert native.allocated_bytes(fd) == 2 * B
    assert native.data_extents(fd) == [(0, B), (6 * B, B)]
    native.punch_ranges(fd, [])  # nothing to do


@small_pages
def test_punch_ranges_page_granular(fd, mem):
    touch(mem, 0, 2 * B)
    native.punch_ranges(fd, [(B + i * PAGE, PAGE) for i in range(256)])  # 1 MiB
    assert native.allocated_bytes(fd) == 2 * B - (1 << 20)
    assert native.data_extents(fd) == [(0, B), (B + (1 << 20), B - (1 << 20))]


def test_punch_ranges_checks_every_range_before_punching(fd, mem):
    touch(mem, 0, SIZE)
    with pytest.raises(ValueError):
        native.punch_ranges(fd, [(0, B), (-1, B)])
    with pytest.raises(ValueError):
        native.punch_ranges(fd, [(0, B), (2**63 - 1, 1)])
    assert native.allocated_bytes(fd) == SIZE


def test_madv_remove_frees_but_dontneed_does_not(fd, mem, addr):
    touch(mem, 0, SIZE)
    # Regression guard: DONTNEED on a shared mapping only drops our PTEs.
    mem.madvise(mmap.MADV_DONTNEED, 0, 2 * B)
    assert native.allocated_bytes(fd) == SIZE
    assert mem[0:PAGE] == b"\x5a" * PAGE  # data still there
    native.madv_remove(addr + B, 2 * B)
    assert native.allocated_bytes(fd) == SIZE - 2 * B
    assert native.data_extents(fd) == [(0, B), (3 * B, SIZE - 3 * B)]
    assert os.pread(fd, 2 * B, B) == bytes(2 * B)


def test_populate_write_allocates_the_length(fd, addr):
    native.populate_write(addr + B, 3 * B)
    assert native.allocated_bytes(fd) == 3 * B
    assert native.data_extents(fd) == [(B, 3 * B)]
    assert native.resident_pages(addr, SIZE) == 3 * B // PAGE


def test_fallocate_allocates_the_length(fd, mem):
    native.fallocate(fd, 2 * B, 2 * B)
    assert native.allocated_bytes(fd) == 2 * B
    # shmem keeps fallocated pages !uptodate until first touch, and SEEK_DATA
    # counts those as holes: extents only show what was written or faulted.
    assert native.data_extents(fd) == []
    touch(mem, 2 * B, B)
    assert native.data_extents(fd) == [(2 * B, B)]
    assert native.allocated_bytes(fd) == 2 * B


def test_resident_pages_follows_the_file(fd, mem, addr):
    assert native.resident_pages(addr, SIZE) == 0
    touch(mem, 0, 2 * B)
    assert native.resident_pages(addr, SIZE) == 2 * B // PAGE
    native.punch_hole(fd, 0, B)
    assert native.resident_pages(addr, SIZE) == B // PAGE
    assert native.resident_pages(addr, 1) <= 1  # partial page rounds up


def test_buffer_address_leaves_no_export(fd):
    m = mmap.mmap(fd, SIZE)
    a = native.buffer_address(m)
    assert a % PAGE == 0
    m.close()  # BufferError if the export had been kept
    with pytest.raises(BufferError):
        native.buffer_address(b"read-only")


@pytest.mark.parametrize(
    "call",
    [
        lambda fd: native.punch_hole(fd, 0, B),
        lambda fd: native.punch_ranges(fd, [(0, B), (B, B)]),
        lambda fd: native.fallocate(fd, 0, B),
        lambda fd: native.allocated_bytes(fd),
        lambda fd: native.data_extents(fd),
    ],
)
def test_bad_fd_is_ebadf(call):
    with pytest.raises(NativeError) as info:
        call(-1)
    assert info.value.errno == errno.EBADF


def test_punch_ranges_failure_reports_progress_and_range():
    with pytest.raises(NativeError) as info:
        native.punch_ranges(-1, [(B, B), (2 * B, B), (5 * B, B)])
    assert (info.value.done, info.value.offset, info.value.length) == (0, B, 2 * B)


def test_misaligned_address_ranges_are_rejected(addr):
    for call in (native.madv_remove, native.populate_write, native.resident_pages):
        with pytest.raises(ValueError):
            call(addr + 1, PAGE)
    with pytest.raises(ValueError):  # would free a whole page the caller did not name
        native.madv_remove(addr, PAGE + 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda fd, a: native.punch_hole(fd, 2**63 - 1, 2),
        lambda fd, a: native.fallocate(fd, 2**63, 0),
        lambda fd, a: native.punch_hole(fd, -PAGE, PAGE),
        lambda fd, a: native.madv_remove(2**64 - PAGE, 2 * PAGE),
        lambda fd, a: native.populate_write(a, -1),
        lambda fd, a: native.data_extents(fd, 2 * B, B),
    ],
)
def test_bad_ranges_are_value_errors(fd, addr, call):
    with pytest.raises(ValueError):
        call(fd, addr)


def test_wrong_types_are_type_errors(fd):
    with pytest.raises(TypeError):
        native.punch_hole(fd, 0.0, B)


def test_inject_fault_fails_count_times_then_clears(fd, mem):
    touch(mem, 0, SIZE)
    with native.inject_fault("punch", errno.EIO, count=2):
        for _ in range(2):
            with pytest.raises(NativeError) as info:
                native.punch_hole(fd, B, B)
            e = info.value
            assert (e.op, e.errno, e.offset, e.length) == ("punch", errno.EIO, B, B)
        assert native.allocated_bytes(fd) == SIZE  # nothing was punched
        native.punch_hole(fd, B, B)  # consumed: the third call works
    assert native.allocated_bytes(fd) == SIZE - B


def test_inject_fault_is_removed_on_exit(fd):
    with native.inject_fault("fallocate", errno.ENOSPC, count=5):
        with pytest.raises(NativeError):
            native.fallocate(fd, 0, B)
    native.fallocate(fd, 0, B)
    with pytest.raises(ValueError), native.inject_fault("mmap", errno.EIO):
        pass


def test_inject_fault_on_punch_ranges_counts_one_call(fd, mem):
    touch(mem, 0, SIZE)
    with native.inject_fault("punch", errno.ENOMEM):
        with pytest.raises(NativeError) as info:
            native.punch_ranges(fd, [(0, B), (B, B), (4 * B, B)])
        assert (info.value.done, info.value.offset, info.value.length) == (0, 0, 2 * B)
        native.punch_ranges(fd, [(0, B), (B, B), (4 * B, B)])
    assert native.allocated_bytes(fd) == SIZE - 3 * B


@pytest.mark.parametrize(
    "op, call",
    [
        ("populate", lambda fd, a: native.populate_write(a, B)),
        ("fallocate", lambda fd, a: native.fallocate(fd, 0, B)),
        ("madv_remove", lambda fd, a: native.madv_remove(a, B)),
    ],
)
def test_inject_fault_each_op(fd, addr, op, call):
    with native.inject_fault(op, errno.ENOMEM):
        with pytest.raises(NativeError) as info:
            call(fd, addr)
    assert (info.value.op, info.value.errno) == (op, errno.ENOMEM)


def test_system_host_populates_and_discards_pieces(fd):
    host = SystemHost()
    host.populate([Backing(fd, 0, 2 * B, 0, 0), Backing(fd, 4 * B, 2 * B, 0, 4 * B)])
    assert native.allocated_bytes(fd) == 4 * B
    # Touching pieces of one fd go out as one punch; the rest stays.
    host.discard([Backing(fd, 0, B, 0, 0), Backing(fd, B, B, 0, B), Backing(fd, 5 * B, B, 0, 5 * B)])
    assert native.allocated_bytes(fd) == B
    with native.inject_fault("punch", errno.EIO):
        with pytest.raises(NativeError) as info:
            host.discard([Backing(fd, 4 * B, B, 0, 4 * B)])
    assert info.value.errno == errno.EIO and native.allocated_bytes(fd) == B


def test_ring_index_accesses_are_single_and_ordered():
    ring = mmap.mmap(-1, 4096)
    base = native.buffer_address(ring)
    ring[2:4] = (0xBEEF).to_bytes(2, "little")
    assert native.load_acquire_u16(base + 2) == 0xBEEF
    native.publish_used(base + 4 + 8 * 3, 17, 10, base + 2, 0x1234)
    assert ring[2:4] == (0x1234).to_bytes(2, "little")  # the index, and nothing else
    assert ring[4 + 24 : 4 + 32] == (17).to_bytes(4, "little") + (10).to_bytes(4, "little")
    assert ring[4:28] == bytes(24) and ring[0:2] == bytes(2)
    ring.close()

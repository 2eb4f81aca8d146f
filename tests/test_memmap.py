"""The guest's memmap: where it lives, the ceiling of a movable-onlining guest,
and the driver's rollback of a memory block it could not add.

Sequences in tests/data/memmap/ were recorded from the real guest lab (QEMU
11.1.3 TCG, Linux 7.2, onlining movable; auto-movable.jsonl with
memory_hotplug.online_policy=auto-movable) with
tests/e2e/memmap/record_sequences.py; the *.notes.txt next to them say how.
The newer ones also carry the region's host allocation at each request (what
the placement observer samples) and the requested size each request found.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from vmemdev.errors import ConfigError
from vmemdev.host.fake import FakeHost, FakeMemory
from vmemdev.protocol.virtio_mem import MemRequest, MemResponse, RequestType, ResponseType
from vmemdev.testing.guest import SimulatedLinuxGuest
from vmemdev.virtio_mem.ceiling import boot_memory, default_reserve
from vmemdev.virtio_mem.device import HostWork, VirtioMem
from vmemdev.virtio_mem.memmap import movable_after
from vmemdev.virtio_mem.model import Geometry
from vmemdev.virtio_mem.rollback import RollbackDetector

from .conftest import attach, start_daemon

MiB = 1 << 20
GiB = 1 << 30
MB = 128 * MiB  # a Linux memory block
A = 1 << 32
DATA = Path(__file__).parent / "data" / "memmap"
TYPES = {t.name: t for t in RequestType}
# Blocks a 512M guest adds, all with their memmap outside the region, before it is
# called movable: 12 an auto-movable guest onlines movable first, its first kernel
# block, one of slack (13 + 1 observed), and the one whose plug samples the last.
SEEN_MOVABLE = movable_after(512 * MiB) + 1


class Guest:
    """A VirtioMem over the fake host, a clock the test sets, and the events it publishes."""

    def __init__(self, region=GiB, block=2 * MiB, boot=512 * MiB, requested=0, **options):
        self.now = 0.0
        self.host = FakeHost()
        self.events: list[tuple[str, dict]] = []
        self.dev = VirtioMem(Geometry(A, region, block), requested, host=self.host, clock=lambda: self.now,
                             publish=lambda name, /, **data: self.events.append((name, data)), **options)
        self.dev.attach(FakeMemory([(0, boot), (A, region)]))
        self._filled = A  # allocate_to fills the region from here up

    def request(self, kind: str, addr=0, nb=0) -> str:
        step = self.dev.begin(MemRequest(TYPES[kind], addr, nb).pack(), 10)
        if isinstance(step, HostWork):
            step = self.dev.finish(step, step.run(self.host))
        return ResponseType(MemResponse.unpack(step).type).name

    def replay(self, name: str, until_failure: bool = False, force: bool = True, each=None) -> None:
        """Each recorded request at its recorded time, with the requested size it saw
        and, where recorded, the region's host allocation (``until_failure``: stop
        after the first rollback: the rest was recorded without the rescue).
        Recordings with ``requested_before`` tell the operator's resizes (between
        requests, made here with ``force``) from the daemon's own (within one):
        the replayed daemon must make those itself. ``each(record)`` after each."""
        for line in (DATA / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            self.now = r["t"]
            asked = r.get("requested_before", r["requested"])
            if asked != self.dev.requested_size:
                self.dev.resize(asked, force=force)
            if r["type"] == "PLUG" and r.get("allocated") is not None:
                self.allocate_to(r["allocated"])
            assert self.request(r["type"], r["addr"], r["nb_blocks"]) == r["response"], r
            assert self.dev.plugged_size == r["plugged"], r
            if until_failure and self.failures():
                return
            if "requested_before" in r:
                assert self.dev.requested_size == r["requested"], r
            if each is not None:
                each(r)

    def allocate_to(self, allocated: int) -> None:
        """The region holds ``allocated`` bytes, as recorded: what the guest wrote
        (its memmap) in blocks plugged before, lowest first."""
        need = allocated - len(self.host.pages) * FakeHost.PAGE
        for gpa, size in self.dev.model.plugged_ranges():
            lo = max(gpa, self._filled)
            take = min(need, gpa + size - lo)
            if take > 0:
                self.host.touch(lo, take)
                self._filled = lo + take
                need -= take

    def add(self, k: int, memmap_in_region: bool, grow: bool = True) -> None:
        """The driver plugs Linux memory block k whole; a kernel-zone guest's
        memmap for the block added before it appears in the region."""
        if grow and self.dev.requested_size < (k + 1) * MB:
            self.dev.resize((k + 1) * MB, force=True)
        assert self.request("PLUG", A + k * MB, MB // self.dev.model.block_size) == "ACK"
        if memmap_in_region and k >= 1:
            self.host.touch(A + (k - 1) * MB, 2 * MiB)
        self.now += 0.05

    def failures(self) -> list[dict]:
        return self.named("HOT_ADD_FAILED")

    def named(self, event: str) -> list[dict]:
        return [data for name, data in self.events if name == event]


# --- rollback detection on recorded sequences ------------------------------------


def test_recorded_rollback_is_detected_with_its_retry():
    g = Guest(boot=256 * MiB, memmap_rescue=None)  # as recorded: nothing lowered requested
    g.replay("rollback")
    failed = g.failures()
    assert [(f["addr"], f["size"], f["count"]) for f in failed] == [(0x130000000, MB, 1), (0x130000000, MB, 2)]
    assert failed[0]["seconds"] < 0.1 and "kernel memory" in failed[0]["cause"]
    assert g.dev.stats.hot_add_failures == 2
    assert g.dev.status()["hot_add_failures"]["total"] == 2
    # six blocks added before it, none left 2 MiB in the region: movable so far (an
    # auto-movable guest of 256M onlines its first 6 blocks movable too)
    assert g.dev.placement.onlining == "movable-so-far"
    assert g.dev.memmap_status()["charged_to_boot_memory"] == 6 * 2 * MiB


@pytest.mark.parametrize("name", ["ordinary", "bbm"])
def test_recorded_sequences_without_a_failed_add_do_not_trigger(name):
    """Resize down (an UNPLUG 0.43 s after the same block's PLUG), UNPLUG_ALL at
    the probe after a reboot, and big-block mode's 256M plugs and unplugs."""
    g = Guest(block=256 * MiB if name == "bbm" else 2 * MiB)
    g.replay(name)
    assert g.failures() == [] and g.dev.stats.hot_add_failures == 0


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


BOOT_512M = 524160 * 1024  # the lab guest's memory table outside the region: 512M less the hole below 1M


def test_recorded_auto_movable_guest_is_never_capped_and_holds_its_memmap_in_the_region():
    """512M, auto-movable, asked 32G (e2e m3): 12 blocks movable, the 13th kernel-zone
    with its memmap still in boot memory, then every memmap in the region."""
    g = Guest(region=32 * GiB, boot=BOOT_512M)
    seen: list[str] = []
    g.replay("auto-movable", force=False, each=lambda r: seen.append(g.dev.placement.onlining))
    assert "movable" not in seen and seen.count("movable-so-far") == 11  # blocks 3..13 observed
    assert g.named("MEMMAP_CEILING_APPLIED") == [] and g.failures() == []
    assert g.dev.requested_size == g.dev.plugged_size == 32 * GiB
    m = g.dev.memmap_status()
    assert m["onlining"] == "mixed" and m["applies"] is False
    assert (m["blocks_observed"]["memmap_outside"], m["blocks_observed"]["memmap_in_region"]) == (13, 242)
    # about plugged/64 held in the region: all but the 13 blocks above and the last (not sampled yet)
    assert m["held_in_region"] == 484 * MiB and m["charged_to_boot_memory"] == 14 * 2 * MiB
    g.dev.resize(16 * GiB)
    g.dev.resize(32 * GiB)  # no ceiling for it


def test_recorded_tmpfs_filled_guest_is_detected_and_rescued_as_recorded():
    """512M filled by a tmpfs to ~25 MiB of kernel memory, asked 8G (e2e m4): it adds
    blocks until the next one fails; the daemon names the rollback and lowers requested
    to 0 in the same request, as it did live; the guest then removes every block, which
    is no rollback, and does not retry."""
    g = Guest(region=8 * GiB, boot=BOOT_512M)
    g.replay("tmpfs", force=False)  # asserts the replayed daemon lowers requested where it did
    [failed] = g.failures()
    [rescue] = g.named("MEMMAP_RESCUE")
    assert failed["count"] == 1 and failed["seconds"] < 0.1
    assert rescue["requested"] == 0 and rescue["memory_blocks_to_remove"] == rescue["plugged"] // MB
    assert g.dev.plugged_size == 0 and g.dev.stats.hot_add_failures == 1


def test_recorded_tmpfs_filled_guest_without_the_rescue_retries():
    """The control run (`--memmap-rescue off`): the same failure, then the driver's retry 50 s later."""
    g = Guest(region=8 * GiB, boot=BOOT_512M, memmap_rescue=None)
    g.replay("tmpfs-norescue", force=False)
    failed = g.failures()
    addr = failed[0]["addr"]
    assert [(f["count"], f["addr"]) for f in failed] == [(1, addr), (2, addr)]
    assert g.named("MEMMAP_RESCUE") == [] and g.dev.requested_size == 8 * GiB
    plugs = [r["t"] for r in records("tmpfs-norescue") if r["type"] == "PLUG" and r["addr"] == addr]
    assert len(plugs) == 2 and 49 < plugs[1] - plugs[0] < 52  # the driver's retry timer: 50 s
    # with the rescue on, the first of them is acted on
    g = Guest(region=8 * GiB, boot=BOOT_512M)
    g.replay("tmpfs-norescue", force=False, until_failure=True)
    [rescue] = g.named("MEMMAP_RESCUE")
    assert rescue["requested"] == 0


# --- rollback detection on sequences built from the driver's behaviour -----------


def rolled(d: RollbackDetector, *steps) -> list:
    out = []
    for step in steps:
        if step[0] == "plug":
            d.plugged(*step[1:])
        elif step[0] == "unplug":
            out.append(d.unplugged(*step[1:]))
        else:
            d.unplugged_all()
    return [r for r in out if r is not None]


def test_a_rollback_needs_the_same_range_soon_and_no_shrink():
    assert len(rolled(RollbackDetector(), ("plug", A, MB, True, 0.0), ("unplug", A, MB, MB, GiB, 0.1))) == 1
    # too late: the guest unplugged for another reason
    assert rolled(RollbackDetector(), ("plug", A, MB, True, 0.0), ("unplug", A, MB, MB, GiB, 6.0)) == []
    # another range
    assert rolled(RollbackDetector(), ("plug", A, MB, True, 0.0), ("unplug", A, MB // 2, MB, GiB, 0.1)) == []
    # asked to shrink (plugged > requested): an ordinary resize down
    assert rolled(RollbackDetector(), ("plug", A, MB, True, 0.0), ("unplug", A, MB, 2 * MB, MB, 0.1)) == []
    # the plug went into a memory block already added: nothing to add, nothing to roll back
    assert rolled(RollbackDetector(), ("plug", A, MB, False, 0.0), ("unplug", A, MB, MB, GiB, 0.1)) == []
    # the driver moved on to another plug before unplugging: the add succeeded
    assert rolled(RollbackDetector(), ("plug", A, MB, True, 0.0), ("plug", A + MB, MB, False, 0.05),
                  ("unplug", A, MB, 2 * MB, GiB, 0.1)) == []
    # UNPLUG_ALL (the driver's probe after a reboot) between them
    assert rolled(RollbackDetector(), ("plug", A, MB, True, 0.0), ("all",),
                  ("unplug", A, MB, MB, GiB, 0.1)) == []


def test_partial_first_plug_and_unaligned_plugs():
    g = Guest(memmap_rescue=None)
    g.dev.resize(64 * MiB)
    assert g.request("PLUG", A, 32) == "ACK"  # the driver plugs what is needed of a fresh block
    g.now += 0.03
    assert g.request("UNPLUG", A, 32) == "ACK"
    assert len(g.failures()) == 1
    g.dev.resize(128 * MiB)
    assert g.request("PLUG", A, 32) == "ACK"  # added this time
    assert g.request("PLUG", A + 64 * MiB, 32) == "ACK"  # into the block already added
    assert g.request("UNPLUG", A + 64 * MiB, 32) == "ACK"
    assert len(g.failures()) == 1


def test_count_restarts_when_the_requested_size_changes():
    g = Guest(memmap_rescue=None)
    g.dev.resize(256 * MiB)
    for _ in range(2):
        g.request("PLUG", A, 64)
        g.now += 0.05
        g.request("UNPLUG", A, 64)
        g.now += 50
    assert [f["count"] for f in g.failures()] == [1, 2]
    g.dev.resize(128 * MiB)
    g.request("PLUG", A, 64)
    g.request("UNPLUG", A, 64)
    assert [(f["count"], f["total"]) for f in g.failures()][-1] == (1, 3)


# --- where the memmap lives ------------------------------------------------------


def test_kernel_zone_onlining_is_seen_in_the_region():
    g = Guest()
    for k in range(5):
        g.add(k, memmap_in_region=True)
    m = g.dev.memmap_status()
    # blocks 0..3 are added when block 4 is plugged; block 0's memmap is in boot memory
    assert m["onlining"] == "kernel"
    assert (m["blocks_observed"]["memmap_in_region"], m["blocks_observed"]["memmap_outside"]) == (3, 1)
    assert m["held_in_region"] == 3 * 2 * MiB
    assert m["charged_to_boot_memory"] == m["memmap_bytes"] - 3 * 2 * MiB == 2 * 2 * MiB


def test_movable_onlining_leaves_the_region_untouched():
    g = Guest(region=4 * GiB)
    for k in range(3):
        g.add(k, memmap_in_region=False)
    assert g.dev.placement.onlining == "unknown"  # two blocks seen added: not enough
    g.add(3, memmap_in_region=False)
    assert g.dev.placement.onlining == "movable-so-far"  # auto-movable starts like this too
    for k in range(4, SEEN_MOVABLE):
        g.add(k, memmap_in_region=False)
    m = g.dev.memmap_status()
    assert m["onlining"] == "movable" and m["held_in_region"] == 0
    assert m["charged_to_boot_memory"] == SEEN_MOVABLE * 2 * MiB


def test_the_movable_verdict_waits_for_more_than_auto_movable_onlines_movable_first():
    # ratio 301 %: 512M -> 12 blocks movable first, + its first kernel block, + 1 of slack
    assert (movable_after(512 * MiB), movable_after(256 * MiB), movable_after(GiB)) == (14, 8, 26)
    assert movable_after(64 * MiB) == movable_after(None) == 3  # never fewer than 3 blocks


def test_auto_movable_is_mixed_never_capped_and_a_reboot_starts_over():
    """As measured (512M, auto-movable, asked 32G): 12 blocks movable, the 13th
    kernel-zone with its memmap still in boot memory, then the memmap in the region."""
    g = Guest(region=32 * GiB, requested=32 * GiB)
    for k in range(13):
        g.add(k, memmap_in_region=False, grow=False)
    assert g.dev.placement.onlining == "movable-so-far" and g.dev.memmap_status()["applies"] is False
    for k in range(13, 20):
        g.add(k, memmap_in_region=k >= 13, grow=False)  # from block 13 on, the memmap goes in block 12
    assert g.dev.placement.onlining == "mixed"
    assert g.dev.requested_size == 32 * GiB and g.named("MEMMAP_CEILING_APPLIED") == []
    g.dev.resize(30 * GiB)
    g.dev.resize(32 * GiB)  # raising is not refused either
    assert g.request("UNPLUG_ALL") == "ACK"
    assert g.dev.placement.onlining == "unknown"


@pytest.mark.parametrize("in_region", [True, False])
def test_with_prealloc_the_placement_stays_unknown(in_region):
    """Preallocated blocks are allocated already: a kernel-zone guest's memmap
    in them adds nothing, so it would look movable. No verdict, no ceiling."""
    g = Guest(prealloc=True)
    for k in range(4):
        g.add(k, memmap_in_region=in_region)
    assert g.dev.placement.onlining == "unknown"


# --- the ceiling -----------------------------------------------------------------


def test_boot_memory_is_the_table_outside_the_device_region():
    geo = Geometry(A, GiB, 2 * MiB)
    assert boot_memory([(0, 640 << 10), (768 << 10, 511 * MiB), (A, GiB)], geo) == 640 * 1024 + 511 * MiB
    assert boot_memory([(0, A + GiB)], geo) == A  # one region holding both
    assert default_reserve(512 * MiB) == 256 * MiB and default_reserve(256 * MiB) == 192 * MiB


def movable_guest(**options) -> Guest:
    g = Guest(region=64 * GiB, **options)
    for k in range(SEEN_MOVABLE):
        g.add(k, memmap_in_region=False)
    return g


def test_a_resize_above_the_ceiling_of_a_movable_guest_is_refused_with_the_numbers():
    g = movable_guest()
    assert g.dev.memmap_status()["ceiling"] == 16 * GiB  # 64 x (512M - 256M)
    with pytest.raises(ConfigError) as exc:
        g.dev.resize(32 * GiB)
    msg = str(exc.value)
    assert "memmap ceiling 16G" in msg and "boot memory 512M" in msg and "reserve 256M, the default" in msg
    assert "vmemdev ctl resize 32G --force" in msg
    assert g.dev.requested_size == SEEN_MOVABLE * MB
    g.dev.resize(16 * GiB)
    g.dev.resize(32 * GiB, force=True)
    g.dev.resize(24 * GiB)  # lowering is never refused
    with pytest.raises(ConfigError):
        g.dev.resize(25 * GiB)


def test_the_reserve_moves_the_ceiling():
    g = movable_guest(memmap_reserve=448 * MiB)
    assert g.dev.memmap_status()["ceiling"] == 4 * GiB
    g.dev.set_memmap_reserve(None)
    assert g.dev.memmap_status()["ceiling"] == 16 * GiB
    g.dev.set_memmap_reserve(GiB)  # more than the boot memory: nothing may be added
    assert g.dev.memmap_status()["ceiling"] == 0
    for bad in (-1, "1G", 1.5, True):
        with pytest.raises(ConfigError):
            g.dev.set_memmap_reserve(bad)


@pytest.mark.parametrize("in_region", [True, None])
def test_no_ceiling_for_kernel_zone_or_unknown_onlining(in_region):
    g = Guest(region=64 * GiB)
    if in_region:
        for k in range(4):
            g.add(k, memmap_in_region=True)
    assert g.dev.memmap_status()["applies"] is False
    g.dev.resize(64 * GiB)


def test_without_a_front_end_there_is_no_boot_memory_and_no_ceiling():
    g = movable_guest()
    g.dev.attach(None)
    assert g.dev.memmap_status()["ceiling"] is None
    g.dev.resize(64 * GiB)


# --- the cap: a guest asked above its ceiling before its onlining was seen --------


def test_a_movable_guest_asked_too_much_before_the_verdict_is_capped_at_the_ceiling():
    g = Guest(region=64 * GiB)
    g.dev.resize(32 * GiB)  # onlining still unknown: not refused
    for k in range(SEEN_MOVABLE - 1):
        g.add(k, memmap_in_region=False, grow=False)
    # movable so far: it may be auto-movable, which plugs all of it
    assert g.dev.requested_size == 32 * GiB and not g.dev.take_config_change()
    g.add(SEEN_MOVABLE - 1, memmap_in_region=False, grow=False)  # now "movable"
    assert g.dev.requested_size == 16 * GiB  # 64 x (512M - 256M)
    assert g.dev.take_config_change() and not g.dev.take_config_change()  # notify the driver once
    [cap] = g.named("MEMMAP_CEILING_APPLIED")
    assert (cap["requested_before"], cap["requested"], cap["ceiling"]) == (32 * GiB, 16 * GiB, 16 * GiB)
    assert "vmemdev ctl resize 32G --force" in cap["reason"] and "boot memory 512M" in cap["reason"]
    assert g.dev.memmap_status()["protection"]["caps"] == 1
    for k in range(SEEN_MOVABLE, SEEN_MOVABLE + 4):  # it goes on adding, below the ceiling: nothing more
        g.add(k, memmap_in_region=False, grow=False)
    assert len(g.named("MEMMAP_CEILING_APPLIED")) == 1 and g.dev.requested_size == 16 * GiB


def test_the_requested_size_given_at_start_is_capped_too():
    g = Guest(region=64 * GiB, requested=40 * GiB)
    for k in range(SEEN_MOVABLE):
        g.add(k, memmap_in_region=False, grow=False)
    assert g.dev.requested_size == 16 * GiB


def test_the_cap_stops_the_guest_and_takes_nothing_back():
    g = Guest(region=8 * GiB, requested=4 * GiB, memmap_reserve=510 * MiB)  # ceiling 128M
    for k in range(SEEN_MOVABLE):
        g.add(k, memmap_in_region=False, grow=False)
    # (a ceiling below the auto-movable run is enforced only once the guest is past it)
    assert g.dev.requested_size == g.dev.plugged_size == SEEN_MOVABLE * MB


def test_a_forced_size_is_not_capped_until_the_operator_asks_again_unforced():
    g = Guest(region=64 * GiB)
    g.dev.resize(32 * GiB, force=True)
    for k in range(SEEN_MOVABLE):
        g.add(k, memmap_in_region=False, grow=False)
    assert g.dev.requested_size == 32 * GiB and g.named("MEMMAP_CEILING_APPLIED") == []
    assert g.dev.memmap_status()["forced"] is True
    g.dev.resize(24 * GiB)  # lowering keeps the operator's decision
    g.add(SEEN_MOVABLE, memmap_in_region=False, grow=False)
    assert g.dev.requested_size == 24 * GiB
    g.dev.resize(8 * GiB)
    g.dev.resize(12 * GiB)  # raised without --force: the ceiling counts again
    assert g.dev.memmap_status()["forced"] is False
    with pytest.raises(ConfigError):
        g.dev.resize(17 * GiB)


@pytest.mark.parametrize("in_region", [True, False])
def test_no_cap_for_kernel_zone_onlining_or_without_a_verdict(in_region):
    g = Guest(region=64 * GiB, requested=32 * GiB, prealloc=not in_region)  # prealloc: stays unknown
    for k in range(6):
        g.add(k, memmap_in_region=in_region, grow=False)
    assert g.dev.requested_size == 32 * GiB and g.named("MEMMAP_CEILING_APPLIED") == []


# --- the rescue: after a rollback, give the guest kernel memory back --------------


def test_rescue_on_the_recorded_rollback():
    """256M guest filled by a tmpfs: six blocks added, the seventh rolled back."""
    g = Guest(boot=256 * MiB)
    g.replay("rollback", until_failure=True)
    # movable so far is enough: whatever the policy, those six blocks' memmap is in boot memory
    assert g.dev.plugged_size == 6 * MB and g.dev.placement.onlining == "movable-so-far"
    [rescue] = g.named("MEMMAP_RESCUE")
    # 32M of margin is 16 blocks; it had 6: all of them go, 12M of memmap comes back
    assert g.dev.requested_size == 0 and g.dev.take_config_change()
    assert (rescue["memory_blocks_to_remove"], rescue["memmap_regained"]) == (6, 12 * MiB)
    assert "ctl rescue off" in rescue["reason"]
    # the driver unplugs from the top, one memory block at a time: no rollback in that
    for k in reversed(range(6)):
        g.now += 0.05
        assert g.request("UNPLUG", A + k * MB, 64) == "ACK"
    assert len(g.failures()) == 1 and g.dev.plugged_size == 0
    assert g.dev.memmap_status()["protection"]["rescues"] == 1


def test_rescue_of_a_guest_forced_past_its_ceiling_removes_the_margin_from_the_top():
    """The 512M guest of memmap.md forced to 32G: 180 blocks added, the 181st fails."""
    g = Guest(region=32 * GiB)
    g.dev.resize(32 * GiB, force=True)
    for k in range(180):
        g.add(k, memmap_in_region=False, grow=False)
    assert g.request("PLUG", A + 180 * MB, 64) == "ACK"
    g.now += 0.04
    assert g.request("UNPLUG", A + 180 * MB, 64) == "ACK"
    assert g.dev.requested_size == 180 * MB - 16 * MB  # 22.5G - 2G: 32M of memmap back
    [rescue] = g.named("MEMMAP_RESCUE")
    assert rescue["plugged"] == 180 * MB and rescue["memory_blocks_to_remove"] == 16
    assert g.dev.take_config_change()
    # requested < plugged now: the driver stops plugging (its retry timer is cancelled
    # when the config change arrives) and unplugs
    assert g.request("PLUG", A + 180 * MB, 64) == "NACK"


def test_rescue_margin_rounds_to_whole_memory_blocks_and_can_be_turned_off():
    g = Guest(region=32 * GiB, memmap_rescue=5 * MiB)  # 3 blocks
    g.dev.resize(8 * GiB, force=True)
    for k in range(10):
        g.add(k, memmap_in_region=False, grow=False)
    g.request("PLUG", A + 10 * MB, 64)
    g.request("UNPLUG", A + 10 * MB, 64)
    assert g.dev.requested_size == 7 * MB
    for k in (9, 8, 7):  # the guest removes them
        assert g.request("UNPLUG", A + k * MB, 64) == "ACK"
    g.dev.set_memmap_rescue(None)
    g.dev.resize(8 * GiB, force=True)
    for k in (7, 8, 9):  # it adds them again, then fails at the same place
        g.add(k, memmap_in_region=False, grow=False)
    g.request("PLUG", A + 10 * MB, 64)
    g.request("UNPLUG", A + 10 * MB, 64)
    assert g.dev.requested_size == 8 * GiB and len(g.failures()) == 2
    assert g.dev.memmap_status()["protection"]["rescue"] is False
    for bad in (0, -1, "32M", 1.5, True):
        with pytest.raises(ConfigError):
            g.dev.set_memmap_rescue(bad)


@pytest.mark.parametrize("onlining", ["kernel", "unknown"])
def test_no_rescue_for_a_guest_that_keeps_the_memmap_in_the_region_or_is_not_seen_yet(onlining):
    g = Guest(region=4 * GiB, prealloc=onlining == "unknown")
    g.dev.resize(4 * GiB, force=True)
    for k in range(6):
        g.add(k, memmap_in_region=True, grow=False)
    assert g.dev.placement.onlining == onlining
    g.request("PLUG", A + 6 * MB, 64)
    g.request("UNPLUG", A + 6 * MB, 64)
    assert len(g.failures()) == 1 and g.named("MEMMAP_RESCUE") == []
    assert g.dev.requested_size == 4 * GiB


# --- the same through the daemon, with the simulated Linux guest -----------------


async def run_guest(guest, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The simulated guest, in a cancel scope handed to the test."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(guest.run)
            task_status.started(scope)


async def wait_until(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_daemon_caps_a_new_movable_guest_and_notifies_its_driver(nursery, tmp_path):
    """512M of boot memory, asked for 32G before anything was plugged: it stops
    at its ceiling (16G) instead of adding until its kernel memory is gone."""
    service, path = await start_daemon(nursery, tmp_path, size=32 * GiB)
    fe = await attach(nursery, service, path, ram_size=512 * MiB)
    guest = SimulatedLinuxGuest(fe, touch=False, kernel_memory=360 * MiB)  # memmap.md: F = 360 MiB
    guest_scope = await nursery.start(run_guest, guest)
    service.resize(32 * GiB)  # onlining unknown yet: accepted
    # the front-end's boot memory is 512M less the 128K hole below 1M: ceiling 16380M
    ceiling = 64 * (512 * MiB - 128 * 1024) // 2
    await wait_until(lambda: service.device.requested_size == ceiling
                     and len(guest.plugged) * 2 * MiB == ceiling, 60)
    sent = [e.data for e in service.events.history if e.name == "CONFIG_CHANGE_SENT"]
    assert sent[-1]["requested"] == ceiling and sent[-1]["delivered"] is True
    await wait_until(lambda: fe.config_changes >= 2)  # the operator's resize, then the cap
    assert [e.name for e in service.events.history].count("MEMMAP_CEILING_APPLIED") == 1
    assert guest.add_failures == 0 and guest.kernel_memory == 360 * MiB - 128 * 2 * MiB
    guest_scope.cancel()
    await trio.sleep(0.05)
    await fe.close()
    fe.release()


async def test_daemon_rescues_a_guest_pushed_past_its_kernel_memory(nursery, tmp_path):
    """Forced past the ceiling with 40M of kernel memory: 20 blocks added, the
    21st rolled back; the rescue makes it remove 16 and stop retrying."""
    service, path = await start_daemon(nursery, tmp_path, size=8 * GiB)
    fe = await attach(nursery, service, path, ram_size=512 * MiB)
    guest = SimulatedLinuxGuest(fe, touch=False, kernel_memory=40 * MiB)
    guest_scope = await nursery.start(run_guest, guest)
    service.resize(8 * GiB, force=True)
    await wait_until(lambda: guest.add_failures >= 1)
    await wait_until(lambda: service.device.plugged_size == 4 * MB)
    assert service.device.requested_size == 4 * MB
    assert guest.kernel_memory == 32 * MiB  # 16 blocks' memmap given back
    [rescue] = [e.data for e in service.events.history if e.name == "MEMMAP_RESCUE"]
    assert rescue["requested_before"] == 8 * GiB and rescue["plugged"] == 20 * MB
    await trio.sleep(1.5)  # the simulated driver retries every 0.5 s; it has nothing to retry
    assert guest.add_failures == 1 and service.device.stats.hot_add_failures == 1
    assert fe.config_changes >= 2
    guest_scope.cancel()
    await trio.sleep(0.05)
    await fe.close()
    fe.release()


@pytest.mark.parametrize("observe", [True, False])
def test_a_front_end_that_is_not_a_linux_guest_can_turn_the_observation_off(observe):
    """Blocks plugged and never written look like movable onlining; a 64 MiB
    boot RAM then has a ceiling of 0 and the cap stops the plugs. With the
    observation off (`--memmap-observe off`) the onlining stays unknown."""
    g = Guest(boot=64 * MiB, requested=GiB, memmap_observe=observe)
    for k in range(4):
        g.add(k, memmap_in_region=False)
    assert g.dev.placement.onlining == ("movable" if observe else "unknown")
    assert (g.dev.requested_size < GiB) is observe

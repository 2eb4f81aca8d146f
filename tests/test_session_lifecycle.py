"""Memory-table changes, ring stop/start, notifications and reconnects, as QEMU drives them."""

from __future__ import annotations

import trio

from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.vhost_user import Request
from vmemdev.protocol.virtio_mem import MemRequest, RequestType, ResponseType
from vmemdev.testing.guest import SimulatedLinuxGuest

from .conftest import A, B, MiB, attach, settle

ACK, BUSY = ResponseType.ACK, ResponseType.BUSY


async def test_rings_are_remapped_after_a_new_memory_table(attached):
    service, fe = attached
    service.resize(256 * MiB)
    assert await fe.plug(A, 4) == ACK
    fe.ram.write(A, b"kept" * 1024)
    # QEMU without CONFIGURE_MEM_SLOTS semantics: a whole new table, new fds.
    await fe.send_memory(use_mem_table=True)
    assert len(service.frontend.memory.regions) == 3
    assert await fe.plug(A + 4 * B, 4) == ACK  # the ring works through the new mapping
    assert fe.ram.read(A, 4096) == b"kept" * 1024
    assert await fe.unplug(A, 8) == ACK
    assert fe.dimm_allocated() == 0


async def test_removing_the_device_region_while_plugged(attached, caplog):
    service, fe = attached
    service.resize(256 * MiB)
    assert await fe.plug(A, 4) == ACK
    fe.ram.write(A, b"\x77" * (4 * B))
    dimm = fe.ram.regions[2]
    await fe.call_ack(Request.REM_MEM_REG, vu.encode_single_region(dimm.describe()))
    assert await fe.plug(A + 4 * B, 1) == BUSY  # never ERROR: the driver would give up
    assert await fe.unplug(A, 4) == BUSY
    assert "not backed by shared memory" in caplog.text
    assert service.device.plugged_size == 4 * B
    assert fe.dimm_allocated() == 4 * B  # nothing was discarded
    await fe.call_ack(Request.ADD_MEM_REG, vu.encode_single_region(dimm.describe()), [dimm.fd])
    assert await fe.unplug(A, 4) == ACK
    assert fe.dimm_allocated() == 0


async def test_a_kick_before_enable_is_not_lost(attached):
    service, fe = attached
    service.resize(256 * MiB)
    await fe.call_ack(Request.SET_VRING_ENABLE, vu.encode_vring_state(0, 0))
    ring = fe.ring
    fe.ram.write(fe.req_gpa, MemRequest(RequestType.PLUG, A, 2).pack())
    ring.write_desc(0, fe.req_gpa, 24, 1, 1)
    ring.write_desc(1, fe.resp_gpa, 10, 2, 0)
    ring.publish(0)
    fe.kick()
    await settle()
    assert ring.used_idx() == 0  # disabled: not processed
    await fe.call_ack(Request.SET_VRING_ENABLE, vu.encode_vring_state(0, 1))
    with trio.fail_after(5):
        assert await fe.wait_used() == (0, 10)
    assert service.device.plugged_size == 2 * B


async def test_get_config_is_answered_while_the_backend_channel_is_stuck(daemon, nursery):
    """QEMU may not read the backend channel while a vCPU waits in GET_CONFIG."""
    service, path = daemon
    fe = await attach(nursery, service, path, watch_backend_channel=False)
    # Nobody reads the channel: after a few thousand notifications it is full.
    for size in range(1, 5001):
        service.resize((size % 400 + 1) * B)
    with trio.fail_after(2):
        for _ in range(100):
            cfg = await fe.get_config()
    assert cfg.requested_size == service.device.requested_size
    await fe.close()
    fe.release()


async def test_reconnect_keeps_plugged_state_and_the_guest_unplugs_all(daemon, nursery):
    service, path = daemon
    fe = await attach(nursery, service, path)
    service.resize(256 * MiB)
    guest = SimulatedLinuxGuest(fe)
    await guest.probe()
    await guest.reconcile()
    assert service.device.plugged_size == 256 * MiB
    await fe.close()  # QEMU went away (VM restarted)
    fe.release()
    with trio.fail_after(5):
        while service.frontend_attached:
            await trio.sleep(0.01)
    assert service.device.plugged_size == 256 * MiB  # documented policy: kept
    fe2 = await attach(nursery, service, path)
    assert (await fe2.get_config()).plugged_size == 256 * MiB
    guest2 = SimulatedLinuxGuest(fe2)
    await guest2.probe()  # Linux sends UNPLUG_ALL when it finds memory plugged
    assert service.device.plugged_size == 0
    await guest2.reconcile()
    assert service.device.plugged_size == 256 * MiB
    guest2.check_contents()
    await fe2.close()
    fe2.release()


async def test_config_change_is_sent_once_per_resize(attached):
    service, fe = attached
    for size in (64 * MiB, 64 * MiB, 128 * MiB, 0, 0):
        service.resize(size)
    await settle(0.1)
    assert fe.config_changes == 3  # unchanged values send nothing


async def test_simulated_guest_follows_resizes(attached, nursery):
    service, fe = attached
    guest = SimulatedLinuxGuest(fe)
    await nursery.start(guest.run)
    for size in (256 * MiB, 768 * MiB, 128 * MiB, 0):
        service.resize(size)
        with trio.fail_after(20):
            while service.device.plugged_size != size:
                await trio.sleep(0.01)
        assert fe.dimm_allocated() <= size
    guest.check_contents()


async def test_the_simulated_guest_keeps_nothing_in_a_range_it_is_unplugging(attached):
    """Linux moves its data out of a range before it sends the UNPLUG, so a
    check of the guest's memory while the UNPLUG is answered (the device's
    plugged size already lower, the guest not yet told) finds no block the
    daemon has discarded: the toolkit's guest gives the range up first."""
    service, fe = attached
    guest = SimulatedLinuxGuest(fe)
    await guest.probe()
    service.resize(256 * MiB)
    await guest.reconcile()
    unplug, checked = fe.unplug, []

    async def unplug_then_check(addr, nb_blocks):
        resp = await unplug(addr, nb_blocks)
        assert service.device.plugged_size < 256 * MiB  # the daemon has discarded the range
        guest.check_contents()
        checked.append(resp)
        return resp

    fe.unplug = unplug_then_check
    service.resize(128 * MiB)
    await guest.reconcile()
    assert checked == [ACK] and service.device.plugged_size == 128 * MiB
    guest.check_contents()

"""Copy this file into your project to test host-side memory accounting with vmemdev.

Needs: pip install vmemdev pytest  (the fixtures load automatically).
Each test gets a real `vmemdev serve` process, a QEMU-like front-end sharing
memfd guest RAM, and a simulated Linux virtio_mem driver that plugs toward
the requested size and writes to what it plugs.
"""

from vmemdev.testing.assertions import (
    assert_allocated_at_most_plugged,
    assert_allocation_within_plugged,
)

MiB = 1 << 20


def test_unplugged_memory_goes_back_to_the_host(vmemdev_lab):
    vmemdev_lab.resize("512M")
    assert vmemdev_lab.allocated() == 512 * MiB  # the guest wrote every page it got
    vmemdev_lab.resize("128M")
    assert vmemdev_lab.allocated() == 128 * MiB  # what it gave back is freed on the host
    assert_allocated_at_most_plugged(vmemdev_lab)
    assert_allocation_within_plugged(vmemdev_lab)
    vmemdev_lab.guest_check_contents()  # and what it kept is intact


def test_memory_max_caps_what_the_guest_can_hold(vmemdev_lab):
    vmemdev_lab.set_limit("memory.max", "256M")
    vmemdev_lab.resize("256M")
    assert vmemdev_lab.accounting()["host_allocated"] <= 256 * MiB


def test_preallocation_is_visible_before_the_guest_touches_memory(vmemdev_lab_factory):
    lab = vmemdev_lab_factory(daemon_args=("--prealloc",), guest_touches=False)
    lab.resize("256M")
    assert lab.allocated() == 256 * MiB
    lab.resize(0)
    assert lab.allocated() == 0

"""The virtio-mem device: model, Device implementation, limits, accounting. No I/O."""

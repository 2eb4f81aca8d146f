"""vmemdev: the virtio-mem device as a vhost-user backend."""

__version__ = "0.1.0"

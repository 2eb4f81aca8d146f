"""Sans-IO wire formats: vhost-user messages, virtio-mem structs, split rings."""

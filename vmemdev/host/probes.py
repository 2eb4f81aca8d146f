"""Read-only views of host memory, for the testing toolkit and tools outside host/."""

from .native import allocated_bytes, buffer_address, data_extents

__all__ = ["allocated_bytes", "buffer_address", "data_extents"]

"""A block bitmap whose range operations cost the range, not the region.

A 16 TiB region of 2 MiB blocks has 8 Mi blocks: 1 MiB of bits. Requests
touch at most 65535 blocks, so every per-request operation works on the
bytes that hold the range only; the popcount is kept up to date instead of
being recounted.
"""

from __future__ import annotations

from collections.abc import Iterator


class BlockBitmap:
    def __init__(self, nblocks: int):
        if nblocks < 0:
            raise ValueError("negative block count")
        self.nblocks = nblocks
        self._bits = bytearray((nblocks + 7) // 8)
        self.count = 0  # number of set bits
        self._dirty_end = 0  # bytes from here on have never been set since the last clear_all
        # The bytes written since the last take_touched(): [_touched_lo, _touched_hi), empty if hi <= lo.
        self._nbytes = len(self._bits)
        self._touched_lo = self._nbytes
        self._touched_hi = 0

    def _check(self, start: int, n: int) -> None:
        if start < 0 or n < 0 or start + n > self.nblocks:
            raise IndexError(f"blocks [{start}, {start + n}) outside 0..{self.nblocks}")

    def _window(self, start: int, n: int) -> tuple[int, int, int]:
        """(first byte, last byte + 1, bit shift) covering [start, start + n)."""
        first = start // 8
        last = (start + n + 7) // 8
        return first, last, start - first * 8

    def count_range(self, start: int, n: int) -> int:
        """Number of set blocks in [start, start + n)."""
        self._check(start, n)
        if n == 0:
            return 0
        first, last, shift = self._window(start, n)
        word = int.from_bytes(self._bits[first:last], "little") >> shift
        return (word & ((1 << n) - 1)).bit_count()

    def _write(self, start: int, n: int, value: bool) -> None:
        self._check(start, n)
        if n == 0:
            return
        first, last, shift = self._window(start, n)
        word = int.from_bytes(self._bits[first:last], "little")
        mask = ((1 << n) - 1) << shift
        before = (word & mask).bit_count()
        word = word | mask if value else word & ~mask
        self._bits[first:last] = word.to_bytes(last - first, "little")
        if value and last > self._dirty_end:
            self._dirty_end = last
        if first < self._touched_lo:
            self._touched_lo = first
        if last > self._touched_hi:
            self._touched_hi = last
        self.count += (n - before) if value else -before

    def set_range(self, start: int, n: int) -> None:
        self._write(start, n, True)

    def clear_range(self, start: int, n: int) -> None:
        self._write(start, n, False)

    def clear_all(self) -> None:
        """Costs the bytes ever set since the last clear, not the region."""
        if self.count:
            end = self._dirty_end
            self._bits[:end] = bytes(end)
            self._touched_lo = 0
            self._touched_hi = max(self._touched_hi, end)
        self._dirty_end = 0
        self.count = 0

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def take_touched(self) -> tuple[int, int] | None:
        """The byte window [first, last) written since the last call (None: none).

        For a durable copy of the bitmap that is kept up to date with the
        window's bytes after each change (``daemon/devrecord.py``): a
        request costs the bytes of its range, not the region.
        """
        lo, hi = self._touched_lo, self._touched_hi
        if hi <= lo:
            return None
        self._touched_lo, self._touched_hi = self._nbytes, 0
        return lo, hi

    def window(self, first: int, last: int) -> bytes:
        return bytes(self._bits[first:last])

    def take_window(self) -> tuple[int, bytearray] | None:
        """``take_touched`` and the bytes of that window, in one call (the
        per-request save's)."""
        lo, hi = self._touched_lo, self._touched_hi
        if hi <= lo:
            return None
        self._touched_lo, self._touched_hi = self._nbytes, 0
        return lo, self._bits[lo:hi]

    @classmethod
    def from_bytes(cls, nblocks: int, data: bytes) -> BlockBitmap:
        """Raises ValueError unless ``data`` is a bitmap of exactly ``nblocks``."""
        bitmap = cls(nblocks)
        if len(data) != len(bitmap._bits):
            raise ValueError(f"{len(data)} bytes for {nblocks} blocks, expected {len(bitmap._bits)}")
        if nblocks % 8 and data[-1] >> (nblocks % 8):
            raise ValueError(f"bits set beyond block {nblocks}")
        bitmap._bits[:] = data
        bitmap.count = int.from_bytes(data, "little").bit_count()
        bitmap._dirty_end = len(data)
        return bitmap

    def test(self, index: int) -> bool:
        self._check(index, 1)
        return bool(self._bits[index // 8] >> (index % 8) & 1)

    def runs(self) -> Iterator[tuple[int, int]]:
        """Yield (start, length) of each run of set blocks, in order.

        Costs the size of the bitmap: for accounting and tests, never for a
        guest request.
        """
        bits = self._bits
        index = 0
        n = self.nblocks
        run_start = None
        while index < n:
            byte = bits[index // 8]
            if index % 8 == 0 and index + 8 <= n and byte in (0, 0xFF):
                full = byte == 0xFF
                if full and run_start is None:
                    run_start = index
                elif not full and run_start is not None:
                    yield run_start, index - run_start
                    run_start = None
                index += 8
                continue
            if byte >> (index % 8) & 1:
                if run_start is None:
                    run_start = index
            elif run_start is not None:
                yield run_start, index - run_start
                run_start = None
            index += 1
        if run_start is not None:
            yield run_start, n - run_start

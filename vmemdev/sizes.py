"""Sizes spelled as QEMU spells them: ``512M``, ``4G``, ``1.5G``, ``0x200000``.

Suffixes B, K, M, G, T, P, E (either case) are powers of 1024; a bare
number is bytes; hexadecimal is bytes only, as in QEMU's qemu_strtosz.
"""

from __future__ import annotations

import re
from fractions import Fraction

from .errors import ConfigError

_SUFFIXES = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_DECIMAL = re.compile(r"(\d+(?:\.\d+)?)([A-Za-z]?)")
_HEX = re.compile(r"0[xX]([0-9A-Fa-f]+)")
U64_MAX = (1 << 64) - 1


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from a size string; ConfigError with a one-line reason otherwise."""
    spelled = text.strip()
    hex_match = _HEX.fullmatch(spelled)
    if hex_match:
        value = int(hex_match.group(1), 16)
    else:
        match = _DECIMAL.fullmatch(spelled)
        suffix = match.group(2).upper() if match else None
        if not match or suffix not in _SUFFIXES:
            raise ConfigError(
                f"{what} {text!r} is not a size (examples: 512M, 4G, 0x40000000, 1073741824)"
            )
        exact = Fraction(match.group(1)) * (1 << _SUFFIXES[suffix])
        if exact.denominator != 1:
            raise ConfigError(f"{what} {text!r} is not a whole number of bytes")
        value = int(exact)
    if value > U64_MAX:
        raise ConfigError(f"{what} {text!r} does not fit in 64 bits")
    return value


def format_size(n: int) -> str:
    """The shortest exact spelling: 256M, 1G, 4K, or plain bytes."""
    for unit, shift in (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)

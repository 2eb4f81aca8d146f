"""``with thing:`` closes the thing: one context-manager shape for every closeable."""

from __future__ import annotations

from typing import Self


class Closing:
    def close(self) -> None:
        """Release what the object holds; safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

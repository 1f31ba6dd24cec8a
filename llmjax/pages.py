"""The engine's page accounting, on the host: which pages of the paged KV cache's pool (llmjax.models.paged) are
free, and how many rows read each of the others.

A page can be in several rows' page tables at once (the full pages of a prompt that a group of answers shares), so
a row that ends gives its pages back one reference each, and a page is free again only when its last reader ends.
"""

from collections.abc import Sequence


class Pool:
    """`size` pages, each free or read by a count of rows."""

    def __init__(self, size: int):
        self.size = size
        self._free = list(range(size))[::-1]  # pages 0, 1, ... first
        self._readers = [0] * size

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, count: int, readers: int = 1) -> list[int]:
        """`count` free pages, each read by `readers` rows."""
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._readers[page] = readers
        return pages

    def give_back(self, pages: Sequence[int]) -> None:
        """One row is done with `pages`: those it was the last reader of are free again."""
        for page in pages:
            self._readers[page] -= 1
            if not self._readers[page]:
                self._free.append(page)

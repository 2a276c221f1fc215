"""A resumable run: items minus the ids already in the output -> results -> rows, each written as it arrives.

Shared by `generate` and `caption` (single process or Ray): the resume rule, the streaming writer and the
counts of the final summary live here once.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

from .items import Item
from .writers import Writer


class Job:
    """Iterator of output rows. `rows(items)` turns the items still to do into rows (any order).

    Counts: skipped (already in the output, or in `skip`), duplicates (an id seen earlier in this run's
    input: it runs once), succeeded, failed (error rows), tokens (generated). `remaining`
    estimates the rows to come for a progress bar (None when the input's length is unknown).
    """

    def __init__(self, items: Iterable[Item], rows: Callable[[Iterator[Item]], Iterator[dict]],
                 writer: Writer | None = None, total: int | None = None, skip: Iterable[str] = ()):
        self.items, self._rows, self.writer = items, rows, writer
        self.done = set(map(str, skip)) | (writer.done if writer is not None else set())
        self._before = frozenset(self.done)
        self.total = total
        self.remaining = None if total is None else max(total - len(self.done), 0)
        self.skipped = self.duplicates = self.succeeded = self.failed = self.tokens = 0
        self.started = self.finished = None
        self._iter: Iterator[dict] | None = None

    def _todo(self) -> Iterator[Item]:
        for item in self.items:
            if item.key in self._before:
                self.skipped += 1
            elif item.key in self.done:
                self.duplicates += 1
            else:
                self.done.add(item.key)  # a repeated id in the input runs once
                yield item

    def _run(self) -> Iterator[dict]:
        self.started = time.perf_counter()
        try:
            for row in self._rows(self._todo()):
                if self.writer is not None:
                    self.writer.write(row)
                self.tokens += row.get("tokens") or len(row.get("token_ids") or ())
                if row.get("error") is None:
                    self.succeeded += 1
                else:
                    self.failed += 1
                yield row
        finally:
            self.finished = time.perf_counter()
            if self.writer is not None:
                self.writer.close()

    def __iter__(self) -> "Job":
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._run()
        return next(self._iter)

    def close(self) -> None:
        """Stop early: abort what runs, write what finished."""
        if self._iter is not None:
            self._iter.close()
        elif self.writer is not None:
            self.writer.close()

    @property
    def seconds(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.perf_counter()) - self.started

    def summary(self, unit: str = "items") -> str:
        n = self.succeeded + self.failed
        rate = n / self.seconds if self.seconds > 0 else 0.0
        dup = f", {self.duplicates} duplicate ids ignored" if self.duplicates else ""
        return (f"{self.succeeded} done, {self.skipped} skipped (already in the output){dup}, {self.failed} failed "
                f"in {self.seconds:.1f} s: {rate:.2f} {unit}/s, {self.tokens} tokens generated "
                f"({self.tokens / self.seconds if self.seconds > 0 else 0.0:.1f} tokens/s)")

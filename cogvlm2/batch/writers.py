"""Streaming result writers, JSONL or Parquet, that make a killed run lose at most its in-flight chunk.

JSONL: one file; each row is appended and flushed as it arrives (and fsynced every chunk); a row cut by
a kill is the file's unterminated tail, which opening the file for resume truncates. Parquet: a folder
of part files (`out.parquet/part-*.parquet`, read back as one table by pyarrow, pandas, Ray, Spark or
DuckDB), each chunk written to a temporary name and renamed into place, so a part is whole or absent.
Opening an existing output collects the ids already present: the resume rule skips those items.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Protocol, TextIO

from .items import require_pyarrow

DEFAULT_CHUNK_ROWS = 256
DEFAULT_CHUNK_SECONDS = 30.0


class OutputError(ValueError):
    """The existing output cannot be resumed (unreadable row, wrong format); the message says how to fix it."""


def is_parquet(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".parquet")


def open_writer(path: str | os.PathLike | None, schema: dict[str, str], overwrite: bool = False,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, chunk_seconds: float = DEFAULT_CHUNK_SECONDS) -> "Writer":
    """A writer for path (None or '-': stdout, JSONL, nothing to resume). schema: column -> type
    ('string', 'int64', 'float64', 'list<int64>'), used for Parquet parts (every part the same)."""
    if path is None or os.fspath(path) == "-":
        return JsonlWriter(None, chunk_rows, chunk_seconds)
    if overwrite:
        remove_output(path)
    if is_parquet(path):
        return ParquetWriter(Path(path), schema, chunk_rows, chunk_seconds)
    return JsonlWriter(Path(path), chunk_rows, chunk_seconds)


def remove_output(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir():
        for part in path.glob("*.parquet"):
            part.unlink()
        for tmp in path.glob(".*.tmp"):
            tmp.unlink()
    elif path.exists():
        path.unlink()


def done_ids(path: str | os.PathLike) -> set[str]:
    """Ids (as strings) of the rows already in an output; empty if it does not exist."""
    path = Path(path)
    if not path.exists():
        return set()
    if is_parquet(path):
        return ParquetWriter.read_ids(path)
    return JsonlWriter.read_ids(path, repair=False)


class Writer(Protocol):
    """write(row) streams a row; close() makes everything durable. `done` holds the ids found on open."""

    done: set[str]
    rows_written: int

    def write(self, row: dict) -> None: ...

    def close(self) -> None: ...


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlWriter(_Closing):
    def __init__(self, path: Path | None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 chunk_seconds: float = DEFAULT_CHUNK_SECONDS):
        self.path = path
        self.chunk_rows, self.chunk_seconds = chunk_rows, chunk_seconds
        self.done = set() if path is None else self.read_ids(path, repair=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.rows_written = 0
        self.f: TextIO = sys.stdout if path is None else open(path, "a", encoding="utf-8")
        self._unsynced, self._last_sync = 0, time.monotonic()

    @staticmethod
    def read_ids(path: Path, repair: bool) -> set[str]:
        """Ids of the complete rows. repair: truncate an unterminated last row (cut by a kill)."""
        if not path.exists():
            return set()
        if path.is_dir():
            raise OutputError(f"{path} is a folder: a JSONL output is a file (a Parquet output ends in .parquet)")
        ids, end = set(), 0
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):  # the row a kill cut short
                    break
                end += len(line)
                if not line.strip():
                    continue
                try:
                    ids.add(str(json.loads(line)["id"]))
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                    raise OutputError(f"{path}:{n}: not an output row with an 'id'; remove the line, or start "
                                      f"over with --overwrite") from None
        if repair and end < path.stat().st_size:
            with open(path, "r+b") as f:
                f.truncate(end)
        return ids

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()  # a killed process loses nothing the OS has
        self.rows_written += 1
        self._unsynced += 1
        if self.path is not None and (self._unsynced >= self.chunk_rows
                                      or time.monotonic() - self._last_sync >= self.chunk_seconds):
            self._sync()

    def _sync(self) -> None:
        os.fsync(self.f.fileno())
        self._unsynced, self._last_sync = 0, time.monotonic()

    def close(self) -> None:
        if self.f is sys.stdout:
            self.f.flush()
            return
        if not self.f.closed:
            self._sync()
            self.f.close()


class ParquetWriter(_Closing):
    def __init__(self, path: Path, schema: dict[str, str], chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 chunk_seconds: float = DEFAULT_CHUNK_SECONDS):
        pa = require_pyarrow()

        if path.exists() and not path.is_dir():
            raise OutputError(f"{path} is a file: a Parquet output is a folder of part files; choose another name")
        path.mkdir(parents=True, exist_ok=True)
        for tmp in path.glob(".*.tmp"):  # a part being written when a previous run was killed
            tmp.unlink()
        self.path = path
        self.schema = pa.schema([(name, _arrow_type(kind)) for name, kind in schema.items()])
        self.chunk_rows, self.chunk_seconds = chunk_rows, chunk_seconds
        self.done = self.read_ids(path)
        self.rows: list[dict] = []
        self.rows_written = 0
        self._run = uuid.uuid4().hex[:8]
        self._parts = len(list(path.glob("part-*.parquet")))
        self._last_flush = time.monotonic()

    @staticmethod
    def read_ids(path: Path) -> set[str]:
        import pyarrow.parquet as pq

        ids = set()
        for part in sorted(path.glob("part-*.parquet")):
            try:
                ids.update(str(i) for i in pq.read_table(part, columns=["id"]).column("id").to_pylist())
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
                raise OutputError(f"{part}: cannot read it ({e}); delete that part to recompute its rows") from None
        return ids

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self.rows_written += 1
        if len(self.rows) >= self.chunk_rows or time.monotonic() - self._last_flush >= self.chunk_seconds:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._last_flush = time.monotonic()
        if not self.rows:
            return
        rows = [{k: r.get(k) for k in self.schema.names} | {"id": str(r["id"])} for r in self.rows]
        table = pa.Table.from_pylist(rows, schema=self.schema)
        name = f"part-{self._parts:05d}-{self._run}.parquet"
        tmp = self.path / f".{name}.tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        self._parts += 1
        self.rows = []

    def close(self) -> None:
        self.flush()


def _arrow_type(kind: str):
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "list<int64>": pa.list_(pa.int64())}
    return types[kind]

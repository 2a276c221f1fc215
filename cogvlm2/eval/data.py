"""Benchmark files on disk -> rows (dicts) with their images, for the official layouts.

Three containers, chosen by the file's suffix:

    .json      the benchmarks' own releases: a list of records, or {"data": [...]} (TextVQA, DocVQA,
               InfographicVQA); images are files next to it (see `ImageResolver`)
    .tsv       VLMEvalKit / OpenCompass TSVs: one row per question, the image base64-encoded in an
               `image` column (a short value there names the `index` of the row holding the image)
    .parquet   Hugging Face dataset shards (lmms-lab/*): the image as {"bytes": ..., "path": ...}; a
               folder of shards or a glob ("data/validation-*.parquet") reads several

A row's `image` ends up as a Path (checked to exist) or bytes; tasks.py maps the rest of a row.
"""

from __future__ import annotations

import base64
import csv
import glob
import json
import sys
from pathlib import Path
from typing import Iterable


class DataError(ValueError):
    """A benchmark file that cannot be read; the message names the file and what is wrong."""


def read_json_rows(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of records or {{\"data\": [...]}}")
    return data


def read_tsv_rows(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read TSV: {e}") from None
    if rows and "image" in rows[0]:
        by_index = {r.get("index"): r["image"] for r in rows}
        for r in rows:
            if r["image"] and len(r["image"]) <= 64:  # a reference to the row that holds the image
                ref = by_index.get(r["image"])
                if ref is None or len(ref) <= 64:
                    raise DataError(f"{path}: row {r.get('index')}: image refers to unknown row {r['image']!r}")
                r["image"] = ref
            r["image"] = _b64(r["image"], path, r.get("index")) if r["image"] else None
    return rows


def _b64(text: str, path: Path, index) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except ValueError as e:
        raise DataError(f"{path}: row {index}: image is not base64: {e}") from None


def read_parquet_rows(files: list[Path]) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise DataError("reading Parquet needs pyarrow: pip install 'cogvlm2[eval]'") from None
    rows: list[dict] = []
    for f in files:
        try:
            rows += pq.read_table(f).to_pylist()
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read Parquet: {e}") from None
    for r in rows:
        img = r.get("image")
        if isinstance(img, dict):
            r["image"] = img.get("bytes") or img.get("path")
    return rows


def read_rows(path: Path) -> list[dict]:
    """Rows of a .json / .tsv / .parquet file, a folder of .parquet shards, or a glob of shards
    ("data/validation-*.parquet")."""
    if "*" in str(path):
        files = sorted(Path(p) for p in glob.glob(str(path)))
        if not files or any(f.suffix != ".parquet" for f in files):
            raise DataError(f"{path}: a pattern must match .parquet files (matched {len(files)} files)")
        return read_parquet_rows(files)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir() and any(path.glob("*.parquet")):
        return read_parquet_rows(sorted(path.glob("*.parquet")))
    if path.suffix == ".parquet":
        return read_parquet_rows([path])
    if path.suffix == ".json":
        return read_json_rows(path)
    if path.suffix == ".tsv":
        return read_tsv_rows(path)
    raise DataError(f"{path}: expected a .json, .tsv or .parquet file")


class ImageResolver:
    """Finds the image file a JSON record names: tried under each root, as given and by its base name."""

    def __init__(self, roots: Iterable[Path]):
        self.roots = [r for r in dict.fromkeys(roots) if r is not None]

    def __call__(self, name: str) -> Path:
        for root in self.roots:
            for candidate in (root / name, root / Path(name).name):
                if candidate.is_file():
                    return candidate
        tried = ", ".join(str(r) for r in self.roots)
        raise DataError(f"image {name!r} not found under {tried} (pass the image folder with --images)")

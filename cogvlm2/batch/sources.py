"""Captioning inputs -> Items: a folder (recursive), a manifest (text / JSONL / CSV / Parquet) or WebDataset shards.

Ids, the resume keys: a folder's files by their path relative to the folder; a manifest's rows by their
`id` column, else the path as written; a WebDataset sample by `shard-stem/key`. Manifest rows name their
media in a `path`, `image`, `video` or `url` column (relative paths are relative to the manifest) and may
give a per-item `prompt`; URLs are refused unless allowed, so that a manifest cannot make the run fetch
from the network by surprise.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .items import Item, is_url, media_kind, require_pyarrow

MEDIA_COLUMNS = ("path", "image", "video", "url", "file")
PROMPT_COLUMNS = ("prompt", "query")
MANIFEST_SUFFIXES = (".txt", ".lst", ".jsonl", ".csv", ".parquet")


@dataclass
class Source:
    """Items of one input, lazily; `total` is known up front when cheap (for the progress bar)."""

    describe: str
    open: Callable[[], Iterator[Item]]
    total: int | None = None

    def __iter__(self) -> Iterator[Item]:
        return self.open()


def open_source(spec: str | os.PathLike, kinds: Iterable[str] = ("image", "video"), allow_urls: bool = False) -> Source:
    """The Source for INPUT: a folder (its files of the given media kinds), a manifest file, WebDataset
    shards (`.tar` paths with `{000..009}` ranges or globs, or a text file listing them)."""
    spec = os.fspath(spec)
    kinds = frozenset(kinds)
    if os.path.isdir(spec):
        return folder_source(Path(spec), kinds)
    if spec.endswith(".tar") or re.search(r"\.tar[}*?\]]*$", spec):
        return webdataset_source(expand_shards(spec))
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {spec}")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".lst"):
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if lines and all(ln.endswith(".tar") for ln in lines):
            return webdataset_source([str(path.parent / ln) if not os.path.isabs(ln) else ln for ln in lines])
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"cannot read {spec}: give a folder, a manifest ({', '.join(MANIFEST_SUFFIXES)}) or "
                         f"WebDataset .tar shards")
    return manifest_source(path, allow_urls)


# ---------------------------------------------------------------------------------------------- folder

def folder_source(root: Path, kinds: frozenset[str]) -> Source:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and media_kind(f) in kinds]

    def items() -> Iterator[Item]:
        for f in files:
            kind = media_kind(f.name)
            yield Item(id=f.relative_to(root).as_posix(), path=str(f), **{kind: str(f)})

    return Source(f"folder {root} ({len(files)} files: {', '.join(sorted(kinds))})", items, len(files))


# ---------------------------------------------------------------------------------------------- manifests

def manifest_source(path: Path, allow_urls: bool) -> Source:
    suffix = path.suffix.lower()
    rows: Callable[[], Iterator[tuple[int, dict | str | Exception]]] = {
        ".txt": lambda: _text_rows(path), ".lst": lambda: _text_rows(path), ".jsonl": lambda: _jsonl_rows(path),
        ".csv": lambda: _csv_rows(path), ".parquet": lambda: _parquet_rows(path)}[suffix]

    def items() -> Iterator[Item]:
        for line, row in rows():
            yield _manifest_item(row, line, path, allow_urls)

    return Source(f"manifest {path}", items, _count_rows(path))


def _manifest_item(row: dict | str | Exception, line: int, manifest: Path, allow_urls: bool) -> Item:
    where = f"{manifest.name}:{line}"
    if isinstance(row, Exception):
        return Item(id=f"{manifest.name}:{line}", line=line, error=f"{where}: {row}")
    if isinstance(row, str):
        row = {"path": row}
    column = next((c for c in MEDIA_COLUMNS if row.get(c) not in (None, "")), None)
    if column is None:
        return Item(id=row.get("id") or where, line=line,
                    error=f"{where}: no media: give one of the columns {', '.join(MEDIA_COLUMNS)}")
    name = str(row[column])
    query = next((str(row[c]) for c in PROMPT_COLUMNS if row.get(c) not in (None, "")), None)
    item_id = row.get("id") if row.get("id") not in (None, "") else name
    if is_url(name):
        if not allow_urls:
            return Item(id=item_id, path=name, line=line,
                        error=f"{where}: {name} is a URL: pass --allow-urls to fetch media over the network")
        source = name
    else:
        source = name if os.path.isabs(name) else str(manifest.parent / name)
    kind = column if column in ("image", "video") else media_kind(name)
    if kind is None:
        return Item(id=item_id, path=name, line=line, error=f"{where}: {name}: unknown media type (extension); "
                                                             f"name it in an 'image' or 'video' column")
    return Item(id=item_id, query=query, path=name, line=line, **{kind: source})


def _text_rows(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield n, line


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | str | Exception]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, ValueError(f"invalid JSON: {e}")
                continue
            yield n, row if isinstance(row, (dict, str)) else ValueError("expected an object or a string")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield reader.line_num, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    pq = _pyarrow_parquet()
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _count_rows(path: Path) -> int | None:
    if path.suffix.lower() == ".parquet":
        return _pyarrow_parquet().ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip() and not line.startswith(b"#"))
    return n - 1 if path.suffix.lower() == ".csv" else n


def _pyarrow_parquet():
    return require_pyarrow().parquet


# ---------------------------------------------------------------------------------------------- WebDataset

def expand_shards(spec: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); then glob patterns."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi, width = int(m[1]), int(m[2]), len(m[1])
        return list(itertools.chain.from_iterable(
            expand_shards(spec[:m.start()] + str(i).zfill(width) + spec[m.end():]) for i in range(lo, hi + 1)))
    if any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"no shard matches {spec}")
        return found
    return [spec]


def webdataset_source(shards: list[str]) -> Source:
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"WebDataset shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                                 if len(missing) > 1 else ""))

    def items() -> Iterator[Item]:
        for shard in shards:
            yield from shard_items(shard)

    return Source(f"{len(shards)} WebDataset shard(s)", items)


def shard_items(shard: str) -> Iterator[Item]:
    """One Item per sample (members sharing a key: `dir/key.ext`, the key up to the first dot of the
    name); its first image or video member is the media, a `.prompt` member its prompt."""
    stem = Path(shard).name.removesuffix(".tar")
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for key, members in itertools.groupby(_tar_members(tar), key=lambda m: m[0]):
                yield _sample_item(stem, key, {ext: data for _, ext, data in members})
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Item(id=f"{stem}/<shard>", path=shard, error=f"cannot read WebDataset shard {shard}: {e}")


def _tar_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, bytes]]:
    for member in tar:
        if not member.isfile():
            continue
        folder, name = os.path.split(member.name)
        if "." not in name or name.startswith("."):
            continue
        base, ext = name.split(".", 1)
        yield f"{folder}/{base}" if folder else base, ext.lower(), tar.extractfile(member).read()


def _sample_item(stem: str, key: str, fields: dict[str, bytes]) -> Item:
    item_id = f"{stem}/{key}"
    media = next(((ext, data) for ext, data in fields.items() if media_kind(f"x.{ext.rsplit('.', 1)[-1]}")), None)
    if media is None:
        return Item(id=item_id, path=f"{stem}.tar/{key}", error=f"sample {key} of {stem}.tar has no image or video "
                                                               f"member (has: {', '.join(sorted(fields))})")
    ext, data = media
    prompt = fields.get("prompt") or None
    return Item(id=item_id, path=f"{stem}.tar/{key}.{ext}", query=prompt.decode("utf-8") if prompt else None,
                **{media_kind(f"x.{ext.rsplit('.', 1)[-1]}"): data})


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """Write a WebDataset shard: (key, {ext: bytes}) per sample (tests and data preparation)."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

"""Work items of offline batch inference (`generate`, `caption`): one prompt about one image or video.

An item names its media by path, URL or bytes (a WebDataset member) and carries a stable id, the key of
the resume rule: an id already present in the output is never run again. An item that could not even be
read (a bad manifest line) carries its error and becomes an error row without touching the model.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv"})
URL_SCHEMES = ("http://", "https://")
URL_TIMEOUT_S = 60
BASE_MODEL = ""  # Item.adapter of an item that asks for the base model (no LoRA adapter) by name


def media_kind(name: str) -> str | None:
    """'image' or 'video' from a file name's extension; None for anything else."""
    ext = Path(name.split("?", 1)[0]).suffix.lower()
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


def is_url(source) -> bool:
    return isinstance(source, str) and source.startswith(URL_SCHEMES)


@dataclass
class Item:
    """id: the resume key (unique within a run); query None: the run's default prompt.

    image / video: a path, an http(s) URL or the file's bytes (at most one of them). path: the name
    reported in the output row (a path, URL or `shard.tar/key.ext`). line: 1-based line of the input
    that defined it, when there is one. error: why the item cannot run (it becomes an error row).
    adapter: the LoRA adapter it runs with (a loaded adapter's name; BASE_MODEL: none; None: the run's
    default, see `adapter_for`).
    """

    id: str | int
    query: str | None = None
    image: str | bytes | None = None
    video: str | bytes | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    template: str | None = None
    path: str | None = None
    line: int | None = None
    error: str | None = None
    adapter: str | None = None

    @property
    def key(self) -> str:
        """The id as the resume rule compares it (outputs store ids as given: 7 and "7" are one id)."""
        return str(self.id)


def adapter_for(item: Item, default: str | None) -> str | None:
    """The LoRA adapter an item runs with: its own, else the run's default (None: the base model)."""
    if item.adapter is None:
        return default
    return item.adapter or None


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is missing; the message names the extra that brings it."""


def require_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - the submodule is what readers and writers use
    except ModuleNotFoundError:
        raise MissingExtraError("Parquet needs pyarrow: pip install -e '.[ray]' (from a checkout) or "
                                "pip install 'cogvlm2[ray]'") from None
    return pyarrow


def read_source(source: str | bytes) -> str | bytes:
    """A path or bytes unchanged; a URL fetched to bytes (only items created with URLs allowed have one)."""
    if not is_url(source):
        return source
    try:
        with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            return response.read()
    except OSError as e:
        raise OSError(f"cannot fetch {source}: {getattr(e, 'reason', None) or e}") from None

"""`generate`'s input: a JSONL file of prompts -> Items, streamed line by line, each checked on its own.

A line is a JSON object of Processor arguments plus an optional id and LoRA adapter, or a JSON string (a
text-only query).
Media paths are relative to the input file. A line that is not valid JSON, has an unknown key or a value
of the wrong type becomes an Item carrying its error (an error row with the line number), never an
abort of the whole batch. Without an `id`, the line number is the id (resume assumes the same file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

from ..config import TEMPLATES
from .items import BASE_MODEL, Item, is_url

KEYS = ("id", "query", "image", "video", "history", "template", "adapter")


def read_prompts(path: str, allow_urls: bool = False) -> Iterator[Item]:
    """Items of a JSONL prompt file ('-' = stdin), in order."""
    root = Path(".") if path == "-" else Path(path).parent
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    try:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield parse_prompt(line, n, root, allow_urls)
    finally:
        if f is not sys.stdin:
            f.close()


def count_prompts(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def parse_prompt(line: str, n: int, root: Path, allow_urls: bool = False) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Item(id=n, line=n, error=f"line {n}: invalid JSON: {e}")
    if isinstance(obj, str):
        return Item(id=n, query=obj, line=n)
    if not isinstance(obj, dict):
        return Item(id=n, line=n, error=f"line {n}: expected a JSON object or string, got {type(obj).__name__}")
    item_id = obj.get("id", n)
    try:
        return Item(id=_check_id(item_id), line=n, **_check_fields(obj, root, allow_urls))
    except ValueError as e:
        return Item(id=item_id if isinstance(item_id, (str, int)) else n, line=n, error=f"line {n}: {e}",
                    image=obj.get("image") if isinstance(obj.get("image"), str) else None,
                    video=obj.get("video") if isinstance(obj.get("video"), str) else None)


def _check_id(item_id) -> str | int:
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, got {item_id!r}")
    return item_id


def _check_fields(obj: dict, root: Path, allow_urls: bool) -> dict:
    unknown = [k for k in obj if k not in KEYS]
    if unknown:
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(KEYS)}")
    if "query" not in obj:
        raise ValueError("missing 'query'")
    if not isinstance(obj["query"], str):
        raise ValueError(f"'query' must be a string, got {type(obj['query']).__name__}")
    fields = {"query": obj["query"]}
    if "image" in obj and "video" in obj:
        raise ValueError("give 'image' or 'video', not both")
    for key in ("image", "video"):
        if key in obj:
            value = obj[key]
            if not isinstance(value, str) or not value:
                raise ValueError(f"'{key}' must be a path (string)")
            if is_url(value) and not allow_urls:
                raise ValueError(f"'{key}' is a URL: pass --allow-urls to fetch media over the network")
            fields[key] = value if is_url(value) or Path(value).is_absolute() else str(root / value)
            fields["path"] = value
    history = obj.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history):
        raise ValueError("'history' must be a list of [question, answer] pairs of strings")
    fields["history"] = [tuple(t) for t in history]
    if "template" in obj:
        if obj["template"] not in TEMPLATES:
            raise ValueError(f"'template' must be one of {', '.join(TEMPLATES)}, got {obj['template']!r}")
        fields["template"] = obj["template"]
    if "adapter" in obj:  # a --lora adapter's name; null: the base model
        adapter = obj["adapter"]
        if adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise ValueError(f"'adapter' must be a --lora adapter's name or null (the base model), got {adapter!r}")
        fields["adapter"] = BASE_MODEL if adapter is None else adapter
    return fields

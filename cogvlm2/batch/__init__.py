"""Offline batch inference over datasets: `generate` (JSONL prompts) and `caption` (folders, manifests,
WebDataset), streamed through the engine with a preprocessing pool, written resumably (JSONL / Parquet),
on one device or a Ray cluster."""

from .caption import caption, default_prompt
from .items import Item

__all__ = ["caption", "default_prompt", "Item"]

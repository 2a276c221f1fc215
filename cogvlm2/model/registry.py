"""Model families, registered by config.json's `architectures`: the one table that says which config class
reads a checkpoint, which model class runs it, which media it takes and how its vision tokens are routed.

Code above the model asks the family (or the processor, which holds it: `processor.media_kinds`) instead
of branching on a model type. A new family is one file beside `cogvlm.py` (its config and model classes)
plus one entry in `FAMILIES`; docs/architecture.md shows the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from ..config import ARCHITECTURES, ConfigError, MediaSpec, ModelConfig, read_json
from .cogvlm import CogVLM2ForCausalLM


class FamilyConfig(Protocol):
    """What the package reads from every family's config (besides its own fields)."""

    architecture: str
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    raw: dict

    @classmethod
    def from_dict(cls, d: dict) -> "FamilyConfig": ...


@dataclass(frozen=True)
class ModelFamily:
    """One architecture. model_class(config, tp=None) is built on the meta device and loaded by the official
    checkpoint keys (`cogvlm2.model.load_model`); its forward takes a flat `ForwardBatch`."""

    architecture: str
    config_class: type[FamilyConfig]
    model_class: type[nn.Module]
    media: MediaSpec

    @property
    def media_kinds(self) -> tuple[str, ...]:
        """"image" and / or "video": what a prompt of this family may carry."""
        return self.media.kinds

    @property
    def max_media_items(self) -> int:
        return self.media.max_items

    @property
    def vision_expert(self) -> bool:
        """Vision tokens (boi and patches) run through a visual expert's weights; else every token runs
        through the language weights."""
        return self.media.vision_expert

    def read_config(self, d: dict) -> FamilyConfig:
        return self.config_class.from_dict(d)


FAMILIES: dict[str, ModelFamily] = {
    arch: ModelFamily(arch, ModelConfig, CogVLM2ForCausalLM, media) for arch, media in ARCHITECTURES.items()
}


def family_of(config_or_architectures: Any) -> ModelFamily:
    """The family of a config (its `architecture`), or of config.json's `architectures` list (the first
    entry that is registered)."""
    arch = getattr(config_or_architectures, "architecture", config_or_architectures)
    names = [arch] if isinstance(arch, str) else list(arch) if isinstance(arch, (list, tuple)) else []
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    raise ConfigError(f"config.json: field 'architectures' must contain one of {sorted(FAMILIES)}, got {names!r}")


def read_config(path: str | Path) -> FamilyConfig:
    """A checkpoint's config.json (or its folder), read by its family's config class."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return family_of(data.get("architectures")).read_config(data)

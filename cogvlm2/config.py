"""Model configuration: the official CogVLM2 `config.json` read into validated dataclasses.

All five official checkpoints share one format. Image chat models (cogvlm2-llama3-chat-19B,
-chinese-chat-19B) have a visual expert in every decoder layer; the video family
(cogvlm2-video-llama3-chat / -base, cogvlm2-llama3-caption) has language weights only. Which
family a checkpoint belongs to is read from `architectures`, never guessed from a folder name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

IMAGE_ARCH = "CogVLMForCausalLM"
VIDEO_ARCH = "CogVLMVideoForCausalLM"


@dataclass(frozen=True)
class MediaSpec:
    """What an architecture decides about media: the kinds it takes ("image", "video"), how many items one
    prompt holds, and whether its vision tokens are routed to a visual expert (a second copy of QKV / dense /
    MLP) or through the language weights."""

    kinds: tuple[str, ...]
    max_items: int
    vision_expert: bool
    default_max_position_embeddings: int


# The two CogVLM2 architectures (`cogvlm2.model.registry` registers one family for each).
ARCHITECTURES = {
    IMAGE_ARCH: MediaSpec(kinds=("image",), max_items=1, vision_expert=True, default_max_position_embeddings=8192),
    VIDEO_ARCH: MediaSpec(kinds=("video",), max_items=24, vision_expert=False, default_max_position_embeddings=2048),
}
TEMPLATES = ("base", "chat", "vqa")
VISION_TOKEN_ID = 128002  # <|reserved_special_token_0|>: placeholder of every vision token


class ConfigError(ValueError):
    """A config.json field is missing or invalid; the message names the field."""


def read_json(path: str | Path) -> Any:
    """The parsed config.json at `path` (or in the folder `path`); a ConfigError names a missing file or bad JSON."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None


def _get(d: dict, key: str, kind, where: str, default: Any = ...) -> Any:
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"{where}: required field '{key}' is missing")
        return default
    value = d[key]
    ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: field '{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _positive(obj, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{where}: field '{name}' must be positive, got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class VisionConfig:
    """EVA2-CLIP-E tower (full size: 63 layers, width 1792, 16 heads, image 1344, patch 14)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_positions: int
    in_channels: int = 3
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        where = "config.json vision_config"
        cfg = cls(
            hidden_size=_get(d, "hidden_size", int, where),
            intermediate_size=_get(d, "intermediate_size", int, where),
            num_hidden_layers=_get(d, "num_hidden_layers", int, where),
            num_heads=_get(d, "num_heads", int, where),
            image_size=_get(d, "image_size", int, where),
            patch_size=_get(d, "patch_size", int, where),
            num_positions=_get(d, "num_positions", int, where),
            in_channels=_get(d, "in_channels", int, where, 3),
            layer_norm_eps=float(_get(d, "layer_norm_eps", (int, float), where, 1e-6)),
        )
        _positive(cfg, where, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_heads",
                               "image_size", "patch_size", "num_positions", "in_channels"))
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"{where}: 'hidden_size' {cfg.hidden_size} is not divisible by 'num_heads' {cfg.num_heads}")
        if cfg.image_size % cfg.patch_size or (cfg.image_size // cfg.patch_size) % 2:
            raise ConfigError(f"{where}: 'image_size' / 'patch_size' must be an even integer (2x2 conv), "
                              f"got {cfg.image_size}/{cfg.patch_size}")
        if cfg.num_positions != cfg.grid_size ** 2 + 1:
            raise ConfigError(f"{where}: 'num_positions' must be (image_size/patch_size)^2 + 1 = "
                              f"{cfg.grid_size ** 2 + 1}, got {cfg.num_positions}")
        return cfg

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        """Vision tokens one image (or video frame) occupies in the prompt: 2x2-pooled patches + boi + eoi."""
        return (self.grid_size // 2) ** 2 + 2


@dataclass(frozen=True)
class ModelConfig:
    """The decoder (Llama-3-8B shaped) plus its vision tower and the prompt template."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    template_version: str
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vision: VisionConfig
    rope_theta: float = 500000.0
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def media(self) -> MediaSpec:
        return ARCHITECTURES[self.architecture]

    @property
    def is_video(self) -> bool:
        return "video" in self.media.kinds

    @property
    def has_vision_expert(self) -> bool:
        """Image chat models route image tokens to a second copy of QKV/dense/MLP; video models don't."""
        return self.media.vision_expert

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_media_items(self) -> int:
        """Images (one) or video frames (the official 24) a prompt holds at most."""
        return self.media.max_items

    @property
    def default_max_model_len(self) -> int:
        """Tokens one sequence holds when positions are the limit: max_position_embeddings, plus the tokens
        that share a position inside the largest media (an image's 2306 tokens span 3 positions; a video
        frame's 66 tokens 3). Image 19B: 8192 + 2303; video: 2048 + 24 x 63."""
        return self.max_position_embeddings + self.max_media_items * (self.vision.tokens_per_image - 3)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        where = "config.json"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        archs = _get(d, "architectures", list, where)
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(f"{where}: field 'architectures' must contain {IMAGE_ARCH} or {VIDEO_ARCH}, got {archs!r}")
        eos = _get(d, "eos_token_id", (int, list), where)
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        if not eos_ids or not all(isinstance(e, int) for e in eos_ids):
            raise ConfigError(f"{where}: field 'eos_token_id' must be an int or a list of ints, got {eos!r}")
        vision = _get(d, "vision_config", dict, where)
        cfg = cls(
            architecture=arch,
            hidden_size=_get(d, "hidden_size", int, where),
            intermediate_size=_get(d, "intermediate_size", int, where),
            num_hidden_layers=_get(d, "num_hidden_layers", int, where),
            num_attention_heads=_get(d, "num_attention_heads", int, where),
            # Absent in the image checkpoints' config.json; the official code defaults it to 8.
            num_key_value_heads=_get(d, "num_multi_query_heads", int, where, 8),
            vocab_size=_get(d, "vocab_size", int, where),
            max_position_embeddings=_get(d, "max_position_embeddings", int, where,
                                         ARCHITECTURES[arch].default_max_position_embeddings),
            rms_norm_eps=float(_get(d, "rms_norm_eps", (int, float), where, 1e-5)),
            template_version=_get(d, "template_version", str, where, "chat"),
            bos_token_id=_get(d, "bos_token_id", int, where, 128000),
            eos_token_ids=eos_ids,
            pad_token_id=_get(d, "pad_token_id", int, where, VISION_TOKEN_ID),
            vision=VisionConfig.from_dict(vision),
            raw=d,
        )
        _positive(cfg, where, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "vocab_size", "max_position_embeddings"))
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"{where}: 'hidden_size' must be divisible by 'num_attention_heads'")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(f"{where}: 'num_attention_heads' must be divisible by 'num_multi_query_heads'")
        if cfg.head_dim % 2:
            raise ConfigError(f"{where}: head dim (hidden_size / num_attention_heads) must be even for rotary")
        if cfg.template_version not in TEMPLATES:
            raise ConfigError(f"{where}: field 'template_version' must be one of {TEMPLATES}, got {cfg.template_version!r}")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict:
        """The official config.json layout (what `from_dict` reads back)."""
        v = self.vision
        out = {
            "architectures": [self.architecture],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_multi_query_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "template_version": self.template_version,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "vision_config": {f.name: getattr(v, f.name) for f in fields(v)} | {"hidden_act": "gelu", "dropout_prob": 0.0},
        }
        return {**self.raw, **out}

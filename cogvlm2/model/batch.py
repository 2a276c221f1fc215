"""The one metadata object a forward pass takes: a flat, unpadded batch of tokens and where things go.

The model knows tensors, not requests. Everything CogVLM2-specific about a token (its rotary
position, whether it is routed to the visual expert, whether a vision embedding replaces it) is
computed once by the processor / engine and arrives here as data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class AttentionBackend(Protocol):
    """Owns the KV cache layout and the masking rule; the model only hands it rotated q/k/v."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, d], k/v [N, Hkv, d] for the N tokens of this step -> [N, Hq, d]."""
        ...


@dataclass
class ForwardBatch:
    """N tokens of one step, flattened across sequences.

    input_ids        [N] long
    positions        [N] long: rotary positions (an image's patch tokens share one position)
    attention        the backend that stores this step's K/V and attends
    vision_idx       [Nv] long or None: tokens that use the visual-expert weights (boi + patches;
                     never eoi, never a generated token). None (and no expert_segments) = all tokens
                     use the language weights.
    language_idx     [N - Nv] long: the complement of vision_idx (required when vision_idx is given)
    vision_embeds    [M, D] or None: embeddings that replace the token embeddings at vision_embed_idx
    vision_embed_idx [M] long
    expert_segments  optional host list of (start, end, is_vision) covering [0, N): the same routing
                     as contiguous runs (an image is one run), so experts run on row slices with no
                     gather / scatter copies; when given, the index tensors are not needed
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionBackend
    vision_idx: torch.Tensor | None = None
    language_idx: torch.Tensor | None = None
    vision_embeds: torch.Tensor | None = None
    vision_embed_idx: torch.Tensor | None = None
    expert_segments: list[tuple[int, int, bool]] | None = None

    def __post_init__(self) -> None:
        if (self.vision_idx is None) != (self.language_idx is None):
            raise ValueError("vision_idx and language_idx must be given together")
        if (self.vision_embeds is None) != (self.vision_embed_idx is None):
            raise ValueError("vision_embeds and vision_embed_idx must be given together")


def expert_indices(expert_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split token indices by a boolean routing mask; (None, None) when no token is routed to the expert."""
    if not bool(expert_mask.any()):
        return None, None
    idx = torch.arange(expert_mask.numel(), device=expert_mask.device)
    return idx[expert_mask], idx[~expert_mask]


def expert_segments(mask: list[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal routing: [(start, end, is_vision), ...] covering the whole mask."""
    out: list[tuple[int, int, bool]] = []
    for i, v in enumerate(mask):
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], i + 1, v)
        else:
            out.append((i, i + 1, v))
    return out

"""Packing: several labelled examples -> one flat, unpadded training batch (no padding to 2303 + max tokens).

The examples are laid back to back; `cu_seqlens` tells PackedAttention where each one starts so
attention stays causal inside each example and never crosses into another. Everything the forward
pass needs (expert routing, vision slots, loss targets) is computed here on the CPU, once; the tokens are
laid out by the batch builder the engine and the reference loop use (`model.batch.flatten`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from ..model.attention import PackedAttention
from ..model.batch import ForwardBatch, flatten
from ..processing.prompt import ModelInputs

IGNORE = -100


@dataclass
class PackedBatch:
    """S examples, N tokens in all, T of them predict a labelled next token.

    input_ids     [N] long
    positions     [N] long   each example's own rotary positions (restart at 0 per example)
    cu_seqlens    [S + 1] long
    embed_idx     [M] long: vision placeholders, in the order of the encoded pixel_values' tokens
    pixel_values  [n, 3, H, W] or None: the images / video frames of all examples, in order
    target_idx    [T] long: tokens whose next token is a label
    target_ids    [T] long: those labels (token target_idx[i] predicts target_ids[i])
    expert_segments  host list of the [start, end) runs of tokens routed to the visual expert (empty: none,
                  or a model without the expert)
    outcomes      host counts of what --max-length did to the examples (dataset.FIT, TRUNCATED, ...)
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    embed_idx: torch.Tensor
    pixel_values: torch.Tensor | None
    target_idx: torch.Tensor
    target_ids: torch.Tensor
    expert_segments: list[tuple[int, int]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_targets(self) -> int:
        return self.target_ids.numel()

    def forward_batch(self, vision_embeds: torch.Tensor | None = None) -> ForwardBatch:
        """The model's batch (causal attention inside each example); vision_embeds [M, D]: the features
        of pixel_values' tokens in order (None: no vision features, e.g. a text-only batch)."""
        return ForwardBatch(self.input_ids, self.positions, PackedAttention(self.cu_seqlens), vision_embeds,
                            None if vision_embeds is None else self.embed_idx, self.expert_segments)

    def pin_memory(self) -> "PackedBatch":
        """Called by DataLoader(pin_memory=True) so host-to-device copies can overlap compute."""
        return PackedBatch(**{f.name: _apply(getattr(self, f.name), lambda t: t.pin_memory()) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PackedBatch(**{f.name: _apply(getattr(self, f.name), move) for f in fields(self)})


def _apply(value, fn):
    return fn(value) if isinstance(value, torch.Tensor) else value


def pack(examples: Sequence[ModelInputs | tuple[ModelInputs, str]], has_vision_expert: bool = True) -> PackedBatch:
    """Labelled ModelInputs (labels from the processor's `answer=`), or the dataset's (inputs, outcome)
    pairs, -> one PackedBatch. Dropped examples are left out; a micro-batch dropped whole keeps the first
    one's no-target stand-in, so every rank still runs its forward / backward pass."""
    if not examples:
        raise ValueError("pack() needs at least one example")
    items = [e if isinstance(e, tuple) else (e, "fit") for e in examples]
    outcomes = Counter(outcome for _, outcome in items)
    kept = [x for x, outcome in items if outcome != "dropped"] or [items[0][0]]
    labels, pixels = [], []
    for x in kept:
        if x.labels is None:
            raise ValueError("training examples need labels: build them with processor(..., answer=...)")
        labels += x.labels[1:] + [IGNORE]  # token t predicts label t + 1; the last one predicts nothing
        if x.pixel_values is not None:
            pixels.append(x.pixel_values if x.pixel_values.dim() == 4 else x.pixel_values.unsqueeze(0))
    flat = flatten(x.span() for x in kept)
    labels_t = torch.tensor(labels)
    keep = labels_t != IGNORE
    return PackedBatch(
        input_ids=torch.tensor(flat.input_ids),
        positions=torch.tensor(flat.positions),
        cu_seqlens=torch.tensor(flat.cu_seqlens),
        embed_idx=torch.tensor(flat.vision_embed_idx, dtype=torch.long),
        pixel_values=torch.cat(pixels) if pixels else None,
        target_idx=keep.nonzero().squeeze(1),
        target_ids=labels_t[keep],
        expert_segments=flat.expert_segments if has_vision_expert else [],
        outcomes=dict(outcomes),
    )

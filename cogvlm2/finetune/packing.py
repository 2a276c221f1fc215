"""Packing: several labelled examples -> one flat, unpadded training batch (no padding to 2303 + max tokens).

The examples are laid back to back; `cu_seqlens` tells PackedAttention where each one starts so
attention stays causal inside each example and never crosses into another. Everything the forward
pass needs (expert routing, vision slots, loss targets) is computed here on the CPU, once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from ..model.batch import expert_segments
from ..processing.prompt import VISION, ModelInputs, vision_expert_mask

IGNORE = -100


@dataclass
class PackedBatch:
    """S examples, N tokens in all, T of them predict a labelled next token.

    input_ids     [N] long
    positions     [N] long   each example's own rotary positions (restart at 0 per example)
    cu_seqlens    [S + 1] long
    vision_idx    [Nv] long or None: tokens routed to the visual expert (None: no such token)
    language_idx  [N - Nv] long or None
    embed_idx     [M] long: vision placeholders, in the order of the encoded pixel_values' tokens
    pixel_values  [n, 3, H, W] or None: the images / video frames of all examples, in order
    target_idx    [T] long: tokens whose next token is a label
    target_ids    [T] long: those labels (token target_idx[i] predicts target_ids[i])
    expert_segments  host list of (start, end, is_vision) runs: the same routing as vision_idx /
                  language_idx, as contiguous slices (no gather / scatter copies in the experts)
    outcomes      host counts of what --max-length did to the examples (dataset.FIT, TRUNCATED, ...)
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    vision_idx: torch.Tensor | None
    language_idx: torch.Tensor | None
    embed_idx: torch.Tensor
    pixel_values: torch.Tensor | None
    target_idx: torch.Tensor
    target_ids: torch.Tensor
    expert_segments: list[tuple[int, int, bool]] | None = None
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_targets(self) -> int:
        return self.target_ids.numel()

    def pin_memory(self) -> "PackedBatch":
        """Called by DataLoader(pin_memory=True) so host-to-device copies can overlap compute."""
        return PackedBatch(**{f.name: _apply(getattr(self, f.name), lambda t: t.pin_memory()) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PackedBatch(**{f.name: _apply(getattr(self, f.name), move) for f in fields(self)})


def _apply(value, fn):
    return fn(value) if isinstance(value, torch.Tensor) else value


def pack(examples: Sequence[ModelInputs | tuple[ModelInputs, str]], has_vision_expert: bool = True,
         segments: bool = True) -> PackedBatch:
    """Labelled ModelInputs (labels from the processor's `answer=`), or the dataset's (inputs, outcome)
    pairs, -> one PackedBatch. Dropped examples are left out; a micro-batch dropped whole keeps the first
    one's no-target stand-in, so every rank still runs its forward / backward pass.

    segments=False routes experts by index lists only: each expert layer then runs once per forward
    whatever the number of examples, which ZeRO-3 needs (it all-gathers a layer's shards at every call,
    and ranks must make the same calls)."""
    if not examples:
        raise ValueError("pack() needs at least one example")
    items = [e if isinstance(e, tuple) else (e, "fit") for e in examples]
    outcomes = Counter(outcome for _, outcome in items)
    kept = [x for x, outcome in items if outcome != "dropped"] or [items[0][0]]
    ids, pos, expert, slots, labels, lengths, pixels = [], [], [], [], [], [], []
    for x in kept:
        if x.labels is None:
            raise ValueError("training examples need labels: build them with processor(..., answer=...)")
        ids += x.input_ids
        pos += x.position_ids
        expert += vision_expert_mask(x.token_type_ids)
        slots += [t == VISION for t in x.token_type_ids]
        labels += x.labels[1:] + [IGNORE]  # token t predicts label t + 1; the last one predicts nothing
        lengths.append(len(x))
        if x.pixel_values is not None:
            pixels.append(x.pixel_values if x.pixel_values.dim() == 4 else x.pixel_values.unsqueeze(0))
    expert_t, labels_t = torch.tensor(expert), torch.tensor(labels)
    idx = torch.arange(len(ids))
    vision_idx = language_idx = runs = None
    if has_vision_expert and bool(expert_t.any()):
        vision_idx, language_idx = idx[expert_t], idx[~expert_t]
        runs = expert_segments(expert) if segments else None
    keep = labels_t != IGNORE
    return PackedBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(pos),
        cu_seqlens=torch.tensor([0] + lengths).cumsum(0),
        vision_idx=vision_idx,
        language_idx=language_idx,
        embed_idx=idx[torch.tensor(slots)],
        pixel_values=torch.cat(pixels) if pixels else None,
        target_idx=idx[keep],
        target_ids=labels_t[keep],
        expert_segments=runs,
        outcomes=dict(outcomes),
    )

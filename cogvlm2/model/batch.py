"""The one metadata object a forward pass takes (ForwardBatch) and the one function that lays tokens out for it.

The model knows tensors, not requests. Everything CogVLM2-specific about a token (its rotary
position, whether it is routed to the visual expert, whether a vision embedding replaces it) is
computed once by the processor / engine and arrives here as data: a `TokenSpan` per sequence, laid
back to back by `flatten` for the reference loop (generation.py), the engine runner and fine-tuning
packing alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Protocol

import torch

Segments = list[tuple[int, int]]  # sorted, disjoint [start, end) runs of tokens that use the visual expert


class AttentionBackend(Protocol):
    """Owns the KV cache layout and the masking rule; the model only hands it rotated q/k/v."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, d], k/v [N, Hkv, d] for the N tokens of this step -> [N, Hq, d].

        A backend may also offer `kv_destination(layer) -> (k_cache, v_cache, slots) | None`: where the model's
        decode kernel may write this step's k / v itself (ops.qkv_rotary), after which it calls the backend with
        `stored=True` (k / v already in the cache). Backends without it are never called so."""
        ...


@dataclass
class ForwardBatch:
    """N tokens of one step, flattened across sequences.

    input_ids        [N] long
    positions        [N] long: rotary positions (an image's patch tokens share one position)
    attention        the backend that stores this step's K/V and attends
    vision_embeds    [M, D] or None: embeddings that replace the token embeddings at vision_embed_idx
    vision_embed_idx [M] long
    expert_segments  host list of the [start, end) runs of tokens that use the visual-expert weights
                     (boi + patches; never eoi, never a generated token); the rest use the language
                     weights. Empty: plain Llama. A host list, so routing never syncs with the device and
                     a step keeps fixed shapes (decode steps, CUDA graphs included, have none).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionBackend
    vision_embeds: torch.Tensor | None = None
    vision_embed_idx: torch.Tensor | None = None
    expert_segments: Segments = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.vision_embeds is None) != (self.vision_embed_idx is None):
            raise ValueError("vision_embeds and vision_embed_idx must be given together")
        check_segments(self.expert_segments, self.input_ids.shape[0])

    @cached_property
    def language_segments(self) -> Segments:
        """The complement of expert_segments in [0, N): the runs that use the language weights."""
        return complement(self.expert_segments, self.input_ids.shape[0])

    @cached_property
    def routed_runs(self) -> list[tuple[bool, int, int]]:
        """Every run in token order as (is_vision, its first row in that expert's joined rows, length):
        how the two experts' outputs interleave back into token order."""
        runs = sorted([(a, b, True) for a, b in self.expert_segments] +
                      [(a, b, False) for a, b in self.language_segments])
        taken = {True: 0, False: 0}
        out = []
        for a, b, vision in runs:
            out.append((vision, taken[vision], b - a))
            taken[vision] += b - a
        return out


@dataclass
class TokenSpan:
    """Consecutive tokens of one sequence as a forward pass takes them (indices local to the span).

    input_ids        token ids
    positions        their rotary positions
    expert_segments  runs of them that use the visual expert
    vision_slots     the tokens whose embedding a vision feature replaces, in feature order
    """

    input_ids: list[int]
    positions: list[int]
    expert_segments: Segments = field(default_factory=list)
    vision_slots: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class FlatTokens:
    """Spans laid back to back: host lists of one flat, unpadded batch.

    cu_seqlens        [S + 1] where each span starts (and the total at the end)
    expert_segments   the spans' runs, offset to flat indices (adjacent runs joined)
    vision_embed_idx  the spans' vision slots, offset: feature row i replaces token vision_embed_idx[i]
    """

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    cu_seqlens: list[int] = field(default_factory=lambda: [0])
    expert_segments: Segments = field(default_factory=list)
    vision_embed_idx: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_batch(self, attention: AttentionBackend, vision_embeds: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> ForwardBatch:
        """The ForwardBatch of these tokens, its tensors built on `device` (vision_embeds [M, D], when
        given, are the features of the vision slots in order)."""
        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        embed_idx = None if vision_embeds is None else tensor(self.vision_embed_idx)
        return ForwardBatch(tensor(self.input_ids), tensor(self.positions), attention, vision_embeds, embed_idx,
                            self.expert_segments)


def flatten(spans: Iterable[TokenSpan]) -> FlatTokens:
    """The one batch builder: spans (one per sequence) -> one flat batch, in order."""
    out = FlatTokens()
    for span in spans:
        offset = len(out.input_ids)
        if len(span.positions) != len(span):
            raise ValueError(f"a span of {len(span)} tokens has {len(span.positions)} positions")
        check_segments(span.expert_segments, len(span))
        out.input_ids += span.input_ids
        out.positions += span.positions
        out.cu_seqlens.append(offset + len(span))
        for a, b in span.expert_segments:
            if out.expert_segments and out.expert_segments[-1][1] == offset + a:
                out.expert_segments[-1] = (out.expert_segments[-1][0], offset + b)
            else:
                out.expert_segments.append((offset + a, offset + b))
        out.vision_embed_idx += [offset + i for i in span.vision_slots]
    return out


def clip_segments(segments: Segments | None, start: int, end: int) -> Segments:
    """The runs inside tokens [start, end), as indices local to start."""
    return [(max(a, start) - start, min(b, end) - start) for a, b in segments or () if a < end and b > start]


def complement(segments: Segments, n: int) -> Segments:
    """The runs of [0, n) that no segment covers."""
    out, at = [], 0
    for a, b in segments:
        if a > at:
            out.append((at, a))
        at = b
    if at < n:
        out.append((at, n))
    return out


def check_segments(segments: Segments, n: int) -> None:
    """ValueError unless the runs are non-empty, sorted, disjoint and inside [0, n)."""
    at = 0
    for a, b in segments:
        if not at <= a < b <= n:
            raise ValueError(f"expert segments {segments} are not sorted, disjoint, non-empty runs in [0, {n})")
        at = b

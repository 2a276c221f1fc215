"""ModelRunner: one ScheduledBatch -> device tensors -> forward -> logits of the sampling rows -> token ids.

Per step, all integer metadata (ids, positions, KV slots, block tables, lengths, routing and vision
indices) is built in host lists, packed into one tensor and copied to the device once (pinned,
non_blocking on CUDA). Visual-expert routing arrives as index tensors sliced from the prompt's
precomputed mask. Image / video features are encoded once per vision hash and kept until no
unfinished sequence has vision tokens left to prefill, so chunked prefill never re-encodes an image
and concurrent requests with the same image share one encoding. Pure-decode steps replay a CUDA
graph when one was captured for a large enough batch size; the only host sync of a step is copying
the sampled ids out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..model.batch import ForwardBatch, expert_segments
from ..model.cogvlm import CogVLM2ForCausalLM
from .attention import Attend, AttentionMetadata, KVCache, PagedAttention, attend_reference
from .config import EngineConfig
from .cuda_graph import DecodeGraphs
from .memory import num_kv_blocks
from .sampler import Sampler
from .scheduler import ScheduledBatch
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CogVLM2ForCausalLM, config: EngineConfig, attend: Attend = attend_reference):
        self.model = model
        self.config = config
        self.device = model.device
        self.attend = attend
        cfg = model.config
        blocks = config.num_kv_blocks or num_kv_blocks(model, config, attend)
        self.kv = KVCache(cfg.num_hidden_layers, blocks, config.block_size, cfg.num_key_value_heads, cfg.head_dim,
                          model.dtype, self.device)
        self.sampler = Sampler()
        self.vision_cache: dict[str, torch.Tensor] = {}  # vision hash -> features [num_vision_tokens, D]
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(model, self.kv, config, attend)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[int | None]:
        """Run one step; the sampled id of every sequence that samples, None for the others."""
        sampling = [s for s, sample in zip(batch.seqs, batch.samples) if sample]
        if (self.graphs is not None and batch.is_decode and self.graphs.fits(len(batch))
                and not any(s.has_pending_vision for s in batch.seqs)):
            hidden = self.graphs.run(self._decode_rows(batch))
        else:
            hidden = self._forward_eager(batch)
        if not sampling:
            return [None] * len(batch)
        tokens = self.sampler(self.model.compute_logits(hidden), sampling).tolist()  # the one host sync
        it = iter(tokens)
        return [next(it) if sample else None for sample in batch.samples]

    def _forward_eager(self, batch: ScheduledBatch) -> torch.Tensor:
        """Hidden states of the sampling rows [n_sample, D]."""
        h = HostInputs.build(batch, self.config.block_size, self.kv.null_block, self.model.config.has_vision_expert)
        (ids, pos, slots, qsl, ctx, tables, logits_idx, embed_idx, vision_idx, language_idx) = self._to_device(
            [h.ids, h.positions, h.slots, h.query_start, h.context, h.tables, h.logits_idx, h.embed_idx,
             h.vision_idx, h.language_idx])
        meta = AttentionMetadata(slots, tables.view(len(batch), -1), ctx, qsl, batch.num_new_tokens, h.context)
        routed = bool(h.vision_idx)
        fb = ForwardBatch(ids, pos, PagedAttention(self.kv, meta, self.attend),
                          vision_idx if routed else None, language_idx if routed else None,
                          self._vision_embeds(h.vision_parts) if h.vision_parts else None,
                          embed_idx if h.vision_parts else None, h.segments)
        return self.model(fb).index_select(0, logits_idx)

    def _decode_rows(self, batch: ScheduledBatch) -> tuple[list[int], list[int], list[int], list[int], list[list[int]]]:
        """(ids, positions, slots, context lens, block tables) of a pure-decode batch: one token per sequence."""
        bs = self.config.block_size
        ids, pos, slots = [], [], []
        for seq, start in zip(batch.seqs, batch.starts):
            ids.append(seq.token_ids[start])
            pos += seq.positions(start, start + 1)
            slots.append(seq.block_table[start // bs] * bs + start % bs)
        return ids, pos, slots, [start + 1 for start in batch.starts], [s.block_table for s in batch.seqs]

    def _to_device(self, arrays: list[list[int]]) -> list[torch.Tensor]:
        """Many host int lists -> device long tensors with ONE host-to-device copy."""
        flat = torch.tensor(list(itertools.chain.from_iterable(arrays)), dtype=torch.long)
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        return list(flat.to(self.device, non_blocking=True).split([len(a) for a in arrays]))

    def _vision_embeds(self, parts: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Features [M, D] for the vision tokens of this step, encoding each missing image once."""
        missing: dict[str, torch.Tensor] = {}
        for seq, _, _ in parts:
            if seq.vision_hash not in self.vision_cache:
                missing.setdefault(seq.vision_hash, seq.inputs.pixel_values)
        if missing:
            pixels = torch.cat(list(missing.values())).to(self.device, non_blocking=True)
            feats = self.model.encode_images(pixels)  # [frames, tokens_per_image, D]
            frames = [p.shape[0] for p in missing.values()]
            for h, f in zip(missing, feats.split(frames)):
                self.vision_cache[h] = f.reshape(-1, f.shape[-1])
        return torch.cat([self.vision_cache[seq.vision_hash][a:b] for seq, a, b in parts])

    def release_vision(self, keep: set[str]) -> None:
        """Drop cached features that no unfinished sequence still needs."""
        for h in [h for h in self.vision_cache if h not in keep]:
            del self.vision_cache[h]


@dataclass
class HostInputs:
    """A step's integer metadata as host lists (flat token index = offset of its sequence + i)."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # KV cache slot of each new token
    query_start: list[int] = field(default_factory=lambda: [0])  # cu_seqlens of the new tokens
    context: list[int] = field(default_factory=list)  # cached tokens per sequence after the step
    tables: list[int] = field(default_factory=list)  # [B * W] block tables padded with the null block
    logits_idx: list[int] = field(default_factory=list)  # last token of each sampling sequence
    embed_idx: list[int] = field(default_factory=list)  # tokens whose embedding a vision feature replaces
    vision_idx: list[int] = field(default_factory=list)  # tokens routed to the visual expert
    language_idx: list[int] = field(default_factory=list)  # the others (only when vision_idx is not empty)
    segments: list[tuple[int, int, bool]] | None = None  # the same routing as contiguous runs
    vision_parts: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, feature rows a:b)

    @classmethod
    def build(cls, batch: ScheduledBatch, block_size: int, null_block: int, expert_model: bool) -> "HostInputs":
        h, expert = cls(), []
        width = max(len(s.block_table) for s in batch.seqs)
        for seq, start, n, sample in zip(batch.seqs, batch.starts, batch.num_new_tokens, batch.samples):
            end, offset, table = start + n, h.query_start[-1], seq.block_table
            h.ids += seq.token_ids[start:end]
            h.positions += seq.positions(start, end)
            h.slots += [table[t // block_size] * block_size + t % block_size for t in range(start, end)]
            h.tables += table + [null_block] * (width - len(table))
            h.context.append(end)
            h.query_start.append(offset + n)
            if sample:
                h.logits_idx.append(offset + n - 1)
            if expert_model:
                expert += seq.expert_mask(start, end)
            a, b = seq.vision_range(start, end)
            if b > a:
                h.embed_idx += [offset + seq.vision_token_idx[r] - start for r in range(a, b)]
                h.vision_parts.append((seq, a, b))
        h.vision_idx = [i for i, e in enumerate(expert) if e]
        h.language_idx = [i for i, e in enumerate(expert) if not e] if h.vision_idx else []
        h.segments = expert_segments(expert) if h.vision_idx else None
        return h

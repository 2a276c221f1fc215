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

import torch

from ..model.batch import ForwardBatch
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
        bs, expert_model = self.config.block_size, self.model.config.has_vision_expert
        ids, pos, slots, expert, embed_idx, logits_idx, vision_parts = [], [], [], [], [], [], []
        qsl, offset = [0], 0
        for seq, start, n, sample in zip(batch.seqs, batch.starts, batch.num_new_tokens, batch.samples):
            end = start + n
            ids += seq.token_ids[start:end]
            pos += seq.positions(start, end)
            table = seq.block_table
            slots += [table[t // bs] * bs + t % bs for t in range(start, end)]
            if expert_model:
                expert += seq.expert_mask(start, end)
            a, b = seq.vision_range(start, end)
            if b > a:
                embed_idx += [offset + seq.vision_token_idx[r] - start for r in range(a, b)]
                vision_parts.append((seq, a, b))
            offset += n
            qsl.append(offset)
            if sample:
                logits_idx.append(offset - 1)
        vision_idx = [i for i, e in enumerate(expert) if e]
        language_idx = [i for i, e in enumerate(expert) if not e] if vision_idx else []
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [self.kv.null_block] * (width - len(s.block_table)) for s in batch.seqs]
        context = [start + n for start, n in zip(batch.starts, batch.num_new_tokens)]
        (ids_t, pos_t, slots_t, qsl_t, ctx_t, tables_t, logits_t, embed_t, vis_t, lang_t) = self._to_device(
            [ids, pos, slots, qsl, context, list(itertools.chain.from_iterable(tables)), logits_idx, embed_idx,
             vision_idx, language_idx])
        meta = AttentionMetadata(slots_t, tables_t.view(len(batch), width), ctx_t, qsl_t,
                                 batch.num_new_tokens, context)
        fb = ForwardBatch(ids_t, pos_t, PagedAttention(self.kv, meta, self.attend),
                          vis_t if vision_idx else None, lang_t if vision_idx else None,
                          self._vision_embeds(vision_parts) if vision_parts else None,
                          embed_t if vision_parts else None)
        return self.model(fb).index_select(0, logits_t)

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

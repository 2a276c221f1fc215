"""The CUDA attend of the paged engine: flash SDPA for prefill chunks, the Triton paged kernel for decode rows.

Plugs into `engine.attention.PagedAttention` (same signature as `attend_reference`). Prefill is
compute-bound: each prefilling sequence's keys are gathered once into a contiguous tensor (a few MB
per layer) and go through SDPA's flash kernel, causal (bottom-right aligned when a prefix was
cached). Decode is bandwidth-bound: all one-token rows go through `paged_decode_attention`, which
reads K/V straight from the paged blocks. The graph-captured decode path uses device tensors only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..attention_metadata import AttentionMetadata
from .decode_attention import paged_decode_attention


class CudaAttend:
    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len  # bounds every context: fixes the decode grid for CUDA graphs

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        if meta.query_lens is None:  # CUDA-graph decode: one query per sequence
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                          self.max_model_len)
        if all(n == 1 for n in meta.query_lens):
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                          max(meta.context_lens_host))
        out = torch.empty_like(q)
        decode_rows = [b for b, n in enumerate(meta.query_lens) if n == 1]
        if decode_rows:
            rows = torch.tensor(decode_rows, device=q.device)
            tokens = meta.query_start_loc.index_select(0, rows)
            out[tokens] = paged_decode_attention(
                q.index_select(0, tokens), k_cache, v_cache, meta.block_tables.index_select(0, rows),
                meta.context_lens.index_select(0, rows), scale, max(meta.context_lens_host[b] for b in decode_rows))
        block_size = k_cache.shape[1]
        group = q.shape[1] // k_cache.shape[2]
        start = 0
        for b, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_host)):
            if q_len > 1:
                blocks = meta.block_tables[b, :-(-ctx // block_size)]
                k = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1).repeat_interleave(group, 0)  # [Hq, ctx, d]
                v = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1).repeat_interleave(group, 0)
                qb = q[start:start + q_len].transpose(0, 1)  # [Hq, q_len, d]
                if q_len == ctx:
                    o = F.scaled_dot_product_attention(qb[None], k[None], v[None], is_causal=True)
                else:
                    o = F.scaled_dot_product_attention(qb[None], k[None], v[None],
                                                       attn_mask=causal_lower_right(q_len, ctx))
                out[start:start + q_len] = o[0].transpose(0, 1)
            start += q_len
        return out

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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ..attention_metadata import AttentionMetadata
from . import decode_attention
from .decode_attention import paged_decode_attention


# Never cuDNN for prefill chunks: it builds a plan per (query, key) length on the host while the GPU idles (355 ms
# of GPU gaps ending at its memset in a 16-image captioning profile; +600 ms steps in a 64-image run), again at every
# new prompt length when serving. Flash costs more than a warm plan (H100: 0.25 vs 0.14 ms a layer at 2.3K tokens).
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class CudaAttend:
    """Every decode launch sizes its grid for max_model_len (the captured graphs', too): the kernels compile
    once per tile set instead of once per context length met in a mixed step (each a Triton JIT on the host)."""

    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len  # bounds every context: fixes the decode grid
        self._rows: tuple[AttentionMetadata, tuple[torch.Tensor, ...]] | None = None

    prefetches = True  # takes prefetch= (engine.attention.PagedAttention)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, prefetch: bool = False) -> torch.Tensor:
        """prefetch: decode rows load their first K / V tile before waiting for the kernel before (PDL), which
        wrote the step's K / V (decode_attention.PREFETCH)."""
        scale = q.shape[-1] ** -0.5
        if meta.query_lens is None or all(n == 1 for n in meta.query_lens):  # decode rows only (a graph's, too)
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                          self.max_model_len, prefetch=prefetch and decode_attention.PREFETCH)
        out = torch.empty_like(q)
        if any(n == 1 for n in meta.query_lens):
            tokens, tables, lens = self._decode_rows(meta)
            out[tokens] = paged_decode_attention(q.index_select(0, tokens), k_cache, v_cache, tables, lens, scale,
                                                 self.max_model_len)
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
                    with sdpa_kernel(PREFILL_BACKENDS):
                        o = F.scaled_dot_product_attention(qb[None], k[None], v[None], is_causal=True)
                else:  # lower-right causal goes to the flash kernel directly
                    o = F.scaled_dot_product_attention(qb[None], k[None], v[None],
                                                       attn_mask=causal_lower_right(q_len, ctx))
                out[start:start + q_len] = o[0].transpose(0, 1)
            start += q_len
        return out

    def _decode_rows(self, meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
        """A mixed step's one-token rows (their flat tokens, block tables, context lengths), gathered on the device
        once per step (every layer shares the step's metadata), from indices copied without a host sync."""
        if self._rows is None or self._rows[0] is not meta:
            rows = [b for b, n in enumerate(meta.query_lens) if n == 1]
            index = torch.tensor(rows, dtype=torch.long, pin_memory=True).to(meta.block_tables.device,
                                                                               non_blocking=True)
            self._rows = meta, (meta.query_start_loc.index_select(0, index), meta.block_tables.index_select(0, index),
                                meta.context_lens.index_select(0, index))
        return self._rows[1]

"""Paged attention: the KV cache tensor, per-step metadata, the K/V write, and the reference attend.

Extension point for a fast kernel (FlexAttention / Triton / FlashAttention varlen): implement

    attend(q [N, Hq, d], k_cache [num_blocks + 1, block_size, Hkv, d], v_cache, meta) -> [N, Hq, d]

reading `meta.block_tables`, `meta.context_lens` and `meta.query_start_loc` (device tensors), and
pass it as `LLMEngine(..., attend=...)` (default: `default_attend`, which picks `kernels.cuda_attend`
on CUDA). The K/V of this step's tokens is already in the cache when attend runs, so it sees queries
and keys of token i of sequence s at cache position context_lens[s] - query_len[s] + i. Pure-decode
steps under a CUDA graph carry no host lists (`query_lens is None`), so a graph-safe attend must use
device tensors only.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import torch
import torch.nn.functional as F

from .attention_metadata import AttentionMetadata

try:  # Triton is optional: CPU installs never need it
    from .kernels import kv_store
except ImportError:  # pragma: no cover - exercised on machines without triton
    kv_store = None

__all__ = ["Attend", "AttentionMetadata", "KVCache", "PagedAttention", "attend_decode_batched", "attend_reference",
           "default_attend"]


class KVCache:
    """K and V of every layer: [num_layers, 2, num_blocks + 1, block_size, Hkv, d].

    The extra last block is the null block: padded rows of a CUDA-graph batch write into it and
    padded block-table entries point to it; the block manager never hands it out.

    device may be one device per layer (pipeline stages): each run of consecutive layers on one device
    then gets its own [layers, 2, ...] tensor there, and `kv` is the first of them. `layers[i]` is layer
    i's [2, num_blocks + 1, block_size, Hkv, d] either way.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | list[torch.device]):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.null_block = num_blocks
        devices = [torch.device(d) for d in device] if isinstance(device, (list, tuple)) else \
            [torch.device(device)] * num_layers
        runs = [(d, len(list(g))) for d, g in itertools.groupby(devices)]
        parts = [torch.zeros(n, 2, num_blocks + 1, block_size, num_kv_heads, head_dim, dtype=dtype, device=dev)
                 for dev, n in runs]  # one allocation per run of layers on one device
        self.kv = parts[0]
        self._parts = parts
        self.layers: list[torch.Tensor] = [layer for part in parts for layer in part.unbind(0)]
        self.multi_device = len(parts) > 1

    def copy_rows(self, copies: list[tuple[int, int, int]]) -> None:
        """For each (source block, destination block, rows): the first rows of the source's K and V, every
        layer, into the destination (on the device's stream, after the steps launched before)."""
        for src, dst, rows in copies:
            if src != dst:
                for part in self._parts:
                    part[:, :, dst, :rows].copy_(part[:, :, src, :rows])

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def attend_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Per sequence: gather its blocks, SDPA with the causal mask shifted by the cached length.
    Without host lists (CUDA graph) it falls back to the batched decode path."""
    if meta.query_lens is None:
        return attend_decode_batched(q, k_cache, v_cache, meta)
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    start = 0
    for b, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_host)):
        blocks = meta.block_tables[b, :-(-ctx // block_size)]
        k = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)[None]  # [1, Hkv, ctx, d]
        v = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)[None]
        qb = q[start:start + q_len].transpose(0, 1)[None]  # [1, Hq, q_len, d]
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        mask = (torch.arange(ctx, device=q.device)[None, :] <= q_pos)[None, None]  # [1, 1, q_len, ctx]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, enable_gqa=True)
        out[start:start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


def attend_decode_batched(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """One query per sequence, static shapes (CUDA-graph safe): gather the whole padded block table
    [B, W * block_size] and mask keys at or beyond each context length."""
    bsz, width = meta.block_tables.shape
    k = k_cache[meta.block_tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, W * block_size, d]
    v = v_cache[meta.block_tables].flatten(1, 2).transpose(1, 2)
    keys = torch.arange(k.shape[2], device=q.device)
    mask = (keys[None, :] < meta.context_lens[:, None])[:, None, None, :]  # [B, 1, 1, W * block_size]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, enable_gqa=True)  # [B, Hq, 1, d]
    return out[:, :, 0, :]


def default_attend(device: torch.device, max_model_len: int) -> Attend:
    """On CUDA the fast kernels of `engine/kernels` when they import (Triton present); else the reference."""
    if torch.device(device).type == "cuda":
        try:
            from .kernels.cuda_attend import CudaAttend
        except ImportError:
            return attend_reference
        return CudaAttend(max_model_len)
    return attend_reference


class PagedAttention:
    """The AttentionBackend of one step: writes the new K/V into their slots, then attends.

    Under pipeline stages a layer's cache may live on another device than the metadata: its
    tensors are copied there once per step and device (the layer's q/k/v already are there)."""

    def __init__(self, cache: KVCache, meta: AttentionMetadata, attend: Attend = attend_reference):
        self.cache = cache
        self.meta = meta
        self.attend = attend
        self._prefetches = getattr(attend, "prefetches", False)  # takes prefetch= (CudaAttend)
        self._metas = {meta.slot_mapping.device: meta}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 stored: bool = False) -> torch.Tensor:
        """stored: k / v are in the cache already (written by the model where kv_destination said: by its QKV
        kernel, which an attend that `prefetches` overlaps with its first K / V loads)."""
        kv = self.cache.layers[layer]
        k_cache, v_cache = kv[0], kv[1]  # [num_blocks + 1, bs, Hkv, d]
        meta = self._metas.get(kv.device) or self._meta_on(kv.device)
        if not self.cache.multi_device or kv.device.type != "cuda":
            if not stored:
                self._store(k_cache, v_cache, meta.slot_mapping, k, v)
            elif self._prefetches:
                return self.attend(q, k_cache, v_cache, meta, prefetch=True)
            return self.attend(q, k_cache, v_cache, meta)
        with torch.cuda.device(kv.device):  # kernels launch on the current device
            if not stored:
                self._store(k_cache, v_cache, meta.slot_mapping, k, v)
            return self.attend(q, k_cache, v_cache, meta)

    def kv_destination(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(k_cache, v_cache, slot_mapping) of `layer` where the model's decode kernel may write this step's K / V
        itself (then calls with stored=True; model/batch.py's AttentionBackend): a contiguous CUDA cache on the
        metadata's device; None elsewhere (CPU, pipeline stages' caches on other devices), where the store stays
        here."""
        kv = self.cache.layers[layer]
        if kv.device.type != "cuda" or self.cache.multi_device or not kv.is_contiguous():
            return None
        return kv[0], kv[1], self.meta.slot_mapping

    @staticmethod
    def _store(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> None:
        """The new K / V into their slots: one Triton launch on CUDA, two index_copy_ elsewhere."""
        if k_cache.is_cuda and kv_store is not None and kv_store.fits(k, v, k_cache):
            kv_store.store_kv(k_cache, v_cache, slots, k, v)
            return
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def _meta_on(self, device: torch.device) -> AttentionMetadata:
        m = self.meta
        moved = {f: getattr(m, f).to(device, non_blocking=device.type == "cuda")
                 for f in ("slot_mapping", "block_tables", "context_lens", "query_start_loc")}
        self._metas[device] = dataclasses.replace(m, **moved)
        return self._metas[device]

"""The new tokens' K and V written into their paged-cache slots in one Triton launch (two index_copy_ kernels
otherwise: 64 launches per decode step of the 19B model, 32 with this)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import pdl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_k, stride_v, ROW: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < ROW
    k = tl.load(k_ptr + t * stride_k + offs, mask=ok)
    v = tl.load(v_ptr + t * stride_v + offs, mask=ok)
    tl.store(kc_ptr + slot * ROW + offs, k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptr + slot * ROW + offs, v.to(vc_ptr.dtype.element_ty), mask=ok)


def fits(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """k / v [N, Hkv, d] whose rows are contiguous (any row stride: views of the fused QKV), and a
    contiguous cache of the same row shape."""
    row = k.shape[1] * k.shape[2]
    return all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (k, v)) and k_cache.is_contiguous() \
        and k_cache.shape[-2] * k_cache.shape[-1] == row


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k_cache.view(-1, Hkv, d)[slots] = k and the same for v (k / v [N, Hkv, d], `fits`)."""
    n, row = k.shape[0], k.shape[1] * k.shape[2]
    if n:
        _store_kv_kernel[(n,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0), ROW=row,
                               BLOCK=triton.next_power_of_2(row), num_warps=4 if row >= 1024 else 1,
                               **pdl.options(k))

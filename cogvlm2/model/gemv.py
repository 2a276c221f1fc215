"""A one-row GEMV in Triton for batch-1 decode (`ops.linear` uses it while `ops.DECODE_GEMV` is set: the default;
`COGVLM2_DECODE_GEMV=0` keeps cuBLAS).

At batch 1 a decode step is the language weights streamed once (15 GB on one H200, 7.7 GB per rank at TP=2). The
profiles of `benchmarks/profile_gpu.py` and `tp_gpu.py --profile-ttft` put cuBLAS's GEMVs at 3.6 TB/s on one GPU
(87% of copy bandwidth) and at ~3.0 TB/s on the TP=2 shapes, where it also splits K (128 reduce launches a step).
This kernel keeps every program on whole rows: BLOCK_N rows of W [N, K] (K contiguous) times x, K walked in BLOCK_K
steps that are prefetched STAGES - 1 steps ahead through shared memory (cp.async, `tl.range(num_stages)`),
so the loads stay in flight while the products are summed; no split of K, so no partials and no second launch,
and the sum's order does not depend on scheduling. `benchmarks/kernels_gpu.py --only gemv` times it against cuBLAS
on the language model's decode shapes at TP=1 and TP=2; `COGVLM2_DECODE_GEMV=0 / 1 benchmarks/engine_gpu.py` the engine
without / with it (H200: 94% of copy bandwidth vs cuBLAS's 87% at TP=1, 83% vs 70% at TP=2; BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_ops import _on

# (BLOCK_N, BLOCK_K, warps, stages): 8 rows x 512 columns (8 KB of bf16) a step, 3 steps in flight; N = 4,096
# gives 512 programs, ~4 per SM
CONFIG = (8, 512, 4, 3)
# what the benchmark sweeps (the first is CONFIG)
CANDIDATES = [CONFIG, (8, 512, 4, 4), (16, 256, 4, 3), (4, 1024, 4, 3), (16, 512, 8, 3), (8, 1024, 8, 3),
              (8, 512, 4, 1)]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, stride_wn, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 STAGES: tl.constexpr):
    """out[n] = sum_k W[n, k] x[k] for BLOCK_N rows: products summed per lane in float32 over the K steps, then
    across the lanes once."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k_ok = (k0 + offs_k) < K
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + k0 + offs_k, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=n_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int] = CONFIG) -> torch.Tensor:
    """x [..., K] with one row in all (a decode token) @ weight [N, K]^T -> [..., N] in x's dtype."""
    if x.numel() != x.shape[-1]:
        raise ValueError(f"gemv takes one row, got x of shape {tuple(x.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k or weight.stride(-1) != 1:
        raise ValueError(f"gemv: x [..., {x.shape[-1]}] against a weight [{n}, {k}] with stride {weight.stride()}")
    x1 = x.reshape(k).contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = config
    with _on(x):  # the launch on x's GPU (pipeline stages: a later stage's layers live on another GPU)
        _gemv_kernel[(triton.cdiv(n, block_n),)](x1, weight, out, n, weight.stride(0), K=k, BLOCK_N=block_n,
                                                 BLOCK_K=block_k, STAGES=stages, num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)


@triton.jit
def _gemv_silu_mul_kernel(x_ptr, g_ptr, u_ptr, out_ptr, N, stride_gn, stride_un, K: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """out[n] = silu(G[n] . x) * (U[n] . x): the MLP's gate and up rows in one pass over x, each sum exactly as
    _gemv_kernel forms it and rounded to the output dtype, then silu and the product as ops.silu_mul rounds them
    (so the result equals gemv, gemv, silu_mul bit for bit, one launch instead of three)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + offs_n[:, None].to(tl.int64) * stride_gn + offs_k[None, :]
    u_ptrs = u_ptr + offs_n[:, None].to(tl.int64) * stride_un + offs_k[None, :]
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k_ok = (k0 + offs_k) < K
        ok = n_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(g_ptrs + k0, mask=ok, other=0.0).to(tl.float32) * x
        acc_u += tl.load(u_ptrs + k0, mask=ok, other=0.0).to(tl.float32) * x
    dtype = out_ptr.dtype.element_ty
    g = tl.sum(acc_g, axis=1).to(dtype).to(tl.float32)
    u = tl.sum(acc_u, axis=1).to(dtype).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + offs_n, (s * u).to(dtype), mask=n_ok)


def gemv_silu_mul(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  config: tuple[int, int, int, int] = CONFIG) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for one row x [..., K] and weights gate, up [N, K] -> [..., N]."""
    if x.numel() != x.shape[-1]:
        raise ValueError(f"gemv_silu_mul takes one row, got x of shape {tuple(x.shape)}")
    n, k = gate.shape
    if up.shape != gate.shape or x.shape[-1] != k or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"gemv_silu_mul: x [..., {x.shape[-1]}] against gate {tuple(gate.shape)} and up "
                         f"{tuple(up.shape)} (strides {gate.stride()}, {up.stride()})")
    x1 = x.reshape(k).contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = config
    with _on(x):
        _gemv_silu_mul_kernel[(triton.cdiv(n, block_n),)](x1, gate, up, out, n, gate.stride(0), up.stride(0), K=k,
                                                          BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                                                          num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)

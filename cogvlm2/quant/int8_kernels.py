"""int8 weights with one float32 scale per output row (`Int8Linear`, `formats.quantize_int8`) times 16-bit
activations, in Triton: out = (x @ q^T) * scale, the products summed in float32 and rounded once.

Under a 4-bit `--quant` the language model's lm_head (128,256 x 4,096, 1.05 GB in bf16) is the largest single
weight a decode step reads: ~20% of an int4 step's bytes at batch 1. In int8 it reads half of that, at ~0.9% of
relative error on the logits (Gaussian rows, per-row scales; the 4-bit linears' own error is ~10%). Two kernels:

- one row (batch-1 decode): `_int8_gemv_kernel`, whole rows a program (no split of K, so no partials and no second
  launch), the int8 tile converted and multiplied in float32 per lane, summed across lanes once, times the scale;
- 2 rows and more (batched decode, several sequences' last tokens in a prefill): `_int8_tile_kernel`, the weight
  rows as the MMA's M side converted to x's dtype (exact: |q| <= 127), the tokens as its N side padded to 16-64,
  float32 accumulation, the scale in the epilogue; more than 64 rows take a second grid axis over row blocks.

Both are graph-safe (no host syncs). CONFIGS are the best of CANDIDATES on the lm_head's shape on an H200
(`benchmarks/lm_head_gpu.py`, against the bf16 GEMV and cuBLAS): 0.142 ms at one row (bf16 GEMV 0.232), 0.167 /
0.198 / 0.258 ms at 16 / 32 / 64 rows (cuBLAS 0.255 / 0.266 / 0.285).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, warps, stages): one row: 8 rows x 1,024 columns (8 KB of int8, as the bf16 GEMV's 4 x 1,024) a
# step, 3 steps in flight; 2+ rows, by BLOCK_M (the rows padded to a power of 2 from 16 to 64)
CONFIGS = {1: (8, 512, 4, 4), 16: (32, 256, 4, 4), 32: (64, 128, 4, 4), 64: (128, 128, 8, 3)}
CANDIDATES = {1: [(8, 1024, 4, 3), (4, 2048, 4, 3), (16, 512, 4, 3), (16, 1024, 8, 3), (8, 2048, 8, 2),
                  (8, 512, 4, 4)],
              16: [(32, 256, 4, 4), (16, 512, 4, 3), (64, 256, 4, 3), (32, 512, 4, 3), (64, 128, 4, 4)],
              32: [(32, 256, 4, 4), (16, 512, 4, 3), (64, 256, 4, 3), (32, 512, 4, 3), (64, 128, 4, 4)],
              64: [(64, 128, 4, 4), (32, 256, 4, 4), (64, 256, 4, 3), (128, 128, 8, 3)]}
MAX_BLOCK_M = 64


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """out[n] = scale[n] * sum_k q[n, k] x[k] for BLOCK_N rows: the products summed per lane in float32 over the K
    steps, then across the lanes once."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k_ok = (k0 + offs_k) < K
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0)
        x = tl.load(x_ptr + k0 + offs_k, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
    tl.store(out_ptr + offs_n, (tl.sum(acc, axis=1) * scale).to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _int8_tile_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, stride_xm, stride_om, K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                      PRECISION: tl.constexpr):
    """out[m, n] = scale[n] * sum_k q[n, k] x[m, k] for BLOCK_N weight rows and BLOCK_M rows of x: acc [BLOCK_N,
    BLOCK_M] += q tile (in x's dtype) @ x tile^T, float32 accumulation."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < N, offs_m < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs + k0, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0).to(x.dtype)
        acc = tl.dot(w, x, acc, input_precision=PRECISION)
    acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def block_m(rows: int) -> int:
    """The tile's BLOCK_M for `rows` rows of x: a power of 2 from 16 to MAX_BLOCK_M (more rows: a grid axis)."""
    return min(MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [..., K] (bf16 / fp16 / fp32) @ (weight int8 [N, K] * scale float32 [N, 1])^T -> [..., N] in x's dtype;
    config: CONFIGS' for the row count when None (1 row: the GEMV's, else the tile's by BLOCK_M)."""
    n, k = weight.shape
    if weight.dtype != torch.int8 or not weight.is_contiguous() or x.shape[-1] != k \
            or scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"int8_linear: x [..., {x.shape[-1]}] against an int8 weight {tuple(weight.shape)} "
                         f"({weight.dtype}, contiguous {weight.is_contiguous()}) and a float32 scale [{n}], got "
                         f"{tuple(scale.shape)} {scale.dtype}")
    rows = x.numel() // k if k else 0
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.view(*x.shape[:-1], n)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # x's GPU
        if rows == 1:
            block_n, block_k, warps, stages = config or CONFIGS[1]
            _int8_gemv_kernel[(triton.cdiv(n, block_n),)](x2, weight, scale, out, n, K=k, BLOCK_N=block_n,
                                                          BLOCK_K=block_k, STAGES=stages, num_warps=warps,
                                                          num_stages=stages)
        else:
            bm = block_m(rows)
            block_n, block_k, warps, stages = config or CONFIGS[bm]
            _int8_tile_kernel[(triton.cdiv(n, block_n), triton.cdiv(rows, bm))](
                x2, weight, scale, out, rows, n, x2.stride(0), out.stride(0), K=k, BLOCK_N=block_n, BLOCK_M=bm,
                BLOCK_K=block_k, STAGES=stages, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)

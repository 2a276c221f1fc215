"""Triton kernels for weight-only 4-bit linears: y = x @ W^T with W in the fp4/nf4 (bitsandbytes) or the
group-wise int4 layout of `formats.py`, unpacked in registers (never written out as bf16).

Decode (few rows): a fused GEMV/GEMM streams the packed weight once; a single row reduces on the CUDA
cores in float32, 2..64 rows go through tensor cores on the dequantized bf16/fp16 tile. Prefill (many
rows): the weight is dequantized into a bf16 buffer by one kernel and cuBLAS does the GEMM (the extra
pass costs a few percent of a compute-bound GEMM). Nothing syncs with the host or picks configs at run
time (no autotuning), so every call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FUSED_MAX_ROWS = 64  # more rows than this: dequantize + cuBLAS


@triton.jit
def _fp4_tile(w_ptr, absmax_ptr, lut_ptr, offs_n, n_ok, k0, K, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """Float32 weight tile [BLOCK_N, BLOCK_K] at columns k0.. of rows offs_n: lut[code] * absmax."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(w_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=n_ok[:, None], other=0)
    code = tl.interleave(byte >> 4, byte & 0xF)  # [BLOCK_N, BLOCK_K], high nibble first
    vals = tl.load(lut_ptr + code.to(tl.int32))
    offs_s = k0 // BLOCKSIZE + tl.arange(0, BLOCK_K // BLOCKSIZE)
    scale = tl.load(absmax_ptr + offs_n[:, None] * (K // BLOCKSIZE) + offs_s[None, :], mask=n_ok[:, None], other=0.0)
    vals = tl.reshape(vals, (vals.shape[0], BLOCK_K // BLOCKSIZE, BLOCKSIZE)) * scale[:, :, None]
    return tl.reshape(vals, (vals.shape[0], BLOCK_K))


@triton.jit
def _fp4_matmul_kernel(x_ptr, w_ptr, absmax_ptr, lut_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _fp4_tile(w_ptr, absmax_ptr, lut_ptr, offs_n, n_ok, k0, K, BLOCK_K, BLOCKSIZE)  # [BN, BK]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp4_dequant_kernel(w_ptr, absmax_ptr, lut_ptr, out_ptr, N, K,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    w = _fp4_tile(w_ptr, absmax_ptr, lut_ptr, offs_n, n_ok, k0, K, BLOCK_K, BLOCKSIZE)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _int4_tile(qw_ptr, qz_ptr, s_ptr, offs_n, n_ok, k0, N, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Float32 weight tile [BLOCK_K, BLOCK_N] (K-major, as stored) at rows k0.. (one group): (q - z) * s."""
    offs_p = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(qw_ptr + offs_p[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)  # [BK/8, BN]
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    q = (packed[:, None, :] >> shifts) & 0xF  # [BK/8, 8, BN]: k = 8 i + j
    q = tl.reshape(q, (BLOCK_K, q.shape[2]))
    g = k0 // GROUP
    zp = tl.load(qz_ptr + g * (N // 8) + offs_n // 8, mask=n_ok, other=0)
    z = (zp >> ((offs_n % 8) * 4).to(tl.int32)) & 0xF
    s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    return (q - z[None, :]).to(tl.float32) * s[None, :]


@triton.jit
def _int4_matmul_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _int4_tile(qw_ptr, qz_ptr, s_ptr, offs_n, n_ok, k0, N, BLOCK_K, GROUP)  # [BK, BN]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(tl.trans(x.to(tl.float32)) * w, axis=0)[None, :]
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_dequant_kernel(qw_ptr, qz_ptr, s_ptr, out_ptr, N, K,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    w = _int4_tile(qw_ptr, qz_ptr, s_ptr, offs_n, n_ok, k0, N, BLOCK_K, GROUP)  # [BK, BN]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], w.to(out_ptr.dtype.element_ty), mask=n_ok[None, :])


def _rows(m: int) -> int:
    """BLOCK_M for m rows: 1 (CUDA-core reduction) or a tensor-core tile of 16..64 rows."""
    return 1 if m == 1 else min(64, max(16, triton.next_power_of_2(m)))


def _flat(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def fp4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, n: int, k: int,
                   dtype: torch.dtype, blocksize: int = 64) -> torch.Tensor:
    """The [n, k] weight in `dtype` (exactly formats.dequantize_4bit)."""
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    block_k = 256 if k % 256 == 0 else blocksize
    _fp4_dequant_kernel[(triton.cdiv(n, 16), k // block_k)](packed, absmax, lut, out, n, k, BLOCK_N=16,
                                                            BLOCK_K=block_k, BLOCKSIZE=blocksize)
    return out


def fp4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, n: int,
               blocksize: int = 64) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., n] with W in the bitsandbytes 4-bit layout (K % blocksize == 0)."""
    x2, k = _flat(x), x.shape[-1]
    m = x2.shape[0]
    if m > FUSED_MAX_ROWS:
        return torch.nn.functional.linear(x, fp4_dequantize(packed, absmax, lut, n, k, x.dtype, blocksize))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m = _rows(m)
        block_k = 256 if block_m == 1 and k % 256 == 0 else (128 if k % 128 == 0 else blocksize)
        block_n = 16 if block_m == 1 else 32
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        _fp4_matmul_kernel[grid](x2, packed, absmax, lut, out, m, n, k, x2.stride(0), out.stride(0),
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCKSIZE=blocksize,
                                 num_warps=4)
    return out.view(*x.shape[:-1], n)


def int4_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                    group: int) -> torch.Tensor:
    """The [N, K] weight in `dtype` (exactly formats.dequantize_int4)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    block_k = min(group, 64)
    _int4_dequant_kernel[(triton.cdiv(n, 64), k // block_k)](qweight, qzeros, scales, out, n, k, BLOCK_N=64,
                                                             BLOCK_K=block_k, GROUP=group)
    return out


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group: int) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] with W in the group-wise int4 layout."""
    x2 = _flat(x)
    m, k, n = x2.shape[0], x.shape[-1], qweight.shape[1]
    if m > FUSED_MAX_ROWS:
        return torch.nn.functional.linear(x, int4_dequantize(qweight, qzeros, scales, x.dtype, group))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m = _rows(m)
        block_k = min(group, 128 if block_m == 1 else 64)
        block_n = 32 if block_m == 1 else 64
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        _int4_matmul_kernel[grid](x2, qweight, qzeros, scales, out, m, n, k, x2.stride(0), out.stride(0),
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group, num_warps=4)
    return out.view(*x.shape[:-1], n)

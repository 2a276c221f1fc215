"""Triton kernels of the quantized linears. Weight-only 4-bit: y = x @ W^T with W in the fp4/nf4
(bitsandbytes) or the group-wise int4 layout of `formats.py`, unpacked in registers (never written out
as bf16). fp8: the per-token activation quantization in one pass over x.

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
def _fp4_value(code):
    """bitsandbytes' fp4 code -> its value without a table: sign bit, 2-bit exponent e, 1 mantissa bit m;
    e >= 1: (1 + m/2) 2^-e * 4/3 (2/3, 1, 1/3, 1/2, 1/6, 1/4), e = 0: m / 192."""
    c = code.to(tl.int32)
    e = (c >> 1) & 3
    m = c & 1
    v = (((127 - e) << 23) | (m << 22)).to(tl.float32, bitcast=True) * (4.0 / 3.0)
    v = tl.where(e == 0, m.to(tl.float32) * (1.0 / 192.0), v)
    return tl.where((c & 8) != 0, -v, v)


@triton.jit
def _fp4_tile(w_ptr, absmax_ptr, lut_ptr, nabs_ptr, nmap_ptr, offset, offs_n, n_ok, k0, K, BLOCK_K: tl.constexpr,
              BLOCKSIZE: tl.constexpr, ARITH: tl.constexpr, NESTED: tl.constexpr):
    """Float32 weight tile [BLOCK_N, BLOCK_K] at columns k0.. of rows offs_n: lut[code] * absmax (ARITH: the
    fp4 value computed from the code's bits instead of looked up, the same float32 values; NESTED: 8-bit
    absmax = nmap[a8] * nabs[block // 256] + offset)."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(w_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=n_ok[:, None], other=0)
    code = tl.interleave(byte >> 4, byte & 0xF)  # [BLOCK_N, BLOCK_K], high nibble first
    if ARITH:
        vals = _fp4_value(code)
    else:
        vals = tl.load(lut_ptr + code.to(tl.int32))
    offs_s = k0 // BLOCKSIZE + tl.arange(0, BLOCK_K // BLOCKSIZE)
    blk = offs_n[:, None] * (K // BLOCKSIZE) + offs_s[None, :]  # [BN, BK / 64] flat block index
    if NESTED:
        a8 = tl.load(absmax_ptr + blk, mask=n_ok[:, None], other=0)
        scale = tl.load(nmap_ptr + a8.to(tl.int32)) * tl.load(nabs_ptr + blk // 256, mask=n_ok[:, None], other=0.0)
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=n_ok[:, None], other=0.0)
    vals = tl.reshape(vals, (vals.shape[0], BLOCK_K // BLOCKSIZE, BLOCKSIZE)) * scale[:, :, None]
    return tl.reshape(vals, (vals.shape[0], BLOCK_K))


@triton.jit
def _fp4_matmul_kernel(x_ptr, w_ptr, absmax_ptr, lut_ptr, nabs_ptr, nmap_ptr, offset, out_ptr, M, N, K, stride_xm,
                       stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCKSIZE: tl.constexpr, ARITH: tl.constexpr, NESTED: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _fp4_tile(w_ptr, absmax_ptr, lut_ptr, nabs_ptr, nmap_ptr, offset, offs_n, n_ok, k0, K, BLOCK_K,
                      BLOCKSIZE, ARITH, NESTED)  # [BN, BK]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp4_dequant_kernel(w_ptr, absmax_ptr, lut_ptr, nabs_ptr, nmap_ptr, offset, out_ptr, N, K,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    w = _fp4_tile(w_ptr, absmax_ptr, lut_ptr, nabs_ptr, nmap_ptr, offset, offs_n, n_ok, k0, K, BLOCK_K, BLOCKSIZE,
                  False, NESTED)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _int4_tile(qw_ptr, qz_ptr, s_ptr, offs_n, n_ok, k0, N, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Float32 weight tile [BLOCK_K, BLOCK_N] (K-major, as stored) at rows k0..: (q - z) * s per group."""
    offs_p = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(qw_ptr + offs_p[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)  # [BK/8, BN]
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    q = (packed[:, None, :] >> shifts) & 0xF  # [BK/8, 8, BN]: k = 8 i + j
    SPAN: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K  # rows of one group inside the tile
    q = tl.reshape(q, (BLOCK_K // SPAN, SPAN, q.shape[2]))
    g = (k0 + tl.arange(0, BLOCK_K // SPAN) * SPAN) // GROUP  # [tile groups]
    zp = tl.load(qz_ptr + g[:, None] * (N // 8) + offs_n[None, :] // 8, mask=n_ok[None, :], other=0)
    z = (zp >> ((offs_n[None, :] % 8) * 4).to(tl.int32)) & 0xF  # [tile groups, BN]
    s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
    w = (q - z[:, None, :]).to(tl.float32) * s[:, None, :]
    return tl.reshape(w, (BLOCK_K, w.shape[2]))


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


# Launch configs (BLOCK_N, BLOCK_K, num_warps, num_stages) by kernel and path; fixed, so nothing is tuned
# at run time (CUDA-graph safe). benchmarks/quant_gpu.py sweeps alternatives on the real shapes.
# FP4_ARITH[path]: decode fp4 codes arithmetically instead of with the 16-entry table (fp4 layers only).
CONFIGS = {
    ("fp4", "gemv"): (8, 512, 4, 3),  # one row: CUDA-core reduction, [N, K/2] bytes streamed row-wise
    ("fp4", "tile"): (32, 128, 4, 3),  # 2..64 rows: tensor cores on the dequantized tile
    ("fp4", "dequant"): (16, 256, 4, 1),
    ("int4", "gemv"): (32, 256, 4, 3),
    ("int4", "tile"): (64, 128, 4, 3),
    ("int4", "dequant"): (64, 128, 4, 1),
}
FP4_ARITH = {"gemv": False, "tile": False}


def _rows(m: int) -> int:
    """BLOCK_M for m rows: 1 (CUDA-core reduction) or a tensor-core tile of 16..64 rows."""
    return 1 if m == 1 else min(64, max(16, triton.next_power_of_2(m)))


def _block_k(want: int, k: int, unit: int) -> int:
    """The largest power-of-two multiple of `unit`, at most `want`, that divides k (k % unit == 0)."""
    b = max(unit, want)
    while b > unit and k % b:
        b //= 2
    return b


def _flat(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


Nested = tuple[torch.Tensor, torch.Tensor, float] | None  # (nested_absmax, nested_quant_map, offset) or None


def _stats(absmax: torch.Tensor, nested: Nested) -> tuple:
    """Kernel arguments (absmax, nabs, nmap, offset, NESTED); unused pointers repeat absmax."""
    return (absmax, *nested, True) if nested is not None else (absmax, absmax, absmax, 0.0, False)


def fp4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, n: int, k: int,
                   dtype: torch.dtype, blocksize: int = 64, nested: Nested = None) -> torch.Tensor:
    """The [n, k] weight in `dtype` (exactly formats.dequantize_4bit)."""
    block_n, block_k, warps, stages = CONFIGS[("fp4", "dequant")]
    block_k = _block_k(block_k, k, blocksize)
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    a, nabs, nmap, offset, is_nested = _stats(absmax, nested)
    _fp4_dequant_kernel[(triton.cdiv(n, block_n), k // block_k)](
        packed, a, lut, nabs, nmap, offset, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k, BLOCKSIZE=blocksize,
        NESTED=is_nested, num_warps=warps, num_stages=stages)
    return out


def fp4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, n: int,
               blocksize: int = 64, is_fp4: bool = False, nested: Nested = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., n] with W in the bitsandbytes 4-bit layout (K % blocksize == 0). `is_fp4`:
    the codes are bitsandbytes' fp4 (which may then be decoded without the table, see FP4_ARITH);
    `nested`: the absmax are 8-bit (double quantization)."""
    x2, k = _flat(x), x.shape[-1]
    m = x2.shape[0]
    if m > FUSED_MAX_ROWS:
        return torch.nn.functional.linear(x, fp4_dequantize(packed, absmax, lut, n, k, x.dtype, blocksize, nested))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m = _rows(m)
        path = "gemv" if block_m == 1 else "tile"
        block_n, block_k, warps, stages = CONFIGS[("fp4", path)]
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        a, nabs, nmap, offset, is_nested = _stats(absmax, nested)
        _fp4_matmul_kernel[grid](x2, packed, a, lut, nabs, nmap, offset, out, m, n, k, x2.stride(0), out.stride(0),
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(block_k, k, blocksize),
                                 BLOCKSIZE=blocksize, ARITH=is_fp4 and FP4_ARITH[path], NESTED=is_nested,
                                 num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)


def _int4_block_k(want: int, k: int, group: int) -> int:
    """A power of two that divides k and is a multiple or a divisor of the group."""
    b = _block_k(want, k, 8)
    while b > 8 and (k % b or (b % group and group % b)):
        b //= 2
    return b


def int4_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                    group: int) -> torch.Tensor:
    """The [N, K] weight in `dtype` (exactly formats.dequantize_int4)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    block_n, block_k, warps, stages = CONFIGS[("int4", "dequant")]
    block_k = _int4_block_k(block_k, k, group)
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    _int4_dequant_kernel[(triton.cdiv(n, block_n), k // block_k)](
        qweight, qzeros, scales, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group, num_warps=warps,
        num_stages=stages)
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
        block_n, block_k, warps, stages = CONFIGS[("int4", "gemv" if block_m == 1 else "tile")]
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        _int4_matmul_kernel[grid](x2, qweight, qzeros, scales, out, m, n, k, x2.stride(0), out.stride(0),
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_int4_block_k(block_k, k, group),
                                  GROUP=group, num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX, 1e-12)
    q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row, scale)


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 [M, 1]) in one pass (formats.quantize_fp8_rows fused)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        _fp8_rows_kernel[(m,)](x, q, s, k, x.stride(0), FP8_MAX=448.0, BLOCK=block,
                               num_warps=min(16, max(4, block // 1024)))
    return q, s

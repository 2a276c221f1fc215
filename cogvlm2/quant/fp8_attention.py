"""fp8 attention for the vision tower under `--quant fp8` (full, non-causal attention of one image's tokens).

The ViT's attention is ~73 ms of a one-image prefill in bf16 (cuDNN at ~520 TFLOP/s, 63 layers of 16 heads x
9,217 tokens x 112, `benchmarks/kernels_gpu.py --only vit`) and fp8's linears leave it untouched. Here both of
its products run on the fp8 tensor cores, as FlashAttention-3's fp8 path does:

    quantize:  q, k, v -> e4m3 with one scale per (image, head) (the largest |x| of the head maps to 448),
               head dim zero-padded to a power of two (112 -> 128: zeros add nothing to q.k or to the output),
               v written transposed ([.., D, N]: the fp8 MMA takes its second operand K-major)
    attention: S = (q k^T) sq sk / sqrt(D); online softmax in float32 (exp2); P in e4m3 (its values lie in
               [0, 1], relative to the running row maximum); O = (P v) sv / l, in the input dtype

The quantizing pass reads q, k, v once and writes them at half their size; the scales come from one
max-reduction per tensor read in place (`head_amax`: a tile a program, one atomic max each). On the CPU (and in
tests) the same kernels run in Triton's interpreter with `qdtype` a 16-bit float instead of e4m3 (the interpreter
emulates the float8 cast wrongly), which checks everything but the fp8 rounding; the CUDA test checks that too.

The tower uses it under `--quant fp8` when `cogvlm2.quant.linear.FP8_ATTENTION` is set (`Fp8Linear.attention`).
Its error is e4m3's: ~5% relative to exact attention on random ViT-shaped inputs, almost all of it from q and k
in e4m3 (`benchmarks/kernels_gpu.py --only vit` prints it beside the speed).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .formats import FP8_MAX

# BLOCK_M query rows x BLOCK_N keys per step, warps, stages: the fastest of benchmarks/kernels_gpu.py's tile
# shapes on an H200 at one image (1.45 ms an image and layer, quantizing included) and at four (1.04 ms; cuDNN's
# bf16: 1.17 / 1.15)
CONFIG = (64, 128, 4, 3)


@triton.jit
def _quantize_heads_kernel(x_ptr, out_ptr, scale_ptr, H, sxb, sxh, sxn, son, sod, N: tl.constexpr, NP: tl.constexpr,
                           D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr):
    """Rows [BLOCK] of one (image, head) of x [B, H, N, D] (any strides, d contiguous) -> out [B, H, NP, DP]
    (or, by its strides son / sod, [B, H, DP, NP]) scaled by 1 / scale[b, h]; rows N..NP and columns D..DP zero."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, DP)
    x = tl.load(x_ptr + b.to(tl.int64) * sxb + h * sxh + rows[:, None].to(tl.int64) * sxn + d[None, :],
                mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(x / tl.load(scale_ptr + bh), -FP8_MAX), FP8_MAX)
    tl.store(out_ptr + bh.to(tl.int64) * NP * DP + rows[:, None] * son + d[None, :] * sod,
             q.to(out_ptr.dtype.element_ty), mask=rows[:, None] < NP)


@triton.jit
def _amax_heads_kernel(x_ptr, amax_ptr, H, sxb, sxh, sxn, N: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       BLOCK: tl.constexpr):
    """The largest |x| of each (image, head) of x [B, H, N, D] (any strides, d contiguous) into amax [B * H]
    (zeroed by the caller): one [BLOCK, D] tile a program, one atomic max per tile."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, DP)
    x = tl.load(x_ptr + b.to(tl.int64) * sxb + h * sxh + rows[:, None].to(tl.int64) * sxn + d[None, :],
                mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0)
    tl.atomic_max(amax_ptr + bh, tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0))


def head_amax(x: torch.Tensor) -> torch.Tensor:
    """float32 [B * H]: the largest |x| of each (image, head) of x [B, H, N, D] (d contiguous), read in place: the
    q, k and v the tower hands over are strided views of one projection (it replaced a torch reduction over the
    views' (N, D); which is faster is not measured yet: `benchmarks/kernels_gpu.py --only vit` times the quantizing)."""
    b, h, n, d = x.shape
    amax = torch.zeros(b * h, dtype=torch.float32, device=x.device)
    block = 64
    _amax_heads_kernel[(triton.cdiv(n, block), b * h)](x, amax, h, x.stride(0), x.stride(1), x.stride(2), N=n, D=d,
                                                        DP=triton.next_power_of_2(d), BLOCK=block, num_warps=4)
    return amax


def min_k(qdtype: torch.dtype) -> int:
    """The tensor cores' smallest reduction dim: 32 for one-byte operands, 16 for two-byte ones."""
    return 32 if qdtype.itemsize == 1 else 16


def quantize_heads(x: torch.Tensor, qdtype: torch.dtype = torch.float8_e4m3fn, transpose: bool = False,
                   pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, N, D] -> (qdtype [B, H, NP, DP] or, transposed, [B, H, DP, NP]; float32 scales [B * H]): DP the
    head dim padded to a power of two (at least the MMA's smallest K), NP the tokens padded to a multiple of
    `pad_to` (zeros), x ~ q * scale per (image, head)."""
    b, h, n, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    dp, np_ = max(triton.next_power_of_2(d), min_k(qdtype)), triton.cdiv(n, pad_to) * pad_to
    scale = (head_amax(x) / FP8_MAX).clamp_(min=1e-12)
    out = torch.empty((b, h, dp, np_) if transpose else (b, h, np_, dp), dtype=qdtype, device=x.device)
    son, sod = (1, np_) if transpose else (dp, 1)
    block = 64
    _quantize_heads_kernel[(triton.cdiv(np_, block), b * h)](
        x, out, scale, h, x.stride(0), x.stride(1), x.stride(2), son, sod, N=n, NP=np_, D=d, DP=dp, BLOCK=block,
        FP8_MAX=FP8_MAX, num_warps=4)
    return out, scale


@triton.jit
def _attention_step(q, k_ptr, vt_ptr, base, start, d, cols0, s_scale, m_i, l_i, acc, N: tl.constexpr,
                    NP: tl.constexpr, DP: tl.constexpr, MASK: tl.constexpr):
    """One tile of BLOCK_N keys: the online softmax's update of (m_i, l_i, acc). MASK: keys past N are padding."""
    cols = start + cols0
    k = tl.load(k_ptr + base + cols[:, None] * DP + d[None, :])
    s = tl.dot(q, tl.trans(k)) * s_scale
    if MASK:
        s = tl.where(cols[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    vt = tl.load(vt_ptr + base + d[:, None] * NP + cols[None, :])
    acc = tl.dot(p.to(vt.dtype), tl.trans(vt), acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(q_ptr, k_ptr, vt_ptr, o_ptr, sq_ptr, sk_ptr, sv_ptr, H, softmax_scale, sob, soh, son,
                      N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """One (image, head) and BLOCK_M query rows: q, k [B, H, NP, DP] and vt [B, H, DP, NP] quantized per
    (image, head) (scales sq, sk, sv) and zero-padded (NP a multiple of both blocks), out [B, H, N, D] at
    strides (sob, soh, son, 1). Full key tiles run unmasked; the last, partial one masks its padded keys."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    base = bh.to(tl.int64) * NP * DP
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    cols0 = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + base + rows[:, None] * DP + d[None, :])
    # S in log2 units: exp2 in the softmax
    s_scale = tl.load(sq_ptr + bh) * tl.load(sk_ptr + bh) * softmax_scale * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DP), tl.float32)
    FULL: tl.constexpr = (N // BLOCK_N) * BLOCK_N
    for start in range(0, FULL, BLOCK_N):
        m_i, l_i, acc = _attention_step(q, k_ptr, vt_ptr, base, start, d, cols0, s_scale, m_i, l_i, acc, N, NP, DP,
                                        False)
    if FULL < N:
        m_i, l_i, acc = _attention_step(q, k_ptr, vt_ptr, base, FULL, d, cols0, s_scale, m_i, l_i, acc, N, NP, DP,
                                        True)
    out = acc * (tl.load(sv_ptr + bh) / l_i[:, None])
    tl.store(o_ptr + b.to(tl.int64) * sob + h * soh + rows[:, None].to(tl.int64) * son + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rows[:, None] < N) & (d[None, :] < D))


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qdtype: torch.dtype = torch.float8_e4m3fn,
                  config: tuple[int, int, int, int] = CONFIG) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q, k, v [B, H, N, D] (any strides, d contiguous) with both products in
    `qdtype` (e4m3 on the GPU). Returns [B, H, N, D] in q's dtype, a transposed view of a [B, N, H, D] buffer:
    `.transpose(1, 2).reshape(B, N, H * D)` (the tower's next step) is free."""
    b, h, n, d = q.shape
    block_m, block_n, warps, stages = config
    block_n = max(block_n, min_k(qdtype))  # the keys are P @ V's reduction dim
    pad = max(block_m, block_n)  # powers of two: a multiple of each block
    (qq, sq), (kq, sk), (vq, sv) = (quantize_heads(q, qdtype, pad_to=pad), quantize_heads(k, qdtype, pad_to=pad),
                                    quantize_heads(v, qdtype, transpose=True, pad_to=pad))
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    _attention_kernel[(triton.cdiv(n, block_m), b * h)](
        qq, kq, vq, out, sq, sk, sv, h, 1.0 / math.sqrt(d), out.stride(0), out.stride(2), out.stride(1),
        N=n, NP=qq.shape[2], D=d, DP=qq.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        num_stages=stages)
    return out.transpose(1, 2)

"""Triton kernels of the quantized linears. Weight-only 4-bit: y = x @ W^T with W in the fp4/nf4
(bitsandbytes) or the group-wise int4 layout of `formats.py`, unpacked in registers (never written out
as bf16). fp8: the per-token activation quantization in one pass over x.

Decode (few rows): a fused GEMV/GEMM streams the packed weight once, which is all its cost, so the inner
loops are kept to a few integer ops per code: the codes are read as int32 words (16-byte vector loads;
the bitsandbytes bytes are viewed as words in place), decoded by writing bits into a float (no int ->
float conversion, no table in memory) and the absmax / group scale is applied once per block of products.
A single row reduces on the CUDA cores in float32 (or, per ONE_ROW, takes the tile); 1..64 rows go through
tensor cores with the operands swapped (W x^T: the weight tile is the MMA's 64-row side, x's few rows the
narrow one), the codes turned into 16-bit float pairs by bit operations (int4: c + q, the zero point and scale
applied after the dot per group) or by one lookup per byte in a 256-entry pair table (fp4/nf4, absmax applied
after one dot per block); the statistics are loaded a step ahead. (int4 from TILE_A8's 33 rows on: the rows
quantized to int8 per row and group, the codes unpacked to int8 in K order, the dot on the integer tensor cores.)
Where N leaves too few programs, K is split (automatically, to cover the SMs) and a second kernel adds the float32
partials in a fixed order (deterministic).
Prefill (many rows): the weight is dequantized into a bf16 buffer by one kernel and cuBLAS does the GEMM
(the extra pass costs a few percent of a compute-bound GEMM). Nothing syncs with the host or picks configs
at run time (no autotuning), so every call can be captured in a CUDA graph. Loop bounds are compile-time
constants (K is specialized): Triton 3.6's interpreter cannot take a run-time scalar as a range bound.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

from .. import pdl
from . import gluon_kernels
from ..counters import counters, last_to_arrive

logger = logging.getLogger(__name__)

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
def _u4_float(q):
    """int32 q in [0, 2^23) -> float32 2^23 + q, by writing q into the mantissa of 2^23: one OR instead of an
    int -> float conversion (those run at a quarter of the FMA rate and would cap a 4-bit kernel's bandwidth)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _fp4_value_34(words, LSB: tl.constexpr):
    """The bitsandbytes fp4 codes at bit LSB of int32 words -> 3/4 of their values (the caller multiplies the
    absmax by 4/3), as float bits: the code's e (2 bits) and m go to bits 23..24 and 22 with one shift, and
    XOR 0x3F800000 makes the exponent 127 ^ e = 127 - e, i.e. 2^-e (1 + m/2); e = 0 is 0 or 2^-8 (1/192 x 3/4);
    the sign bit (bit 25 after the shift) moves to bit 31. Every value is exact."""
    if LSB <= 22:
        v = words << (22 - LSB)
    else:
        v = words >> (LSB - 22)
    bits = (v & 0x01C00000) ^ 0x3F800000
    bits = tl.where((v & 0x01800000) == 0, (v & 0x00400000) * 238, bits)  # e = 0: m 0x3B800000 (2^-8)
    return (bits | ((v << 6) & -0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _store(out_ptr, acc, offs_m, offs_n, m_ok, n_ok, stride_om, M, N, SPLIT_K: tl.constexpr, split):
    """acc [BLOCK_M, BLOCK_N] -> out in its dtype, or (split K) -> float32 partials [SPLIT_K, M, N] that
    _splitk_sum_kernel adds in a fixed order (deterministic, so graph replays equal eager runs)."""
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    else:
        base = out_ptr + split.to(tl.int64) * M * N
        tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _splitk_sum_kernel(part_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _finish_row(part_ptr, out_ptr, count_ptr, acc, offs_n, n_ok, N, SPLIT_K: tl.constexpr):
    """One row's split-K finish inside the GEMV (A8_FUSED["sum"]): this program's float32 partial acc [BLOCK_N] goes to
    part[split]; the program of its column block that counts last (an atomic counter per block, acq_rel at GPU
    scope, after a barrier so every thread's partial is written) adds the SPLIT_K partials in slice order, exactly
    as _splitk_sum_kernel does, writes the output and puts the counter back to 0 for the next launch."""
    tl.store(part_ptr + tl.program_id(1) * N + offs_n, acc, mask=n_ok)
    if last_to_arrive(count_ptr, tl.program_id(0), SPLIT_K):
        total = tl.load(part_ptr + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg")  # the other SMs' writes
        for s in tl.static_range(1, SPLIT_K):
            total += tl.load(part_ptr + s * N + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)
        tl.store(count_ptr + tl.program_id(0), 0)


@triton.jit
def _fp4_gemv_kernel(x_ptr, w_ptr, absmax_ptr, lut_ptr, nabs_ptr, nmap_ptr, offset, out_ptr, N, K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, ARITH: tl.constexpr,
                     NESTED: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, SUM_ONCE: tl.constexpr):
    """One row: out[n] = sum_k x[k] W[n, k]. The packed weight is read as int32 words ([N, K/8], 8 codes a
    word, 16-byte vector loads along K); per absmax block the products are summed first and scaled once.
    Byte t of a word holds k = 8w + 2t in its high nibble and 8w + 2t + 1 in its low nibble. SUM_ONCE
    (FP4_SUM_ONCE): each word's 8 products are scaled by its block's absmax and kept per word, summed across the
    tile once after the loop, as the int4 GEMVs do (summing across threads every step costs barriers that keep the
    loads from staying in flight); the same terms added in another order."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = offs_n < N
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE  # absmax blocks per step
    WB: tl.constexpr = BLOCKSIZE // 8  # words per block
    KS: tl.constexpr = K // SPLIT_K
    b = tl.arange(0, NB)
    wi = tl.arange(0, WB)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_w = tl.zeros((BLOCK_N, NB, WB) if SUM_ONCE else (1, 1, 1), dtype=tl.float32)
    for i in tl.range(0, KS, BLOCK_K, num_stages=STAGES):  # STAGES > 1: cp.async prefetch
        k0 = tl.program_id(1) * KS + i
        word_col = k0 // 8 + b[:, None] * WB + wi[None, :]  # [NB, WB]
        words = tl.load(w_ptr + offs_n[:, None, None] * (K // 8) + word_col[None, :, :], mask=n_ok[:, None, None],
                        other=0)
        part = tl.zeros((BLOCK_N, NB, WB), dtype=tl.float32)
        for t in tl.static_range(4):
            for half in tl.static_range(2):  # high nibble: k = 8w + 2t, low: 8w + 2t + 1
                if ARITH:
                    v = _fp4_value_34(words, 8 * t + 4 - 4 * half)
                else:
                    v = tl.load(lut_ptr + ((words >> (8 * t + 4 - 4 * half)) & 0xF))
                xk = tl.load(x_ptr + word_col * 8 + (2 * t + half)).to(tl.float32)  # [NB, WB]
                part += v * xk[None, :, :]
        blk = offs_n[:, None] * (K // BLOCKSIZE) + (k0 // BLOCKSIZE + b)[None, :]  # [BN, NB]
        if NESTED:
            a8 = tl.load(absmax_ptr + blk, mask=n_ok[:, None], other=0)
            scale = tl.load(nmap_ptr + a8.to(tl.int32)) * tl.load(nabs_ptr + blk // 256, mask=n_ok[:, None], other=0.0)
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + blk, mask=n_ok[:, None], other=0.0)
        if ARITH:
            scale = scale * (4.0 / 3.0)
        if SUM_ONCE:
            acc_w += part * scale[:, :, None]
        else:
            acc += tl.sum(tl.sum(part, axis=2) * scale, axis=1)
    if SUM_ONCE:
        acc = tl.sum(tl.sum(acc_w, axis=2), axis=1)
    _store(out_ptr, acc[None, :], tl.arange(0, 1), offs_n, tl.arange(0, 1) < 1, n_ok, 0, 1, N, SPLIT_K,
           tl.program_id(1))


# The PTX of _fp4_dot8 on the GPU ($0 = the dot; $1 the word of 8 codes; $2 / $3 the low / high 4 codes'
# activations): per 4 codes one PRMT looks the magnitudes x 192 up as bytes (its selector nibbles are the codes, the
# sign bit masked off), a second turns the codes' sign bits into byte masks (selector 0 or 1 into the pool
# 0x0000FF00), the positive and negative codes' magnitudes (m & ~mask, m & mask) go through one IDP4A each into two
# sums, subtracted at the end. tests/test_quant_kernels.py runs this text through a model of the PTX instructions'
# documented semantics on the CPU. (Until 6cc1005 the activations were stored beside their negations and a PRMT
# picked one by the code's sign: two instructions fewer a word but twice the activation bytes, and the kernel was
# L1-bound: 293.2 against 304.1 tok/s on the H200, BENCHMARKS.md, fifteenth session.)
FP4_DOT8_PTX = tl.constexpr("""
{
.reg .b32 ta, tb, tk, w, s, m, k, n, p, ap, an;
mov.b32 ta, 0xC0800100;
mov.b32 tb, 0x30206040;
mov.b32 tk, 0x0000FF00;
mov.b32 w, $1;
and.b32 s, w, 0x7777;
prmt.b32 m, ta, tb, s;
shr.u32 s, w, 3;
and.b32 s, s, 0x1111;
prmt.b32 k, tk, tk, s;
and.b32 n, m, k;
xor.b32 p, m, n;
dp4a.u32.s32 ap, p, $2, 0;
dp4a.u32.s32 an, n, $2, 0;
shr.u32 w, w, 16;
and.b32 s, w, 0x7777;
prmt.b32 m, ta, tb, s;
shr.u32 s, w, 3;
and.b32 s, s, 0x1111;
prmt.b32 k, tk, tk, s;
and.b32 n, m, k;
xor.b32 p, m, n;
dp4a.u32.s32 ap, p, $3, ap;
dp4a.u32.s32 an, n, $3, an;
sub.s32 $0, ap, an;
}
""")


@triton.jit
def _fp4_dot8(words, xa, xb, ASM: tl.constexpr):
    """int32 sum over the 8 bitsandbytes fp4 codes of each word of (value x 192) times an int8 activation: the
    values x 192 are exact integers (0, 1, 128, 192, 64, 96, 32, 48 for the magnitude codes 0-7, bit 3 the sign), so
    the dot is exact. Nibble q of a word (byte q // 2, the low nibble first: k = 8p + (q ^ 1)) pairs with byte q % 4
    of xa (q < 4) or xb (quantize_fp4_a8 packs them so). On the GPU (ASM) FP4_DOT8_PTX, ~15 instructions for 8
    codes; elsewhere the same sum code by code (Triton's interpreter has no inline PTX)."""
    if ASM:
        return tl.inline_asm_elementwise(FP4_DOT8_PTX, "=r,r,r,r", [words, xa, xb], dtype=tl.int32, is_pure=True,
                                         pack=1)
    d = tl.zeros(words.shape, dtype=tl.int32)
    for q in tl.static_range(8):
        code = (words >> (4 * q)) & 0xF
        idx = code & 7
        mag = tl.where(idx < 2, idx, (2 + (idx & 1)) << (7 - (idx >> 1)))
        xw = xa if q < 4 else xb
        xq = (xw << (24 - 8 * (q % 4))) >> 24  # signed byte q % 4
        d += tl.where(code >= 8, -mag, mag) * xq
    return d


@triton.jit
def _quantize_fp4_a8_kernel(x_ptr, xw_ptr, sx_ptr, GROUP: tl.constexpr, PDL: tl.constexpr):
    """One absmax block of a row for the fp4 W4A8 GEMV (store_fp4_a8_groups), one program a block."""
    pdl.enter(PDL)
    g = tl.program_id(0)
    xg = tl.load(x_ptr + g * GROUP + tl.arange(0, GROUP)).to(tl.float32)
    store_fp4_a8_groups(tl.reshape(xg, (1, GROUP)), xw_ptr, sx_ptr, g + tl.arange(0, 1), tl.arange(0, 1) < 1, GROUP)


@triton.jit
def store_fp4_a8_groups(xg, xw_ptr, sx_ptr, g, g_ok, GROUP: tl.constexpr):
    """Float32 groups xg [R, GROUP] (absmax blocks g [R] of a row, those with g_ok) quantized for the fp4 W4A8 GEMV:
    int8 xq = round(x / sx), sx = |x| max / 127 (as the int4 W4A8's _int8_groups), packed four to a word in the order
    _fp4_dot8 pairs them with the codes (byte b of word j holds k = 4j + (b ^ 1)); also called by the kernels that
    produce a decode row (model/triton_ops.py, FP4_A8), as store_a8_groups is for int4."""
    sx, xq = _int8_groups(xg)
    even, odd = tl.split(tl.reshape(xq, (xg.shape[0], GROUP // 4, 2, 2)))  # [R, GROUP / 4, 2]: k = 4j + 2h (+ 1)
    shifts = (tl.arange(0, 2) * 16)[None, None, :]
    words = tl.sum(((odd & 0xFF) << shifts) | ((even & 0xFF) << (shifts + 8)), axis=2)  # disjoint bits: an OR
    tl.store(xw_ptr + g[:, None] * (GROUP // 4) + tl.arange(0, GROUP // 4)[None, :], words, mask=g_ok[:, None])
    tl.store(sx_ptr + g, sx, mask=g_ok)


@triton.jit
def _fp4_gemv_a8_kernel(xw_ptr, sx_ptr, w_ptr, absmax_ptr, out_ptr, final_ptr, count_ptr, N, w2_ptr, absmax2_ptr,
                        out2_ptr, final2_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, L2_LINES: tl.constexpr,
                        FUSED_SUM: tl.constexpr, PDL: tl.constexpr, PAIR: tl.constexpr):
    """One row, the bitsandbytes fp4 layout (absmax blocks of 64, float32 absmax, the standard fp4 codes) times int8
    activations (quantize_fp4_a8, one scale per absmax block): per word of 8 codes an exact int32 dot (_fp4_dot8),
    scaled by absmax x sx / 192 and kept per word, summed across the tile once after the loop (no barrier in it).
    L2_LINES (> 0, PDL only: A8_L2_PREFETCH_BYTES): the program's codes (its rows' K slice, that many 128-byte lines
    a row rounded up to a power of 2) prefetched into L2 before the PDL wait, as the int4 W4A8 GEMV does. FUSED_SUM
    (K split): the column block's last program adds the partials (_finish_row, as the int4 W4A8 GEMV does). PAIR:
    a second weight of the same shape in the same launch (the *2 pointers, the column blocks past the first's), as
    the int4 W4A8 GEMV's pair."""
    pdl.launch_dependents(PDL)
    pid_n = tl.program_id(0)
    if PAIR:
        blocks = tl.cdiv(N, BLOCK_N)
        second = pid_n >= blocks
        pid_n -= second.to(tl.int32) * blocks
        w_ptr, absmax_ptr = tl.where(second, w2_ptr, w_ptr), tl.where(second, absmax2_ptr, absmax_ptr)
        out_ptr, final_ptr = tl.where(second, out2_ptr, out_ptr), tl.where(second, final2_ptr, final_ptr)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = offs_n < N
    NB: tl.constexpr = BLOCK_K // 64  # absmax blocks per step
    KS: tl.constexpr = K // SPLIT_K
    if L2_LINES > 0:  # 32 words a line; the lanes past the slice's last line repeat it
        line = tl.minimum(tl.arange(0, L2_LINES), KS // 256 - 1)
        first = tl.minimum(offs_n, N - 1) * (K // 8) + tl.program_id(1) * (KS // 8)
        pdl.prefetch_l2(w_ptr + first[:, None] + (line * 32)[None, :])
    pdl.wait(PDL)
    b = tl.arange(0, NB)
    wi = tl.arange(0, 8)  # the 8 words of a block
    acc = tl.zeros((BLOCK_N, NB, 8), dtype=tl.float32)
    for i in tl.range(0, KS, BLOCK_K, num_stages=STAGES):  # STAGES > 1: cp.async prefetch
        k0 = tl.program_id(1) * KS + i
        word_col = k0 // 8 + b[:, None] * 8 + wi[None, :]  # [NB, 8]
        words = tl.load(w_ptr + offs_n[:, None, None] * (K // 8) + word_col[None, :, :], mask=n_ok[:, None, None],
                        other=0)
        # the activations of k 8p..8p+3 and 8p+4..8p+7, broadcast over the rows
        xa, xb = tl.split(tl.load(xw_ptr + 2 * word_col[:, :, None] + tl.arange(0, 2)[None, None, :]))
        d = _fp4_dot8(words, xa[None, :, :], xb[None, :, :], ASM)
        blk = offs_n[:, None] * (K // 64) + (k0 // 64 + b)[None, :]  # [BN, NB]
        scale = tl.load(absmax_ptr + blk, mask=n_ok[:, None], other=0.0) * tl.load(sx_ptr + k0 // 64 + b)[None, :]
        acc += d.to(tl.float32) * scale[:, :, None]
    row = tl.sum(tl.sum(acc, axis=2), axis=1) * (1.0 / 192.0)
    if FUSED_SUM:
        _finish_row(out_ptr, final_ptr, count_ptr, row, offs_n, n_ok, N, SPLIT_K)
    else:
        _store(out_ptr, row[None, :], tl.arange(0, 1), offs_n, tl.arange(0, 1) < 1, n_ok, 0, 1, N, SPLIT_K,
               tl.program_id(1))


@triton.jit
def _int4_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr):
    """One row, group-wise int4: per group sum_k (q - z) s x = s (sum_k q x - z sum_k x); nibble j of a word is
    taken in place (q 16^j in the mantissa of 2^23, x scaled by 16^-j, both exact), so a code costs one
    logic op, one add and one FMA."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = offs_n < N
    NG: tl.constexpr = BLOCK_K // GROUP  # groups per step
    RP: tl.constexpr = GROUP // 8  # packed rows per group
    KS: tl.constexpr = K // SPLIT_K
    g = tl.arange(0, NG)
    r = tl.arange(0, RP)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in tl.range(0, KS, BLOCK_K, num_stages=STAGES):  # STAGES > 1: cp.async prefetch
        k0 = tl.program_id(1) * KS + i
        prow = k0 // 8 + g[:, None] * RP + r[None, :]  # [NG, RP]
        words = tl.load(qw_ptr + prow[:, :, None].to(tl.int64) * N + offs_n[None, None, :],
                        mask=n_ok[None, None, :], other=0)  # [NG, RP, BN]
        hi = words >> 12  # nibbles 5..7 at bits 8..19
        dot = tl.zeros((NG, RP, BLOCK_N), dtype=tl.float32)
        sx = tl.zeros((NG, RP), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_ptr + prow * 8 + j).to(tl.float32)
            sx += xj
            if j <= 4:
                q = _u4_float(words & (0xF << (4 * j))) - 8388608.0  # q 16^j
                dot += q * (xj * (0.0625 ** j))[:, :, None]
            else:
                q = _u4_float(hi & (0xF << (4 * j - 12))) - 8388608.0  # q 16^(j - 3)
                dot += q * (xj * (0.0625 ** (j - 3)))[:, :, None]
        grp = k0 // GROUP + g  # [NG]
        zp = tl.load(qz_ptr + grp[:, None] * (N // 8) + offs_n[None, :] // 8, mask=n_ok[None, :], other=0)
        z = ((zp >> ((offs_n[None, :] % 8) * 4).to(tl.int32)) & 0xF).to(tl.float32)  # [NG, BN]
        s = tl.load(s_ptr + grp[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(s * (tl.sum(dot, axis=1) - z * tl.sum(sx, axis=1)[:, None]), axis=0)
    _store(out_ptr, acc[None, :], tl.arange(0, 1), offs_n, tl.arange(0, 1) < 1, n_ok, 0, 1, N, SPLIT_K,
           tl.program_id(1))


@triton.jit
def _int4_row_tile(qw_ptr, N, BLOCK_N: tl.constexpr, RP: tl.constexpr, KS: tl.constexpr, pid_n):
    """The one-row int4 GEMVs' tile, one group (RP packed rows) a step over this program's K slice of KS: its
    columns (column block pid_n), their mask, the packed rows of a step, each column's zero-point shift in its
    packed word, and the pointers to the slice's first step ([RP, BLOCK_N]; the loop advances them RP * N a step)."""
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    r = tl.arange(0, RP)
    zshift = ((offs_n % 8) * 4).to(tl.int32)
    p0 = tl.program_id(1) * (KS // 8)  # first packed row of this slice
    w_ptrs = qw_ptr + ((p0 + r).to(tl.int64) * N)[:, None] + offs_n[None, :]
    return offs_n, offs_n < N, r, zshift, w_ptrs


@triton.jit
def _masked_u4_float(words, MASK: tl.constexpr, ASM: tl.constexpr):
    """_u4_float(words & MASK): the bits under MASK written into the mantissa of 2^23, as one LOP3 ((a & b) | c,
    lookup 0xEA) on the GPU (ASM; ptxas otherwise emits an AND and an OR), plain integer ops elsewhere (Triton's
    interpreter has no inline PTX)."""
    if ASM:
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                         [words, tl.full(words.shape, MASK, tl.int32),
                                          tl.full(words.shape, 0x4B000000, tl.int32)],
                                         dtype=tl.int32, is_pure=True, pack=1)
        return bits.to(tl.float32, bitcast=True)
    return _u4_float(words & MASK)


@triton.jit
def _int4_gemv2_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
                       GROUP: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr):
    """One row, group-wise int4, one group a step, with no reduction across threads inside the loop (ONE_ROW
    "gemv2"). _int4_gemv_kernel sums every step's products across its tile (its loop compiled for sm_90 by
    Triton 3.6: 29 barriers a step, ~5.8 instructions a code; benchmarks/kernel_sass.py), so its loads cannot
    stay in flight; here each thread keeps its own partial sums [packed row, column] over the whole K slice and the
    tile is summed once at the end, like the bf16 GEMV (model/gemv.py) that streams at copy bandwidth. Per code:
    one LOP3 (the nibble into the mantissa of 2^23), one FADD (minus 2^23 + z 16^j: (q - z) 16^j exactly), one
    FFMA with x 16^-j; per word one FFMA by the group's scale."""
    RP: tl.constexpr = GROUP // 8  # packed rows of a group
    KS: tl.constexpr = K // SPLIT_K
    offs_n, n_ok, r, zshift, w_ptrs = _int4_row_tile(qw_ptr, N, BLOCK_N, RP, KS, tl.program_id(0))
    acc = tl.zeros((RP, BLOCK_N), dtype=tl.float32)
    for i in tl.range(0, KS, GROUP, num_stages=STAGES):  # STAGES > 1: cp.async prefetch
        k0 = tl.program_id(1) * KS + i
        words = tl.load(w_ptrs, mask=n_ok[None, :], other=0)  # [RP, BN]
        w_ptrs += RP * N
        zp, sw = _int4_stats(qz_ptr, s_ptr, k0 // GROUP, offs_n, n_ok, N)
        z = ((zp >> zshift) & 0xF).to(tl.float32)  # [BN]
        hi = words >> 12  # nibbles 5..7 at bits 8..19
        dot = tl.zeros((RP, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_ptr + k0 + r * 8 + j).to(tl.float32)  # [RP]
            if j <= 4:
                q = _masked_u4_float(words, 0xF << (4 * j), ASM) - (8388608.0 + z * (16.0 ** j))[None, :]  # (q-z)16^j
                dot += q * (xj * (0.0625 ** j))[:, None]
            else:
                q = _masked_u4_float(hi, 0xF << (4 * j - 12), ASM) - (8388608.0 + z * (16.0 ** (j - 3)))[None, :]
                dot += q * (xj * (0.0625 ** (j - 3)))[:, None]
        acc += dot * sw[None, :]
    _store(out_ptr, tl.sum(acc, axis=0)[None, :], tl.arange(0, 1), offs_n, tl.arange(0, 1) < 1, n_ok, 0, 1, N,
           SPLIT_K, tl.program_id(1))


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + sum_i a.byte[i] * b.byte[i] over the 4 bytes of int32 words, a's bytes unsigned and b's signed: one
    IDP4A on the GPU (ASM), the same sum by shifts and masks elsewhere (Triton's interpreter has no inline PTX)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    for i in tl.static_range(4):
        c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
    return c


@triton.jit
def _int8_groups(xg):
    """Rows of float32 xg [R, GROUP], each a group of the W4A8 activations: (sx [R] = |x| max / 127, xq [R, GROUP]
    int32 = round(x / sx), half away from zero, |xq| <= 127)."""
    sx = tl.maximum(tl.max(tl.abs(xg), axis=1) / 127.0, 1e-30)
    xs = xg / sx[:, None]
    return sx, (xs + tl.where(xs >= 0, 0.5, -0.5)).to(tl.int32)


@triton.jit
def _quantize_groups(x_ptr, xe_ptr, xo_ptr, sx_ptr, sq_ptr, g0, NG: tl.constexpr, NG_PAD: tl.constexpr,
                     GROUP: tl.constexpr):
    """Groups g0 .. g0 + NG - 1 of a row x for the W4A8 GEMV: int8 xq = round(x / sx) with sx = |x| max / 127 per
    group (a group of the weight's size keeps an outlier channel from flattening the rest), packed four to a word as
    the weight's codes come out of its words: even k (8p, 8p+2, 8p+4, 8p+6) in xe[p], odd k in xo[p]; and sum_k xq."""
    gi = tl.arange(0, NG_PAD)
    g_ok = gi < NG
    xg = tl.load(x_ptr + (g0 + gi)[:, None] * GROUP + tl.arange(0, GROUP)[None, :], mask=g_ok[:, None],
                 other=0.0).to(tl.float32)  # [NG_PAD, GROUP]
    store_a8_groups(xg, xe_ptr, xo_ptr, sx_ptr, sq_ptr, g0 + gi, g_ok, GROUP)


@triton.jit
def store_a8_groups(xg, xe_ptr, xo_ptr, sx_ptr, sq_ptr, g, g_ok, GROUP: tl.constexpr):
    """Float32 groups xg [R, GROUP] (groups g [R] of a row, those with g_ok) quantized and stored in the W4A8 layout
    (_quantize_groups); also called by kernels that produce a decode row (model/triton_ops.py: the RMSNorm, SiLU-mul)
    to hand the W4A8 GEMV its input without a quantize launch."""
    RP: tl.constexpr = GROUP // 8
    sx, xq = _int8_groups(xg)
    even, odd = tl.split(tl.reshape(xq, (xg.shape[0], RP, 4, 2)))  # [R, RP, 4]: k = 8p + 2i (+ 1)
    shifts = (tl.arange(0, 4) * 8)[None, None, :]
    p = g[:, None] * RP + tl.arange(0, RP)[None, :]
    tl.store(xe_ptr + p, tl.sum((even & 0xFF) << shifts, axis=2), mask=g_ok[:, None])  # disjoint bits: an OR
    tl.store(xo_ptr + p, tl.sum((odd & 0xFF) << shifts, axis=2), mask=g_ok[:, None])
    tl.store(sx_ptr + g, sx, mask=g_ok)
    tl.store(sq_ptr + g, tl.sum(xq, axis=1), mask=g_ok)


@triton.jit
def _quantize_a8_kernel(x_ptr, xe_ptr, xo_ptr, sx_ptr, sq_ptr, GROUP: tl.constexpr, PDL: tl.constexpr):
    """One group a program (_quantize_groups) before the W4A8 GEMV, when its prologue does not (FUSED["quant"])."""
    pdl.enter(PDL)
    _quantize_groups(x_ptr, xe_ptr, xo_ptr, sx_ptr, sq_ptr, tl.program_id(0), 1, 1, GROUP)


@triton.jit
def _prefetch_codes_l2(w_ptrs, ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, N, BLOCK_N: tl.constexpr):
    """The packed rows w_ptrs[0] .. w_ptrs[ROWS - 1] (int32 words, N a row apart, BLOCK_N from the first
    pointer's column on) into L2: one prefetch a 128-byte line (32 words); the rows past ROWS repeat the last."""
    LINES: tl.constexpr = (BLOCK_N + 31) // 32
    row = tl.minimum(tl.arange(0, ROWS_PAD), ROWS - 1).to(tl.int64)
    pdl.prefetch_l2(w_ptrs + (row * N)[:, None] + (tl.arange(0, LINES) * 32)[None, :])


@triton.jit
def _int4_gemv_a8_kernel(x_ptr, xe_ptr, xo_ptr, sx_ptr, sq_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, final_ptr, count_ptr,
                         N, qw2_ptr, qz2_ptr, s2_ptr, out2_ptr, final2_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                         GROUP: tl.constexpr, SPLIT_K: tl.constexpr, ASM: tl.constexpr, STAGES: tl.constexpr,
                         FUSED_QUANT: tl.constexpr, NG_PAD: tl.constexpr, FUSED_SUM: tl.constexpr,
                         L2_ROWS: tl.constexpr, PDL: tl.constexpr, PAIR: tl.constexpr):
    """One row, group-wise int4 weights times int8 activations (W4A8, as llama.cpp's q4 x q8 dot products; x
    quantized by _quantize_a8_kernel). Word p of a column holds k = 8p + j in nibble j: the word masked with
    0x0F0F0F0F holds the even k as four bytes, shifted by 4 first the odd ones, so 8 codes cost one shift, two
    ANDs and two IDP4A against xe[p] / xo[p]; per group sum_k (q - z) s x ~= s sx (sum_k q xq - z sum_k xq).
    Each thread keeps its words' scaled dot products [packed row, column] over the K slice, summed across the tile
    once at the end (a sum across threads every step cost barriers that kept the loads from staying in flight).
    L2_ROWS (> 0, PDL only: A8_L2_PREFETCH_BYTES): the program's packed rows, rounded up to a power of 2, prefetched
    into L2 before the PDL wait. PAIR (PAIR_A8): a second linear of the same shape reading the same x (the MLP's up
    beside its gate) in the same launch, its weights, partials and output at the *2 pointers: the column blocks
    past the first linear's cdiv(N, BLOCK_N) are the second's (their counters follow the first's)."""
    RP: tl.constexpr = GROUP // 8  # packed rows of a group
    KS: tl.constexpr = K // SPLIT_K
    pdl.launch_dependents(PDL)  # A8_FUSED["pdl"], A8_L2_PREFETCH_BYTES
    pid_n = tl.program_id(0)
    if PAIR:
        blocks = tl.cdiv(N, BLOCK_N)
        second = pid_n >= blocks
        pid_n -= second.to(tl.int32) * blocks
        qw_ptr, qz_ptr, s_ptr = tl.where(second, qw2_ptr, qw_ptr), tl.where(second, qz2_ptr, qz_ptr), \
            tl.where(second, s2_ptr, s_ptr)
        out_ptr, final_ptr = tl.where(second, out2_ptr, out_ptr), tl.where(second, final2_ptr, final_ptr)
    if L2_ROWS > 0:
        first = tl.program_id(1).to(tl.int64) * (KS // 8) * N + pid_n * BLOCK_N  # this program's codes
        _prefetch_codes_l2(qw_ptr + first, KS // 8, L2_ROWS, N, BLOCK_N)
    pdl.wait(PDL)
    if FUSED_QUANT:  # this program's K slice of x quantized here (every column block writes the same values)
        _quantize_groups(x_ptr, xe_ptr, xo_ptr, sx_ptr, sq_ptr, tl.program_id(1) * (KS // GROUP), KS // GROUP,
                         NG_PAD, GROUP)
        tl.debug_barrier()  # the slice is written before any thread of the program reads it
    offs_n, n_ok, r, zshift, w_ptrs = _int4_row_tile(qw_ptr, N, BLOCK_N, RP, KS, pid_n)
    acc = tl.zeros((RP, BLOCK_N), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in tl.range(0, KS, GROUP, num_stages=STAGES):  # STAGES > 1: cp.async prefetch
        k0 = tl.program_id(1) * KS + i
        g = k0 // GROUP
        xe = tl.load(xe_ptr + k0 // 8 + r)
        xo = tl.load(xo_ptr + k0 // 8 + r)
        words = tl.load(w_ptrs, mask=n_ok[None, :], other=0)  # [RP, BN]
        w_ptrs += RP * N
        d = _dp4a(words & 0x0F0F0F0F, xe[:, None], tl.zeros((RP, BLOCK_N), dtype=tl.int32), ASM)
        d = _dp4a((words >> 4) & 0x0F0F0F0F, xo[:, None], d, ASM)
        zp, sw = _int4_stats(qz_ptr, s_ptr, g, offs_n, n_ok, N)
        z = ((zp >> zshift) & 0xF).to(tl.float32)
        scale = sw * tl.load(sx_ptr + g)  # [BN]
        acc += d.to(tl.float32) * scale[None, :]  # a word's dot product is exact (|d| <= 8 * 15 * 127)
        acc_z += scale * z * tl.load(sq_ptr + g).to(tl.float32)
    row = tl.sum(acc, axis=0) - acc_z
    if FUSED_SUM:  # split K: the last program of the column block adds the partials (no second launch)
        _finish_row(out_ptr, final_ptr, count_ptr, row, offs_n, n_ok, N, SPLIT_K)
    else:
        _store(out_ptr, row[None, :], tl.arange(0, 1), offs_n, tl.arange(0, 1) < 1, n_ok, 0, 1, N, SPLIT_K,
               tl.program_id(1))


@triton.jit
def _halves(u, DT: tl.constexpr):
    """int32 u holding two 16-bit floats (bits 0..15 and 16..31) -> (low, high) in DT, by reinterpreting the bits:
    no conversion instruction, and the pair usually stays in its register all the way into the MMA operand."""
    lo = u.to(tl.int16).to(DT, bitcast=True)
    hi = (u >> 16).to(tl.int16).to(DT, bitcast=True)
    return lo, hi


@triton.jit
def _int4_stats(qz_ptr, s_ptr, g, offs_n, n_ok, N):
    """Group g's packed zero points (8 columns a word, as stored) and float32 scales for columns offs_n."""
    zp = tl.load(qz_ptr + g * (N // 8) + offs_n // 8, mask=n_ok, other=0)
    return zp, tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)


@triton.jit
def _int4_mma_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K: tl.constexpr, stride_xm,
                     stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP: tl.constexpr, SPLIT_K: tl.constexpr):
    """1..64 rows of x, group-wise int4, on tensor cores with the operands swapped: acc [BLOCK_N, BLOCK_M] = W x^T,
    so the weight tile is the MMA's 64-row side and the few rows of x its narrow side (never padded to 64).

    Per group the zero point and scale come out of the dot: sum_k (q - z) s x = s (sum_k (q + c) x - (z + c) sum_k x),
    so the tile holds c + q, made by OR-ing two nibbles into the mantissas of a 16-bit float pair (c = 128 in bf16,
    1024 in fp16: two codes for one shift and one AND-OR, exact). Nibbles j and j + 4 of a word share a pair, so the
    tile's K order is 8p + (0 4 1 5 2 6 3 7) and x's columns are permuted to match, in registers. fp32 (CPU
    interpreter, fp32 models) converts the codes and keeps K in order. (Loading x in the tile's K order instead, a
    gather, ran at 400 GB/s against 672 on the H200 at 32 rows: BENCHMARKS.md, 2026-12-01.)"""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    SUB: tl.constexpr = BLOCK_K  # K of one dot: a group or a part of one (BLOCK_K <= GROUP)
    P: tl.constexpr = SUB // 8  # packed rows per dot
    KS: tl.constexpr = K // SPLIT_K
    p = tl.arange(0, P)
    zshift = (offs_n % 8) * 4
    if DT == tl.bfloat16:  # c + q as a 16-bit float is exact; the dot's sum then holds c sum x, taken out per group
        c: tl.constexpr = 128.0
        MAGIC: tl.constexpr = 0x43004300
    elif DT == tl.float16:
        c: tl.constexpr = 1024.0
        MAGIC: tl.constexpr = 0x64006400
    else:
        c: tl.constexpr = 0.0
        MAGIC: tl.constexpr = 0
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_first = tl.program_id(1) * KS
    # the group's zero points and scales are loaded one step ahead (Triton pipelines only the tile loads; a load
    # issued in the step that uses it would stall every step for a full memory latency)
    zp, s = _int4_stats(qz_ptr, s_ptr, k_first // GROUP, offs_n, n_ok, N)
    for i in range(0, KS, BLOCK_K):
        k0 = k_first + i
        z_cur, s_cur = ((zp >> zshift) & 0xF).to(tl.float32), s
        zp, s = _int4_stats(qz_ptr, s_ptr, (k_first + tl.minimum(i + BLOCK_K, KS - BLOCK_K)) // GROUP, offs_n,
                            n_ok, N)
        words = tl.load(qw_ptr + ((k0 // 8 + p).to(tl.int64) * N)[None, :] + offs_n[:, None], mask=n_ok[:, None],
                        other=0)  # [BN, P]
        x = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + tl.arange(0, SUB))[:, None], mask=m_ok[None, :],
                    other=0.0)  # [SUB, BM]
        if DT == tl.float32:
            q0, q1 = (words & 0xF).to(tl.float32), ((words >> 4) & 0xF).to(tl.float32)
            q2, q3 = ((words >> 8) & 0xF).to(tl.float32), ((words >> 12) & 0xF).to(tl.float32)
            q4, q5 = ((words >> 16) & 0xF).to(tl.float32), ((words >> 20) & 0xF).to(tl.float32)
            q6, q7 = ((words >> 24) & 0xF).to(tl.float32), ((words >> 28) & 0xF).to(tl.float32)
            t = tl.join(tl.join(tl.join(q0, q4), tl.join(q2, q6)), tl.join(tl.join(q1, q5), tl.join(q3, q7)))
            w = tl.reshape(t, (BLOCK_N, SUB))  # [.., 4t + 2hb + lb]: k = 8p + j in order
            d = tl.dot(w, x, input_precision="ieee")
        else:
            lo0, hi0 = _halves((words & 0x000F000F) | MAGIC, DT)  # nibbles 0 and 4
            lo1, hi1 = _halves(((words >> 4) & 0x000F000F) | MAGIC, DT)
            lo2, hi2 = _halves(((words >> 8) & 0x000F000F) | MAGIC, DT)
            lo3, hi3 = _halves(((words >> 12) & 0x000F000F) | MAGIC, DT)
            t = tl.join(tl.join(tl.join(lo0, hi0), tl.join(lo1, hi1)), tl.join(tl.join(lo2, hi2), tl.join(lo3, hi3)))
            w = tl.reshape(tl.permute(t, (0, 1, 4, 3, 2)), (BLOCK_N, SUB))  # [.., 4b + 2a + h]: k = 8p + a + 2b + 4h
            x = tl.reshape(tl.permute(tl.reshape(x, (P, 2, 2, 2, BLOCK_M)), (0, 2, 3, 1, 4)), (SUB, BLOCK_M))
            d = tl.dot(w, x)
        xs = tl.sum(x.to(tl.float32), axis=0)  # [BM]
        acc += s_cur[:, None] * (d - (z_cur + c)[:, None] * xs[None, :])
    _store(out_ptr, tl.trans(acc), offs_m, offs_n, m_ok, n_ok, stride_om, M, N, SPLIT_K, tl.program_id(1))


@triton.jit
def _quantize_rows_kernel(x_ptr, xq_ptr, sx_ptr, sq_ptr, stride_xm, K: tl.constexpr, GROUP: tl.constexpr):
    """Row m, group g of x [M, K] for the W4A8 tile (_int8_groups, as the one-row W4A8 quantizes): xq [M, K] int8,
    sx [M, K / GROUP] float32, sq [M, K / GROUP] = sum_k xq."""
    m = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)[None, :]  # [1, GROUP]
    sx, xq = _int8_groups(tl.load(x_ptr + m * stride_xm + offs).to(tl.float32))
    tl.store(xq_ptr + m * K + offs, xq.to(tl.int8))
    tl.store(sx_ptr + m * (K // GROUP) + g + tl.arange(0, 1), sx)
    tl.store(sq_ptr + m * (K // GROUP) + g + tl.arange(0, 1), tl.sum(xq, axis=1))


@triton.jit
def _int4_a8_mma_kernel(xq_ptr, sx_ptr, sq_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N,
                        K: tl.constexpr, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                        SPLIT_K: tl.constexpr):
    """2..64 rows, group-wise int4 weights times int8 activations on the integer tensor cores (W4A8 as the one-row
    GEMV does it, for batched decode): acc [BLOCK_N, BLOCK_M] = W xq^T with the operands swapped as in
    _int4_mma_kernel, one group a step. The codes become int8 by a shift and a mask each, joined in natural K order
    (k = 8p + j: nibble j of packed row p), so x needs no permutation; the dot over the group is exact in int32 and
    the zero point comes out of it: sum_k (q - z) xq = sum_k q xq - z sum_k xq, then the group's two scales."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    P: tl.constexpr = GROUP // 8  # packed rows of a group
    NG: tl.constexpr = K // GROUP
    STEPS: tl.constexpr = NG // SPLIT_K  # groups of a program's K slice
    p = tl.arange(0, P)
    zshift = (offs_n % 8) * 4
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    g_first = tl.program_id(1) * STEPS
    zp, s = _int4_stats(qz_ptr, s_ptr, g_first, offs_n, n_ok, N)  # a step ahead, as in _int4_mma_kernel
    for i in range(0, STEPS):
        g = g_first + i
        z_cur, s_cur = ((zp >> zshift) & 0xF).to(tl.float32), s
        zp, s = _int4_stats(qz_ptr, s_ptr, g_first + tl.minimum(i + 1, STEPS - 1), offs_n, n_ok, N)
        words = tl.load(qw_ptr + ((g * P + p).to(tl.int64) * N)[None, :] + offs_n[:, None], mask=n_ok[:, None],
                        other=0)  # [BN, P]
        q0, q1 = (words & 0xF).to(tl.int8), ((words >> 4) & 0xF).to(tl.int8)
        q2, q3 = ((words >> 8) & 0xF).to(tl.int8), ((words >> 12) & 0xF).to(tl.int8)
        q4, q5 = ((words >> 16) & 0xF).to(tl.int8), ((words >> 20) & 0xF).to(tl.int8)
        q6, q7 = ((words >> 24) & 0xF).to(tl.int8), ((words >> 28) & 0xF).to(tl.int8)
        t = tl.join(tl.join(tl.join(q0, q1), tl.join(q2, q3)), tl.join(tl.join(q4, q5), tl.join(q6, q7)))
        w = tl.reshape(tl.permute(t, (0, 1, 4, 3, 2)), (BLOCK_N, GROUP))  # [.., 4 e2 + 2 e1 + e0]: k = 8p + j
        xq = tl.load(xq_ptr + offs_m[None, :] * K + (g * GROUP + tl.arange(0, GROUP))[:, None], mask=m_ok[None, :],
                     other=0)  # [GROUP, BM] int8
        d = tl.dot(w, xq, out_dtype=tl.int32).to(tl.float32)  # exact: |d| <= GROUP * 15 * 127 < 2^24
        sxg = tl.load(sx_ptr + offs_m * NG + g, mask=m_ok, other=0.0)
        sqg = tl.load(sq_ptr + offs_m * NG + g, mask=m_ok, other=0).to(tl.float32)
        acc += s_cur[:, None] * sxg[None, :] * (d - z_cur[:, None] * sqg[None, :])
    _store(out_ptr, tl.trans(acc), offs_m, offs_n, m_ok, n_ok, stride_om, M, N, SPLIT_K, tl.program_id(1))


@triton.jit
def _fp4_scale(absmax_ptr, nabs_ptr, nmap_ptr, offset, blk, n_ok, NESTED: tl.constexpr):
    """float32 absmax of flat blocks blk (NESTED: nmap[a8] * nabs[blk // 256] + offset)."""
    # one return: Triton 3.6 type-checks every return of a function, even one behind a constexpr branch
    if NESTED:
        a8 = tl.load(absmax_ptr + blk, mask=n_ok, other=0)
        scale = tl.load(nmap_ptr + a8.to(tl.int32)) * tl.load(nabs_ptr + blk // 256, mask=n_ok, other=0.0) + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=n_ok, other=0.0)
    return scale


@triton.jit
def _fp4_mma_kernel(x_ptr, w_ptr, absmax_ptr, lut_ptr, nabs_ptr, nmap_ptr, offset, out_ptr, M, N,
                    K: tl.constexpr, stride_xm, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, SCALE: tl.constexpr,
                    SPLIT_K: tl.constexpr):
    """1..64 rows of x, bitsandbytes 4-bit layout, on tensor cores with the operands swapped (see _int4_mma_kernel):
    one dot per absmax block (or per part of one), scaled by the block's absmax (x SCALE) after the dot. Each byte
    (two codes, k even in the high nibble) is looked up whole in a 256-entry table of 16-bit float pairs (lut_ptr,
    pair_table()): one load per two weights, already in the MMA operand's order. fp32 looks up the 16 code values
    one by one.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    KS: tl.constexpr = K // SPLIT_K
    SUB: tl.constexpr = BLOCK_K  # K of one dot: an absmax block or a part of one (BLOCK_K <= BLOCKSIZE)
    row = offs_n.to(tl.int64) * (K // 2)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_first = tl.program_id(1) * KS
    blk0 = offs_n * (K // BLOCKSIZE)  # [BN] flat index of each row's first absmax block
    # the absmax are loaded one step ahead (see _int4_mma_kernel)
    scale = _fp4_scale(absmax_ptr, nabs_ptr, nmap_ptr, offset, blk0 + k_first // BLOCKSIZE, n_ok, NESTED)
    for i in range(0, KS, BLOCK_K):
        k0 = k_first + i
        scale_cur = scale
        scale = _fp4_scale(absmax_ptr, nabs_ptr, nmap_ptr, offset,
                           blk0 + (k_first + tl.minimum(i + BLOCK_K, KS - BLOCK_K)) // BLOCKSIZE, n_ok, NESTED)
        byte = tl.load(w_ptr + row[:, None] + (k0 // 2 + tl.arange(0, SUB // 2))[None, :], mask=n_ok[:, None],
                       other=0).to(tl.int32)  # [BN, SUB / 2]
        x = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + tl.arange(0, SUB))[:, None], mask=m_ok[None, :],
                    other=0.0)  # [SUB, BM]
        if DT == tl.float32:
            w = tl.reshape(tl.join(tl.load(lut_ptr + (byte >> 4)), tl.load(lut_ptr + (byte & 0xF))), (BLOCK_N, SUB))
            d = tl.dot(w, x, input_precision="ieee")
        else:
            even, odd = _halves(tl.load(lut_ptr + byte), DT)
            d = tl.dot(tl.reshape(tl.join(even, odd), (BLOCK_N, SUB)), x)
        acc += d * (scale_cur * SCALE)[:, None]
    _store(out_ptr, tl.trans(acc), offs_m, offs_n, m_ok, n_ok, stride_om, M, N, SPLIT_K, tl.program_id(1))


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
    w = (_u4_float(q) - (z[:, None, :].to(tl.float32) + 8388608.0)) * s[:, None, :]  # (q - z) * s, exactly
    return tl.reshape(w, (BLOCK_K, w.shape[2]))


@triton.jit
def _int4_dequant_kernel(qw_ptr, qz_ptr, s_ptr, out_ptr, N, K,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    w = _int4_tile(qw_ptr, qz_ptr, s_ptr, offs_n, n_ok, k0, N, BLOCK_K, GROUP)  # [BK, BN]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], w.to(out_ptr.dtype.element_ty), mask=n_ok[None, :])


# Launch configs by kernel and path; fixed, so nothing is tuned at run time (CUDA-graph safe).
# benchmarks/quant_gpu.py sweeps alternatives on the real shapes (inside CUDA graphs) and reports the best.
# gemv / tile: (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K); dequant: (BLOCK_N, BLOCK_K, warps, stages).
# SPLIT_K > 1 cuts K into that many slices run by separate programs (more loads in flight when N gives too
# few programs); their float32 partials are added by a second small kernel in a fixed order. SPLIT_K = 0: as
# many slices (a power of two, at most 16) as it takes for the programs to cover every SM once (N decides);
# SPLIT_K = -w (tiles): as many as cover every SM w times (more warps per SM to hide latency; the tiles' grids of
# ~1.5-2 programs of 4 warps per SM looked latency-bound: their code issues ~3.4 instructions per 4-bit code,
# under the issue limit, yet they streamed ~500 GB/s at batch 16).
# ONE_ROW[fmt]: the kernel for a single row: "gemv" (CUDA cores) or "tile" (the tensor-core tile, 16 rows);
# int4 also "gemv-a8" (x quantized to int8 per group by a small kernel first, then integer dot products).
# FP4_ARITH: the fp4 GEMV decodes codes arithmetically instead of with the 16-entry table (fp4 layers only).
CONFIGS = {
    # The GEMVs' stages: 1 loads a step's codes into registers and then decodes them (every figure measured up to
    # 90db7e6 ran so: their loads were never pipelined, whatever the launch's num_stages); > 1 prefetches that many
    # steps ahead through shared memory (cp.async, `tl.range(num_stages=...)`), keeping loads in flight while the
    # codes are decoded. Measured on an H200 (44c8754): no gain, every stages > 1 candidate was slower. Their SASS
    # (sm_90, read here) shows why the 4-bit GEMVs plateaued at ~1.2 TB/s: each step summed its products across
    # threads (the float int4 GEMV: 29 barriers a step), so the loads could not stay in flight; "gemv2" and the
    # W4A8 GEMV now sum once at the end.
    # one row: 8 rows x 1024 codes (4 KB) a step per program (H200, 45709e9: 910 GB/s of codes on the LM's
    # shapes; 8 x 2048, the default until then: 706)
    ("fp4", "gemv"): (8, 1024, 8, 1, 1),
    # 1..64 rows: 128 rows of W x one absmax block (4 KB of codes) a step, 4 in flight, K split so the programs
    # cover the SMs 4 times (H200, 1172c92: 536 GB/s of codes at 32 rows; one wave, 6 in flight: 516)
    ("fp4", "tile"): (128, 64, 4, 4, -4),
    # fp4 W4A8 (ONE_ROW "gemv-a8", the default: the official fp4 layout times int8 activations, _fp4_gemv_a8_kernel):
    # the fp4 GEMV's tile, one absmax block's 8 words a thread's run (H200, 597c3e4: batch-1 decode 289 tok/s)
    ("fp4", "gemv-a8"): (8, 1024, 8, 1, 1),
    ("fp4", "dequant"): (16, 256, 4, 1),
    ("int4", "gemv"): (32, 1024, 4, 1, 2),  # 16 KB a step; K in two slices: 256 programs for N = 4096
    # W4A8 (ONE_ROW "gemv-a8", the default one-row int4 kernel since f56b1d2's H200 sweep): one group of 128 k
    # (64 B a column) a step, K split so the programs cover the SMs twice, 4 steps in flight. Compiled for sm_90
    # (benchmarks/kernel_sass.py): 2.2 instructions a code and no barrier (summed across threads every step until
    # 68d3ff9: 2.8 and 3 barriers a step; the float GEMV above: ~5.8 and 29). H200, the five LM shapes in one
    # graph: 1,609 GB/s of codes (gemv 1,232, gemv2 1,323); engine int4 batch-1 decode 259 -> 317 tok/s
    ("int4", "gemv-a8"): (64, 128, 4, 4, -2),
    # ONE_ROW "gemv2": one group a step, no reduction inside the loop; K split so the programs cover the SMs twice.
    # Best of its 11 candidates on the H200 (f56b1d2): 1,323 GB/s, below W4A8's 1,609; see _int4_gemv2_kernel
    ("int4", "gemv2"): (128, 128, 4, 1, -2),
    ("int4", "tile"): (128, 128, 4, 4, 0),  # one group (8 KB of codes) a step, 4 in flight
    # TILE_A8's tile (BLOCK_N, unused, warps, stages, SPLIT_K): one group a step, K split to cover the SMs twice.
    # Best of 7 at 32 rows on the H200 (7be199a): 571 GB/s, below the bf16-activation tile's 674
    ("int4", "tile-a8"): (128, 0, 4, 4, -2),
    # the Gluon tile (TILE_GLUON) by BLOCK_M 8 / 16 / 32 / 64: fewer warps a program, or a shorter K step, as the
    # activations' registers grow (BLOCK_K 128: 128 registers a thread at 8 rows, 210 at 32, spills at 64 unless the
    # activations are loaded in their own step, X_AHEAD 0: 254). Best of the candidates on the H200 (BENCHMARKS.md,
    # sixteenth session, the LM linears of a decode step, 3.7 GB): 2.17 ms at 2 rows, 2.25 at 8, 2.63-2.75 at 16,
    # 3.54-3.64 at 32, 5.07 at 64 (the Triton tiles: 5.12, 5.14, 5.25, 5.43, 7.96)
    ("int4", "tile-gl"): (128, 128, 4, 1, -2),
    # the Gluon fp4 tile (TILE_GLUON["fp4"]): (BLOCK_N, BLOCK_K <= the absmax block, warps, flags, SPLIT_K), all rows,
    # flags as the int4 tile's (1: X_AHEAD, >> 2: the cp.async ring's stages; its pairs are always a byte's two codes).
    # Best of 8 on the H200 (BENCHMARKS.md, seventeenth session, the LM linears of a decode step, 3.9 GB): the ring,
    # 3 stages: 3.12 / 3.60 / 4.62 ms at 16 / 32 / 64 rows (the Triton fp4 tile: 6.69 / 7.11 / 9.09; the register
    # kernel (64, 64, 2, 1, -2): 3.80 / 4.55 / 5.55)
    ("fp4", "tile-gl"): (64, 64, 2, 12, -2),
    # ONE_ROW "tile-gl" only (not the default): best of 3 that ran at one row 2.19 ms against the W4A8 GEMV's 1.95
    ("int4", "tile-gl1"): (64, 128, 2, 14, -4),
    # 16 / 32 / 64 rows: the cp.async ring (flags 14: byte pairs, 3 stages; 18: 4 stages), best of 5 / 9 / 6 on the
    # H200 (seventeenth session): 2.52 ms at 16 rows, 3.03 at 32, 4.51 at 64 (the register kernel: 2.68-2.73, 3.39-3.64,
    # 4.91-5.12); engine int4 decode at batch 32 7.19 -> 6.60 ms a step
    ("int4", "tile-gl16"): (64, 128, 2, 14, -2),
    ("int4", "tile-gl32"): (128, 128, 4, 14, 0),
    ("int4", "tile-gl64"): (64, 64, 2, 18, -2),
    ("int4", "dequant"): (64, 128, 4, 1),
}
# int4's one row: W4A8 (x quantized to int8 per weight group, symmetric, by a small kernel; ~0.5% of relative
# error on a linear's output next to the ~5-10% of the 4-bit weights themselves: tests/test_quant_kernels.py);
# COGVLM2_INT4_ONE_ROW=gemv (or gemv2, tile, tile-gl: the Gluon tile with 7 of its 8 MMA columns idle, config
# "tile-gl1": 2.19 ms for a decode step's LM linears against W4A8's 1.95 on the H200) keeps the activations in
# bf16. The official fp4 layout's one row: W4A8 too (_fp4_gemv_a8_kernel, x to int8 per absmax block of 64),
# measured on the H200 (BENCHMARKS.md, fifteenth session, `quant_gpu.py --modes fp4 --sections decode`): batch-1
# decode 289 tok/s against the float GEMV's 193 (202 with FP4_SUM_ONCE); COGVLM2_FP4_ONE_ROW=gemv keeps the
# activations in bf16
ONE_ROW = {"fp4": os.environ.get("COGVLM2_FP4_ONE_ROW", "gemv-a8"),
           "int4": os.environ.get("COGVLM2_INT4_ONE_ROW", "gemv-a8")}
if ONE_ROW["fp4"] not in ("gemv", "gemv-a8", "tile"):
    raise ValueError(f"COGVLM2_FP4_ONE_ROW={ONE_ROW['fp4']!r}: choose gemv, gemv-a8 or tile")
if ONE_ROW["int4"] not in ("gemv", "gemv2", "gemv-a8", "tile", "tile-gl"):
    raise ValueError(f"COGVLM2_INT4_ONE_ROW={ONE_ROW['int4']!r}: choose gemv-a8, gemv, gemv2, tile or tile-gl")
FP4_ARITH = {"gemv": True}
# FP4_SUM_ONCE: the fp4 GEMV keeps its scaled products per word and sums across the tile once at the end instead of
# every step (see _fp4_gemv_kernel; what took the int4 GEMVs from ~1.2 to ~1.6 TB/s of codes). On: the H200's
# batch-1 decode with the float GEMV 193 -> 202 tok/s (`PYTHONPATH=. python benchmarks/quant_gpu.py --modes fp4
# --sections decode` with COGVLM2_FP4_ONE_ROW=gemv and COGVLM2_FP4_SUM_ONCE=0 / 1; BENCHMARKS.md, fifteenth session)
FP4_SUM_ONCE = {"gemv": os.environ.get("COGVLM2_FP4_SUM_ONCE", "1") == "1"}
# A8_FUSED: the W4A8 GEMV's launches folded into it (three a linear unfused: quantize x, GEMV, split-K sum). "sum":
# with K split, the GEMV's last program per column block adds the float32 partials (an atomic counter per block)
# instead of _splitk_sum_kernel; "quant": each program quantizes its own K slice of x in its prologue (the same
# arithmetic as _quantize_a8_kernel, written to the same buffers) instead of the quantize launch, while the slice has
# at most A8_QUANT_MAX_GROUPS groups. Both bit-equal to the three launches (tests/test_quant_kernels.py). "pdl": the
# GEMV launched with programmatic dependent launch (cogvlm2/pdl.py). Measured on the H200 (BENCHMARKS.md, engine int4
# decode batch 1, 2026-12-01): none 319.6 tok/s, **sum 334.6** (the default), sum + quant 316.8, sum + quant + pdl
# 238.6 (the three launches under PDL: 256); `benchmarks/quant_gpu.py --a8-fused off,sum,...` times them in the engine.
A8_FUSED = {"sum": True, "quant": False, "pdl": False}
# A8_L2_PREFETCH_BYTES: a W4A8 GEMV (int4's, or the official fp4 layout's) whose codes are at most this many bytes
# (the attention output's projection: 8 MiB of codes for 4,096 x 4,096; 0: none) is launched with PDL, its row's
# quantize launch too, and each program prefetches its codes into L2 before it waits: the ~14 us a layer of decode
# attention before it (the int4 profile, BENCHMARKS.md, fourteenth session) streams them meanwhile. On: int4 batch-1
# decode 359.6 -> 366.9 tok/s on the H200 (BENCHMARKS.md, fifteenth session: `PYTHONPATH=. python
# benchmarks/decode_ab.py --quant int4 --set "quant.triton_kernels.A8_L2_PREFETCH_BYTES=0" --set
# "quant.triton_kernels.A8_L2_PREFETCH_BYTES=9437184" --batches 1 --rounds 2`); 13.6 MiB (the QKV's 12 MiB too) 350.5,
# 30 MiB (every W4A8 GEMV) 258.6: under PDL a GEMV after a norm loses, after attention it gains.
# COGVLM2_A8_L2_PREFETCH=0 (bytes, read at import) turns it off
A8_L2_PREFETCH_BYTES = int(os.environ.get("COGVLM2_A8_L2_PREFETCH", "9437184"))
A8_QUANT_MAX_GROUPS = 32
# FP4_A8_LONG_K_SPLIT: the fp4 W4A8 GEMV splits K at least this many ways (0: as CONFIGS says, unsplit) for rows of
# 8,192+ codes (the MLP's down projection, K = 14,336), the partials added by the column block's last program. Nsight
# Compute on the H200 (BENCHMARKS.md, fifteenth session): unsplit, down's 512 programs fill 0.65 of a wave and stream
# at 29% of DRAM bandwidth (23 us) where the gate's 1,792 reach 43%. Split in two: the official fp4 layout's batch-1
# decode 315.1 -> 324.9 tok/s on the H200 (four ways: 324.1; `PYTHONPATH=. python benchmarks/decode_ab.py --quant fp4
# --set "quant.triton_kernels.FP4_A8_LONG_K_SPLIT=0" --set "quant.triton_kernels.FP4_A8_LONG_K_SPLIT=2" --batches 1
# --rounds 2`, BENCHMARKS.md, fifteenth session); COGVLM2_FP4_A8_LONG_K_SPLIT (read at import) sets it, 0: unsplit
FP4_A8_LONG_K_SPLIT = int(os.environ.get("COGVLM2_FP4_A8_LONG_K_SPLIT", "2"))
A8_LONG_K = 8192
# INT4_A8_LONG_K_SPLIT: the same for int4's W4A8 GEMV, as a CONFIGS split (< 0: K split so the programs cover the SMs
# that many times; 0: the config's, -2) for rows of A8_LONG_K+ codes. Nsight Compute (BENCHMARKS.md, fifteenth
# session): its down projection runs 512 programs at 0.4 waves and 47% of DRAM bandwidth. Measured on the H200
# (sixteenth session, `PYTHONPATH=. python benchmarks/decode_ab.py --quant int4 --set
# "quant.triton_kernels.INT4_A8_LONG_K_SPLIT=0" --set "...=-4" --set "...=16" --batches 1 --rounds 2`): 367.9, 355.1,
# 355.3 tok/s, so off; COGVLM2_INT4_A8_LONG_K_SPLIT (read at import) sets it
INT4_A8_LONG_K_SPLIT = int(os.environ.get("COGVLM2_INT4_A8_LONG_K_SPLIT", "0"))
# TILE_A8: int4 from this many rows on (2+; 0: never) through the W4A8 tile where the Gluon tile (TILE_GLUON) is off or
# does not apply (_int4_a8_mma_kernel: x quantized to
# int8 per row and group, integer tensor cores) instead of the bf16-activation tile; 0.6-0.7% of error against
# W4A16 (interpreted tests). The LM linears of a decode step on the H200 (BENCHMARKS.md, 2026-12-01, `quant_gpu.py
# --sections lmstep`): W4A8 tile 5.60-5.76 ms at 2-16 rows, 6.19-6.31 at 24-32, 7.63-8.04 at 48-64; bf16 tile
# 5.34-5.44 at 24-32 rows (BLOCK_M 32; 7.31-7.52 with BLOCK_M 16 at 2-16 rows, hence INT4_TILE_ROWS), 8.42-8.58 at 48-64
TILE_A8 = {"int4": 33}
# TILE_GLUON: int4 at 2..64 rows through the Gluon tile (gluon_kernels.py: every MMA operand in registers, no shared
# memory) where it applies (Gluon importable, sm_80+, bf16 / fp16); COGVLM2_INT4_TILE_GLUON=0 (read at import) keeps
# the Triton tiles above. Configs ("int4", "tile-gl" / "tile-gl16" / "tile-gl32" / "tile-gl64"): (BLOCK_N, BLOCK_K,
# warps, flags, SPLIT_K as for the tiles) at BLOCK_M 8 (2-8 rows) / 16 / 32 / 64; flags: 1 = X_AHEAD (the activations
# loaded a step ahead with the words, else at the top of their step: fewer registers), 2 = BYTE_PAIRS (the two codes
# of a byte form an MMA pair, so the activations need no byte permutes: 540 against 585 SASS instructions a step at
# 32 rows, 431 against 412 at 8; alone it does not win on the H200), flags >> 2 = STAGES (2+: the cp.async ring
# kernel, _int4_ring_kernel, byte pairs: a step's words and activations through shared memory, STAGES - 1 steps
# ahead, so the registers that held them are free: 128 registers at 32 rows with (128, 128, 4) and 3 stages against
# 210; the default at 16-64 rows). Rows of x not 16-byte aligned fall back to nibble pairs in registers. Measured on
# the H200 (BENCHMARKS.md): engine int4 decode at batch 32 8.99 -> 7.20 ms a step with the register kernel
# (sixteenth session; `PYTHONPATH=. python benchmarks/decode_ab.py --quant int4 --set
# "quant.triton_kernels.TILE_GLUON={'int4': False}" --set "quant.triton_kernels.TILE_GLUON={'int4': True}" --batches
# 32 --rounds 2`), 7.19 -> 6.60 ms with the ring at 16-64 rows (seventeenth session)
TILE_GLUON = {"int4": os.environ.get("COGVLM2_INT4_TILE_GLUON", "1") == "1",
              # the official fp4 layout's 2..64 rows through the Gluon fp4 tile (_fp4_ring_kernel at its default
              # config; the register kernel _fp4_mma2_kernel where x's rows are not 16-byte aligned): engine decode
              # at batch 32 11.01 -> 7.20 ms a step on the H200 (seventeenth session, decode_ab.py --quant fp4)
              "fp4": os.environ.get("COGVLM2_FP4_TILE_GLUON", "1") == "1"}
INT4_TILE_ROWS = 32  # the bf16-activation int4 tile's least BLOCK_M on a GPU (16 in Triton's interpreter: fewer lanes)


def _gluon_off(fmt: str, err: Exception) -> None:
    """A Gluon tile that does not compile under this Triton (Gluon is experimental: its API moves between
    versions) is switched off for the process, with a warning, and the Triton tile runs instead."""
    TILE_GLUON[fmt] = False
    logger.warning("the Gluon %s tile does not compile here (%s: %s); using the Triton tile", fmt,
                   type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")


def _gluon_compile_error(err: Exception) -> bool:
    """Whether err comes from compiling a kernel (Triton's own errors: the front end, ptxas; or a failed MLIR pass),
    not from running one."""
    from triton.errors import TritonError

    return isinstance(err, TritonError) or isinstance(err, RuntimeError) and "PassManager" in str(err)


def _run_gluon(fmt: str, launch, outs: list[tuple[torch.Tensor, torch.Tensor]], split: int
               ) -> list[torch.Tensor] | None:
    """launch() a Gluon tile writing the (out, partials) pairs of outs, then add each pair's K slices into its out;
    None where the tile failed to compile (Gluon then switched off for fmt in this process, _gluon_off). An error
    from running it is raised."""
    try:
        launch()
    except Exception as e:
        if not _gluon_compile_error(e):
            raise
        _gluon_off(fmt, e)
        return None
    for out, part in outs:
        _finish(part, out, split)
    return [out for out, _ in outs]


def _block_counters(device: torch.device, blocks: int) -> torch.Tensor:
    """A8_FUSED["sum"]'s int32 counters, one per column block (cogvlm2/counters.py)."""
    return counters("W4A8 split-K sum", device, blocks)


# The alternatives benchmarks/quant_gpu.py times on the real shapes (the first of each is the default above);
# test_quant_kernels runs every one of them on the GPU.
CANDIDATES = {
    ("fp4", "gemv"): [(8, 1024, 8, 1, 1), (8, 1024, 8, 3, 1), (8, 2048, 8, 3, 1), (4, 1024, 4, 3, 1),
                      (8, 1024, 8, 4, 1), (16, 1024, 8, 3, 1), (4, 1024, 4, 1, 1)],
    ("fp4", "gemv-a8"): [(8, 1024, 8, 1, 1), (8, 1024, 8, 3, 1), (16, 1024, 8, 3, 1), (4, 1024, 4, 3, 1),
                         (8, 2048, 8, 3, 2)],
    ("fp4", "tile"): [(128, 64, 4, 4, -4), (128, 64, 4, 6, 0), (128, 64, 4, 4, 0), (64, 64, 4, 6, 0),
                      (256, 64, 8, 4, 0), (128, 32, 4, 8, 0), (128, 64, 8, 6, 0), (128, 64, 4, 6, -2)],
    ("int4", "gemv"): [(32, 1024, 4, 1, 2), (32, 1024, 4, 2, 2), (32, 1024, 4, 3, 2), (32, 512, 4, 3, 2),
                       (32, 512, 4, 4, 4), (16, 1024, 4, 3, 2), (64, 512, 4, 3, 2), (16, 1024, 4, 1, 2)],
    # the last two: 8 warps a program (Nsight Compute: the 4-warp GEMVs run 0.3-0.45 waves, latency-bound)
    ("int4", "gemv-a8"): [(64, 128, 4, 4, -2), (64, 128, 4, 1, -4), (64, 128, 4, 3, -4), (128, 128, 4, 3, -2),
                          (32, 128, 4, 4, -4), (128, 128, 4, 1, -4), (64, 128, 4, 4, -4), (32, 128, 4, 4, -2),
                          (64, 128, 8, 4, -2), (128, 128, 8, 4, -2)],
    ("int4", "gemv2"): [(128, 128, 4, 1, -2), (128, 128, 4, 3, -2), (128, 128, 4, 4, -4), (64, 128, 4, 3, -4),
                        (256, 128, 8, 3, -2), (128, 128, 8, 3, -2), (64, 128, 2, 4, -4), (256, 128, 4, 2, -2),
                        (256, 128, 4, 3, -2), (512, 128, 8, 2, -2), (512, 128, 8, 3, -1)],
    ("int4", "tile-a8"): [(128, 0, 4, 3, 0), (64, 0, 4, 3, 0), (128, 0, 8, 3, 0), (256, 0, 8, 3, 0), (128, 0, 4, 4, -2),
                          (64, 0, 4, 4, -2), (128, 0, 4, 2, 0)],
    # the Gluon tile at 8 / 16 / 32 / 64 rows (BLOCK_N = 16 x warps x row repeats)
    ("fp4", "tile-gl"): [(64, 64, 2, 12, -2), (128, 64, 4, 1, -2), (64, 64, 2, 1, -2), (64, 32, 2, 1, -2),
                         (128, 64, 4, 16, -2), (64, 64, 2, 16, -2), (64, 64, 2, 12, 0), (128, 64, 4, 12, 0),
                         (64, 64, 2, 20, -2)],
    # (flags 14: byte pairs, 3 stages; 18: byte pairs, 4 stages)
    ("int4", "tile-gl"): [(128, 128, 4, 1, -2), (128, 128, 4, 3, -2), (64, 128, 2, 1, -2), (128, 128, 4, 14, -2)],
    ("int4", "tile-gl1"): [(64, 128, 2, 14, -4), (128, 128, 4, 14, -4), (128, 128, 4, 18, -4), (64, 128, 2, 18, -4),
                           (256, 128, 4, 14, -2), (128, 128, 4, 1, -2)],
    ("int4", "tile-gl16"): [(64, 128, 2, 14, -2), (64, 128, 2, 3, -2), (128, 128, 4, 14, -2), (64, 128, 2, 18, -2),
                            (64, 128, 2, 14, 0), (64, 64, 2, 18, -2)],
    ("int4", "tile-gl32"): [(128, 128, 4, 14, 0), (64, 128, 2, 3, -2), (64, 128, 2, 14, -2), (128, 64, 4, 18, -2),
                            (128, 128, 4, 18, 0), (64, 128, 2, 14, 0), (128, 64, 4, 14, 0), (256, 128, 8, 14, 0),
                            (128, 128, 4, 22, 0)],
    ("int4", "tile-gl64"): [(64, 64, 2, 18, -2), (64, 128, 2, 2, -2), (64, 128, 2, 14, -2), (64, 64, 2, 18, 0),
                            (64, 64, 2, 22, -2), (64, 128, 2, 18, -2), (128, 64, 4, 18, -2)],
    ("int4", "tile"): [(128, 128, 4, 4, 0), (64, 128, 4, 4, 0), (128, 128, 8, 4, 0), (256, 128, 8, 3, 0),
                       (128, 64, 4, 6, 0), (128, 128, 4, 3, 0), (128, 128, 4, 4, 2), (128, 128, 4, 4, -2),
                       (128, 128, 4, 3, -4), (64, 128, 4, 4, -2)],
}


def _rows(m: int, least: int = 16) -> int:
    """BLOCK_M of the tensor-core tile for m rows: least..64 (the MMA's narrow side)."""
    return min(64, max(least, triton.next_power_of_2(m)))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a GPU; 8 for the CPU (Triton's interpreter), so the tests cut K there too."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _block_k(want: int, k: int, unit: int) -> int:
    """The largest power-of-two multiple of `unit`, at most `want`, that divides k (k % unit == 0)."""
    b = max(unit, want)
    while b > unit and k % b:
        b //= 2
    return b


def _split(k: int, split: int, want: int, unit: int) -> tuple[int, int]:
    """(SPLIT_K, BLOCK_K): at most `split` slices of k, each a multiple of `unit`, and the largest power-of-two
    multiple of `unit` up to `want` that divides a slice (k % unit == 0)."""
    while split > 1 and k % (split * unit):
        split //= 2
    return split, _block_k(want, k // split, unit)


def _tile_split(split: int, programs: int, device: torch.device) -> int:
    """SPLIT_K of a tile config: as given (> 0), or the power of two <= 16 that makes `programs` cover the SMs
    once (0) or -split times (< 0: more programs per SM hide more memory latency, at the price of more float32
    partials to add)."""
    if split > 0:
        return split
    waves, split, sms = max(1, -split), 1, _sm_count(device)
    while split < 16 and programs * split < waves * sms:
        split *= 2
    return split


def launch_split(split: int, block_n: int, n: int, k: int, unit: int, device: torch.device, count: int = 1) -> int:
    """The K split of a launch over `count` weights [n, k] (a pair: 2) with a config's split and BLOCK_N, in slices
    of whole `unit`s: as given (> 0), or sized by _tile_split for all count x cdiv(n, BLOCK_N) column blocks, so a
    pair may split K less than each of its linears alone (its sums then differ from theirs in float32 rounding)."""
    return _split(k, _tile_split(split, triton.cdiv(n, block_n) * count, device), unit, unit)[0]


def _rows_16b(x2: torch.Tensor) -> bool:
    """Whether every row of x2 [m, K] (16-bit) starts 16 bytes aligned: what the Gluon tiles' cp.async rings copy
    (and the int4 tile's int32 activation pairs read)."""
    return x2.stride(0) % 8 == 0 and x2.data_ptr() % 16 == 0


def _outputs(m: int, n: int, split: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [m, n] in x's dtype, what the matmul kernel writes: out itself, or float32 partials per slice)."""
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    return out, out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)


def _finish(part: torch.Tensor, out: torch.Tensor, split: int) -> None:
    if split > 1:
        block = 1024
        _splitk_sum_kernel[(triton.cdiv(out.numel(), block),)](part, out, out.numel(), SPLIT_K=split, BLOCK=block,
                                                               num_warps=4)


def _flat(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


Nested = tuple[torch.Tensor, torch.Tensor, float] | None  # (nested_absmax, nested_quant_map, offset) or None


def _stats(absmax: torch.Tensor, nested: Nested) -> tuple:
    """Kernel arguments (absmax, nabs, nmap, offset, NESTED); unused pointers repeat absmax."""
    return (absmax, *nested, True) if nested is not None else (absmax, absmax, absmax, 0.0, False)


def pair_table(lut: torch.Tensor, dtype: torch.dtype, is_fp4: bool) -> tuple[torch.Tensor, float]:
    """(table, scale) for the 4-bit tile kernel in a 16-bit dtype: table[b] (int32) holds the values of byte b's two
    codes as a pair of `dtype` floats, the high nibble's (k even) in the low half; the kernel multiplies the block
    absmax by `scale`. fp4 stores 3/4 of each value (exact in bf16 and fp16: 1/2, 3/4, 1/4, 3/8, 1/8, 3/16, 2^-8,
    while 2/3, 1/3, 1/6, 1/192 are not) with scale 4/3; other tables are rounded to `dtype` once. float32 x needs
    no table (the kernel reads `lut`). Torch ops on lut's device: no host sync, so it may run under capture."""
    scale = 4.0 / 3.0 if is_fp4 else 1.0
    bits = (lut.float() * (1.0 / scale)).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # [16]
    b = torch.arange(256, device=lut.device)
    pair = bits[b >> 4] | (bits[b & 0xF] << 16)
    return torch.where(pair >= 2**31, pair - 2**32, pair).to(torch.int32), scale


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


def quantize_fp4_a8(x: torch.Tensor, block: int = 64, launch_pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One row x [1, K] (contiguous) for the fp4 W4A8 GEMV: (xw int32 [K / 4]: int8 per absmax block of `block`,
    four a word in _fp4_dot8's order; sx float32 [K / block]), one launch (launch_pdl: with programmatic dependent
    launch where the GPU has it, cogvlm2/pdl.py)."""
    k = x.shape[-1]
    xw, sx = a8_buffers(k, -block, x.device)
    _quantize_fp4_a8_kernel[(k // block,)](x.reshape(1, k), xw, sx, GROUP=block, num_warps=1,
                                           **(pdl.options(x) if launch_pdl else {"PDL": False}))
    return xw, sx


def fp4_a8_applies(x: torch.Tensor, packed: torch.Tensor, blocksize: int, is_fp4: bool, nested: Nested) -> bool:
    """Whether fp4_linear takes x (one row, contiguous) through the fp4 W4A8 GEMV: then quantize_fp4_a8(x) done once
    can serve several such layers that read x (fp4_linear's `a8`)."""
    return (x.numel() == x.shape[-1] and ONE_ROW["fp4"] == "gemv-a8" and is_fp4 and nested is None
            and blocksize == 64 and packed.data_ptr() % 16 == 0 and x.stride(-1) == 1)


def _fp4_a8(x: torch.Tensor, x2: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]], n: int,
            a8: tuple[torch.Tensor, torch.Tensor] | None) -> list[torch.Tensor]:
    """The fp4 W4A8 GEMV of one row x2 [1, K] with one weight (packed, float32 absmax), or two of one shape (PAIR) in
    one launch; their outputs [1, n] in x's dtype."""
    packed = weights[0][0]
    k = x2.shape[1]
    block_n, block_k, warps, stages, split = CONFIGS[("fp4", "gemv-a8")]
    if FP4_A8_LONG_K_SPLIT and k >= A8_LONG_K:  # the MLP's down projection: more programs for its long rows
        split = max(split, FP4_A8_LONG_K_SPLIT)
    split, block_k = _split(k, split, block_k, 64)
    outs = [_outputs(1, n, split, x) for _ in weights]
    fused_sum = split > 1
    blocks = triton.cdiv(n, block_n) * len(weights)
    count = _block_counters(x.device, blocks) if fused_sum else outs[0][1]
    options = pdl.options(x)
    prefetch = options["PDL"] and len(weights) == 1 and 0 < packed.numel() <= A8_L2_PREFETCH_BYTES \
        and k // split >= 256
    xw, sx = a8 if a8 is not None else quantize_fp4_a8(x2, launch_pdl=prefetch)
    (out, part), (out2, part2), (packed2, a2) = outs[0], outs[-1], weights[-1]
    _fp4_gemv_a8_kernel[(blocks, split)](
        xw, sx, packed.view(-1).view(torch.int32), weights[0][1], part, out, count, n,
        packed2.view(-1).view(torch.int32), a2, part2, out2, K=k, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
        STAGES=stages, ASM=x.is_cuda, L2_LINES=triton.next_power_of_2(k // split // 256) if prefetch else 0,
        FUSED_SUM=fused_sum, PAIR=len(weights) == 2, num_warps=warps, num_stages=stages,
        **(options if prefetch else {"PDL": False}))
    for out, part in outs:
        _finish(part, out, 1 if fused_sum else split)  # fused: nothing left to add
    return [out for out, _ in outs]


def _fp4_gluon(x: torch.Tensor, x2: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]], n: int,
               blocksize: int, nested: tuple) -> list[torch.Tensor] | None:
    """The Gluon fp4 tile for x2 [m, K] times one fp4 weight (packed, absmax as _stats gives it; nested: the rest of
    _stats), or two of one shape with float32 absmax in one launch (the ring); their outputs [m, n] in x's dtype.
    None where this Triton cannot compile the tile (then switched off for the process, _gluon_off)."""
    m, k = x2.shape
    block_n, block_k, warps, flags, split = CONFIGS[("fp4", "tile-gl")]
    split = launch_split(split, block_n, n, k, blocksize, x.device, len(weights))
    outs = [_outputs(m, n, split, x) for _ in weights]
    aligned = _rows_16b(x2)  # for the ring's 16-byte copies
    second = (*weights[1], outs[1][1]) if len(weights) == 2 else None
    return _run_gluon("fp4", lambda: gluon_kernels.fp4_mma2(
        x2, weights[0][0], (weights[0][1], *nested), outs[0][1], blocksize, _rows(m, 8), block_n,
        _block_k(min(block_k, blocksize), blocksize, 32), warps, split, bool(flags & 1), flags >> 2 if aligned else 0,
        second), outs, split)


def fp4_linear_pair(x: torch.Tensor, first: tuple[torch.Tensor, torch.Tensor],
                    second: tuple[torch.Tensor, torch.Tensor], n: int,
                    a8: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x @ W1^T, x @ W2^T) for two fp4 weights (packed, float32 absmax; blocks of 64, the standard code) of one
    shape in one launch: one row through the fp4 W4A8 GEMV, 2-64 rows through the Gluon fp4 tile's ring, where
    fp4_linear would take those; else None. The same numbers as two fp4_linear calls at the pair's K split, bit for
    bit (launch_split)."""
    x2 = _flat(x)
    if first[0].shape != second[0].shape or first[1].shape != second[1].shape:
        return None
    ring = CONFIGS[("fp4", "tile-gl")][3] >> 2 and _rows_16b(x2)  # a pair runs on the ring only
    if all(fp4_a8_applies(x2, w[0], 64, True, None) for w in (first, second)):
        outs = _fp4_a8(x, x2, [first, second], n, a8)
    elif TILE_GLUON["fp4"] and ring and all(gluon_kernels.fp4_applies(x2, w[0], 64, True) for w in (first, second)):
        outs = _fp4_gluon(x, x2, [first, second], n, 64, _stats(first[1], None)[1:])
    else:
        return None
    return None if outs is None else tuple(y.view(*x.shape[:-1], n) for y in outs)


def fp4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, n: int,
               blocksize: int = 64, is_fp4: bool = False, nested: Nested = None,
               table: tuple[torch.Tensor, float] | None = None,
               a8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., n] with W in the bitsandbytes 4-bit layout (K % blocksize == 0). `is_fp4`:
    the codes are bitsandbytes' fp4 (which may then be decoded without the table, see FP4_ARITH);
    `nested`: the absmax are 8-bit (double quantization); `table`: pair_table(lut, x.dtype, is_fp4), cached by
    the caller (else built here, two small torch ops); `a8`: x already quantized by quantize_fp4_a8 (where
    fp4_a8_applies: the MLP's gate and up read the same row), used instead of quantizing it again."""
    x2, k = _flat(x), x.shape[-1]
    m = x2.shape[0]
    if m > FUSED_MAX_ROWS:
        return torch.nn.functional.linear(x, fp4_dequantize(packed, absmax, lut, n, k, x.dtype, blocksize, nested))
    if not m:
        return x.new_empty(*x.shape[:-1], n)
    a, nabs, nmap, offset, is_nested = _stats(absmax, nested)
    if fp4_a8_applies(x2, packed, blocksize, is_fp4, nested):  # int8 activations, integer dot products
        return _fp4_a8(x, x2, [(packed, a)], n, a8)[0].view(*x.shape[:-1], n)
    elif m == 1 and ONE_ROW["fp4"] in ("gemv", "gemv-a8") and packed.data_ptr() % 16 == 0:  # codes as int32 words
        block_n, block_k, warps, stages, split = CONFIGS[("fp4", "gemv")]
        split, block_k = _split(k, split, block_k, blocksize)
        out, part = _outputs(m, n, split, x)
        _fp4_gemv_kernel[(triton.cdiv(n, block_n), split)](
            x2, packed.view(-1).view(torch.int32), a, lut, nabs, nmap, offset, part, n, k, BLOCK_N=block_n,
            BLOCK_K=block_k, BLOCKSIZE=blocksize, ARITH=is_fp4 and FP4_ARITH["gemv"], NESTED=is_nested,
            SUM_ONCE=FP4_SUM_ONCE["gemv"],
            SPLIT_K=split, STAGES=stages, num_warps=warps, num_stages=stages)
    elif TILE_GLUON["fp4"] and gluon_kernels.fp4_applies(x2, packed, blocksize, is_fp4):  # operands in registers
        outs = _fp4_gluon(x, x2, [(packed, a)], n, blocksize, (nabs, nmap, offset, is_nested))
        if outs is None:  # this Triton cannot compile it: switched off, the Triton tile instead
            return fp4_linear(x, packed, absmax, lut, n, blocksize, is_fp4, nested, table, a8)
        return outs[0].view(*x.shape[:-1], n)
    else:
        block_n, block_k, warps, stages, split = CONFIGS[("fp4", "tile")]
        split = _tile_split(split, triton.cdiv(n, block_n), x.device)
        unit = _block_k(min(block_k, blocksize), k, 16)  # one step, one dot: an absmax block or a part of one
        split, block_k = _split(k, split, unit, unit)
        out, part = _outputs(m, n, split, x)
        if x.dtype == torch.float32:
            lookup, scale = lut, 1.0
        else:
            lookup, scale = table if table is not None else pair_table(lut, x.dtype, is_fp4)
        _fp4_mma_kernel[(triton.cdiv(n, block_n), split)](
            x2, packed, a, lookup, nabs, nmap, offset, part, m, n, k, x2.stride(0), out.stride(0),
            BLOCK_M=_rows(m), BLOCK_N=block_n, BLOCK_K=block_k, BLOCKSIZE=blocksize,
            NESTED=is_nested, SCALE=scale, SPLIT_K=split, num_warps=warps, num_stages=stages)
    _finish(part, out, split)
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


A8Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (xe [2, K/8] int32, sx [K/G] float32, sq [K/G] int32)


# FP4_A8: the a8 "group" (Fp4Linear.shares_a8, model.ops.a8_group) asking the kernels that produce a decode row for
# the fp4 W4A8 row (absmax blocks of 64, store_fp4_a8_groups) instead of int4's (a positive group size)
FP4_A8 = -64


def a8_buffers(k: int, group: int, device: torch.device) -> A8Row | tuple[torch.Tensor, torch.Tensor]:
    """Empty buffers for one row of K quantized for the W4A8 GEMV (store_a8_groups, quantize_a8 write them); group
    FP4_A8: the fp4 W4A8 row (xw [K / 4] int32, sx [K / 64] float32: store_fp4_a8_groups, quantize_fp4_a8)."""
    if group < 0:  # FP4_A8 (or quantize_fp4_a8's blocks of -group)
        return (torch.empty(k // 4, dtype=torch.int32, device=device),
                torch.empty(k // -group, dtype=torch.float32, device=device))
    xe = torch.empty(2, k // 8, dtype=torch.int32, device=device)  # even / odd k, four int8 a word
    sx = torch.empty(k // group, dtype=torch.float32, device=device)
    return xe, sx, torch.empty(k // group, dtype=torch.int32, device=device)


def a8_row_applies(x: torch.Tensor) -> bool:
    """Whether int4_linear takes x (one row, contiguous) through the W4A8 GEMV with its quantize launch, i.e. whether
    quantize_a8(x) done once can serve several int4 linears that read x (int4_linear's `a8`)."""
    return x.numel() == x.shape[-1] and ONE_ROW["int4"] == "gemv-a8" and x.stride(-1) == 1 and not A8_FUSED["quant"]


def quantize_a8(x: torch.Tensor, group: int, launch_pdl: bool = False) -> A8Row:
    """One row x [1, K] (contiguous) quantized for the W4A8 GEMV: int8 per weight group, symmetric (one launch;
    launch_pdl: with programmatic dependent launch where the GPU has it, cogvlm2/pdl.py)."""
    k = x.shape[-1]
    xe, sx, sq = a8_buffers(k, group, x.device)
    _quantize_a8_kernel[(k // group,)](x.reshape(1, k), xe[0], xe[1], sx, sq, GROUP=group, num_warps=4,
                                       **(pdl.options(x) if launch_pdl else {"PDL": False}))
    return xe, sx, sq


def _int4_a8_path(x2: torch.Tensor) -> bool:
    """Whether int4_linear takes x2 [m, K] through the W4A8 GEMV (one row, ONE_ROW "gemv-a8")."""
    return x2.shape[0] == 1 and ONE_ROW["int4"] == "gemv-a8" and x2.stride(-1) == 1


def _int4_gluon_path(x2: torch.Tensor, scales: torch.Tensor, group: int) -> bool:
    """Whether int4_linear takes x2 [m, K] through the Gluon tile (2+ rows, or one as ONE_ROW "tile-gl" says)."""
    return TILE_GLUON["int4"] and (x2.shape[0] > 1 or ONE_ROW["int4"] == "tile-gl") \
        and gluon_kernels.applies(x2, scales, group)


def _int4_a8(x: torch.Tensor, x2: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             group: int, a8: A8Row | None) -> list[torch.Tensor]:
    """The W4A8 GEMV of one row x2 [1, K] with one int4 weight, or two of one shape (PAIR: the MLP's gate and up) in
    one launch; their outputs [1, N] in x's dtype."""
    qweight, qzeros, scales = weights[0]
    k, n = x2.shape[1], qweight.shape[1]
    block_n, _, warps, stages, split = CONFIGS[("int4", "gemv-a8")]
    if INT4_A8_LONG_K_SPLIT and k >= A8_LONG_K:  # the MLP's down projection: more programs for its long rows
        split = INT4_A8_LONG_K_SPLIT
    blocks = triton.cdiv(n, block_n) * len(weights)  # a pair's second weight: the blocks after the first's
    split = launch_split(split, block_n, n, k, group, x.device, len(weights))
    outs = [_outputs(1, n, split, x) for _ in weights]
    groups = k // group // split  # of a program's K slice
    fused_quant = a8 is None and A8_FUSED["quant"] and groups <= A8_QUANT_MAX_GROUPS
    options = pdl.options(x)
    prefetch = options["PDL"] and len(weights) == 1 and n % block_n == 0 and \
        0 < qweight.numel() * qweight.element_size() <= A8_L2_PREFETCH_BYTES
    if fused_quant:  # each program quantizes its own slice into these
        xe, sx, sq = a8_buffers(k, group, x.device)
    else:
        xe, sx, sq = a8 if a8 is not None else quantize_a8(x2, group, launch_pdl=prefetch)
    fused_sum = A8_FUSED["sum"] and split > 1
    count = _block_counters(x.device, blocks) if fused_sum else outs[0][1]
    (out, part), (out2, part2), second = outs[0], outs[-1], weights[-1]
    _int4_gemv_a8_kernel[(blocks, split)](
        x2, xe[0], xe[1], sx, sq, qweight, qzeros, scales, part, out, count, n, *second, part2, out2, K=k,
        BLOCK_N=block_n, GROUP=group, SPLIT_K=split, ASM=x.is_cuda, STAGES=stages, FUSED_QUANT=fused_quant,
        NG_PAD=triton.next_power_of_2(groups) if fused_quant else 1, FUSED_SUM=fused_sum,
        L2_ROWS=triton.next_power_of_2(k // split // 8) if prefetch else 0, PAIR=len(weights) == 2, num_warps=warps,
        num_stages=stages, **(options if A8_FUSED["pdl"] or prefetch else {"PDL": False}))
    for out, part in outs:
        _finish(part, out, 1 if fused_sum else split)  # fused: nothing left to add
    return [out for out, _ in outs]


def _int4_gluon(x: torch.Tensor, x2: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                group: int) -> list[torch.Tensor] | None:
    """The Gluon int4 tile for x2 [m, K] times one int4 weight, or two of one shape (a pair: the MLP's gate and up) in
    one launch; their outputs [m, N] in x's dtype. None where this Triton cannot compile the tile (then switched off
    for the process, _gluon_off)."""
    qweight, qzeros, scales = weights[0]
    m, k, n = x2.shape[0], x2.shape[1], qweight.shape[1]
    block_m = _rows(m, 8)  # the MMA's operands in registers; one row ("tile-gl1") only as ONE_ROW says
    path = "tile-gl1" if m == 1 else "tile-gl" if block_m == 8 else f"tile-gl{block_m}"
    block_n, block_k, warps, flags, split = CONFIGS[("int4", path)]
    split = launch_split(split, block_n, n, k, group, x.device, len(weights))
    block_k = _block_k(min(block_k, group), group, 32)
    outs = [_outputs(m, n, split, x) for _ in weights]
    aligned = _rows_16b(x2)  # x read as int32 pairs (16 bytes for cp.async)
    second = (*weights[1], outs[1][1]) if len(weights) == 2 else None
    return _run_gluon("int4", lambda: gluon_kernels.int4_mma2(
        x2, qweight, qzeros, scales, outs[0][1], group, block_m, block_n, block_k, warps, split,
        x_ahead=bool(flags & 1), byte_pairs=bool(flags & 2 and aligned), stages=flags >> 2 if aligned else 0,
        second=second), outs, split)


def int4_linear_pair(x: torch.Tensor, first: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     second: tuple[torch.Tensor, torch.Tensor, torch.Tensor], group: int,
                     a8: A8Row | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x @ W1^T, x @ W2^T) for two int4 weights (qweight, qzeros, scales) of one shape in one launch: one row
    through the W4A8 GEMV, 2-64 rows through the Gluon tile, where int4_linear would take those; else None. The same
    numbers as two int4_linear calls at the pair's K split, bit for bit (launch_split: it may split less)."""
    x2 = _flat(x)
    m, n = x2.shape[0], first[0].shape[1]
    if any(a.shape != b.shape for a, b in zip(first, second)) or not 1 <= m <= FUSED_MAX_ROWS:
        return None
    if _int4_a8_path(x2):
        outs = _int4_a8(x, x2, [first, second], group, a8)
    elif _int4_gluon_path(x2, first[2], group):
        outs = _int4_gluon(x, x2, [first, second], group)
    else:
        return None
    return None if outs is None else tuple(y.view(*x.shape[:-1], n) for y in outs)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group: int, a8: A8Row | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] with W in the group-wise int4 layout. `a8`: x already quantized by quantize_a8
    (when a8_row_applies(x): gate and up read the same row), used instead of quantizing it again."""
    x2 = _flat(x)
    m, k, n = x2.shape[0], x.shape[-1], qweight.shape[1]
    if m > FUSED_MAX_ROWS:
        return torch.nn.functional.linear(x, int4_dequantize(qweight, qzeros, scales, x.dtype, group))
    if not m:
        return x.new_empty(*x.shape[:-1], n)
    if m == 1 and ONE_ROW["int4"] == "gemv":  # whole groups per step (the scale is applied once per group)
        block_n, block_k, warps, stages, split = CONFIGS[("int4", "gemv")]
        split, block_k = _split(k, split, block_k, group)
        out, part = _outputs(m, n, split, x)
        _int4_gemv_kernel[(triton.cdiv(n, block_n), split)](
            x2, qweight, qzeros, scales, part, n, k, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group, SPLIT_K=split,
            STAGES=stages, num_warps=warps, num_stages=stages)
    elif m == 1 and ONE_ROW["int4"] == "gemv2":  # one group a step, the tile summed once at the end
        block_n, _, warps, stages, split = CONFIGS[("int4", "gemv2")]
        split, _ = _split(k, _tile_split(split, triton.cdiv(n, block_n), x.device), group, group)
        out, part = _outputs(m, n, split, x)
        _int4_gemv2_kernel[(triton.cdiv(n, block_n), split)](
            x2, qweight, qzeros, scales, part, n, k, BLOCK_N=block_n, GROUP=group, SPLIT_K=split, STAGES=stages,
            ASM=x.is_cuda, num_warps=warps, num_stages=stages)
    elif _int4_a8_path(x2):  # int8 activations, one group a step
        return _int4_a8(x, x2, [(qweight, qzeros, scales)], group, a8)[0].view(*x.shape[:-1], n)
    elif _int4_gluon_path(x2, scales, group):
        outs = _int4_gluon(x, x2, [(qweight, qzeros, scales)], group)
        if outs is None:  # this Triton cannot compile it: switched off, the Triton tiles instead
            return int4_linear(x, qweight, qzeros, scales, group, a8)
        return outs[0].view(*x.shape[:-1], n)
    elif 0 < TILE_A8["int4"] <= m and x2.stride(-1) == 1 and group % 32 == 0:  # int8 activations on the tensor cores
        block_n, _, warps, stages, split = CONFIGS[("int4", "tile-a8")]
        split, _ = _split(k, _tile_split(split, triton.cdiv(n, block_n), x.device), group, group)
        out, part = _outputs(m, n, split, x)
        xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
        sx = torch.empty(m, k // group, dtype=torch.float32, device=x.device)
        sq = torch.empty(m, k // group, dtype=torch.int32, device=x.device)
        _quantize_rows_kernel[(m, k // group)](x2, xq, sx, sq, x2.stride(0), K=k, GROUP=group, num_warps=4)
        _int4_a8_mma_kernel[(triton.cdiv(n, block_n), split)](
            xq, sx, sq, qweight, qzeros, scales, part, m, n, k, out.stride(0), BLOCK_M=_rows(m),
            BLOCK_N=block_n, GROUP=group, SPLIT_K=split, num_warps=warps, num_stages=stages)
    else:
        block_n, block_k, warps, stages, split = CONFIGS[("int4", "tile")]
        split = _tile_split(split, triton.cdiv(n, block_n), x.device)
        split, _ = _split(k, split, group, group)  # slices of whole groups; the tile then divides the slice
        block_k = _int4_block_k(min(block_k, group), k // split, group)  # one step, one dot: a group or a part
        out, part = _outputs(m, n, split, x)
        _int4_mma_kernel[(triton.cdiv(n, block_n), split)](
            x2, qweight, qzeros, scales, part, m, n, k, x2.stride(0), out.stride(0),
            BLOCK_M=_rows(m, INT4_TILE_ROWS if x.is_cuda else 16), BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group,
            SPLIT_K=split, num_warps=warps, num_stages=stages)
    _finish(part, out, split)
    return out.view(*x.shape[:-1], n)


@triton.jit
def _rcp(x, ASM: tl.constexpr):
    """1 / x: one rcp.approx (the special-function unit, ~1 ulp) where ASM, instead of div.full's sequence."""
    if ASM:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 / x


@triton.jit
def _gelu_erf(x, ASM: tl.constexpr):
    """GELU(x) = x (1 + erf(x / sqrt(2))) / 2 = max(x, 0) - |x| erfc(|x| / sqrt(2)) / 2, the erfc within 2.4e-7
    (Abramowitz & Stegun 7.1.26: one reciprocal, one exp2, five FMAs; its 1 / sqrt(2), the 1/2 and the exponent's
    scale folded into the constants). libdevice's erff costs ~3x the instructions, and made the vision MLP's GELU +
    fp8 quantizing pass issue-bound: 0.33 ms a layer on an H200 against ~0.1 ms of memory traffic; A&S as written,
    31 PTX instructions an element, 0.21 ms; with the folding, the reciprocal and the max form here, 25 and 0.147
    ms. In bf16 it rounds like F.gelu for every |GELU(x)| > 1e-3; below that the row's fp8 scale flushes it anyway."""
    a = tl.abs(x)
    t = _rcp(1.0 + 0.23164188826636045 * a, ASM)  # 0.3275911 / sqrt(2)
    poly = ((((0.5307027145 * t - 0.7265760135) * t + 0.7107068705) * t - 0.142248368) * t + 0.127414796) * t
    return tl.maximum(x, 0.0) - a * (poly * tl.math.exp2(a * a * -0.7213475204444817))  # erfc(|x|/sqrt 2) / 2


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, FP8_MAX: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr, GELU: tl.constexpr, ASM: tl.constexpr):
    """ROWS rows of x a program, each scaled by its own largest |value| (one load, one store per element). ASM (a
    GPU): the e4m3 conversion saturates at 448 by itself (cvt.rn.satfinite), so no clamp."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK)
    ok = (rows[:, None] < M) & (offs[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=ok, other=0.0).to(tl.float32)
    if GELU:  # the exact (erf) GELU, rounded to the input dtype as F.gelu's output is
        x = _gelu_erf(x, ASM).to(x_ptr.dtype.element_ty).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1) / FP8_MAX, 1e-12)
    q = x * (1.0 / scale)[:, None]  # one reciprocal a row
    if not ASM:
        q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + rows[:, None] * K + offs[None, :], q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + rows, scale, mask=rows < M)


# elements (rows x the row's power-of-two block) of x one program of fp8_quantize_rows takes (1: a row a program).
# benchmarks/kernels_gpu.py --only gemm times the choices: on an H200 several narrow rows a program gained nothing
# (0.018 ms a row a program against 0.020-0.023 for the ViT's 9,217 x 1,792; fc2's GELU pass 0.208 against 0.222)
FP8_ROW_ELEMENTS = 1


def fp8_quantize_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 [M, 1]) in one pass (formats.quantize_fp8_rows fused);
    gelu: of F.gelu(x) (exact), computed in the same pass (the GELU's output never goes to memory)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        rows = min(16, max(1, FP8_ROW_ELEMENTS // block))
        _fp8_rows_kernel[(triton.cdiv(m, rows),)](x, q, s, m, k, x.stride(0), FP8_MAX=448.0, ROWS=rows, BLOCK=block,
                                                  GELU=gelu, ASM=x.is_cuda,
                                                  num_warps=min(16, max(4, rows * block // 1024)))
    return q, s

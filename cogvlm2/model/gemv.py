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
`gemv_silu_mul` is the MLP's gate and up in one pass with the SiLU-and-multiply in its epilogue; `gemv_rotary` the
attention's QKV projection with the rotary embedding of q and k and the K/V store into the paged cache in its
epilogue (ops.qkv_rotary; on by default, `COGVLM2_DECODE_QKV_ROTARY=0` keeps three launches).

`skinny` takes the same design to 2-64 rows (batched decode) on the tensor cores: cuBLAS's kernels for these shapes
split K (a reduce launch each) and, on the profiles, stream the weights at ~84% of copy at batch 32. Measured on an
H200 (f56b1d2, `kernels_gpu.py --only skinny --batches 8,16,32,64`, TP=2 shapes): slower than cuBLAS at every batch
and candidate (best 2.46 / 2.44 / 2.61 / 3.34 ms against 2.43 / 2.30 / 2.34 / 2.29 at 8 / 16 / 32 / 64 rows), so it
stays off (`COGVLM2_DECODE_SKINNY=1` turns it on, for other cards). Since then it can split K (a config's 5th
entry; the column block's last program adds the slices' partials, no second launch), for the attention's QKV and
dense at 32 rows, which cuBLAS reads at 78% / 63% of copy bandwidth on the H200 (eighteenth session's shapes), where
whole-row programs are either too few (wide) or read more activations than weights (narrow);
`ops.SKINNY_MAX_WEIGHT` keeps the larger weights on cuBLAS. Not yet measured on a GPU.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .. import pdl
from ..counters import counters, last_to_arrive
from .triton_ops import _on

# (BLOCK_N, BLOCK_K, warps, stages): 4 rows x 1,024 columns (8 KB of bf16) a step, 3 steps in flight; N = 4,096
# gives 1,024 programs. Under PDL (cogvlm2/pdl.py, on by default) the best of the candidates on the H200 (59521d4,
# the decode linears in one graph): TP=1 shapes 3.51 ms (94% of copy), TP=2 1.86 ms (89%), where (8, 512, 4, 3),
# the best without PDL (3.53 / 2.00 ms then), took 3.64 / 1.95
CONFIG = (4, 1024, 4, 3)
# what the benchmark sweeps (the first is CONFIG)
CANDIDATES = [CONFIG, (8, 512, 4, 3), (8, 512, 4, 4), (16, 256, 4, 3), (16, 512, 8, 3), (8, 1024, 8, 3),
              (8, 512, 4, 1)]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, stride_wn, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 STAGES: tl.constexpr, PDL: tl.constexpr):
    """out[n] = sum_k W[n, k] x[k] for BLOCK_N rows: products summed per lane in float32 over the K steps, then
    across the lanes once. The first step's weights are loaded before waiting for the previous kernel (PDL). (Also
    prefetching a <= 32 MiB weight's rows into L2 before that wait, as the int4 W4A8 GEMV does, was slower on the
    H200 at batch 1, BENCHMARKS.md, fifteenth session: all of the o-proj 240.1 -> 238.0 tok/s, its first 8 / 16 MiB
    240.2 -> 239.9 / 239.1; the first tiles loaded before the wait are already 8 MiB of it.)"""
    pdl.launch_dependents(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    k_ok = offs_k < K
    w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    pdl.wait(PDL)
    x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)
    acc = w.to(tl.float32) * x.to(tl.float32)[None, :]  # = 0 + the first products: the loop's sum, bit for bit
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
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
    options = pdl.options(x)
    with _on(x):  # the launch on x's GPU (pipeline stages: a later stage's layers live on another GPU)
        _gemv_kernel[(triton.cdiv(n, block_n),)](x1, weight, out, n, weight.stride(0), K=k, BLOCK_N=block_n,
                                                 BLOCK_K=block_k, STAGES=stages, num_warps=warps,
                                                 num_stages=stages, **options)
    return out.view(*x.shape[:-1], n)


@triton.jit
def _two_tiles(x_ptr, a_ptrs, b_ptrs, row_ok, K: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
               PDL: tl.constexpr):
    """Two [BLOCK_N, BLOCK_K] tiles of weight rows (pointers at k = 0) times one row x, each summed per lane over the
    K steps exactly as _gemv_kernel sums its tile (float32 [BLOCK_N, BLOCK_K]); the first step's weights are loaded
    before the PDL wait (see _gemv_kernel), x after it."""
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(b_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    pdl.wait(PDL)
    x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    acc_a = a.to(tl.float32) * x
    acc_b = b.to(tl.float32) * x
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
        k_ok = (k0 + offs_k) < K
        ok = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc_a += tl.load(a_ptrs + k0, mask=ok, other=0.0).to(tl.float32) * x
        acc_b += tl.load(b_ptrs + k0, mask=ok, other=0.0).to(tl.float32) * x
    return acc_a, acc_b


@triton.jit
def _gemv_silu_mul_kernel(x_ptr, g_ptr, u_ptr, out_ptr, N, stride_gn, stride_un, K: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    """out[n] = silu(G[n] . x) * (U[n] . x): the MLP's gate and up rows in one pass over x, each sum exactly as
    _gemv_kernel forms it and rounded to the output dtype, then silu and the product as ops.silu_mul rounds them
    (so the result equals gemv, gemv, silu_mul bit for bit, one launch instead of three)."""
    pdl.launch_dependents(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + offs_n[:, None].to(tl.int64) * stride_gn + offs_k[None, :]
    u_ptrs = u_ptr + offs_n[:, None].to(tl.int64) * stride_un + offs_k[None, :]
    acc_g, acc_u = _two_tiles(x_ptr, g_ptrs, u_ptrs, n_ok, K, BLOCK_K, STAGES, PDL)
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
                                                          num_warps=warps, num_stages=stages, **pdl.options(x))
    return out.view(*x.shape[:-1], n)


@triton.jit
def _gemv_rotary_kernel(x_ptr, w_ptr, out_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, stride_wn, ROTATED,
                        KV_HEADS, K: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        STAGES: tl.constexpr, STORE: tl.constexpr, PDL: tl.constexpr):
    """out = W x for the fused QKV projection, heads of 2 * HALF rows, the first ROTATED of them rotated (half-split
    rotary). A program takes BLOCK_N rows j of one head's first half and their partners j + HALF, two tiles of the
    shape _gemv_kernel sums (so each sum is formed as it forms it), rounds the sums to the output dtype and rotates
    them in float32 as triton_ops._rotary_kernel does: gemv then rotary_, bit for bit, in one launch. With STORE the
    last 2 * KV_HEADS heads (k, then v) also go into the paged cache rows kc / vc [slots, KV_HEADS, 2 * HALF] at
    slot slot_ptr[0], cast as kv_store._store_kv_kernel casts them (so its launch is not needed)."""
    pdl.launch_dependents(PDL)
    PER_HEAD: tl.constexpr = HALF // BLOCK_N
    head = tl.program_id(0) // PER_HEAD
    j = (tl.program_id(0) % PER_HEAD) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = head * 2 * HALF + j
    lo_ptrs = w_ptr + lo[:, None].to(tl.int64) * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    acc_lo, acc_hi = _two_tiles(x_ptr, lo_ptrs, lo_ptrs + HALF * stride_wn, j < HALF, K, BLOCK_K, STAGES, PDL)
    dtype = out_ptr.dtype.element_ty
    x1 = tl.sum(acc_lo, axis=1).to(dtype)
    x2 = tl.sum(acc_hi, axis=1).to(dtype)
    if head < ROTATED:
        c = tl.load(cos_ptr + j)
        s = tl.load(sin_ptr + j)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        x1 = (f1 * c - f2 * s).to(dtype)
        x2 = (f1 * s + f2 * c).to(dtype)
    tl.store(out_ptr + lo, x1)
    tl.store(out_ptr + lo + HALF, x2)
    if STORE:
        kv_head = head - (ROTATED - KV_HEADS)  # 0 .. KV_HEADS - 1: k; KV_HEADS .. 2 KV_HEADS - 1: v
        if kv_head >= 0:
            row = tl.load(slot_ptr).to(tl.int64) * (KV_HEADS * 2 * HALF) + (kv_head % KV_HEADS) * 2 * HALF + j
            if kv_head < KV_HEADS:
                tl.store(kc_ptr + row, x1.to(kc_ptr.dtype.element_ty))
                tl.store(kc_ptr + row + HALF, x2.to(kc_ptr.dtype.element_ty))
            else:
                tl.store(vc_ptr + row, x1.to(vc_ptr.dtype.element_ty))
                tl.store(vc_ptr + row + HALF, x2.to(vc_ptr.dtype.element_ty))


def gemv_rotary(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_rotated_heads: int,
                head_dim: int, config: tuple[int, int, int, int] = CONFIG,
                store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., K] (one row) @ weight [N, K]^T -> [..., N] with the first num_rotated_heads heads of head_dim rows
    rotated by cos / sin [1, head_dim / 2] (float32): gemv then triton_ops.rotary_, bit for bit, one launch.
    store (k_cache, v_cache, slots): the rows are q, k, v heads (as many k heads as v heads, k rotated, v not) and
    k / v also go into k_cache / v_cache [..., Hkv, head_dim] (contiguous) at slot slots[0], as
    engine.kernels.kv_store.store_kv would write them."""
    if x.numel() != x.shape[-1]:
        raise ValueError(f"gemv_rotary takes one row, got x of shape {tuple(x.shape)}")
    n, k = weight.shape
    half = head_dim // 2
    block_n, block_k, warps, stages = config
    if x.shape[-1] != k or weight.stride(-1) != 1 or n % head_dim or head_dim % 2 or half % block_n:
        raise ValueError(f"gemv_rotary: x [..., {x.shape[-1]}] against a weight [{n}, {k}] (stride {weight.stride()})"
                         f" in heads of {head_dim} rows, {block_n} rows a program")
    if cos.shape != (1, half) or sin.shape != (1, half) or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"gemv_rotary: cos / sin must be float32 [1, {half}], got {tuple(cos.shape)} {cos.dtype}")
    kv_heads = 0
    if store is not None:
        k_cache, v_cache, slots = store
        kv_heads = n // head_dim - num_rotated_heads
        if kv_heads <= 0 or num_rotated_heads <= kv_heads or k_cache.shape[-2:] != (kv_heads, head_dim) \
                or v_cache.shape != k_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()) \
                or slots.numel() < 1:
            raise ValueError(f"gemv_rotary: store into caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} "
                             f"needs [..., {kv_heads}, {head_dim}] contiguous and a slot")
    else:
        k_cache = v_cache = slots = x  # never read (STORE off)
    x1 = x.reshape(k).contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    with _on(x):
        _gemv_rotary_kernel[(n // head_dim * (half // block_n),)](
            x1, weight, out, cos.contiguous(), sin.contiguous(), k_cache, v_cache, slots, weight.stride(0),
            num_rotated_heads, kv_heads, K=k, HALF=half, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
            STORE=store is not None, num_warps=warps, num_stages=stages, **pdl.options(x))
    return out.view(*x.shape[:-1], n)


# A few rows (batched decode, 2-64 tokens): the same whole-rows-a-program design on the tensor cores. The weight is
# the MMA's M side (BLOCK_N of its rows), the tokens its N side (padded to BLOCK_M >= 16), so a program reads its
# weight rows once for every token, K prefetched STAGES - 1 steps ahead. (BLOCK_N, BLOCK_K, warps, stages[, split])
# by BLOCK_M (the rows padded to a power of 2, at least 16: shared memory per program grows with it, and at least
# 2-3 programs must fit an SM). split (SPLIT_K, 1 when left out; 0: as many as bring the programs to two per SM) cuts
# K into that many slices, a program each; the column block's last program adds their float32 partials in slice
# order (an atomic counter per block, cogvlm2/counters.py: no second launch, the order fixed). Why: at 32 rows the
# H200 profile has cuBLAS reading the attention's dense [4,096, 4,096] at 63% of copy bandwidth and its QKV at 78%
# (each with a split-K reduce launch), where the MLP's larger weights reach 90-101%; small whole-row programs read
# more activations than weights a step (BLOCK_N 16 x BLOCK_K 256 of weights against 256 x 32 of x), wide ones are
# too few without a K split. Off by default (ops.DECODE_SKINNY)
SKINNY_CONFIGS = {16: (16, 256, 4, 4), 32: (16, 256, 4, 4), 64: (32, 128, 4, 4)}
SKINNY_CANDIDATES = [(16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 3), (32, 128, 4, 4), (64, 128, 4, 3),
                     (16, 128, 4, 6), (32, 256, 8, 3), (64, 128, 4, 4, 0), (128, 128, 4, 3, 0), (64, 256, 4, 3, 0),
                     (128, 64, 4, 4, 0), (64, 128, 4, 4, 4), (128, 128, 8, 3, 8), (128, 64, 4, 5, 0)]
SKINNY_MAX_ROWS = 64


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, part_ptr, count_ptr, M, N, stride_xm, stride_wn, stride_om,
                   K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   STAGES: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr):
    """out[m, n] = sum_k W[n, k] x[m, k] for BLOCK_N rows of W and every row of x: acc [BLOCK_N, BLOCK_M] += W tile
    [BLOCK_N, BLOCK_K] @ x tile^T [BLOCK_K, BLOCK_M] (float32 accumulation) over this program's slice of K (all of
    it without a split); split, the partials go to part [SPLIT_K, M, N] and the block's last program sums them."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < N, offs_m < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    SLICE: tl.constexpr = (STEPS + SPLIT_K - 1) // SPLIT_K * BLOCK_K  # K values a slice (whole steps)
    start = tl.program_id(1) * SLICE
    for k0 in tl.range(start, start + SLICE, BLOCK_K, num_stages=STAGES):
        k_ok = (k0 + offs_k) < K
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptrs + k0, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        acc = tl.dot(w, x, acc, input_precision=PRECISION)
    ok = n_ok[:, None] & m_ok[None, :]
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        part = part_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(part + tl.program_id(1).to(tl.int64) * M * N, acc, mask=ok)
        if last_to_arrive(count_ptr, tl.program_id(0), SPLIT_K):
            total = tl.load(part, mask=ok, other=0.0, cache_modifier=".cg")  # the other SMs' writes
            for s in tl.static_range(1, SPLIT_K):
                total += tl.load(part + s * M * N, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(count_ptr + tl.program_id(0), 0)


def _skinny_launch(x: torch.Tensor, name: str, config: tuple[int, ...] | None):
    """(x as [rows, K] with unit stride along K, BLOCK_M, the config (BLOCK_N, BLOCK_K, warps, stages, split):
    SKINNY_CONFIGS' for BLOCK_M when None, split 1 when left out; the dot's input precision: full float32 for float32
    x, never TF32) for `name`'s launch; a clear error beyond SKINNY_MAX_ROWS rows."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if not 1 <= rows <= SKINNY_MAX_ROWS:
        raise ValueError(f"{name} takes 1 to {SKINNY_MAX_ROWS} rows, got x of shape {tuple(x.shape)}")
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block_m = max(16, triton.next_power_of_2(rows))
    config = tuple(config or SKINNY_CONFIGS[block_m])
    return x2, block_m, config + (1,) * (5 - len(config)), "ieee" if x.dtype == torch.float32 else "tf32"


def skinny_split(n: int, k: int, block_n: int, block_k: int, split: int, device: torch.device) -> int:
    """The K slices of a skinny launch: `split` as given, 0 the fewest powers of 2 (at most 16) that bring the
    column blocks' programs to two per SM (one where the device is not a GPU), never more than K has BLOCK_K steps
    (every slice at least one step)."""
    steps = max(1, triton.cdiv(k, block_k))
    if split == 0:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        split = 1
        while split < 16 and triton.cdiv(n, block_n) * split < 2 * sms:
            split *= 2
    if split < 1:
        raise ValueError(f"skinny: a split of K must be 0 (automatic) or positive, got {split}")
    return min(split, steps)


def skinny(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [..., K] with at most SKINNY_MAX_ROWS rows in all @ weight [N, K]^T -> [..., N] in x's dtype (float32
    inputs multiply in full float32, never TF32); config None: SKINNY_CONFIGS for the padded row count."""
    x2, block_m, (block_n, block_k, warps, stages, split), precision = _skinny_launch(x, "skinny", config)
    rows, k, n = x2.shape[0], x2.shape[1], weight.shape[0]
    if weight.shape[1] != k or weight.stride(-1) != 1:
        raise ValueError(f"skinny: x [..., {k}] against a weight {tuple(weight.shape)} with stride {weight.stride()}")
    split = skinny_split(n, k, block_n, block_k, split, x.device)
    blocks = triton.cdiv(n, block_n)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    part = torch.empty(split, rows, n, dtype=torch.float32, device=x.device) if split > 1 else out
    count = counters("skinny split-K sum", x.device, blocks) if split > 1 else out
    with _on(x):
        _skinny_kernel[(blocks, split)](x2, weight, out, part, count, rows, n, x2.stride(0), weight.stride(0),
                                        out.stride(0), K=k, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
                                        STAGES=stages, PRECISION=precision, SPLIT_K=split, num_warps=warps,
                                        num_stages=stages)
    return out.view(*x.shape[:-1], n)


@triton.jit
def _skinny_silu_mul_kernel(x_ptr, g_ptr, u_ptr, out_ptr, M, N, stride_xm, stride_gn, stride_un, stride_om,
                            K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            STAGES: tl.constexpr, PRECISION: tl.constexpr):
    """out[m, n] = silu(G[n] . x[m]) * (U[n] . x[m]): _skinny_kernel's sums for the gate and the up rows, each
    rounded to the output dtype, then silu and the product rounded as ops.silu_mul rounds them."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < N, offs_m < M
    g_ptrs = g_ptr + offs_n[:, None].to(tl.int64) * stride_gn + offs_k[None, :]
    u_ptrs = u_ptr + offs_n[:, None].to(tl.int64) * stride_un + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k_ok = (k0 + offs_k) < K
        w_ok = n_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptrs + k0, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        acc_g = tl.dot(tl.load(g_ptrs + k0, mask=w_ok, other=0.0), x, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(tl.load(u_ptrs + k0, mask=w_ok, other=0.0), x, acc_u, input_precision=PRECISION)
    dtype = out_ptr.dtype.element_ty
    g = acc_g.to(dtype).to(tl.float32)
    u = acc_u.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    tl.store(out_ptrs, (act * u).to(dtype), mask=n_ok[:, None] & m_ok[None, :])


def skinny_silu_mul(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    config: tuple[int, ...] | None = None) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for 1 to SKINNY_MAX_ROWS rows x [..., K] -> [..., N]: equal bit for bit to
    skinny, skinny, silu_mul at the same config without a split of K (a config's split is not used here)."""
    x2, block_m, (block_n, block_k, warps, stages, _), precision = _skinny_launch(x, "skinny_silu_mul", config)
    rows, k, n = x2.shape[0], x2.shape[1], gate.shape[0]
    if up.shape != gate.shape or gate.shape[1] != k or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"skinny_silu_mul: x [..., {k}] against gate {tuple(gate.shape)} and up "
                         f"{tuple(up.shape)} (strides {gate.stride()}, {up.stride()})")
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    with _on(x):
        _skinny_silu_mul_kernel[(triton.cdiv(n, block_n),)](
            x2, gate, up, out, rows, n, x2.stride(0), gate.stride(0), up.stride(0), out.stride(0), K=k,
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, STAGES=stages, PRECISION=precision,
            num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)

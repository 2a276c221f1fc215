"""Paged decode attention in Triton (flash-decoding): one query token per sequence, KV read from paged blocks.

Stage 1 splits every sequence's context into chunks of `split` tokens; a program handles one
(sequence, kv head, chunk) and all the query heads that share that kv head (grouped-query attention:
the KV chunk is read once for the whole group). Stage 2 merges the chunks with their log-sum-exp.
Splitting keeps the GPU busy at batch 1, where (sequence, kv head) alone gives only 8 programs.
The grid depends only on (batch, max_splits), so a captured CUDA graph can replay it for any
context lengths up to max_splits * split.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ... import pdl

# Tuned on an H200 (benchmarks/kernels_gpu.py --only decode, 2,355-token contexts): (split, block_n, num_stages,
# context_bound) from each batch size on. Small batches take short splits: (sequence, kv head) pairs alone cannot
# fill 132 SMs. Larger ones take longer splits whose loop stops at the context, so that ~600-800 programs hold
# tokens: 36 us at batch 8 where 1024-token splits took 55; 55 us at batch 16 (66); 89 us at batch 32 where the H100's
# tiles (512, 32, 3, masked to the split's end) took 110 (83% of copy bandwidth instead of 67%); batch 64 89% (75%).
NUM_WARPS = 4
TILES = ((1, (128, 64, 2, False)), (8, (256, 64, 2, True)), (16, (512, 64, 2, True)), (24, (1024, 64, 2, True)))
SWEEP_KV_HEADS = 8  # the sweep's kv heads (Llama-3-8B); the grid has batch x kv heads x splits programs
# PREFETCH (the `prefetch` argument): each chunk loads its first tile of K / V before the PDL wait (cogvlm2/pdl.py),
# overlapping the DRAM latency with the kernel before it instead of starting once it has finished. Safe: every token
# but the step's own was written by an earlier step, and the block tables and context lengths by copies (or torch
# ops) before the step's kernels; the step's token (context - 1), written by the kernel before this one, is read
# after the wait. Measured on the H200 (benchmarks/decode_ab.py, BENCHMARKS.md, fourteenth session): after bf16's
# QKV GEMV that also stores K / V (model.ops.DECODE_QKV_ROTARY, batch 1) 238.0 -> 240.1 tok/s; after int4's small
# store kernel 359.8 -> 353.8, at batch 32 (after cuBLAS) 7.54 -> 8.23 ms. So the engine asks for it only after the
# fused QKV GEMV (engine.attention.PagedAttention, `stored`), when PREFETCH (COGVLM2_DECODE_PREFETCH=0 turns it off,
# read at import)
PREFETCH = os.environ.get("COGVLM2_DECODE_PREFETCH", "1") != "0"


def tuned_tiles(batch: int, kv_heads: int = SWEEP_KV_HEADS) -> tuple[int, int, int, bool]:
    """(split, block_n, num_stages, context_bound) for a batch of `batch` sequences with `kv_heads` kv heads on this
    GPU: the tiles the sweep found for the batch that gives as many (sequence, kv head) pairs, so a tensor-parallel
    rank holding 4 of the 8 heads takes at batch 32 the tiles of batch 16 (the same programs, each as long)."""
    pairs = max(1, batch * kv_heads // SWEEP_KV_HEADS)
    return [tiles for first, tiles in TILES if pairs >= first][-1]


# sbt_b, the block tables' row stride, is their width: fixed under the CUDA graphs, the step's widest table in a
# mixed step. Specializing on it (divisible by 16 or not) would compile a second variant of every tile set the first
# time a mixed step's width is not a multiple of 16 (inferred: two +300-400 ms captioning steps went with it; none
# with a compile since, benchmarks/step_timeline_gpu.py).
@triton.jit(do_not_specialize=["sbt_b"])
def _stage1(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr, scale,
            sq_b, sq_h, sk_blk, sk_tok, sk_h, sv_blk, sv_tok, sv_h, sbt_b, so_b, so_h, so_s, sl_b, sl_h,
            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_TOKENS: tl.constexpr, PRECISION: tl.constexpr,
            CONTEXT_BOUND: tl.constexpr, HEADS_FIRST: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """One (sequence, kv head, chunk): the chunk's attention for the GROUP query heads of that kv head, normalized,
    with its log-sum-exp, into out / lse. PREFETCH: the chunk's first tile of K / V is loaded before the PDL wait (see
    PREFETCH above), all but this step's token, which is read after it."""
    pdl.launch_dependents(PDL)
    if not PREFETCH:
        pdl.wait(PDL)
    if HEADS_FIRST:  # the kv heads of one (sequence, chunk) run side by side: they read one token row's 2 KB
        kvh = tl.program_id(0)
        b = tl.program_id(1)
    else:
        b = tl.program_id(0)
        kvh = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    start = s * SPLIT_TOKENS
    end = tl.minimum(start + SPLIT_TOKENS, ctx)
    rows = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + rows
    row_ok = rows < GROUP
    d = tl.arange(0, HEAD_PAD)  # a head dim that is no power of 2 is padded with zeros (exact in both dots)
    d_ok = d < HEAD_DIM
    if PREFETCH:
        tok0 = start + tl.arange(0, BLOCK_N)
        ok0 = tok0 < end
        blk0 = tl.load(bt_ptr + b * sbt_b + tok0 // BLOCK_SIZE, mask=ok0, other=0).to(tl.int64)
        k_at = k_ptr + blk0[:, None] * sk_blk + (tok0 % BLOCK_SIZE)[:, None] * sk_tok + kvh * sk_h + d[None, :]
        v_at = v_ptr + blk0[:, None] * sv_blk + (tok0 % BLOCK_SIZE)[:, None] * sv_tok + kvh * sv_h + d[None, :]
        old = (ok0 & (tok0 < ctx - 1))[:, None] & d_ok[None, :]  # written by earlier steps
        k0 = tl.load(k_at, mask=old, other=0.0)
        v0 = tl.load(v_at, mask=old, other=0.0)
        pdl.wait(PDL)
        new = (ok0 & (tok0 == ctx - 1))[:, None] & d_ok[None, :]  # this step's, written by a kernel before this one
        k0 = tl.load(k_at, mask=new, other=k0)
        v0 = tl.load(v_at, mask=new, other=v0)
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    if start < ctx:
        if PREFETCH:
            m, l, acc = _attend_tile(q, k0, v0, ok0, m, l, acc, scale, PRECISION)
        # CONTEXT_BOUND: iterate up to the context only (a run-time trip count) instead of over the whole split
        # with the tokens past `end` masked (a constant one)
        # (the bound inline: Triton 3.6's interpreter turns every assigned value into a tensor, a loop bound included)
        for i in range(BLOCK_N if PREFETCH else 0, end - start if CONTEXT_BOUND else SPLIT_TOKENS, BLOCK_N):
            tok = start + i + tl.arange(0, BLOCK_N)
            ok = tok < end
            blk = tl.load(bt_ptr + b * sbt_b + tok // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
            slot = tok % BLOCK_SIZE
            k = tl.load(k_ptr + blk[:, None] * sk_blk + slot[:, None] * sk_tok + kvh * sk_h + d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptr + blk[:, None] * sv_blk + slot[:, None] * sv_tok + kvh * sv_h + d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
            m, l, acc = _attend_tile(q, k, v, ok, m, l, acc, scale, PRECISION)
    # A chunk past the context runs no iteration: l = 0 gives lse = -inf, which stage 2 weighs 0.
    out = acc / tl.maximum(l, 1e-30)[:, None]
    tl.store(out_ptr + b * so_b + heads[:, None] * so_h + s * so_s + d[None, :], out,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * sl_b + heads * sl_h + s, m + tl.log(l), mask=row_ok)


@triton.jit
def _attend_tile(q, k, v, ok, m, l, acc, scale, PRECISION: tl.constexpr):
    """Online softmax over one tile of tokens (ok: the tile's tokens in the chunk): the running max m, sum l and
    output acc of the GROUP_PAD query rows, updated."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_N]
    qk = tl.where(ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, axis=1))
    p = tl.exp(qk - m_new[:, None])
    alpha = tl.exp(m - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _stage2(part_ptr, lse_ptr, out_ptr, so_b, so_h, so_s, sl_b, sl_h, sout_b, sout_h,
            NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
            PDL: tl.constexpr):
    """Head h of sequence b: its NUM_SPLITS chunks' outputs weighed by their log-sum-exp. (Folded into stage 1, the
    last chunk of each sequence and kv head merging, it was slower on the H200: 228.0 against 236.3 tok/s at batch
    1, f5259c0, BENCHMARKS.md: the merge's heads one after another, a serial tail longer than the launch it saved.)"""
    pdl.enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    s_ok = s < NUM_SPLITS
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + s, mask=s_ok, other=float("-inf"))
    # both loads in flight at once (masking the outputs' load by lse would wait for it first): an empty chunk's
    # output was never written, so it is read and then zeroed, its weight being 0 (lse -inf)
    part = tl.load(part_ptr + b * so_b + h * so_h + s[:, None] * so_s + d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    w = tl.exp(lse - tl.max(lse, axis=0))  # empty chunks have lse -inf -> weight 0
    part = tl.where((lse > float("-inf"))[:, None], part, 0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * sout_b + h * sout_h + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, max_context: int,
                           out: torch.Tensor | None = None, split: int | None = None, block_n: int | None = None,
                           num_warps: int = NUM_WARPS, num_stages: int | None = None,
                           context_bound: bool | None = None, heads_first: bool = False,
                           prefetch: bool = False) -> torch.Tensor:
    """q [B, Hq, d]; k/v_cache [num_blocks, block_size, Hkv, d] (any strides, last dim contiguous);
    block_tables [B, max_blocks] int32; context_lens [B] int32 (tokens to attend, the current one
    included, already written to the cache). max_context bounds every context_lens (sets the grid).
    split / block_n / num_stages / context_bound: None takes the tuned tiles for this batch size; context_bound
    and heads_first (off: it did not win on the H200), prefetch: see `_stage1` and PREFETCH. Returns [B, Hq, d] in
    q's dtype."""
    b, hq, dim = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    tuned = tuned_tiles(b, hkv)
    split, block_n, num_stages, context_bound = (
        tuned[0] if split is None else split, tuned[1] if block_n is None else block_n,
        tuned[2] if num_stages is None else num_stages, tuned[3] if context_bound is None else context_bound)
    splits = max(1, triton.cdiv(max_context, split))
    head_pad = max(16, triton.next_power_of_2(dim))  # tl.arange needs a power of 2, tl.dot at least 16
    part = torch.empty(b, hq, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q) if out is None else out
    _stage1[(hkv, b, splits) if heads_first else (b, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=min(block_n, split), SPLIT_TOKENS=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", CONTEXT_BOUND=context_bound,
        HEADS_FIRST=heads_first, PREFETCH=prefetch, num_warps=num_warps, num_stages=num_stages, **pdl.options(q))
    _stage2[(b, hq)](part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
                     out.stride(0), out.stride(1), NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
                     HEAD_DIM=dim, HEAD_PAD=head_pad, **pdl.options(q))
    return out

"""Greedy decoding's argmax over the vocabulary in two small Triton launches.

torch's `argmax(-1)` of a [B, 128,256] float32 row reduces it in one pass that took 27 us a step on the H200 at
batch 1 and at batch 32 (BENCHMARKS.md, the int4 decode profile of 2026-12-01) against a few microseconds of
memory traffic (0.5 MB a row). Here each program takes one chunk of one row (its largest value and that value's
first index), then one program a row picks among the chunks. The result is torch's, ties and NaN included: the
index of the first maximum, and a NaN counts as larger than any number (the first NaN wins).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 4096  # values of a row per program: 32 programs for Llama-3's 128,256


@triton.jit
def _pick(values, index, ok, LIMIT):
    """(value, index) of the first maximum of values (NaN the largest) among the lanes where ok."""
    nan = (values != values) & ok
    has_nan = tl.max(nan.to(tl.int32), axis=0) > 0
    top = tl.max(tl.where(ok & ~nan, values, float("-inf")), axis=0)
    hit = tl.where(has_nan, nan, ok & (values == top))
    return tl.where(has_nan, float("nan"), top), tl.min(tl.where(hit, index, LIMIT), axis=0)


@triton.jit
def _chunk_kernel(x_ptr, val_ptr, idx_ptr, V, stride, CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(x_ptr + row * stride + offs, mask=ok, other=float("-inf")).to(tl.float32)
    best, first = _pick(x, offs, ok, V)
    tl.store(val_ptr + row * CHUNKS + chunk, best)
    tl.store(idx_ptr + row * CHUNKS + chunk, first)


@triton.jit
def _rows_kernel(val_ptr, idx_ptr, out_ptr, CHUNKS: tl.constexpr, CP: tl.constexpr, V):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CP)
    ok = c < CHUNKS
    values = tl.load(val_ptr + row * CHUNKS + c, mask=ok, other=float("-inf"))
    index = tl.load(idx_ptr + row * CHUNKS + c, mask=ok, other=0)
    # chunk c's index is the first of its chunk, so the first chunk holding the maximum holds its first index
    best, first = _pick(values, index, ok, V)
    tl.store(out_ptr + row, first.to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (floating point, rows contiguous) -> [B] int64 on its device: logits.argmax(-1)."""
    b, v = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(b, dtype=torch.long, device=logits.device)
    if b == 0:
        return out
    if v == 0:
        raise ValueError("argmax of an empty vocabulary")
    chunks = triton.cdiv(v, BLOCK)
    values = torch.empty(b, chunks, dtype=torch.float32, device=logits.device)
    index = torch.empty(b, chunks, dtype=torch.int32, device=logits.device)
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        _chunk_kernel[(b, chunks)](logits, values, index, v, logits.stride(0), CHUNKS=chunks, BLOCK=BLOCK,
                                   num_warps=8)
        _rows_kernel[(b,)](values, index, out, CHUNKS=chunks, CP=triton.next_power_of_2(chunks), V=v, num_warps=1)
    return out


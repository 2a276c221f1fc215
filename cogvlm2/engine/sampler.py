"""Sampler: the next token of every sampling row at once, from per-row settings held as tensors.

Semantics equal `generation.apply_penalties` + `generation.sample_token` row by row: repetition
penalty over prompt + generated ids (HF), presence / frequency over generated ids (OpenAI),
temperature, top-k, then top-p (smallest prefix reaching top_p). Greedy rows (temperature 0 or
top_k 1) take the argmax of the penalised logits. Seeded rows draw with their own torch.Generator
(created on first use, seeded with `seed`, kept by the sequence across steps and preemptions), so
they do not depend on which other requests share the batch; unseeded rows draw together with the
exponential-race trick. Non-finite values never reach the draw: NaN logits count as -inf, +inf as the
largest float, and a row left without a probability distribution (all NaN / -inf) takes its argmax,
so no request's settings or logits can make the step raise. Per-row settings reach the device in one
copy per step; nothing here syncs with the host: the caller copies the ids out once. Under async
scheduling each row's latest id may still be on the device (`pending`): the penalties then count it
from there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .sequence import Sequence

try:  # Triton is optional: CPU installs never need it
    from .kernels import argmax as argmax_kernel
except ImportError:  # pragma: no cover - exercised on machines without triton
    argmax_kernel = None

# FAST_ARGMAX: the argmax over the vocabulary in two small Triton launches (engine/kernels/argmax.py, torch's result
# bit for bit, ties and NaN included) instead of torch's, which the H200 profile of 2026-12-01 put at 27 us a step
# (batch 1 and 32). On: engine decode on the H200 bf16 batch 1 236.6 -> 237.9 tok/s, batch 32 7.57 -> 7.54 ms, int4
# batch 1 356.4 -> 360.0 tok/s (`benchmarks/decode_ab.py --set "engine.sampler.FAST_ARGMAX=0" --set
# "engine.sampler.FAST_ARGMAX=1"`, two rounds, BENCHMARKS.md, fourteenth session); COGVLM2_FAST_ARGMAX=0 (read at
# import) turns it off
FAST_ARGMAX = os.environ.get("COGVLM2_FAST_ARGMAX", "1") != "0"


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] long: logits.argmax(-1), on CUDA through the Triton kernels when FAST_ARGMAX is set."""
    if FAST_ARGMAX and argmax_kernel is not None and logits.is_cuda:
        return argmax_kernel.argmax(logits)
    return logits.argmax(-1)

TEMPERATURE, TOP_P, TOP_K, REPETITION, PRESENCE, FREQUENCY, GREEDY = range(7)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting: from pageable memory the driver may first sync with the stream,
    which would stall async scheduling behind the step in flight, so CUDA copies go through pinned memory."""
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def _padded(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(len(x) for x in lists)
    return _to_device(torch.tensor([x + [pad] * (width - len(x)) for x in lists], dtype=torch.long), device)


@dataclass
class SamplingTensors:
    """rows [B, 7] float32: the columns above. seen / outputs [B, L] long ids padded with V (the
    ids each row's repetition / presence-frequency penalty looks at; empty for rows without one)."""

    rows: torch.Tensor
    seen: torch.Tensor | None
    outputs: torch.Tensor | None
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def build(cls, seqs: list[Sequence], vocab: int, device: torch.device,
              pending: torch.Tensor | None = None) -> "SamplingTensors":
        """pending [B] long on the device: each row's latest id, not in its token_ids yet."""
        ps = [s.params for s in seqs]
        rows = _to_device(torch.tensor([[1.0 if p.greedy else p.temperature, p.top_p,
                                         min(p.top_k, vocab) if p.top_k > 0 else vocab, p.repetition_penalty,
                                         p.presence_penalty, p.frequency_penalty, float(p.greedy)]
                                        for p in ps], dtype=torch.float32), device)
        rep = [p.repetition_penalty != 1.0 for p in ps]
        pf = [bool(p.presence_penalty or p.frequency_penalty) for p in ps]
        seen = _padded([s.token_ids if r else [] for s, r in zip(seqs, rep)], vocab, device) if any(rep) else None
        outputs = (_padded([s.output_ids if f else [] for s, f in zip(seqs, pf)], vocab, device)
                   if any(f and s.num_output_tokens for s, f in zip(seqs, pf)) else None)
        if pending is not None and any(rep):
            seen = _with_pending(seen, rows[:, REPETITION] != 1.0, pending, vocab)
        if pending is not None and any(pf):
            outputs = _with_pending(outputs, (rows[:, PRESENCE] != 0) | (rows[:, FREQUENCY] != 0), pending, vocab)
        return cls(rows, seen, outputs, all(p.greedy for p in ps), any(p.top_k > 0 for p in ps),
                   any(p.top_p < 1.0 for p in ps))

    def col(self, c: int) -> torch.Tensor:
        return self.rows[:, c:c + 1]  # [B, 1]


def _with_pending(ids: torch.Tensor | None, uses: torch.Tensor, pending: torch.Tensor, pad: int) -> torch.Tensor:
    """ids [B, L] (or None) plus one column: pending[b] where uses[b], pad elsewhere (device only)."""
    column = torch.where(uses, pending, pad)[:, None]
    return column if ids is None else torch.cat([ids, column], 1)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, +inf -> the largest float (finite values unchanged, bit for bit)."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits [B, V] float32 -> penalised copy. Rows without a penalty come out bit-identical."""
    vocab = logits.shape[1]
    if t.seen is not None:
        seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
        seen = seen.scatter_(1, t.seen, True)[:, :vocab]
        rp = t.col(REPETITION)
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    if t.outputs is not None:
        counts = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.float32, device=logits.device)
        counts = counts.scatter_add_(1, t.outputs, torch.ones_like(t.outputs, dtype=torch.float32))[:, :vocab]
        logits = torch.where(counts > 0, logits - (t.col(PRESENCE) + t.col(FREQUENCY) * counts), logits)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits [B, V] already divided by temperature -> -inf outside each row's top-k / top-p set."""
    if t.any_top_k:
        k = t.col(TOP_K).long()
        kth = logits.sort(dim=-1, descending=True).values.gather(1, k - 1)  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if t.any_top_p:
        top_p = t.col(TOP_P)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs > top_p) & (top_p < 1.0)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


class Sampler:
    """generator: draws the unseeded rows' noise (None: torch's global RNG). The ranks of a tensor-parallel
    group each pass one seeded alike, so they sample the same ids whatever else uses the global RNG."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], pending: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] float32 of the B sampling rows -> token ids [B] long (on the device).
        pending [B]: each row's latest id when it is not in the sequence's token_ids yet."""
        t = SamplingTensors.build(seqs, logits.shape[1], logits.device, pending)
        logits = apply_penalties(logits, t)
        best = argmax(logits)
        if t.all_greedy:
            return best
        probs = filter_top_k_top_p(_finite(logits / t.col(TEMPERATURE)), t).softmax(-1)
        valid = probs.isfinite().all(-1, keepdim=True) & (probs.sum(-1, keepdim=True) > 0)  # [B, 1]
        probs = torch.where(valid, probs, torch.nn.functional.one_hot(best, probs.shape[1]).to(probs.dtype))
        noise = torch.empty_like(probs).exponential_(generator=self.generator).clamp_min_(1e-10)
        sampled = argmax(probs / noise)
        for i, s in enumerate(seqs):
            if s.params.seed is not None and not s.params.greedy:
                sampled[i] = torch.multinomial(probs[i], 1, generator=self._generator(s, logits.device))[0]
        return torch.where(t.col(GREEDY)[:, 0] > 0, best, sampled)

    @staticmethod
    def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
        if getattr(seq, "generator", None) is None:
            seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
        return seq.generator

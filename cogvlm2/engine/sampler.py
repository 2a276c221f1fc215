"""Sampler: the next token of every sampling row at once, from per-row settings held as tensors.

Semantics equal `generation.apply_penalties` + `generation.sample_token` row by row: repetition
penalty over prompt + generated ids (HF), presence / frequency over generated ids (OpenAI),
temperature, top-k, then top-p (smallest prefix reaching top_p). Greedy rows (temperature 0 or
top_k 1) take the argmax of the penalised logits. Seeded rows draw with their own torch.Generator
(created on first use, seeded with `seed`, kept by the sequence across steps and preemptions), so
they do not depend on which other requests share the batch; unseeded rows draw together with the
exponential-race trick. Nothing here syncs with the host: the caller copies the ids out once.
"""

from __future__ import annotations

import torch

from .sequence import Sequence


def _rows(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _padded_ids(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(x) for x in lists), default=0)
    return _rows(device, [x + [pad] * (width - len(x)) for x in lists], torch.long)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [B, V] float32 -> penalised copy (only rows with a penalty pay for it)."""
    vocab, device = logits.shape[1], logits.device
    rep = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rep:
        seen = torch.zeros(len(rep), vocab + 1, dtype=torch.bool, device=device)  # column V = padding
        seen.scatter_(1, _padded_ids([seqs[i].token_ids for i in rep], vocab, device), True)
        seen = seen[:, :vocab]
        penalty = _rows(device, [seqs[i].params.repetition_penalty for i in rep], torch.float32)[:, None]
        rows = _rows(device, rep, torch.long)
        x = logits[rows]
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
        logits = logits.index_copy(0, rows, x)
    pf = [i for i, s in enumerate(seqs) if (s.params.presence_penalty or s.params.frequency_penalty) and s.num_output_tokens]
    if pf:
        ids = _padded_ids([seqs[i].output_ids for i in pf], vocab, device)
        counts = torch.zeros(len(pf), vocab + 1, dtype=torch.float32, device=device)
        counts = counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))[:, :vocab]
        presence = _rows(device, [seqs[i].params.presence_penalty for i in pf], torch.float32)[:, None]
        frequency = _rows(device, [seqs[i].params.frequency_penalty for i in pf], torch.float32)[:, None]
        rows = _rows(device, pf, torch.long)
        x = logits[rows]
        x = torch.where(counts > 0, x - (presence + frequency * counts), x)
        logits = logits.index_copy(0, rows, x)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [B, V] already divided by temperature -> -inf outside each row's top-k / top-p set."""
    device, vocab = logits.device, logits.shape[1]
    if any(s.params.top_k > 0 for s in seqs):
        k = _rows(device, [min(s.params.top_k, vocab) if s.params.top_k > 0 else vocab for s in seqs], torch.long)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(s.params.top_p < 1.0 for s in seqs):
        top_p = _rows(device, [s.params.top_p for s in seqs], torch.float32)[:, None]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs > top_p) & (top_p < 1.0)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [B, V] float32 of the B sampling rows -> token ids [B] long (on the device)."""
        logits = apply_penalties(logits, seqs)
        greedy = [s.params.greedy for s in seqs]
        argmax = logits.argmax(-1)
        if all(greedy):
            return argmax
        device = logits.device
        temperature = _rows(device, [1.0 if g else s.params.temperature for g, s in zip(greedy, seqs)], torch.float32)
        probs = filter_top_k_top_p(logits / temperature[:, None], seqs).softmax(-1)
        noise = torch.empty_like(probs).exponential_().clamp_min_(1e-10)
        sampled = (probs / noise).argmax(-1)
        for i, s in enumerate(seqs):
            if s.params.seed is not None and not greedy[i]:
                sampled[i] = torch.multinomial(probs[i], 1, generator=self._generator(s, device))[0]
        return torch.where(_rows(device, greedy, torch.bool), argmax, sampled)

    @staticmethod
    def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
        if getattr(seq, "generator", None) is None:
            seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
        return seq.generator

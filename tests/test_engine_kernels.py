"""The engine's attention and sampler against the simple paths: paged attention (varlen and batched
decode) against dense causal attention and PackedAttention; the batched sampler against
`generation.apply_penalties` / `sample_token` row by row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cogvlm2.engine.attention import (AttentionMetadata, KVCache, PagedAttention, attend_decode_batched,
                                      attend_reference)
from cogvlm2.engine.sampler import Sampler, SamplingTensors, apply_penalties
from cogvlm2.engine.sequence import Sequence
from cogvlm2.generation import apply_penalties as ref_penalties
from cogvlm2.generation import sample_token
from cogvlm2.model.attention import PackedAttention
from cogvlm2.processing.prompt import ModelInputs
from cogvlm2.sampling_params import SamplingParams

HQ, HKV, D, BS = 4, 2, 8, 4


def paged_step(cache: KVCache, tables: list[list[int]], starts: list[int], q_lens: list[int],
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, host_lists: bool = True) -> torch.Tensor:
    slots = [tables[b][t // BS] * BS + t % BS for b in range(len(tables)) for t in range(starts[b], starts[b] + q_lens[b])]
    width = max(len(t) for t in tables)
    ctx = [s + n for s, n in zip(starts, q_lens)]
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor([t + [cache.null_block] * (width - len(t)) for t in tables]),
                             torch.tensor(ctx), torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist()),
                             q_lens if host_lists else None, ctx if host_lists else None)
    return PagedAttention(cache, meta)(0, q, k, v)


def test_paged_matches_dense_causal():
    torch.manual_seed(0)
    cache = KVCache(1, 32, BS, HKV, D, torch.float32, "cpu")
    lens = [5, 9, 1, 13]
    tables = [[3, 7], [0, 9, 4], [12], [5, 6, 1, 2]]
    full = [(torch.randn(n, HQ, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D)) for n in lens]
    # step 1: prefill all but the last few tokens; step 2: the rest (a chunk / a decode token)
    tail = [2, 3, 1, 1]
    heads = [n - t for n, t in zip(lens, tail)]
    for starts, q_lens in (([0] * 4, heads), (heads, tail)):
        keep = [i for i, n in enumerate(q_lens) if n]  # a 1-token sequence has nothing to prefill first
        sel = lambda j: torch.cat([full[i][j][starts[i]:starts[i] + q_lens[i]] for i in keep])  # noqa: E731
        out = paged_step(cache, [tables[i] for i in keep], [starts[i] for i in keep], [q_lens[i] for i in keep],
                         sel(0), sel(1), sel(2))
        offset = 0
        for i in keep:
            q, k, v = full[i]
            n, s = lens[i], starts[i]
            mask = torch.ones(n, n, dtype=torch.bool).tril()[s:s + q_lens[i]]
            ref = F.scaled_dot_product_attention(q[s:s + q_lens[i]].transpose(0, 1), k.transpose(0, 1),
                                                 v.transpose(0, 1), attn_mask=mask, enable_gqa=True).transpose(0, 1)
            torch.testing.assert_close(out[offset:offset + q_lens[i]], ref, atol=1e-5, rtol=1e-5)
            offset += q_lens[i]


def test_stored_step_attends_to_what_the_model_wrote():
    """A decode step whose K / V the model already wrote (stored=True, the fused QKV kernel's path) attends exactly
    as the step that stores them itself; the CPU cache offers no destination (the model then never stores)."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, HQ, D), torch.randn(1, HKV, D), torch.randn(1, HKV, D)
    meta = AttentionMetadata(torch.tensor([6]), torch.tensor([[3, 1]]), torch.tensor([7]), torch.tensor([0, 1]),
                             [1], [7])
    caches = [KVCache(1, 8, BS, HKV, D, torch.float32, "cpu") for _ in range(2)]
    for c in caches:
        c.kv.normal_()
    caches[1].kv.copy_(caches[0].kv)
    ref = PagedAttention(caches[0], meta)(0, q, k, v)
    slot = caches[1].layers[0].view(2, -1, HKV, D)[:, 6]
    slot[0], slot[1] = k[0], v[0]  # what the model's kernel writes at the step's slot
    assert torch.equal(PagedAttention(caches[1], meta)(0, q, k * 0, v * 0, stored=True), ref)
    assert torch.equal(caches[1].kv, caches[0].kv)
    assert PagedAttention(caches[1], meta).kv_destination(0) is None

    # an attend that `prefetches` (CudaAttend) is asked to only when the model's kernel wrote the step's K / V
    calls = []

    class Recording:
        prefetches = True

        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return attend_reference(*args)

    for stored in (True, False):
        out = PagedAttention(caches[1], meta, Recording())(0, q, k, v, stored=stored)
        assert torch.equal(out, ref)
    assert calls == [{"prefetch": True}, {}]


def test_batched_decode_matches_reference():
    torch.manual_seed(1)
    cache = KVCache(1, 16, BS, HKV, D, torch.float32, "cpu")
    cache.kv.normal_()
    tables = [[3, 7, 2], [0], [9, 4]]
    starts = [10, 2, 5]  # the decode token's index in each sequence
    q, k, v = torch.randn(3, HQ, D), torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    saved = cache.kv.clone()
    varlen = paged_step(cache, tables, starts, [1, 1, 1], q, k, v)
    cache.kv.copy_(saved)
    batched = paged_step(cache, tables, starts, [1, 1, 1], q, k, v, host_lists=False)
    torch.testing.assert_close(varlen, batched, atol=1e-5, rtol=1e-5)
    assert attend_reference is not attend_decode_batched


def test_paged_prefill_matches_packed_attention():
    torch.manual_seed(2)
    lens = [6, 11, 3]
    n = sum(lens)
    q, k, v = torch.randn(n, HQ, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D)
    packed = PackedAttention(torch.tensor([0, 6, 17, 20]))(0, q, k, v)
    paged = paged_step(KVCache(1, 16, BS, HKV, D, torch.float32, "cpu"), [[0, 1], [2, 3, 4], [5]], [0, 0, 0], lens, q, k, v)
    torch.testing.assert_close(paged, packed, atol=1e-5, rtol=1e-5)


def make_seq(prompt: list[int], generated: list[int], params: SamplingParams) -> Sequence:
    seq = Sequence("s", ModelInputs(prompt, [0] * len(prompt), list(range(len(prompt)))), params)
    seq.token_ids += generated
    return seq


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(0)
    vocab = 40
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(presence_penalty=0.5, frequency_penalty=0.8),
              SamplingParams(), SamplingParams(repetition_penalty=0.7, presence_penalty=-1.0, frequency_penalty=0.2)]
    seqs = [make_seq(torch.randint(0, vocab, (7,), generator=g).tolist(),
                     torch.randint(0, vocab, (i * 3,), generator=g).tolist(), p) for i, p in enumerate(params)]
    logits = torch.randn(4, vocab, generator=g)
    ours = apply_penalties(logits.clone(), SamplingTensors.build(seqs, vocab, logits.device))
    for i, s in enumerate(seqs):
        ref = ref_penalties(logits[i].clone(), torch.tensor(s.token_ids), s.output_ids, s.params)
        assert torch.equal(ours[i], ref), i


def test_sampler_rows_match_sample_token():
    g = torch.Generator().manual_seed(1)
    vocab = 60
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5, seed=11),
              SamplingParams(temperature=1.3, top_p=0.8, seed=12), SamplingParams(temperature=0.9, top_k=20, top_p=0.5, seed=13),
              SamplingParams(temperature=1.0, top_k=1, repetition_penalty=1.2)]
    seqs = [make_seq([1, 2, 3], [4], p) for p in params]
    refs = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    sampler = Sampler()
    for _ in range(20):
        logits = torch.randn(len(seqs), vocab, generator=g) * 3
        ours = sampler(logits.clone(), seqs).tolist()
        for i, s in enumerate(seqs):
            row = ref_penalties(logits[i].clone(), torch.tensor(s.token_ids), s.output_ids, s.params)
            assert ours[i] == sample_token(row, s.params, refs[i]), (i, s.params)


def test_unseeded_rows_respect_filters():
    torch.manual_seed(3)
    logits = torch.randn(1, 100)
    allowed = set(logits[0].topk(3).indices.tolist())
    seqs = [make_seq([1], [], SamplingParams(temperature=2.0, top_k=3)) for _ in range(64)]
    drawn = Sampler()(logits.expand(64, -1).clone(), seqs).tolist()
    assert set(drawn) <= allowed and len(set(drawn)) > 1
    nucleus = torch.tensor([[5.0, 4.9, 0.0, -1.0, -2.0]]).expand(64, -1).clone()
    seqs = [make_seq([1], [], SamplingParams(temperature=1.0, top_p=0.5)) for _ in range(64)]
    assert set(Sampler()(nucleus, seqs).tolist()) <= {0, 1}

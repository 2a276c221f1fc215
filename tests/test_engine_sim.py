"""Randomised simulation of the scheduler + block manager (no model): random arrivals, lengths, aborts,
shared prefixes, two images with identical placeholder ids, a tiny pool. Every step checks the
invariants, and a fake KV store (slot -> what the token's K/V would depend on) checks that every
sequence only ever attends to its own tokens, shared prefix blocks included.
"""

from __future__ import annotations

import random

import pytest

from cogvlm2.engine.block_manager import BlockManager, block_hash
from cogvlm2.engine.config import EngineConfig
from cogvlm2.engine.scheduler import Scheduler
from cogvlm2.engine.sequence import Sequence, SequenceStatus
from cogvlm2.processing.prompt import ModelInputs, position_ids
from cogvlm2.sampling_params import SamplingParams

VISION_ID = 7  # every image uses the same placeholder id: only the vision hash tells them apart


def make_prompt(rng: random.Random, stems: list[list[int]]) -> ModelInputs:
    ids, types, vision_hash = [1], [0], None
    if rng.random() < 0.5:
        run = rng.choice([3, 6])
        ids += [VISION_ID] * run
        types += [1] * run
        vision_hash = rng.choice(["image-A", "image-B"])
    stem = rng.choice(stems)
    text = stem + [rng.randrange(10, 20) for _ in range(rng.randrange(0, 12))]
    text = text or [11]
    ids += text
    types += [0] * len(text)
    return ModelInputs(ids, types, position_ids(types), None, vision_hash)


def token_key(seq: Sequence, t: int) -> tuple:
    """Everything the K/V of token t depends on besides earlier tokens."""
    vision = seq.vision_hash if seq.token_types(t, t + 1)[0] else None
    return (seq.token_ids[t], seq.positions(t, t + 1)[0], seq.expert_mask(t, t + 1)[0], vision)


def check_invariants(bm: BlockManager, sched: Scheduler) -> None:
    holders = [0] * bm.num_blocks
    for seq in sched.running:
        assert seq.status == SequenceStatus.RUNNING
        assert seq.num_computed_tokens <= len(seq)
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
        assert len(seq.block_hashes) == seq.num_computed_tokens // bm.block_size or not bm.enable_prefix_caching
        parent = None
        for i, h in enumerate(seq.block_hashes):
            parent = block_hash(seq, i, bm.block_size, parent, bm.adapter_id)
            assert h == parent, "a sequence's block hash does not describe its tokens"
            owner = bm.hash_of[seq.block_table[i]]
            assert owner is None or owner == h, "a block's hash disagrees with its holder's content"
        for b in seq.block_table:
            holders[b] += 1
    for seq in sched.waiting:
        assert seq.status == SequenceStatus.WAITING and not seq.block_table and seq.num_computed_tokens == 0
    assert holders == bm.ref_count, "ref counts != number of sequences holding each block"
    assert set(bm.free) == {b for b in range(bm.num_blocks) if bm.ref_count[b] == 0}
    assert len(bm.free) + sum(1 for r in bm.ref_count if r) == bm.num_blocks
    for h, b in bm.block_of.items():
        assert bm.hash_of[b] == h
    assert sum(h is not None for h in bm.hash_of) == len(bm.block_of)
    for h, (b, rows) in bm.tail_of.items():  # a tail hash belongs to a full block that still holds its content
        assert bm.tail_hash_of[b] == h and bm.hash_of[b] is not None and 0 < rows < bm.block_size
    assert sum(h is not None for h in bm.tail_hash_of) == len(bm.tail_of)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_simulation(seed: int, prefix_caching: bool):
    rng = random.Random(seed)
    block_size = 4
    config = EngineConfig(block_size=block_size, max_num_seqs=rng.choice([4, 8]), max_num_batched_tokens=rng.choice([8, 24, 64]),
                          max_model_len=80, num_kv_blocks=24)
    bm = BlockManager(config.num_kv_blocks, block_size, prefix_caching, adapter_id="lora-1" if seed == 2 else None)
    sched = Scheduler(config, bm)
    stems = [[rng.randrange(10, 20) for _ in range(n)] for n in (0, 9, 17, 30)]
    kv: dict[int, tuple] = {}  # slot -> token_key written there
    live: dict[str, Sequence] = {}
    finished = aborted = hits = tail_hits = 0
    total_steps = 3000
    for step in range(total_steps + 20000):
        arriving = step < total_steps
        if arriving and rng.random() < 0.3:
            params = SamplingParams(max_new_tokens=rng.randrange(1, 30))
            seq = Sequence(f"r{step}", make_prompt(rng, stems), params)
            live[seq.request_id] = seq
            sched.add(seq)
        if arriving and live and rng.random() < 0.03:
            seq = live.pop(rng.choice(sorted(live)))
            sched.finish(seq)
            aborted += 1
        batch = sched.schedule()
        assert batch.num_tokens <= config.max_num_batched_tokens
        assert len(sched.running) <= config.max_num_seqs
        assert all(n >= 1 for n in batch.num_new_tokens)
        for src, dst, rows in batch.kv_copies:  # the runner's copies, first in the step
            for j in range(rows):
                kv[dst * block_size + j] = kv[src * block_size + j]
            tail_hits += 1
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_new_tokens):  # the fake forward pass
            for t in range(start, start + n):
                kv[seq.block_table[t // block_size] * block_size + t % block_size] = token_key(seq, t)
            for t in range(start + n):  # attention reads every cached token of the sequence
                assert kv[seq.block_table[t // block_size] * block_size + t % block_size] == token_key(seq, t)
        sampled = [rng.randrange(10, 20) if s else None for s in batch.samples]
        sched.update(batch, sampled)
        for seq, token in zip(batch.seqs, sampled):
            if token is not None and (seq.num_output_tokens >= seq.params.max_new_tokens or len(seq) >= 80):
                hits += seq.num_cached_tokens > 0
                sched.finish(seq)
                del live[seq.request_id]
                finished += 1
        check_invariants(bm, sched)
        if not arriving and not sched.has_unfinished():
            break
    assert not live and not sched.has_unfinished(), "some request never finished"
    assert bm.num_free == bm.num_blocks
    assert finished > 300 and aborted > 10
    assert sched.num_preemptions > 0, "the pool never ran dry: the simulation is too gentle"
    assert (hits > 0) == prefix_caching and (tail_hits > 0) == prefix_caching


def test_two_images_never_share_blocks():
    """Identical placeholder ids and text, different image hashes: no block in common."""
    bm = BlockManager(32, 4)
    config = EngineConfig(block_size=4, max_model_len=64, num_kv_blocks=32)
    sched = Scheduler(config, bm)
    types = [0] + [1] * 8 + [0] * 7
    seqs = []
    for h in ("image-A", "image-B", "image-A"):
        seq = Sequence(h, ModelInputs([1] + [VISION_ID] * 8 + list(range(20, 27)), types, position_ids(types), None, h),
                       SamplingParams())
        sched.add(seq)
        batch = sched.schedule()
        sched.update(batch, [5 if s else None for s in batch.samples])
        seqs.append(seq)
    a, b, a2 = seqs
    assert not set(a.block_table) & set(b.block_table)
    assert a2.num_cached_tokens == 12 and a2.block_table[:3] == a.block_table[:3]
    assert b.num_cached_tokens == 0

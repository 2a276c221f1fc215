"""Async scheduling (one step in flight, the next decode launched from its ids on the device, arrivals
admitted beside it) against the synchronous engine: the same tokens, text, finish reasons and stream deltas on
mixed workloads (text / image / video, chunked prefill, preemption, aborts mid-stream, stop ids and strings, seeds),
every KV block back at the end; and a randomised scheduler simulation of the lookahead with stops
it cannot foresee and aborts while a step is in flight.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engine import GREEDY, assert_all_free, image, mixed_requests, reference
from test_engine import tiny, tiny_video  # noqa: F401 - module-scoped fixtures shared with test_engine
from test_engine_sim import check_invariants, make_prompt, token_key

from cogvlm2.engine import LLM, EngineConfig, LLMEngine
from cogvlm2.engine.block_manager import BlockManager
from cogvlm2.engine.scheduler import Scheduler
from cogvlm2.engine.sequence import Sequence
from cogvlm2.sampling_params import SamplingParams


def count_lookaheads(engine: LLMEngine) -> dict[str, int]:
    """Count the scheduler's lookahead decisions (launched / declined) from now on, the launched ones that
    admitted a waiting sequence, and those that continued a prefill still in flight."""
    counts = {"lookahead": 0, "fallback": 0, "admitted": 0, "resumed": 0}
    plan = engine.scheduler.schedule_lookahead

    def counted(prev, done):
        batch = plan(prev, done)
        counts["lookahead" if batch is not None else "fallback"] += 1
        if batch is not None:
            rows = batch.input_rows or [None] * len(batch)
            counts["admitted"] += any(r is None and a == s.num_computed_tokens for s, a, r in zip(batch.seqs,
                                                                                                  batch.starts, rows))
            counts["resumed"] += any(r is None and a > s.num_computed_tokens for s, a, r in zip(batch.seqs,
                                                                                                 batch.starts, rows))
        return batch

    engine.scheduler.schedule_lookahead = counted
    return counts


def stream(engine: LLMEngine, requests, abort_at: dict[str, int] | None = None) -> dict[str, list]:
    """Step until done; every output of each request in order. abort_at[id] = k aborts the request
    as soon as the caller has seen k of its tokens (what a client that disconnects does)."""
    outs: dict[str, list] = {}
    pending, step = sorted(requests, key=lambda r: r[0]), 0
    abort_at = dict(abort_at or {})
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, x, p = pending.pop(0)
            engine.add_request(rid, x, p)
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
            if abort_at.get(out.request_id) is not None and len(out.token_ids) >= abort_at[out.request_id]:
                assert engine.abort(out.request_id) != out.finished
                abort_at[out.request_id] = None
        step += 1
    assert_all_free(engine)
    return outs


def summary(outs: list) -> tuple:
    """Everything a client sees of one request, checking that each token came exactly once, in order."""
    final = outs[-1]
    assert final.finished and not any(o.finished for o in outs[:-1])
    assert sum((o.delta_token_ids for o in outs), []) == final.token_ids
    assert "".join(o.delta_text for o in outs) == final.text
    return final.token_ids, final.text, final.finish_reason, final.stop_reason


def _raise(error: Exception) -> None:
    raise error


def both_modes(model, processor, config: dict, requests, abort_at=None) -> tuple[dict, dict[str, int]]:
    """Run the requests with and without async scheduling; assert equal summaries; (summaries, counts)."""
    results = {}
    for async_scheduling in (False, True):
        engine = LLMEngine(model, EngineConfig(async_scheduling=async_scheduling, **config), processor)
        counts = count_lookaheads(engine)
        engine.core._recover = _raise  # no step may fail (a retry alone would hide it: same tokens, slower)
        results[async_scheduling] = {rid: summary(o) for rid, o in stream(engine, requests, abort_at).items()}
        if not async_scheduling:
            assert counts["lookahead"] == counts["fallback"] == 0  # the synchronous path never plans ahead
    assert results[True] == results[False]
    return results[True], counts


CONFIGS = {
    "default": dict(),
    "chunked": dict(max_num_batched_tokens=24, block_size=8),
    "preempt": dict(num_kv_blocks=12, block_size=16, max_model_len=192, max_num_batched_tokens=64),
    "full-batch": dict(max_num_seqs=2),  # requests wait while the batch is full
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_async_equals_sync_mixed(tiny, name):
    model, processor = tiny
    requests = mixed_requests(processor)
    x = processor("Count with me")
    ref = reference(model, x, SamplingParams(max_new_tokens=12, **GREEDY))
    stop_text = processor.tokenizer.decode(ref[5:7])
    requests += [
        (2, "stop-id", x, SamplingParams(max_new_tokens=12, stop_token_ids=[ref[3]], **GREEDY)),
        (2, "stop-str", x, SamplingParams(max_new_tokens=12, stop=[stop_text], **GREEDY)),
        (4, "seeded", processor("Tell me something", image=image(9)),
         SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)),
        (4, "abort-mid", processor("A long answer please"), SamplingParams(max_new_tokens=40, **GREEDY)),
    ]
    done, counts = both_modes(model, processor, CONFIGS[name], requests, abort_at={"abort-mid": 5})
    for _, rid, xi, p in requests:
        tokens, _, finish, _ = done[rid]
        if rid == "abort-mid":
            assert finish == "abort" and tokens == reference(model, xi, p)[:5]  # no stale in-flight token
        elif rid != "seeded":
            assert tokens == reference(model, xi, p)[:len(tokens)], rid
    assert done["stop-id"][2:] == ("stop", ref[3]) and done["stop-str"][2:] == ("stop", stop_text)
    assert counts["lookahead"] >= 5 and counts["fallback"] > 0
    if name == "chunked":  # prompts of several chunks: each chunk after the first launched ahead
        assert counts["resumed"] >= 3, counts


def test_async_equals_sync_preemption_counts(tiny):
    """A pool so small that decodes preempt: preemption happens only on the synchronous path."""
    model, processor = tiny
    requests = [(i, f"r{i}", processor(f"Story {i}: " + "once upon a time " * 3, image=image(i) if i % 2 else None),
                 SamplingParams(max_new_tokens=30, **GREEDY)) for i in range(5)]
    config = dict(num_kv_blocks=12, block_size=16, max_model_len=192, max_num_batched_tokens=96)
    for async_scheduling in (False, True):
        engine = LLMEngine(model, EngineConfig(async_scheduling=async_scheduling, **config), processor)
        done = {rid: summary(o) for rid, o in stream(engine, requests).items()}
        assert engine.scheduler.num_preemptions > 0
        for _, rid, x, p in requests:
            assert done[rid][0] == reference(model, x, p), (async_scheduling, rid)


def test_async_video_chunked(tiny_video):
    model, processor = tiny_video
    g = torch.Generator().manual_seed(3)
    frames = [torch.randint(0, 256, (3, t, 64, 80), dtype=torch.uint8, generator=g) for t in (2, 3)]
    requests = [(i, f"video-{i}", processor(q, video=f), SamplingParams(max_new_tokens=8, **GREEDY))
                for i, (q, f) in enumerate([("What happens?", frames[0]), ("Describe the video.", frames[1])])]
    requests.append((1, "text", processor("Hello video model"), SamplingParams(max_new_tokens=5, **GREEDY)))
    done, counts = both_modes(model, processor, dict(max_num_batched_tokens=40, block_size=16), requests)
    for _, rid, x, p in requests:
        assert done[rid][0] == reference(model, x, p), rid
    assert counts["lookahead"] > 0 and counts["resumed"] > 0, counts


def test_penalties_and_admissions_overlap(tiny):
    """Penalties count the id still on the device, so they overlap; requests arriving mid-decode are admitted
    into lookahead steps (prefill beside the decoding rows, whose ids stay on the device), penalised ones too."""
    model, processor = tiny
    engine = LLMEngine(model, EngineConfig(), processor)
    counts = count_lookaheads(engine)
    x = processor("la la la")
    p = SamplingParams(max_new_tokens=12, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.7,
                       temperature=0, ignore_eos=True)
    out = stream(engine, [(0, "pen", x, p)])["pen"][-1]
    assert counts["lookahead"] >= 10 and out.token_ids == reference(model, x, p)
    counts = count_lookaheads(engine)
    requests = [(0, "a", processor("first"), p),
                (4, "b", processor("second"), SamplingParams(max_new_tokens=6, **GREEDY)),
                (6, "c", processor("third", image=image(2)), p),
                (6, "d", processor("fourth"), SamplingParams(max_new_tokens=5, repetition_penalty=1.5, temperature=0))]
    done = stream(engine, requests)
    assert counts["admitted"] >= 2 and counts["fallback"] <= 1 and counts["lookahead"] >= 10
    for _, rid, x, q in requests:
        assert done[rid][-1].token_ids == reference(model, x, q), rid


def test_sampler_pending_ids_equal_host_ids():
    """A row's latest id on the device (`pending`) penalises exactly like the same id on the host."""
    from cogvlm2.engine.sampler import SamplingTensors, apply_penalties
    from cogvlm2.processing.prompt import ModelInputs

    g = torch.Generator().manual_seed(0)
    vocab = 50
    params = [SamplingParams(repetition_penalty=1.4), SamplingParams(presence_penalty=0.8, frequency_penalty=-0.5),
              SamplingParams(), SamplingParams(repetition_penalty=0.7, frequency_penalty=1.1)]
    seqs = []
    for i, p in enumerate(params):
        prompt = torch.randint(0, vocab, (5,), generator=g).tolist()
        seq = Sequence(f"s{i}", ModelInputs(prompt, [0] * 5, list(range(5))), p)
        seq.token_ids += torch.randint(0, vocab, (i,), generator=g).tolist()  # 0..3 generated ids
        seqs.append(seq)
    pending = torch.randint(0, vocab, (len(seqs),), generator=g)
    logits = torch.randn(len(seqs), vocab, generator=g)
    ahead = apply_penalties(logits, SamplingTensors.build(seqs, vocab, logits.device, pending))
    for seq, token in zip(seqs, pending.tolist()):
        seq.token_ids.append(token)
    on_host = apply_penalties(logits, SamplingTensors.build(seqs, vocab, logits.device))
    assert torch.equal(ahead, on_host) and not torch.equal(ahead, logits)


def test_outputs_one_call_later_and_has_unfinished(tiny):
    """The first call only launches; a request that stops is reported once and the extra token it
    decoded in flight is dropped; has_unfinished() covers the step still in flight."""
    model, processor = tiny
    x = processor("Count with me")
    ref = reference(model, x, SamplingParams(max_new_tokens=8, **GREEDY))
    engine = LLMEngine(model, EngineConfig(), processor)
    engine.add_request("r", x, SamplingParams(max_new_tokens=8, stop_token_ids=[ref[4]], **GREEDY))
    assert engine.step() == [] and engine.has_unfinished()
    seen = []
    while engine.has_unfinished():
        seen += engine.step()
    assert [o.delta_token_ids for o in seen] == [[t] for t in ref[:5]]
    assert seen[-1].finish_reason == "stop" and engine.step() == []
    assert_all_free(engine)


@pytest.mark.parametrize("pool", [None, 8])
def test_graph_buffers_async_equals_sync(tiny, pool):
    """The CUDA-graph decode path (static buffers, eager on the CPU) fed ids on the device; with a
    small pool, preempted sequences come back with new block tables into reused rows."""
    from cogvlm2.engine.cuda_graph import DecodeGraphs

    model, processor = tiny
    requests = [(i, f"r{i}", processor(f"Prompt number {i} " * (i + 1), image=image(i) if i % 2 else None),
                 SamplingParams(max_new_tokens=6 + 3 * i, **GREEDY)) for i in range(6)]
    results, device_ids = {}, []
    for async_scheduling in (False, True):
        config = EngineConfig(max_model_len=128, cuda_graph_batch_sizes=(1, 2, 4), max_num_seqs=8,
                              num_kv_blocks=pool, async_scheduling=async_scheduling)
        engine = LLMEngine(model, config, processor)
        graphs = DecodeGraphs(model, engine.runner.kv, engine.config, engine.runner.attend, capture=False)
        run_graph = graphs.run
        graphs.run = lambda rows: device_ids.append(isinstance(rows[0], torch.Tensor)) or run_graph(rows)
        engine.runner.graphs = graphs
        results[async_scheduling] = {rid: summary(o) for rid, o in stream(engine, requests).items()}
        assert (engine.scheduler.num_preemptions > 0) == (pool is not None)
    assert results[True] == results[False]
    for _, rid, x, p in requests:
        assert results[True][rid][0] == reference(model, x, p), rid
    assert any(device_ids) and not all(device_ids)


def test_graph_block_tables_persist_and_follow(tiny):
    """Random batches (growing, shrinking, reordered, replaced and shared tables, padded buckets):
    after every run each row of the persistent device tables starts with its sequence's table, pad
    rows with the null block, and steady growth sends only the new blocks."""
    from cogvlm2.engine.cuda_graph import DecodeGraphs

    model, processor = tiny
    config = EngineConfig(max_model_len=128, cuda_graph_batch_sizes=(1, 2, 4, 8), max_num_seqs=8, num_kv_blocks=64)
    engine = LLMEngine(model, config, processor)
    graphs = DecodeGraphs(model, engine.runner.kv, engine.config, engine.runner.attend, capture=False)
    rng = random.Random(0)
    tables = [[rng.randrange(64) for _ in range(rng.randrange(1, 5))] for _ in range(8)]
    sent = []
    for step in range(60):
        n = rng.randrange(1, 9)
        for t in tables:
            if rng.random() < 0.2 and len(t) < graphs.width:
                t.append(rng.randrange(64))  # a new block
        if rng.random() < 0.15:
            tables[rng.randrange(8)] = [rng.randrange(64) for _ in range(rng.randrange(1, 6))]  # preempted, re-admitted
        if rng.random() < 0.15:
            rng.shuffle(tables)  # a sequence left, the rows shifted
        batch = tables[:n]
        context = [len(t) * 16 for t in batch]
        updates = graphs._table_updates(batch + [[graphs.null_block]] * (next(s for s in graphs.sizes if s >= n) - n))
        sent.append(len(updates[0]))
        graphs.run(([1] * n, [c - 1 for c in context], [0] * n, context, batch))
        bt = graphs.block_tables.tolist()
        bs = next(s for s in graphs.sizes if s >= n)
        for r in range(bs):
            expect = batch[r] if r < n else [graphs.null_block]
            assert bt[r][:len(expect)] == expect, (step, r)
    assert min(sent) == 0 and sum(sent) < 60 * 8 * 3  # most steps send little or nothing


def test_llm_generate_both_modes(tiny):
    model, processor = tiny
    prompts = ["Hi", {"query": "What is it?", "image": image(1)}, processor("Tokens in")]
    params = [SamplingParams(max_new_tokens=n, **GREEDY) for n in (3, 4, 5)]
    outs = [[o.token_ids for o in LLM(model, async_scheduling=a).generate(prompts, params, use_tqdm=False)]
            for a in (False, True)]
    assert outs[0] == outs[1] and [len(t) for t in outs[1]] == [3, 4, 5]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_simulation_lookahead(seed: int, prefix_caching: bool):
    """The engine's async step loop over the scheduler alone: random arrivals (admitted into lookahead steps
    too), aborts while a step is in flight, EOS-like stops the lookahead cannot foresee, a tiny pool. The fake KV
    store records which (sequence, token) wrote each slot; a token still on the device is known only to its
    writer."""
    rng = random.Random(100 + seed)
    block_size, max_len = 4, 80
    config = EngineConfig(block_size=block_size, max_num_seqs=rng.choice([4, 8]),
                          max_num_batched_tokens=rng.choice([8, 24, 64]), max_model_len=max_len, num_kv_blocks=24)
    bm = BlockManager(config.num_kv_blocks, block_size, prefix_caching)
    sched = Scheduler(config, bm)
    stems = [[rng.randrange(10, 20) for _ in range(n)] for n in (0, 9, 17, 30)]
    kv: dict[int, tuple[Sequence, int]] = {}
    live: dict[str, Sequence] = {}
    stats = dict(finished=0, aborted_in_flight=0, lookahead=0, discarded=0, admitted=0, resumed=0, tail_copies=0)

    def slot(seq: Sequence, t: int) -> int:
        return seq.block_table[t // block_size] * block_size + t % block_size

    def launch(batch):
        for src, dst, rows in batch.kv_copies:  # the runner's copies, first in the step
            for j in range(rows):
                kv[dst * block_size + j] = kv[src * block_size + j]
            stats["tail_copies"] += 1
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_new_tokens):
            for t in range(start, start + n):
                kv[slot(seq, t)] = (seq, t)
            for t in range(start + n):
                writer = kv[slot(seq, t)]
                assert writer == (seq, t) or token_key(*writer) == token_key(seq, t)
        return batch, [rng.randrange(10, 20) if s else None for s in batch.samples]

    def collect(step):
        batch, sampled = step
        sched.update(batch, sampled)
        for seq, token in zip(batch.seqs, sampled):
            if token is None:
                continue
            if seq.is_finished:
                stats["discarded"] += 1
                continue
            if rng.random() < 0.1 or seq.num_output_tokens >= seq.params.max_new_tokens or len(seq) >= max_len:
                sched.finish(seq)
                del live[seq.request_id]
                stats["finished"] += 1

    def done(seq: Sequence) -> bool:
        return seq.num_output_tokens + 1 >= seq.params.max_new_tokens or len(seq) + 1 >= max_len

    in_flight, total_steps = None, 3000
    for step in range(total_steps + 20000):
        arriving = step < total_steps
        if arriving and rng.random() < 0.3:
            seq = Sequence(f"r{step}", make_prompt(rng, stems), SamplingParams(max_new_tokens=rng.randrange(1, 30)))
            live[seq.request_id] = seq
            sched.add(seq)
        if arriving and live and rng.random() < 0.03:
            seq = live.pop(rng.choice(sorted(live)))
            stats["aborted_in_flight"] += in_flight is not None and seq in in_flight[0].seqs
            sched.finish(seq)
        prev, in_flight = in_flight, None
        if prev is not None:
            batch = sched.schedule_lookahead(prev[0], done)
            if batch is not None:
                assert batch.num_tokens <= config.max_num_batched_tokens and not batch.preempted
                resumes = {id(s): a + k for s, a, k, sample in zip(*(getattr(prev[0], f) for f in (
                    "seqs", "starts", "num_new_tokens", "samples"))) if not sample}
                for seq, start, n, row in zip(batch.seqs, batch.starts, batch.num_new_tokens,
                                              batch.input_rows or [None] * len(batch)):
                    # a decoding sequence computes the token in flight; a prefilling one its next chunk, from
                    # where the step in flight leaves it; an admitted one starts where it was cached
                    if row is not None:
                        assert (n, start) == (1, len(seq))
                    else:
                        assert start == resumes.get(id(seq), seq.num_computed_tokens)
                        stats["resumed"] += id(seq) in resumes
                in_flight = launch(batch)
                stats["lookahead"] += 1
                stats["admitted"] += batch.input_rows is None or None in batch.input_rows
            collect(prev)
        if in_flight is None:
            batch = sched.schedule()
            if batch.seqs:
                in_flight = launch(batch)
        check_invariants(bm, sched)
        if not arriving and not sched.has_unfinished() and in_flight is None:
            break
    assert not live and bm.num_free == bm.num_blocks
    assert stats["finished"] > 300 and stats["aborted_in_flight"] > 5 and stats["discarded"] > 50
    assert stats["lookahead"] > 500 and stats["admitted"] > 100 and sched.num_preemptions > 0
    assert stats["resumed"] > (100 if config.max_num_batched_tokens < 64 else 5), stats  # prefills continued ahead
    assert (stats["tail_copies"] > 0) == prefix_caching, stats  # image tails reused, in lookahead steps too


def test_step_timeline_benchmark_mechanics(tmp_path):
    """benchmarks/step_timeline_gpu.py --dry-run: captioning on the tiny model, step by step, with a budget that
    chunks every prompt: the later chunks are launched ahead ("prefill+ahead"), no step fails, and every step of
    the JSON holds what the GPU run reads (kind, images, tokens, timings)."""
    root = Path(__file__).parents[1]
    out = tmp_path / "timeline.json"
    run = subprocess.run([sys.executable, "benchmarks/step_timeline_gpu.py", "--dry-run", "--budgets", "16,8192",
                          "--out", str(out)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "engine step failed" not in run.stderr, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    chunked, whole = data["16"], data["8192"]
    kinds = {s["kind"] for s in chunked["steps"]}
    assert {"prefill", "prefill+ahead", "decode+ahead"} <= kinds, kinds
    assert [s["kind"] for s in chunked["steps"]].count("prefill") == 1  # every step after the first launched ahead
    assert sum(s["images"] for s in chunked["steps"]) == 8 == sum(s["images"] for s in whole["steps"])
    assert whole["summary"]["images_per_encoding_step"] == 8  # all eight prompts fit one step
    assert all(s["gpu_end_ms"] >= s["gpu_start_ms"] >= 0 for s in chunked["steps"])
    assert "budget 16: 8 images in" in run.stdout

"""The engine against the simple reference loop: greedy output token for token equal to `generate_ids`
run on each request alone, under continuous batching, staggered arrivals, chunked prefill, preemption
and the prefix cache; images and video; stops, penalties, seeds; every KV block back at the end.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cogvlm2.engine import LLM, EngineConfig, LLMEngine
from cogvlm2.llm import load_processor_and_model
from cogvlm2.generation import generate_ids
from cogvlm2.processing.prompt import ModelInputs
from cogvlm2.sampling_params import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def random_tiny(name: str, folder) -> tuple:
    """The tiny architecture with random weights over the whole vocabulary: the engine is checked against
    the reference loop, and a random model's long, varied greedy outputs (unlike the trained model's short
    answers, then EOS after EOS when EOS is ignored) exercise stops, lengths and image-dependence."""
    from cogvlm2.tiny.recipe import initial_checkpoint

    return load_processor_and_model(str(initial_checkpoint(name, folder, list(range(128256)), seed=0)), device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_tiny("tiny", tmp_path_factory.mktemp("random-tiny") / "ckpt")


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    return random_tiny("tiny-video", tmp_path_factory.mktemp("random-tiny-video") / "ckpt")


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (120, 160, 3), dtype=torch.uint8, generator=g).numpy())


def reference(model, x: ModelInputs, params: SamplingParams) -> list[int]:
    """generate_ids on this request alone, cut at its stop id like the engine."""
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(model.config.eos_token_ids))
    out = []
    for (token,) in generate_ids(model, [x], params):
        out.append(token)
        if token in stops:
            break
    return out


def forget_tail_hashes(engine: LLMEngine) -> None:
    """The block manager's prefix-cache tail hashes dropped (as if evicted); its full-block hashes stay."""
    bm = engine.block_manager
    bm.tail_of.clear()
    bm.tail_hash_of = [None] * bm.num_blocks


def run(engine: LLMEngine, requests: list[tuple[int, str, ModelInputs, SamplingParams]]) -> dict:
    """requests = (arrival step, id, inputs, params); step until all finish; final outputs by id."""
    done, step = {}, 0
    pending = sorted(requests, key=lambda r: r[0])
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, x, p = pending.pop(0)
            engine.add_request(rid, x, p)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    assert_all_free(engine)
    return done


def assert_all_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total, "KV blocks leaked"
    assert stats.num_running == stats.num_waiting == 0
    assert not engine.runner.vision_cache, "vision features outlived their requests"


def mixed_requests(processor) -> list[tuple[int, str, ModelInputs, SamplingParams]]:
    return [
        (0, "short", processor("Hi"), SamplingParams(max_new_tokens=12, **GREEDY)),
        (0, "image-a", processor("What is in the picture?", image=image(1)), SamplingParams(max_new_tokens=10, **GREEDY)),
        (1, "long", processor("Tell me a long story about a cat and a dog. " * 8), SamplingParams(max_new_tokens=8, **GREEDY)),
        (3, "image-b", processor("Describe it.", history=[("Hi", "Hello!")], image=image(2)),
         SamplingParams(max_new_tokens=14, **GREEDY)),
        (5, "image-a-again", processor("What is in the picture?", image=image(1)), SamplingParams(max_new_tokens=6, **GREEDY)),
        (6, "penalties", processor("Repeat after me: la la la"),
         SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.5, presence_penalty=0.5,
                        frequency_penalty=0.7, ignore_eos=True)),
    ]


ENGINE_CONFIGS = {
    "default": dict(),
    "chunked": dict(max_num_batched_tokens=24, block_size=8),
    "preempt": dict(num_kv_blocks=8, block_size=16, max_model_len=128, max_num_batched_tokens=64),
    "no-prefix-cache": dict(enable_prefix_caching=False, max_num_seqs=2),
}


@pytest.mark.parametrize("name", list(ENGINE_CONFIGS))
def test_greedy_matches_reference(tiny, name):
    model, processor = tiny
    engine = LLMEngine(model, EngineConfig(**ENGINE_CONFIGS[name]), processor)
    requests = mixed_requests(processor)
    done = run(engine, requests)
    for _, rid, x, p in requests:
        assert done[rid].token_ids == reference(model, x, p), rid
        assert done[rid].finish_reason == "length"
    if name == "preempt":
        assert engine.scheduler.num_preemptions > 0
    if name == "default":
        assert done["image-a-again"].num_cached_tokens > 0  # same image, same prompt: prefix hit


def test_video_chunked(tiny_video):
    model, processor = tiny_video
    g = torch.Generator().manual_seed(3)
    frames = [torch.randint(0, 256, (3, t, 64, 80), dtype=torch.uint8, generator=g) for t in (2, 3)]
    requests = [(i, f"video-{i}", processor(q, video=f), SamplingParams(max_new_tokens=8, **GREEDY))
                for i, (q, f) in enumerate([("What happens?", frames[0]), ("Describe the video.", frames[1])])]
    requests.append((1, "text", processor("Hello video model"), SamplingParams(max_new_tokens=5, **GREEDY)))
    engine = LLMEngine(model, EngineConfig(max_num_batched_tokens=40, block_size=16), processor)
    done = run(engine, requests)
    for _, rid, x, p in requests:
        assert done[rid].token_ids == reference(model, x, p), rid


def test_prefix_cache_second_turn(tiny):
    model, processor = tiny
    warm = LLMEngine(model, EngineConfig(block_size=8), processor)
    p = SamplingParams(max_new_tokens=6, **GREEDY)
    first = processor("What is this?", image=image(5))
    out1 = run(warm, [(0, "turn-1", first, p)])["turn-1"]
    second = processor("And the colors?", history=[("What is this?", out1.text)], image=image(5))
    out2 = run(warm, [(0, "turn-2", second, p)])["turn-2"]
    assert out2.num_cached_tokens >= processor.config.vision.tokens_per_image, "the image's blocks were not reused"
    cold = run(LLMEngine(model, EngineConfig(block_size=8), processor), [(0, "cold", second, p)])["cold"]
    assert cold.num_cached_tokens == 0
    assert out2.token_ids == cold.token_ids == reference(model, second, p)


def test_different_images_do_not_share(tiny):
    model, processor = tiny
    engine = LLMEngine(model, EngineConfig(block_size=8), processor)
    p = SamplingParams(max_new_tokens=8, **GREEDY)
    a, b = processor("Describe.", image=image(7)), processor("Describe.", image=image(8))
    assert a.input_ids == b.input_ids  # same placeholders: only the vision hash differs
    out_a = run(engine, [(0, "a", a, p)])["a"]
    out_b = run(engine, [(0, "b", b, p)])["b"]
    assert out_b.num_cached_tokens == 0
    assert out_a.token_ids == reference(model, a, p) and out_b.token_ids == reference(model, b, p)
    assert out_a.token_ids != out_b.token_ids
    both = run(engine, [(0, "b", b, p), (0, "a", a, p)])  # concurrently, both cached from before
    assert both["a"].token_ids == out_a.token_ids and both["b"].token_ids == out_b.token_ids


def test_stops_and_lengths(tiny):
    model, processor = tiny
    x = processor("Count with me")
    ref = reference(model, x, SamplingParams(max_new_tokens=12, **GREEDY))
    tok = processor.tokenizer
    engine = LLMEngine(model, EngineConfig(), processor)
    stop_text = tok.decode(ref[5:7])
    prefix_text = tok.decode(ref[:5])
    assert stop_text.strip() and stop_text not in prefix_text
    requests = [
        (0, "stop-id", x, SamplingParams(max_new_tokens=12, stop_token_ids=[ref[3]], **GREEDY)),
        (0, "stop-str", x, SamplingParams(max_new_tokens=12, stop=[stop_text], **GREEDY)),
        (0, "length", x, SamplingParams(max_new_tokens=4, **GREEDY)),
        (0, "eos", x, SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[ref[2]])),
    ]
    done = run(engine, requests)
    assert done["stop-id"].token_ids == ref[:4] and done["stop-id"].finish_reason == "stop"
    assert done["stop-id"].stop_reason == ref[3]
    s = done["stop-str"]
    assert s.finish_reason == "stop" and s.stop_reason == stop_text and s.token_ids == ref[:7]
    assert tok.decode(ref[:7]).startswith(s.text) and stop_text not in s.text
    assert done["length"].token_ids == ref[:4] and done["length"].finish_reason == "length"
    assert done["eos"].token_ids == ref[:3]


def test_max_model_len_and_validation(tiny):
    model, processor = tiny
    engine = LLMEngine(model, EngineConfig(max_model_len=32, num_kv_blocks=4), processor)
    x = processor("Hi")
    out = run(engine, [(0, "r", x, SamplingParams(max_new_tokens=100, **GREEDY))])["r"]
    assert out.finish_reason == "length" and len(x) + len(out.token_ids) == 32
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", processor("word " * 40), SamplingParams())
    engine.add_request("dup", x, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("dup", x, SamplingParams())
    engine.abort("dup")
    with pytest.raises(ValueError, match="num_kv_blocks"):
        LLMEngine(model, EngineConfig(max_model_len=128, num_kv_blocks=4), processor)
    with pytest.raises(ValueError):
        EngineConfig(block_size=12)


def test_abort_frees_blocks(tiny):
    model, processor = tiny
    engine = LLMEngine(model, EngineConfig(max_num_batched_tokens=16), processor)
    engine.add_request("a", processor("first request " * 5), SamplingParams(max_new_tokens=50, **GREEDY))
    engine.add_request("b", processor("second"), SamplingParams(max_new_tokens=5, **GREEDY))
    engine.add_request("c", processor("third", image=image(4)), SamplingParams(max_new_tokens=50, **GREEDY))
    for _ in range(4):
        engine.step()
    assert engine.abort("a") and engine.abort("c") and not engine.abort("nope")
    outs = {o.request_id: o for o in engine.step()}
    assert outs["a"].finished and outs["a"].finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert_all_free(engine)


def test_seeded_sampling(tiny):
    model, processor = tiny
    x, other = processor("Tell me something"), processor("Something else entirely", image=image(9))
    p = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = run(LLMEngine(model, EngineConfig(), processor), [(0, "x", x, p)])["x"].token_ids
    mixed = run(LLMEngine(model, EngineConfig(max_num_batched_tokens=16), processor),
                [(0, "o", other, SamplingParams(max_new_tokens=20, temperature=1.0)), (2, "x", x, p)])
    assert mixed["x"].token_ids == alone
    assert alone == reference(model, x, p)  # the same draws as the reference loop with that seed
    unseeded = run(LLMEngine(model, EngineConfig(), processor),
                   [(0, str(i), x, SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)) for i in range(2)])
    assert unseeded["0"].token_ids != unseeded["1"].token_ids


def test_llm_generate(tiny):
    model, processor = tiny
    llm = LLM(model, max_num_batched_tokens=32)
    prompts = ["Hi", {"query": "What is it?", "image": image(1)}, processor("Tokens in")]
    outs = llm.generate(prompts, [SamplingParams(max_new_tokens=n, **GREEDY) for n in (3, 4, 5)], use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [3, 4, 5]
    assert outs[1].token_ids == reference(model, processor("What is it?", image=image(1)),
                                           SamplingParams(max_new_tokens=4, **GREEDY))
    assert outs[0].text == processor.tokenizer.decode(outs[0].token_ids)
    assert_all_free(llm.engine)


def test_decode_graph_buffers_eagerly(tiny):
    """The CUDA-graph decode path (static buffers, bucket padding into the null block, batched
    decode attention) replayed eagerly on the CPU: same tokens as the reference."""
    from cogvlm2.engine.cuda_graph import DecodeGraphs

    model, processor = tiny
    config = EngineConfig(max_model_len=256, cuda_graph_batch_sizes=(1, 2, 4), max_num_seqs=8)
    engine = LLMEngine(model, config, processor)
    graphs = DecodeGraphs(model, engine.runner.kv, engine.config, engine.runner.attend, capture=False)
    used = []
    run_graph = graphs.run
    graphs.run = lambda rows: used.append(len(rows[0])) or run_graph(rows)
    engine.runner.graphs = graphs
    requests = [(i, f"r{i}", processor(f"Prompt number {i} " * (i + 1), image=image(i) if i % 2 else None),
                 SamplingParams(max_new_tokens=6 + i, **GREEDY)) for i in range(6)]
    done = run(engine, requests)
    for _, rid, x, p in requests:
        assert done[rid].token_ids == reference(model, x, p), rid
    assert {3, 4} & set(used) and max(used) <= 4  # padded buckets were exercised


def test_text_chunks_replay_the_decode_graph_buffers(tiny):
    """Steps whose tokens are all text (a second turn over a cached image, a short text prompt, with
    decoding sequences beside them) run as decode-shaped rows through the graph buffers (eager on the
    CPU): one row per token, each with its own context. Same tokens as the reference; longer or
    image-bearing chunks still take the eager path."""
    from cogvlm2.engine.cuda_graph import DecodeGraphs

    model, processor = tiny
    config = EngineConfig(max_model_len=256, cuda_graph_batch_sizes=(1, 2, 4, 8, 16, 32), max_num_seqs=32,
                          block_size=8)
    engine = LLMEngine(model, config, processor)
    graphs = DecodeGraphs(model, engine.runner.kv, engine.config, engine.runner.attend, capture=False)
    rows_per_run = []
    run_graph = graphs.run
    graphs.run = lambda rows: rows_per_run.append(rows[1]) or run_graph(rows)
    engine.runner.graphs = graphs
    eager = []
    forward_eager = engine.runner._forward_eager
    engine.runner._forward_eager = (lambda batch, source=None: eager.append(sum(batch.num_new_tokens))
                                    or forward_eager(batch, source))
    p = SamplingParams(max_new_tokens=6, **GREEDY)
    first = processor("Describe the picture.", image=image(21))
    out = run(engine, [(0, "turn1", first, p)])["turn1"]
    assert out.token_ids == reference(model, first, p)
    assert eager  # the image-bearing prompt ran eagerly
    answer = processor.tokenizer.decode(out.token_ids)
    second = processor("And the colours?", history=[("Describe the picture.", answer)], image=image(21))
    text_only = processor("Hi")
    rows_per_run.clear(), eager.clear()
    requests = [(0, "turn2", second, p), (2, "text", text_only, SamplingParams(max_new_tokens=5, **GREEDY))]
    done = run(engine, requests)
    for _, rid, x, q in requests:
        assert done[rid].token_ids == reference(model, x, q), rid
    assert done["turn2"].num_cached_tokens >= len(first) - config.block_size
    new = len(second) - done["turn2"].num_cached_tokens
    assert 1 < new <= 32
    # the second turn's new tokens: one run whose rows are that many consecutive positions
    assert any(len(r) >= new and r[:new] == list(range(r[0], r[0] + new)) for r in rows_per_run), rows_per_run
    assert not eager, eager  # nothing of these requests ran eagerly
    # a text chunk longer than the largest graph (32 rows) takes the eager path
    long_text = processor("word " * 40)
    eager.clear()
    done = run(engine, [(0, "long", long_text, p)])
    assert done["long"].token_ids == reference(model, long_text, p) and eager and max(eager) > 32


def test_prefix_hit_ending_inside_the_image(tiny):
    """Only the first blocks of an image survive in the cache (evicted tail): the request resumes
    mid-image, encoding the image for the remaining vision tokens."""
    from cogvlm2.engine.sequence import Sequence

    model, processor = tiny
    engine = LLMEngine(model, EngineConfig(block_size=8), processor)
    x = processor("Describe.", image=image(11))
    p = SamplingParams(max_new_tokens=5, **GREEDY)
    run(engine, [(0, "a", x, p)])
    bm = engine.block_manager
    keep = {bm._hash(Sequence("probe", x, p), i) for i in range(1)}
    for h in [h for h in bm.block_of if h not in keep]:  # evict everything after block 0
        bm.hash_of[bm.block_of.pop(h)] = None
    out = run(engine, [(0, "b", x, p)])["b"]
    assert out.num_cached_tokens == 8 and x.token_type_ids[8] == 1
    assert out.token_ids == reference(model, x, p)


def test_new_question_on_a_cached_image_reuses_its_tail(tiny):
    """A second prompt over the same image (another question) hits the cached blocks up to the end of the image:
    the full blocks by their hashes, the image's last rows (in a block that goes on with the first question) by
    that block's tail hash, copied into a block of its own. Nothing of the image is computed again, so the step
    is plain text, and the answer equals the reference. Without the tail hash the hit ends inside the image and
    those vision rows come from the kept tail of the first encoding (the tower does not run again); with that
    evicted too, the image is encoded again. Every answer equals the reference."""
    from cogvlm2.engine import runner as runner_module
    from cogvlm2.engine.sequence import Sequence

    model, processor = tiny
    engine = LLMEngine(model, EngineConfig(block_size=8), processor)
    p = SamplingParams(max_new_tokens=5, **GREEDY)
    questions = ("What is this?", "Describe it briefly.", "Anything else?", "And the colours?")
    prompts = [processor(q, image=image(12)) for q in questions]
    expected = [reference(model, x, p) for x in prompts]
    vision = [i for i, t in enumerate(prompts[1].token_type_ids) if t == 1]
    encodes, copies, plain = [], [], []
    encode, copy_rows, launch = model.encode_images, engine.runner.kv.copy_rows, engine.runner.launch
    model.encode_images = lambda pixels: encodes.append(len(pixels)) or encode(pixels)
    engine.runner.kv.copy_rows = lambda c: copies.append(list(c)) or copy_rows(c)
    # whether each step is plain text (on CUDA: decode rows under the graphs, not an eager mixed step)
    engine.runner.launch = lambda batch, *a: plain.append(engine.runner._is_plain_text(batch)) or launch(batch, *a)
    bm = engine.block_manager
    try:
        run(engine, [(0, "first", prompts[0], p)])
        assert encodes == [1] and not engine.runner.vision_cache  # the features themselves are released
        assert len(bm.tail_of) == 1  # the image ends inside a block, the first question goes on in it
        plain.clear()
        out = run(engine, [(0, "second", prompts[1], p)])["second"]
        end = Sequence("probe", prompts[1], p).vision_end
        assert out.num_cached_tokens == end > vision[-1] and end % 8
        [[(src, dst, rows)]] = copies
        assert rows == end % 8 and src != dst and plain[0]  # its first step: the question alone, plain text
        assert encodes == [1] and out.token_ids == expected[1]
        forget_tail_hashes(engine)  # no tail hash (evicted, say): the kept feature rows serve the image's last rows
        out = run(engine, [(0, "third", prompts[2], p)])["third"]
        assert vision[0] < out.num_cached_tokens <= vision[-1]  # the hit ends inside the image
        assert encodes == [1] and out.token_ids == expected[2] and len(copies) == 1
        forget_tail_hashes(engine)  # both evicted (other images since)
        engine.runner.vision_tails.clear()
        out = run(engine, [(0, "fourth", prompts[3], p)])["fourth"]
        assert encodes == [1, 1] and out.token_ids == expected[3]
        assert len(engine.runner.vision_tails) == 1 and runner_module.VISION_TAILS >= 64
    finally:
        del model.encode_images


def test_a_burst_of_images_is_encoded_in_bounded_tower_passes(tiny, monkeypatch):
    """One step admitting several new images runs the vision tower in passes of at most VISION_PIXELS pixels
    (here: two images a pass), so its activations do not grow with the burst; the answers equal the reference."""
    from cogvlm2.engine import runner as runner_module

    model, processor = tiny
    prompts = [processor(f"Question {i}?", image=image(40 + i)) for i in range(5)]
    side = prompts[0].pixel_values.shape[-1]
    monkeypatch.setattr(runner_module, "VISION_PIXELS", 2 * side * side)
    p = SamplingParams(max_new_tokens=4, **GREEDY)
    expected = [reference(model, x, p) for x in prompts]
    engine = LLMEngine(model, EngineConfig(), processor)
    passes = []
    encode = model.encode_images
    model.encode_images = lambda pixels: passes.append(len(pixels)) or encode(pixels)
    try:
        done = run(engine, [(0, f"r{i}", x, p) for i, x in enumerate(prompts)])
    finally:
        del model.encode_images
    assert passes == [2, 2, 1]  # all five admitted into one step, encoded two at a time
    assert [done[f"r{i}"].token_ids for i in range(5)] == expected


def test_the_kv_pool_profile_covers_the_largest_tower_pass():
    """memory.tower_pass (what the KV pool's sizing encodes) is the largest pass the runner makes: four 1344^2
    images, 144 video frames at 224^2 (six 24-frame videos), fewer when the step's sequences cannot bring more."""
    from cogvlm2.engine.memory import tower_pass
    from cogvlm2.engine.runner import _tower_passes

    assert tower_pass(1344, 1, EngineConfig(max_num_seqs=64)) == 4
    assert tower_pass(224, 24, EngineConfig(max_num_seqs=64)) == 144
    assert tower_pass(224, 24, EngineConfig(max_num_seqs=2)) == 48
    assert tower_pass(4096, 1, EngineConfig()) == 1  # an image past the budget is still encoded, alone
    for size, frames, seqs in [(1344, 1, 64), (224, 24, 64), (224, 24, 2), (64, 1, 8)]:
        media = [(f"m{i}", torch.zeros(frames, 3, size, size)) for i in range(seqs)]
        largest = max(sum(p.shape[0] for _, p in group) for group in _tower_passes(media))
        assert largest <= tower_pass(size, frames, EngineConfig(max_num_seqs=seqs)), (size, frames, seqs)


def test_a_kv_cache_too_small_says_what_the_process_cannot_free(monkeypatch):
    """When the profile finds this process's allocator holding free memory it cannot return (a cached segment shared
    with a live tensor), the error says how much, where, and what to do; below 1 GiB it adds nothing. Releasing
    cached memory touches nothing for CPU devices, nor for CUDA devices before CUDA's first use."""
    import contextlib
    import gc

    from cogvlm2.devices import release_cached_memory
    from cogvlm2.engine.memory import _held_hint

    hint = _held_hint({torch.device("cuda", 0): 3 * 2**30, torch.device("cuda", 1): 2**20})
    assert "3.0 GiB on cuda:0" in hint and "torch.cuda.empty_cache()" in hint and "num_kv_blocks" in hint
    assert _held_hint({torch.device("cuda", 0): 2**29}) == ""
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("gc"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "device", lambda d: calls.append(d))  # a CUDA device would be entered
    release_cached_memory(["cpu", torch.device("cpu")])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    release_cached_memory(["cuda:0"])
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda d: calls.append(d) or contextlib.nullcontext())
    release_cached_memory(["cpu", "cuda:1", torch.device("cuda", 1), "cuda:0"])
    assert calls == ["gc", torch.device("cuda", 0), "empty_cache", torch.device("cuda", 1), "empty_cache"]


def test_gc_freeze_keeps_a_built_engine_out_of_collections_until_the_next_build(monkeypatch):
    """engine.core.GC_FREEZE: a built engine's heap is frozen (out of the collector's reach); an engine dropped while
    frozen, even in a reference cycle, is collected when the next engine is built (its build thaws, then freezes
    again); thaw_heap undoes it all, and with the switch off nothing is frozen."""
    import gc
    import weakref

    from cogvlm2 import devices
    from cogvlm2.engine import core

    model, _ = load_processor_and_model("tiny", device="cpu", dtype="float32")
    monkeypatch.setattr(core, "GC_FREEZE", True)
    try:
        first = core.EngineCore(model, EngineConfig(num_kv_blocks=16, max_model_len=256))
        assert gc.get_freeze_count() > 0
        first.cycle = first  # only the collector can free it
        gone = weakref.ref(first.block_manager)
        del first
        gc.collect()
        assert gone() is not None  # frozen: a full collection does not reach it
        second = core.EngineCore(model, EngineConfig(num_kv_blocks=16, max_model_len=256))
        assert gone() is None and gc.get_freeze_count() > 0
        second.cycle = second
    finally:
        devices.thaw_heap()
    assert gc.get_freeze_count() == 0
    monkeypatch.setattr(core, "GC_FREEZE", False)
    core.EngineCore(model, EngineConfig(num_kv_blocks=16, max_model_len=256))
    assert gc.get_freeze_count() == 0

"""The engine on CUDA (CUDA graphs + flash prefill + Triton paged decode) against the reference loop."""

import pytest
import torch
from PIL import Image

from cogvlm2.llm import LLM
from cogvlm2.generation import generate_ids
from cogvlm2.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("prefetch", [False, True])
def test_engine_cuda_greedy_equals_reference(prefetch, monkeypatch):
    """prefetch: decode attention's first K / V tile loaded before its PDL wait after the fused QKV kernel
    (decode_attention.PREFETCH), graphs captured so."""
    from cogvlm2.engine.kernels import decode_attention

    monkeypatch.setattr(decode_attention, "PREFETCH", prefetch)
    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM("tiny", dtype="float32", device="cuda", max_num_seqs=8, max_num_batched_tokens=96)
    assert llm.engine.runner.graphs is not None  # decode steps replay CUDA graphs
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (20, 20, 20)]
    prompts = [llm.processor("Describe the image.", image=Image.new("RGB", (64, 48), c)) for c in colours]
    prompts += [llm.processor("Tell me a joke."), llm.processor("What is two plus two?", [("Hi", "Hello!")])]
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for x, out in zip(prompts, outs):
        ref = [t[0] for t in generate_ids(llm.engine.model, [x], params)]
        assert out.token_ids == ref
    stats = llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_engine_cuda_half_precision_runs_and_is_deterministic(dtype):
    llm = LLM("tiny", dtype=dtype, device="cuda", max_num_seqs=4)
    prompts = [llm.processor("Describe.", image=Image.new("RGB", (32, 32), (i * 60, 0, 0))) for i in range(4)]
    params = SamplingParams(max_new_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    a = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    b = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert a == b and all(len(t) == 16 for t in a)


def test_engine_cuda_async_equals_sync():
    """Async scheduling on CUDA with graphs (lookahead decode fed the sampled ids on the device, pinned
    landing buffers behind CUDA events, staging buffers used in turn, persistent graph block tables,
    arrivals admitted into lookahead steps) against the synchronous engine: the same streams, greedy rows
    equal to the reference; stop id, stop string, penalties, a seed and an abort mid-stream included."""
    from test_engine_overlap import _raise, count_lookaheads, stream, summary

    from cogvlm2.engine import EngineConfig, LLMEngine
    from cogvlm2.llm import load_processor_and_model

    torch.backends.cuda.matmul.allow_tf32 = False
    model, processor = load_processor_and_model("tiny-random", dtype="float32", device="cuda")  # varied tokens
    greedy = dict(temperature=0, ignore_eos=True)
    x = processor("Count with me")
    ref = [t[0] for t in generate_ids(model, [x], SamplingParams(max_new_tokens=12, **greedy))]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (20, 20, 20)]
    requests = [(i, f"image-{i}", processor("Describe the image.", image=Image.new("RGB", (64, 48), c)),
                 SamplingParams(max_new_tokens=24 + 4 * i, **greedy)) for i, c in enumerate(colours)]
    requests += [
        (1, "stop-id", x, SamplingParams(max_new_tokens=12, stop_token_ids=[ref[3]], **greedy)),
        (1, "stop-str", x, SamplingParams(max_new_tokens=12, stop=[processor.tokenizer.decode(ref[5:7])], **greedy)),
        (2, "penalties", processor("la la la"),
         SamplingParams(max_new_tokens=16, repetition_penalty=1.3, frequency_penalty=0.5, **greedy)),
        (2, "seeded", processor("Tell me a joke."),
         SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)),
        (3, "abort-mid", processor("What is two plus two?"), SamplingParams(max_new_tokens=40, **greedy)),
        # arrivals mid-decode, admitted into lookahead steps: a short text (the decode-graph text rows, the
        # decoding rows' ids from the device) and an image (eager)
        (8, "late-text", processor("Hi there"), SamplingParams(max_new_tokens=6, **greedy)),
        (9, "late-image", processor("And this one?", image=Image.new("RGB", (40, 40), (9, 99, 199))),
         SamplingParams(max_new_tokens=6, **greedy)),
        # a prompt of several 96-token chunks: each after the first launched ahead of the previous step's ids
        (10, "long", processor("one two three four " * 60), SamplingParams(max_new_tokens=6, **greedy)),
    ]
    results = {}
    for async_scheduling in (False, True):
        # an explicit pool: sizing from free memory would see the previous engine's pool still alive
        engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=96, num_kv_blocks=4096,
                                               async_scheduling=async_scheduling), processor)
        assert engine.runner.graphs is not None
        counts = count_lookaheads(engine)
        engine.core._recover = _raise  # no step may fail (a retry alone would hide it: same tokens, slower)
        results[async_scheduling] = {rid: summary(o) for rid, o in
                                     stream(engine, requests, abort_at={"abort-mid": 6}).items()}
    assert counts["lookahead"] > 10 and counts["admitted"] >= 2 and counts["resumed"] >= 2, counts
    assert results[True] == results[False]
    for _, rid, xi, p in requests:
        if rid == "seeded":
            continue
        expect = [t[0] for t in generate_ids(model, [xi], p)]
        tokens = results[True][rid][0]
        assert tokens == expect[:len(tokens)], rid
    (_, _, xa, pa), = [r for r in requests if r[1] == "abort-mid"]
    assert results[True]["abort-mid"][0] == [t[0] for t in generate_ids(model, [xa], pa)][:6]
    assert results[True]["stop-id"][2:] == ("stop", ref[3])


def _graph_engine():
    """The tiny model on CUDA in fp32, an engine with decode graphs up to 32 rows, and the list that records the
    rows of every graph replay."""
    from cogvlm2.engine import EngineConfig, LLMEngine
    from cogvlm2.llm import load_processor_and_model

    torch.backends.cuda.matmul.allow_tf32 = False
    model, processor = load_processor_and_model("tiny-random", dtype="float32", device="cuda")
    # a fixed pool: the earlier tests' engines may still hold this GPU's memory (profiling would find none left)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=32, block_size=16, num_kv_blocks=256, max_model_len=1024),
                       processor)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.sizes[-1] == 32
    rows = []
    replay = graphs.run
    graphs.run = lambda r: rows.append(len(r[1])) or replay(r)
    return model, processor, engine, rows


def _answer_equals_reference(model, engine, x, params):
    """x run alone on the engine; its output, whose tokens equal the reference loop's."""
    engine.add_request("r", x, params)
    while engine.has_unfinished():
        outs = engine.step()
        if outs and outs[0].finished:
            out = outs[0]
    assert out.token_ids == [t[0] for t in generate_ids(model, [x], params)]
    return out


def test_engine_cuda_second_turn_replays_the_decode_graph():
    """A second turn over a cached image: its text tokens run as decode-shaped rows in a captured CUDA
    graph (Triton paged decode, one context length per row), and the answer equals the reference's."""
    model, processor, engine, rows = _graph_engine()
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    img = Image.new("RGB", (64, 48), (200, 30, 90))
    # a first question long enough that the cached whole blocks cover every image token (the tiny
    # model's image ends at position 66: "Describe the image." would cache 64 and leave 3 vision tokens,
    # which the next test's tail hit covers)
    question = "Describe the image in great detail, with its colours, shapes and size."
    first = processor(question, image=img)
    second = processor("And its colour?", history=[(question, "A square.")], image=img)
    for x in (first, second):
        rows.clear()
        out = _answer_equals_reference(model, engine, x, params)
    last_vision = max(i for i, t in enumerate(second.token_type_ids) if t)
    assert out.num_cached_tokens > last_vision  # the second turn's new tokens are text only
    assert max(rows) == out.prompt_len - out.num_cached_tokens  # ... and ran as one graph replay


def test_engine_cuda_new_question_on_a_cached_image_replays_the_decode_graph():
    """A new question over a cached image whose last rows end inside a block the first question goes on in: the
    step copies those rows' K/V (the block's tail hash), so the question's text alone runs, as one decode-graph
    replay, and each answer equals the reference's."""
    model, processor, engine, rows = _graph_engine()
    copies = []
    copy_rows = engine.runner.kv.copy_rows
    engine.runner.kv.copy_rows = lambda c: copies.append(list(c)) or copy_rows(c)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    img = Image.new("RGB", (64, 48), (200, 30, 90))
    for q in ("Describe the image.", "What colour is it?"):  # the image ends at position 66: 3 rows in block 4
        x = processor(q, image=img)
        rows.clear()
        out = _answer_equals_reference(model, engine, x, params)
    last_vision = max(i for i, t in enumerate(x.token_type_ids) if t)
    assert out.num_cached_tokens == last_vision + 1 and [[(c[0] != c[1], c[2]) for c in cs] for cs in copies] == [
        [(True, (last_vision + 1) % 16)]]
    assert max(rows) == out.prompt_len - out.num_cached_tokens  # the question's text, one graph replay


def test_engines_one_after_another_in_one_process():
    """An engine dropped, then a model loaded and an engine built in the same process (a notebook, `cogvlm2 eval`
    after another run, this test suite): the new weights and KV pool are not carved out of the dropped engine's
    cached pool (most of the GPU), so the second engine's memory profile sizes its KV cache as the first one's; an
    engine with an explicit num_kv_blocks in between changes nothing either."""
    import gc

    from cogvlm2.engine.config import EngineConfig
    from cogvlm2.llm import LLMEngine, load_processor_and_model

    def profiled_blocks(**kwargs):
        llm = LLM("tiny", dtype="float32", device="cuda", max_num_seqs=4, **kwargs)
        out = llm.generate([llm.processor("Hello")], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].token_ids) == 4
        return llm.engine.stats().kv_blocks_total

    gc.collect()
    torch.cuda.empty_cache()
    first = profiled_blocks()  # its KV pool is dropped on return and stays in the allocator's cache
    model, processor = load_processor_and_model("tiny", device="cuda", dtype="float32")
    small = LLMEngine(model, EngineConfig(num_kv_blocks=64, max_model_len=512), processor)
    assert small.stats().kv_blocks_total == 64
    second = profiled_blocks()
    assert abs(second - first) <= 0.02 * first, (first, second)

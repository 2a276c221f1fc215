"""Failure containment in the engine: no request's settings can make the sampler raise, a request whose
inputs cannot be processed fails alone, and a failing step fails only the requests it can blame."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from cogvlm2.engine import AsyncLLM, EngineConfig, LLMEngine
from cogvlm2.async_llm import EngineRequestError
from cogvlm2.llm import load_processor_and_model
from cogvlm2.engine.sampler import Sampler
from cogvlm2.engine.sequence import Sequence
from cogvlm2.processing.prompt import ModelInputs
from cogvlm2.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    return load_processor_and_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return load_processor_and_model("tiny", device="cuda", dtype="float32")


def seqs_with(*params: SamplingParams) -> list[Sequence]:
    return [Sequence(f"r{i}", ModelInputs([1, 2, 3], [0, 0, 0], [0, 1, 2]), p) for i, p in enumerate(params)]


def test_sampler_never_raises_on_degenerate_settings_or_logits():
    torch.manual_seed(0)
    vocab = 64
    logits = torch.randn(6, vocab)
    logits[3] = float("nan")  # a model fault on one row
    logits[4, :10] = float("inf")
    params = [SamplingParams(temperature=1e-40, seed=1), SamplingParams(temperature=0.7, repetition_penalty=1e-40, seed=2),
              SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.0, seed=4),
              SamplingParams(temperature=0.5, top_p=0.3, seed=5), SamplingParams(temperature=2.0, top_k=5)]
    ids = Sampler()(logits.clone(), seqs_with(*params))
    assert ids.shape == (6,) and bool(((ids >= 0) & (ids < vocab)).all())
    assert ids[0] == logits[0].argmax()  # a tiny temperature is greedy
    assert 0 <= int(ids[4]) < 10  # +inf logits win


def test_sampler_rows_with_finite_logits_are_unchanged():
    """The guards change nothing for ordinary rows: same ids as the plain formula, seed for seed."""
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.8, seed=11), SamplingParams(temperature=1.3, top_p=0.9, seed=12),
              SamplingParams(temperature=0.6, top_k=7, seed=13)]
    got = Sampler()(logits.clone(), seqs_with(*params))
    for i, p in enumerate(params):
        x = logits[i] / p.temperature
        if p.top_k:
            x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
        if p.top_p < 1:
            v, order = x.sort(descending=True)
            probs = v.softmax(-1)
            v = v.masked_fill(probs.cumsum(-1) - probs > p.top_p, float("-inf"))
            x = torch.empty_like(x).scatter_(0, order, v)
        want = torch.multinomial(x.softmax(-1), 1, generator=torch.Generator().manual_seed(p.seed))[0]
        assert int(got[i]) == int(want)


def test_bad_pixels_fail_alone_at_add_request(tiny):
    model, processor = tiny
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, max_model_len=512), processor)
    from PIL import Image

    good = processor("what?", image=Image.new("RGB", (16, 16), "white"))
    engine.add_request("good", good)  # its hash is remembered as checked: a later turn is not summed again
    assert good.vision_hash in engine.core._finite_pixels
    x = processor("what?", image=Image.new("RGB", (16, 16)))
    x.pixel_values = x.pixel_values.clone()
    x.pixel_values[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        engine.add_request("nan", x)
    engine.abort("good")
    while engine.has_unfinished():
        engine.step()
    x.pixel_values = x.pixel_values[:, :, :8]
    with pytest.raises(ValueError, match="pixel_values must be"):
        engine.add_request("shape", x)
    assert not engine.has_unfinished()


def test_processor_pixels_skip_the_finiteness_sum_until_changed(tiny, monkeypatch):
    """The Processor's pixels are finite by construction (normalized 8-bit media): the engine does not sum
    them on the way to the first token. Changed in place or replaced, they are checked again."""
    model, processor = tiny
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64, max_model_len=512), processor)
    from PIL import Image

    sums = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda t, *a, **k: sums.append(t.shape) or real_sum(t, *a, **k))
    x = processor("what?", image=Image.new("RGB", (16, 16), "navy"))
    assert x.pixels_known_finite
    engine.core.validate("a", x)
    assert x.pixel_values.shape not in sums
    z = processor("what?", image=Image.new("RGB", (16, 16), "teal"))
    z.pixel_values[0, 0, 0, 0] = float("inf")  # in place: the version counter moves
    assert not z.pixels_known_finite
    with pytest.raises(ValueError, match="NaN or infinite"):
        engine.core.validate("b", z)
    y = processor("what?", image=Image.new("RGB", (16, 16), "olive"))
    y.pixel_values = y.pixel_values.clone()  # replaced: a tensor the Processor did not make
    assert not y.pixels_known_finite
    engine.core.validate("c", y)
    assert y.pixel_values.shape in sums


@pytest.mark.parametrize("device, async_scheduling", [
    ("cpu", False), ("cpu", True),
    pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_a_failing_step_fails_only_the_request_to_blame(request, caplog, device, async_scheduling):
    """On CUDA with async scheduling a lookahead step is in flight when the failure hits."""
    model, processor = request.getfixturevalue("tiny" if device == "cpu" else "tiny_cuda")
    config = EngineConfig(num_kv_blocks=128, max_model_len=512, max_num_batched_tokens=64, async_scheduling=async_scheduling)
    greedy = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    prompts = {f"good{i}": processor(f"Question {i} about nothing in particular") for i in range(3)}

    clean = LLMEngine(model, config, processor)
    for rid, x in prompts.items():
        clean.add_request(rid, x, greedy)
    want = {}
    while clean.has_unfinished():
        want.update({o.request_id: o.token_ids for o in clean.step() if o.finished})

    engine = LLMEngine(model, config, processor)
    launch = engine.runner.launch
    calls = {"n": 0}

    def failing_launch(batch, source=None):  # fails whenever "bad" is in the batch, after its first token
        calls["n"] += 1
        if any(s.request_id == "bad" and s.num_output_tokens >= 1 for s in batch.seqs):
            raise RuntimeError("injected failure")
        return launch(batch, source)

    engine.runner.launch = failing_launch
    for rid, x in prompts.items():
        engine.add_request(rid, x, greedy)
    engine.add_request("bad", processor("I will break the step"), greedy)
    caplog.set_level(logging.WARNING, logger="cogvlm2.engine.core")
    final = {}
    for _ in range(200):
        if not engine.has_unfinished():
            break
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert {rid: final[rid].token_ids for rid in prompts} == want  # token for token as without "bad"
    assert all(final[rid].error is None and final[rid].finish_reason == "length" for rid in prompts)
    assert final["bad"].finish_reason == "abort" and "injected failure" in final["bad"].error
    blamed = [r for r in caplog.records if r.getMessage().startswith("request bad failed")]
    assert blamed and blamed[0].exc_info is not None
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total  # nothing leaked
    engine.add_request("after", processor("still serving?"), greedy)  # and it keeps serving
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert len(final["after"].token_ids) == 10


def test_async_llm_delivers_the_failure_to_its_request_only(tiny):
    model, processor = tiny

    async def main():
        engine = LLMEngine(model, EngineConfig(num_kv_blocks=128, max_model_len=512), processor)
        launch = engine.runner.launch

        def failing_launch(batch, source=None):
            if any(s.request_id == "bad" for s in batch.seqs):
                raise RuntimeError("boom")
            return launch(batch, source)

        engine.runner.launch = failing_launch
        async with AsyncLLM(engine) as llm:
            async def run(rid):
                out = None
                async for out in llm.generate(rid, processor(f"hi {rid}"), SamplingParams(max_new_tokens=6,
                                                                                           ignore_eos=True)):
                    pass
                return out

            results = await asyncio.gather(run("a"), run("bad"), run("b"), return_exceptions=True)
            assert isinstance(results[1], EngineRequestError) and "boom" in str(results[1])
            assert results[0].finish_reason == results[2].finish_reason == "length"
            assert llm.is_running

    asyncio.run(main())

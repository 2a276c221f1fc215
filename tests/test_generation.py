"""The reference generation loop: cache == no cache, sampling controls, stopping, streaming text."""

import dataclasses

import pytest
import torch
from PIL import Image

from cogvlm2.generation import apply_penalties, generate_ids, sample_token, stream_text
from cogvlm2.model import load_model
from cogvlm2.tiny import checkpoint_folder
from cogvlm2.model.attention import PaddedKVCache
from cogvlm2.model.batch import TokenSpan, flatten
from cogvlm2.processing import Processor
from cogvlm2.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    m = load_model(checkpoint_folder("tiny"), progress=False)
    return m, Processor.from_pretrained(m.checkpoint_path, m.config)


@pytest.fixture(scope="module")
def tiny_random():
    """Random weights: long greedy outputs without EOS, for stop mechanics (the trained tiny says a few words)."""
    m = load_model(checkpoint_folder("tiny-random"), progress=False)
    return m, Processor.from_pretrained(m.checkpoint_path, m.config)


def _run(model, inputs, **kw):
    return [t[0] for t in generate_ids(model, [inputs], SamplingParams(**kw))]


def test_kv_cache_matches_full_recompute(tiny):
    """Greedy with the cache == argmax of a fresh full forward over prompt + generated tokens."""
    model, proc = tiny
    x = proc("Describe the picture.", image=Image.new("RGB", (50, 80), (0, 128, 255)))
    tokens = _run(model, x, max_new_tokens=6, temperature=0, ignore_eos=True)
    ids = list(x.input_ids)
    with torch.no_grad():
        feats = model.encode_images(x.pixel_values).reshape(-1, model.config.hidden_size)
    for t in tokens:
        n = len(ids)
        pos = x.position_ids + list(range(x.next_position, x.next_position + n - len(x)))
        cache = PaddedKVCache(1, model.config.num_hidden_layers)
        cache.begin_step(torch.ones(1, n, dtype=torch.bool))
        span = TokenSpan(ids, pos, x.expert_segments, x.span().vision_slots)  # generated tokens: language weights
        with torch.no_grad():
            h = model(flatten([span]).to_batch(cache, feats))
        assert int(model.compute_logits(h[-1:]).argmax()) == t
        ids.append(t)


def test_seeded_sampling_is_reproducible(tiny):
    model, proc = tiny
    x = proc("Tell me a story.")
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, ignore_eos=True)
    a = _run(model, x, seed=7, **kw)
    assert a == _run(model, x, seed=7, **kw)
    assert a != _run(model, x, seed=8, **kw)
    assert _run(model, x, top_k=1, temperature=1.0, max_new_tokens=8, ignore_eos=True) == \
        _run(model, x, temperature=0, max_new_tokens=8, ignore_eos=True)


def test_top_k_top_p_restrict_support():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, SamplingParams(top_k=2), g) for _ in range(200)} == {0, 1}
    # softmax = [.64, .24, .09, .03, .01]: top_p 0.8 keeps the two most likely tokens
    assert {sample_token(logits, SamplingParams(top_p=0.8), g) for _ in range(200)} == {0, 1}


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(logits.clone(), torch.tensor([0, 1]), [], SamplingParams(repetition_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    out = apply_penalties(logits.clone(), torch.tensor([]), [2, 2, 3],
                          SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25]


def test_stops(tiny_random):
    model, proc = tiny_random
    x = proc("Hi")
    free = _run(model, x, max_new_tokens=10, temperature=0, ignore_eos=True)
    stopped = _run(model, x, max_new_tokens=10, temperature=0, stop_token_ids=[free[3]])
    assert stopped == free[:4]
    text = "".join(stream_text(model, proc.tokenizer, x, SamplingParams(max_new_tokens=10, temperature=0,
                                                                         ignore_eos=True)))
    assert text == proc.tokenizer.decode(free)
    cut = text[len(text) // 2:len(text) // 2 + 3]
    partial = "".join(stream_text(model, proc.tokenizer, x, SamplingParams(max_new_tokens=10, temperature=0,
                                                                            ignore_eos=True, stop=[cut])))
    assert partial == text[:text.find(cut)]


def test_context_limit_clamps_to_positions(tiny):
    """max_new_tokens beyond the positions left is cut to them with a warning (the official demos'
    2,048 on a video prompt), not refused; a prompt that leaves no position is refused."""
    model, proc = tiny
    x = proc("Hi", image=Image.new("RGB", (50, 80), (0, 128, 255)))
    config = model.config
    try:
        model.config = dataclasses.replace(config, max_position_embeddings=x.next_position + 5)
        with pytest.warns(UserWarning, match="max_new_tokens=100 cut to 6"):
            steps = list(generate_ids(model, [x], SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True)))
        assert len(steps) == 6 == x.output_budget(10**6, model.config.max_position_embeddings)
        assert len(x) > model.config.max_position_embeddings  # the image's tokens share positions
        model.config = dataclasses.replace(config, max_position_embeddings=x.next_position - 2)
        with pytest.raises(ValueError, match="max_position_embeddings"):
            list(generate_ids(model, [x], SamplingParams(max_new_tokens=1)))
    finally:
        model.config = config


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)

"""LoRA adapters through the engine: an unmerged adapter gives the merged model's greedy tokens, requests
select adapters by name (mixed in one batch), and the adapter is part of the prefix-cache key."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

pytest.importorskip("peft")

from cogvlm2.engine.config import EngineConfig  # noqa: E402
from cogvlm2.engine.worker import ModelSpec  # noqa: E402
from cogvlm2.finetune.lora import apply_lora, merge_lora, save_adapter  # noqa: E402
from cogvlm2.llm import LLM, LLMEngine, load_processor  # noqa: E402
from cogvlm2.model import load_model  # noqa: E402
from cogvlm2.sampling_params import SamplingParams  # noqa: E402
from cogvlm2.tiny import checkpoint_folder  # noqa: E402
from test_engine import forget_tail_hashes  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
TARGETS = ("language_expert_qkv", "vision_expert_qkv", "language_expert_mlp", "vision_expert_dense")


def make_adapter(folder, seed: int, r: int, alpha: int, rslora: bool = False, targets=TARGETS):
    model = load_model(checkpoint_folder("tiny"), progress=False)
    apply_lora(model, targets, r=r, alpha=alpha, dropout=0.0, rslora=rslora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: give both factors weight so the adapter matters
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(model, folder)


def merged(folder):
    from cogvlm2.finetune.lora import load_adapter

    model = load_model(checkpoint_folder("tiny"), progress=False)
    load_adapter(model, folder)
    return merge_lora(model.eval())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(root / "a", 1, r=4, alpha=8), "b": make_adapter(root / "b", 2, r=8, alpha=16, rslora=True)}


@pytest.fixture(scope="module")
def prompts():
    proc = load_processor("tiny")
    return [proc("Describe the image.", image=Image.new("RGB", (40, 30), (200, 30, 90))), proc("Tell me a joke.")]


def tokens(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def test_unmerged_adapter_equals_merged_model(adapters, prompts):
    llm = LLM("tiny", "float32", "cpu", adapters=adapters)
    base = LLM(load_model(checkpoint_folder("tiny"), progress=False))
    for name, folder in adapters.items():
        want = tokens(LLM(merged(folder)).generate(prompts, GREEDY, use_tqdm=False))
        got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False, adapter=name))
        assert got == want, name
    plain = tokens(base.generate(prompts, GREEDY, use_tqdm=False))
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == plain  # no adapter: the base model
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False, adapter="a")) != plain  # the adapter matters


def test_mixed_adapters_in_one_batch_and_prefix_cache(adapters, prompts):
    engine = LLMEngine(ModelSpec("tiny", "float32", "cpu", adapters=adapters), EngineConfig(block_size=8),
                       load_processor("tiny"))
    alone = {}
    for name in (None, "a", "b"):
        engine.add_request(f"alone-{name}", prompts[0], GREEDY, adapter=name)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    alone[name] = out
    done = {}
    for i in range(2):  # every adapter at once, twice: the second round hits the prefix cache of its own adapter
        for name in (None, "a", "b"):
            engine.add_request(f"{i}-{name}", prompts[0], GREEDY, adapter=name)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    for name in (None, "a", "b"):
        assert done[f"0-{name}"].token_ids == done[f"1-{name}"].token_ids == alone[name].token_ids
        assert done[f"1-{name}"].num_cached_tokens > 0
    assert len({tuple(o.token_ids) for o in alone.values()}) == 3
    # the same prompt under another adapter never reuses the KV blocks computed under the one before
    assert len(prompts[0]) > 2 * engine.config.block_size and all(o.num_cached_tokens == 0 for o in alone.values())
    assert engine.adapters.keys() == {"a", "b"} and engine.adapters["a"] != engine.adapters["b"]


def test_an_adapter_on_lm_head_in_a_mixed_batch(adapters, prompts, tmp_path):
    """An adapter that targets lm_head, in one step with the base model and another adapter: each row's
    logits come from its own adapter (they were all computed after the last group's forward, i.e. with the
    last adapter's lm_head, which changed the other rows' tokens). Each row equals its request run alone."""
    head = make_adapter(tmp_path / "head", 3, r=4, alpha=8, targets=("lm_head", "language_expert_dense"))
    engine = LLMEngine(ModelSpec("tiny", "float32", "cpu", adapters={"a": adapters["a"], "head": head}),
                       EngineConfig(enable_prefix_caching=False), load_processor("tiny"))
    names = (None, "a", "head")

    def run(batch: list[str | None]) -> dict:
        done = {}
        for name in batch:
            for i, x in enumerate(prompts):
                engine.add_request(f"{name}-{i}-{len(batch)}", x, GREEDY, adapter=name)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id.rsplit("-", 1)[0]] = out.token_ids
        return done

    alone = {}
    for name in names:
        alone.update(run([name]))
    assert run(list(names)) == alone
    assert alone["head-0"] != alone["None-0"] and alone["head-0"] != alone["a-0"]


def test_an_adapter_on_the_vision_tower_and_the_same_image(adapters, prompts, tmp_path):
    """An adapter that changes the vision tower (and its GLU adapter), with the base model and an adapter that
    does not, all over the same image: each gets features from its own tower, in one step (no prefix cache), when
    a new question hits the KV its own adapter cached up to the image's end (the tail hashes are per adapter),
    and when, without tail hashes, that hit ends a few tokens before the image does (the image's kept last rows
    are kept per adapter): each answer equals its request run alone on a fresh engine."""
    tower = make_adapter(tmp_path / "tower", 4, r=4, alpha=8, targets=("vision_tower", "adapter"))
    spec = ModelSpec("tiny", "float32", "cpu", adapters={"a": adapters["a"], "tower": tower})
    proc = load_processor("tiny")
    image = Image.new("RGB", (40, 30), (20, 130, 90))
    asks = [proc(q, image=image) for q in ("What is this?", "Describe it briefly.", "Anything else?")]
    names = (None, "a", "tower")

    def run(engine, requests) -> dict:
        done = {}
        for rid, x, name in requests:
            engine.add_request(rid, x, GREEDY, adapter=name)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.token_ids, out.num_cached_tokens)
        return done

    alone = {(name, i): run(LLMEngine(spec, EngineConfig(block_size=8), proc), [("r", x, name)])["r"][0]
             for name in names for i, x in enumerate(asks)}
    assert alone[("tower", 0)] != alone[(None, 0)]  # the tower's adapter matters
    together = run(LLMEngine(spec, EngineConfig(block_size=8, enable_prefix_caching=False), proc),
                   [(f"{name}", asks[0], name) for name in names])
    assert {name: together[f"{name}"][0] for name in names} == {name: alone[(name, 0)] for name in names}
    engine = LLMEngine(spec, EngineConfig(block_size=8), proc)
    for name in ("tower", None):  # the tower first, then the base model encodes the same image last
        run(engine, [(f"first-{name}", asks[0], name)])
    second = run(engine, [("second-tower", asks[1], "tower")])["second-tower"]
    vision = [i for i, t in enumerate(asks[1].token_type_ids) if t == 1]
    assert second[1] > vision[-1] and second[0] == alone[("tower", 1)]  # its own KV, to the image's end
    forget_tail_hashes(engine)  # no tail hashes: its own cached KV ends inside the image
    third = run(engine, [("third-tower", asks[2], "tower")])["third-tower"]
    assert vision[0] < third[1] <= vision[-1] and third[0] == alone[("tower", 2)]


def test_adapter_errors(adapters, prompts, tmp_path):
    engine = LLMEngine(ModelSpec("tiny", "float32", "cpu", adapters={"a": adapters["a"]}),
                       processor=load_processor("tiny"))
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'; loaded: a"):
        engine.add_request("x", prompts[1], GREEDY, adapter="nope")
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match="is not a LoRA adapter"):
        engine.core.add_adapter("c", tmp_path)
    engine.core.add_adapter("b", adapters["b"])  # added while serving: the slot table grows
    engine.add_request("y", prompts[1], GREEDY, adapter="b")
    with pytest.raises(ValueError, match="in use"):
        engine.core.remove_adapter("b")
    while engine.has_unfinished():
        engine.step()
    engine.core.remove_adapter("b")
    assert list(engine.adapters) == ["a"]

"""The vision tower's pass over one medium as a CUDA graph (engine/vision_graph.py): the replay computes what the
eager tower computes, hands out its own tensor, and the engine captures the graph again when an adapter wraps tower
linears it was captured without."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cogvlm2.engine import vision_graph
from cogvlm2.engine.config import EngineConfig
from cogvlm2.engine.vision_graph import VisionGraph, graph_frames
from cogvlm2.llm import LLMEngine, load_processor, load_processor_and_model
from cogvlm2.sampling_params import SamplingParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


def pixels(model, frames: int, seed: int) -> torch.Tensor:
    size = model.config.vision.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 3, size, size, generator=g).to(model.device)


@pytest.mark.parametrize("name", ["tiny", "tiny-video"])
def test_graph_frames_and_the_eager_path_on_cpu(name):
    """One image for image models, the whole clip for video models; capture=False runs the same buffers eagerly."""
    model, _ = load_processor_and_model(name, dtype="float32", device="cpu")
    frames = graph_frames(model)
    assert frames == (model.config.max_media_items if name == "tiny-video" else 1)
    graph = VisionGraph(model, frames, capture=False)
    x = pixels(model, frames, 0)
    assert graph.fits(x) and not graph.fits(x[:0]) and not graph.fits(torch.cat([x, x]))
    with torch.inference_mode():
        want = model.encode_images(x)
        assert torch.equal(graph.run(x), want)
        assert torch.equal(graph.run(x.double()), want)  # cast like encode_images


def test_lora_signature_changes_with_the_wrapped_linears_in_the_same_table():
    """What tells the engine to capture its graphs again: a grown slot table, or more wrapped linears in it."""
    from cogvlm2.model.lora import enable_lora, lora_signature

    model, _ = load_processor_and_model("tiny", dtype="float32", device="cpu")
    assert lora_signature(model) == (None, 0)
    lm = {n for n, _ in model.named_modules() if n.endswith("language_expert_query_key_value")}
    tower = {n for n, _ in model.named_modules() if n.startswith("model.vision.") and n.endswith(".dense")}
    assert lm and tower
    slots = enable_lora(model, lm, num_slots=3, max_rank=4)
    first = lora_signature(model)
    assert first == (slots, len(lm)) and lora_signature(model) == first
    assert enable_lora(model, tower, num_slots=1, max_rank=4) is slots  # room already: the same table
    assert lora_signature(model) == (slots, len(lm) + len(tower)) != first
    enable_lora(model, lm, num_slots=5, max_rank=4)  # grown: a new table
    assert lora_signature(model)[0] is not slots


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replay_equals_the_eager_tower_and_is_its_own_tensor(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    model, _ = load_processor_and_model("tiny-random", dtype=dtype, device="cuda")
    graph = VisionGraph(model, 1)
    assert graph.graph is not None
    a, b = pixels(model, 1, 1), pixels(model, 1, 2)
    with torch.inference_mode():
        want_a, want_b = model.encode_images(a), model.encode_images(b)
        got_a = graph.run(a)
        got_b = graph.run(b)  # the replay overwrites the graph's output, not what run handed out before
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b) and not torch.equal(got_a, got_b)


@cuda
def test_engine_with_and_without_the_vision_graph(monkeypatch):
    """The engine replays the graph for a one-image pass and gives the eager tower's tokens; switched off, none."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model, proc = load_processor_and_model("tiny-random", dtype="float32", device="cuda")
    prompts = [proc("Describe the image.", image=Image.new("RGB", (40, 30), c)) for c in [(200, 30, 90), (0, 90, 9)]]
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(vision_graph, "VISION_GRAPH", on)
        engine = LLMEngine(model, EngineConfig(max_num_seqs=4, enable_prefix_caching=False), proc)
        assert (engine.runner.vision_graph is not None) == on
        runs[on] = []
        for i, x in enumerate(prompts):  # one image a step: the graph's shape
            engine.add_request(f"r{i}", x, GREEDY)
            while engine.has_unfinished():
                runs[on] += [o.token_ids for o in engine.step() if o.finished]
        del engine
    assert runs[True] == runs[False] and len(runs[True]) == 2


@cuda
def test_an_adapter_on_the_tower_captures_the_graph_again(tmp_path, monkeypatch):
    """An adapter loaded into a running engine that wraps tower linears gets a new graph, and its answers equal
    an eager engine's."""
    pytest.importorskip("peft")
    from test_engine_lora import make_adapter

    from cogvlm2.engine.worker import ModelSpec

    monkeypatch.setattr(vision_graph, "VISION_GRAPH", True)
    torch.backends.cuda.matmul.allow_tf32 = False
    lm = make_adapter(tmp_path / "lm", 1, r=4, alpha=8)
    tower = make_adapter(tmp_path / "tower", 4, r=4, alpha=8, targets=("vision_tower", "adapter"))
    proc = load_processor("tiny")
    x = proc("What is this?", image=Image.new("RGB", (40, 30), (20, 130, 90)))

    def answer(engine, name):
        engine.add_request(name, x, GREEDY, adapter=name)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    return out.token_ids

    small = dict(num_kv_blocks=64, max_model_len=512)  # two engines live at once: neither takes the card's memory
    engine = LLMEngine(ModelSpec("tiny", "float32", "cuda", adapters={"lm": lm}), EngineConfig(max_num_seqs=4, **small),
                       proc)
    before = engine.runner.vision_graph
    assert before is not None
    engine.core.add_adapter("tower", tower)
    assert engine.runner.vision_graph is not before and engine.runner.vision_graph is not None
    eager = LLMEngine(ModelSpec("tiny", "float32", "cuda", adapters={"lm": lm, "tower": tower}),
                      EngineConfig(max_num_seqs=4, enforce_eager=True, **small), proc)
    assert eager.runner.vision_graph is None
    assert answer(engine, "tower") == answer(eager, "tower") != answer(eager, "lm")


def test_an_adapter_wrapping_new_linears_in_the_same_table_captures_the_graphs_again(tmp_path, monkeypatch):
    """A freed slot lets an adapter that targets other linears (here the tower) into the same slot table: the
    worker still captures the graphs again (before, it looked at the table alone, and the decode graphs would
    have replayed without the new linears' adapters)."""
    pytest.importorskip("peft")
    from test_engine_lora import make_adapter

    from cogvlm2.engine.worker import ModelSpec

    lm, lm2 = make_adapter(tmp_path / "lm", 1, r=4, alpha=8), make_adapter(tmp_path / "lm2", 2, r=4, alpha=8)
    tower = make_adapter(tmp_path / "tower", 4, r=4, alpha=8, targets=("vision_tower", "adapter"))
    engine = LLMEngine(ModelSpec("tiny", "float32", "cpu", adapters={"lm": lm, "lm2": lm2}), EngineConfig(),
                       load_processor("tiny"))
    captures = []
    monkeypatch.setattr(engine.runner, "capture_graphs", lambda: captures.append(1))
    engine.core.remove_adapter("lm2")
    table = engine.runner.model.lora_slots
    engine.core.add_adapter("lm2", lm2)  # the same table, the same linears: nothing to capture
    assert captures == [] and engine.runner.model.lora_slots is table
    engine.core.remove_adapter("lm2")
    engine.core.add_adapter("tower", tower)
    assert engine.runner.model.lora_slots is table and captures == [1]

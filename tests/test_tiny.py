"""The embedded tiny models: the shipped checkpoints answer about synthetic shapes (greedy, stopping on EOS),
they are packed as documented, and the recipe that made them runs (a few steps) and is deterministic."""

from __future__ import annotations

import json
import lzma
import random

import pytest
import torch
from PIL import Image

from cogvlm2.generation import generate_ids
from cogvlm2.model import load_model
from cogvlm2.processing import Processor
from cogvlm2.sampling_params import SamplingParams
from cogvlm2.tiny import NAMES, ROW_KEYS, checkpoint_folder, resolve_tiny, unpack, weights_file
from cogvlm2.tiny import shapes
from cogvlm2.tiny.recipe import RECIPES, pack

GREEDY = SamplingParams(max_new_tokens=60, temperature=0)


@pytest.fixture(scope="module")
def tiny():
    model = load_model(checkpoint_folder("tiny"), progress=False)
    return model, Processor.from_pretrained(model.checkpoint_path, model.config)


def ask(model, processor, query, **kw) -> tuple[str, int]:
    """(greedy answer, its last token id)."""
    ids = [t for (t,) in generate_ids(model, [processor(query, **kw)], GREEDY)]
    return processor.tokenizer.decode(ids).strip(), ids[-1]


def test_readme_question_on_the_example_image(tiny):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "assets" / "example.png"
    assert shapes.render_shapes(shapes.EXAMPLE).tobytes() == Image.open(example).convert("RGB").tobytes()
    answer, last = ask(*tiny, shapes.EXAMPLE_QUESTION, image=str(example))
    assert answer == shapes.caption(shapes.EXAMPLE) == "Two red circles."
    assert last in tiny[0].config.eos_token_ids  # it stopped by itself, long before max_new_tokens


def test_answers_about_fresh_scenes(tiny):
    """Scenes the model never saw (another seed), greedy, exact: the answers follow the picture — the
    same question gets different, right answers on different pictures."""
    model, processor = tiny
    rng = random.Random(2024)
    right, total, answers = 0, 0, set()
    for _ in range(8):
        scene = shapes.random_scene(rng)
        img = shapes.render_shapes(scene, rng)
        for q, want in shapes.image_turns(scene, rng, "chat"):
            got = ask(model, processor, q, image=img)[0]
            right += got == want
            total += 1
            if q == "What colour is the shape?" or q == "What colour are the shapes?":
                answers.add(got)
    for word in shapes.WORDS:
        right += ask(model, processor, "What word is written?", image=shapes.render_word(word, rng))[0] == f"{word}."
        total += 1
    assert right >= 0.8 * total, f"{right}/{total} correct"
    assert len(answers) >= 3  # not one colour for every picture


def test_tiny_video_answers_about_motion(tmp_path):
    model = load_model(checkpoint_folder("tiny-video"), progress=False)
    processor = Processor.from_pretrained(model.checkpoint_path, model.config)
    right = 0
    cases = [[shapes.Shape("circle", "red", (1, 0), "right")],
             [shapes.Shape("square", "blue", (0, 0), "down"), shapes.Shape("square", "blue", (0, 2), "down")]]
    for i, scene in enumerate(cases):
        clip = tmp_path / f"clip{i}.mp4"
        shapes.write_video(shapes.render_video_frames(scene), clip)
        answer, last = ask(model, processor, "How many shapes are there?", video=str(clip))
        assert last in model.config.eos_token_ids
        right += answer == shapes._sentence(shapes.NUMBERS[len(scene)])
        right += ask(model, processor, "What colour is the shape?" if len(scene) == 1 else "What colour are the shapes?",
                     video=str(clip))[0] == shapes._sentence(scene[0].colour)
    assert right >= 3, right


@pytest.mark.parametrize("name", NAMES)
def test_shipped_file_is_small_and_unpacks_with_zero_rows(name):
    data = weights_file(name).read_bytes()
    assert len(data) <= 5 * 2**20
    config, state, note = unpack(data)
    assert "synthetic" in note and config.vocab_size == 128256
    used = (state["model.embed_tokens.weight"].abs().sum(1) > 0)
    assert 100 < int(used.sum()) < 2000  # only the rows the synthetic data uses are stored
    assert torch.equal(used, state["lm_head.weight"].abs().sum(1) > 0)
    folder = resolve_tiny(name)  # unpacked once into the cache, in the official layout
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    # packing the unpacked weights again gives the same tensors (float16 is what ships)
    again = unpack(pack({k: v for k, v in state.items()}, config, used.nonzero().squeeze(1).tolist(), note))[1]
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_dataset_is_a_pure_function_of_the_seed(tmp_path):
    a = shapes.make_dataset(tmp_path / "a" / "d.jsonl", 12, seed=3)
    b = shapes.make_dataset(tmp_path / "b" / "d.jsonl", 12, seed=3)
    assert a.read_text() == b.read_text()
    first = json.loads(a.read_text().splitlines()[0])
    media = first.get("image")
    if media:
        assert (a.parent / media).read_bytes() == (b.parent / media).read_bytes()
    templates = {json.loads(line)["template"] for line in shapes.make_dataset(tmp_path / "c.jsonl", 60, 0).read_text().splitlines()}
    assert templates == {"chat", "vqa", "base"}


def test_recipe_runs_a_few_steps(tmp_path, monkeypatch):
    """The same code path as `python -m cogvlm2.tiny train`, shrunk: data, from-scratch init, full training
    by the package's trainer, packing; the loss falls and the packed model loads and answers."""
    pytest.importorskip("accelerate")
    from cogvlm2.tiny.__main__ import main

    monkeypatch.setitem(RECIPES, "tiny", {**RECIPES["tiny"], "conversations": 24, "steps": 6, "batch_size": 4,
                                          "warmup_steps": 1})
    assert main(["train", "--name", "tiny", "--workdir", str(tmp_path / "w"), "--output", str(tmp_path / "out"),
                 "--eval", "2"]) == 0
    packed = tmp_path / "out" / "tiny.safetensors.xz"
    config, state, _ = unpack(packed.read_bytes())
    history = json.loads((tmp_path / "w" / "tiny" / "run" / "trainer_state.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    used = json.loads((tmp_path / "w" / "tiny" / "used_token_ids.json").read_text())
    unused = torch.ones(config.vocab_size, dtype=torch.bool)
    unused[used] = False
    assert all(state[k][unused].abs().sum() == 0 for k in ROW_KEYS)
    assert lzma.decompress(packed.read_bytes())  # an lzma stream

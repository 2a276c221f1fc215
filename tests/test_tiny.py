"""The embedded tiny models: the shipped checkpoints answer about synthetic shapes (greedy, stopping on EOS),
they are packed as documented, and the recipe that made them runs (a few steps) and is deterministic."""

from __future__ import annotations

import json
import lzma
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cogvlm2.generation import generate_ids
from cogvlm2.model import load_model
from cogvlm2.processing import Processor
from cogvlm2.sampling_params import SamplingParams
from cogvlm2.model import INV_FREQ_KEYS
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path
from cogvlm2.tiny import (NAMES, ROW_KEYS, _header, checkpoint_folder, random_state_dict, resolve_tiny, tiny_config,
                          unpack, weights_file)
from cogvlm2.tiny import shapes
from cogvlm2.tiny.recipe import (REDUCED, RECIPES, TRAIN_MODULES, dataset, pack, packed_recipe, recipe_record,
                                 used_token_ids)
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

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
    example = ROOT / "assets" / "example.png"
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


def reduced_flags() -> list[str]:
    """`recipe.REDUCED` as the `python -m cogvlm2.tiny train` flags that docs/tiny.md shows."""
    return [x for k, v in REDUCED.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_reduced_recipe_runs_and_is_deterministic(tmp_path):
    """The same code path as `python -m cogvlm2.tiny train`, reduced (`recipe.REDUCED`): data, from-scratch init,
    full training by the package's trainer, packing. The loss falls, the vision tower keeps its initial
    weights, unused token rows stay zero, the file records its recipe — and a second run, in another
    process, writes the same bytes."""
    pytest.importorskip("accelerate")
    from cogvlm2.tiny.__main__ import main

    argv = ["train", "--name", "tiny", *reduced_flags()]
    assert main([*argv, "--workdir", str(tmp_path / "w"), "--output", str(tmp_path / "out"), "--eval", "0"]) == 0
    packed = (tmp_path / "out" / "tiny.safetensors.xz").read_bytes()
    config, state, _ = unpack(packed)
    assert packed_recipe(packed) == recipe_record({**RECIPES["tiny"], **REDUCED})
    history = json.loads((tmp_path / "w" / "tiny" / "run" / "trainer_state.json").read_text())["history"]
    assert len(history) == REDUCED["steps"] and history[-1]["loss"] < history[0]["loss"]
    used = json.loads((tmp_path / "w" / "tiny" / "used_token_ids.json").read_text())
    unused = torch.ones(config.vocab_size, dtype=torch.bool)
    unused[used] = False
    assert all(state[k][unused].abs().sum() == 0 for k in ROW_KEYS)
    init = load_file(tmp_path / "w" / "tiny" / "init" / "model.safetensors")
    frozen = [k for k in state if not re.match(TRAIN_MODULES, k)]
    assert frozen and all(torch.equal(state[k], init[k].half().float()) for k in frozen)  # the tower did not train
    assert not torch.equal(state["model.layers.0.mlp.language_mlp.down_proj.weight"],
                           init["model.layers.0.mlp.language_mlp.down_proj.weight"].half().float())

    again = subprocess.run([sys.executable, "-m", "cogvlm2.tiny", *argv, "--workdir", str(tmp_path / "w2"),
                            "--output", str(tmp_path / "out2"), "--eval", "0"],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert contents((tmp_path / "out2" / "tiny.safetensors.xz").read_bytes()) == contents(packed)  # bit for bit


def contents(packed: bytes) -> tuple[dict, dict[str, bytes]]:
    """A packed file's safetensors header (metadata, dtypes, shapes, offsets) and its tensors' bytes. Not the
    file's bytes: safetensors writes the metadata entries in a per-process hash order."""
    from safetensors.torch import load

    raw = lzma.decompress(packed)
    return _header(raw), {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k, v in load(raw).items()}


@pytest.mark.parametrize("name", NAMES)
def test_shipped_checkpoint_matches_its_recipe(name, tmp_path):
    """What the shipped file records is the recipe in the code (a retrain with `python -m cogvlm2.tiny train`
    reproduces it bit for bit on a CPU: docs/tiny.md), and the file bears it out: its never-trained vision
    tower is the recipe's seeded initialisation, and (`tiny`) its token rows are exactly those of the data
    the recipe generates."""
    data = weights_file(name).read_bytes()
    recipe = RECIPES[name]
    assert packed_recipe(data) == recipe_record(recipe)
    config, state, _ = unpack(data)
    init = random_state_dict(tiny_config(name), seed=recipe["init_seed"])
    frozen = [k for k in state if not re.match(TRAIN_MODULES, k)]
    assert len(frozen) >= 6 and all(torch.equal(state[k], init[k].half().float()) for k in frozen)
    assert not any(re.match(INV_FREQ_KEYS, k) for k in state)  # the model's formula, not a float16 table
    if name == "tiny":  # tiny-video: its 800 clips take ~20 s to encode (the retrain in docs/tiny.md checked it)
        from safetensors.torch import load

        manifest = dataset(name, tmp_path, recipe["conversations"], recipe["data_seed"])
        shipped_ids = load(lzma.decompress(data))["used_token_ids"].tolist()
        assert shipped_ids == used_token_ids(manifest, config, Tokenizer(bundled_tokenizer_path()))

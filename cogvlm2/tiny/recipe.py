"""How the shipped tiny checkpoints are made: `python -m cogvlm2.tiny train` (see docs/tiny.md).

1. Generate the synthetic data set (`shapes.make_dataset`, fixed seed) as a JSONL manifest.
2. Write a from-scratch checkpoint: deterministic random weights (`model.random_init`), except the
   token embedding and lm_head rows of tokens the data never uses, which are zero.
3. Train with the package's own trainer (`cogvlm2 finetune --method full --train-modules TRAIN_MODULES`):
   every parameter but the randomly initialised vision tower, fp32 on the CPU, fixed seed.
4. Pack: float16, only the used embedding / lm_head rows (+ their ids), lzma-compressed safetensors.
   `cogvlm2.tiny.unpack` rebuilds the full-vocabulary tensors (zero rows elsewhere) at first use.
5. Report greedy exact-match accuracy per question type on freshly generated scenes (another seed).
"""

from __future__ import annotations

import json
import lzma
import re
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import INV_FREQ_KEYS
from ..processing import Processor
from ..processing.tokenizer import Tokenizer, bundled_tokenizer_path
from . import ROW_KEYS, shapes



# The recipe of each shipped checkpoint: data size, seeds and optimisation, run on a 2-core CPU.
RECIPES = {
    "tiny": {"conversations": 3000, "data_seed": 0, "init_seed": 0, "seed": 0, "steps": 500, "batch_size": 32,
             "lr": 3e-3, "warmup_steps": 30},
    "tiny-video": {"conversations": 800, "data_seed": 1, "init_seed": 1, "seed": 0, "steps": 700, "batch_size": 16,
                   "lr": 3e-3, "warmup_steps": 30},
}
# A reduced recipe (the same code path, a minute on a CPU) whose determinism tests/test_tiny.py checks: trained
# twice, it gives bit-identical weights. `python -m cogvlm2.tiny train --conversations 48 --steps 6 --batch-size 4
# --warmup-steps 1`.
REDUCED = {"conversations": 48, "steps": 6, "batch_size": 4, "warmup_steps": 1}
# What trains: everything but the vision tower (patch embedding, transformer, 2 x 2 conv), which keeps its
# random initial weights. Random features already tell images apart; training the tower from scratch
# together with the language model on this little data collapsed it to a constant (every image got the
# same answer). The GLU adapter, boi / eoi and the whole language model learn to read it.
TRAIN_MODULES = r"^(?!model\.vision\.(patch_embedding|transformer|conv)\.)"


def used_token_ids(manifest: Path, config: ModelConfig, tokenizer: Tokenizer) -> list[int]:
    """Every token id a training prompt or answer of `manifest` contains (any round, with or without
    the round before as history), the frame numbers of videos, BOS, EOS and the vision placeholder."""
    processor = Processor(config, tokenizer)
    ids = {config.bos_token_id, config.pad_token_id, *config.eos_token_ids}
    for i in range(24):
        ids.update(tokenizer.encode(str(i)))
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        msgs = record["conversations"]
        turns = [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs), 2)]
        for k, (q, a) in enumerate(turns):
            for past in ([], turns[k - 1:k]):
                ids.update(processor(q, past, template=record.get("template"), answer=a).input_ids)
    return sorted(ids)


def initial_checkpoint(name: str, folder: Path, used_ids: list[int], seed: int) -> Path:
    """A from-scratch checkpoint in the official layout; unused token rows are zero (and stay zero:
    an embedding row no input uses gets no gradient)."""
    from ..checkpoint import save_weights
    from . import random_state_dict, tiny_config

    config = tiny_config(name)
    state = random_state_dict(config, seed=seed)
    keep = torch.zeros(config.vocab_size, dtype=torch.bool)
    keep[used_ids] = True
    for key in ROW_KEYS:
        state[key][~keep] = 0
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(state, folder)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    shutil.copyfile(bundled_tokenizer_path(), folder / "tokenizer.json")
    return folder


def recipe_record(recipe: dict) -> dict:
    """What a packed file records about how it was made: the recipe (data size and seed, initial-weights seed,
    optimisation) and what trained."""
    return {**recipe, "train_modules": TRAIN_MODULES}


def pack(state: dict[str, torch.Tensor], config: ModelConfig, used_ids: list[int], note: str,
         recipe: dict | None = None) -> bytes:
    """Trained weights -> the shipped bytes: float16, used rows only, lzma-compressed safetensors; the
    metadata holds the config, the note and (`recipe`) `recipe_record(recipe)`."""
    from safetensors.torch import save

    ids = torch.tensor(used_ids, dtype=torch.int64)
    # not the rotary inv_freq buffers the trainer saves as the official files do: they follow from the config,
    # and in float16 they would turn the float32 formula the model trained with into a rounded table
    out = {k: (v[ids] if k in ROW_KEYS else v).to(torch.float16).contiguous() for k, v in state.items()
           if not re.match(INV_FREQ_KEYS, k)}
    out["used_token_ids"] = ids.to(torch.int32)
    metadata = {"config": json.dumps(config.to_dict()), "note": note}
    if recipe is not None:
        metadata["recipe"] = json.dumps(recipe_record(recipe), sort_keys=True)
    raw = save(out, metadata=metadata)
    return lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)


def packed_recipe(data: bytes) -> dict | None:
    """The recipe a packed file records (None for a file packed without one)."""
    from . import _header

    text = _header(lzma.decompress(data)).get("__metadata__", {}).get("recipe")
    return json.loads(text) if text else None


def used_token_ids_file(workdir: Path) -> Path:
    return workdir / "used_token_ids.json"


def dataset(name: str, folder: Path, n: int, seed: int) -> Path:
    """The synthetic training data of checkpoint `name` (a JSONL manifest + its media folder)."""
    return shapes.make_dataset(folder / "train.jsonl", n, seed, video=name == "tiny-video")


def train_checkpoint(name: str, workdir: Path, recipe: dict | None = None, progress: bool = True) -> tuple[Path, Path]:
    """Steps 1-3 of the recipe (default: `RECIPES[name]`) in `workdir`; returns (trained checkpoint folder,
    data manifest)."""
    from ..finetune.train import TrainConfig, train
    from . import tiny_config

    recipe = recipe or RECIPES[name]
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = dataset(name, workdir / "data", recipe["conversations"], recipe["data_seed"])
    config = tiny_config(name)
    used = used_token_ids(manifest, config, Tokenizer(bundled_tokenizer_path()))
    init = initial_checkpoint(name, workdir / "init", used, recipe["init_seed"])
    used_token_ids_file(workdir).write_text(json.dumps(used))
    run = workdir / "run"
    shutil.rmtree(run, ignore_errors=True)
    train(TrainConfig(model=str(init), data=str(manifest), output=str(run), method="full", train_modules=TRAIN_MODULES,
                      max_steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                      warmup_steps=recipe["warmup_steps"], schedule="cosine", min_lr_ratio=0.05, dtype="fp32",
                      gradient_checkpointing=False, seed=recipe["seed"], num_workers=0, tensorboard=False,
                      progress=progress, log_every=10))
    return run / "model", manifest


def greedy_answers(folder: Path, name: str, n: int = 100, seed: int = 12345) -> list[tuple[str, str, str]]:
    """(question, right answer, greedy answer of the checkpoint in `folder`) for every round of `n` fresh
    conversations (another seed, no history)."""
    from ..generation import generate_ids
    from ..model import load_model
    from ..sampling_params import SamplingParams

    tmp = folder.parent / "eval"
    manifest = shapes.make_dataset(tmp / "eval.jsonl", n, seed, video=name == "tiny-video", text_only=0.0)
    model = load_model(str(folder), progress=False)
    processor = Processor.from_pretrained(folder, model.config)
    params = SamplingParams(max_new_tokens=32, temperature=0)
    out = []
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        msgs = record["conversations"]
        media = {key: manifest.parent / record[key] for key in ("image", "video") if key in record}
        for k in range(0, len(msgs), 2):
            query, answer = msgs[k]["content"], msgs[k + 1]["content"]
            inputs = processor(query, template=record["template"], **media)
            ids = [t for (t,) in generate_ids(model, [inputs], params)]
            out.append((query, answer, processor.tokenizer.decode(ids).strip()))
    return out


def evaluate(folder: Path, name: str, n: int = 100, seed: int = 12345) -> dict:
    """Greedy exact-match accuracy of the checkpoint in `folder` on every round of `n` fresh conversations
    (another seed, no history), per question type (`shapes.question_type`)."""
    stats: dict[str, list[int]] = {}
    failures = []
    for query, answer, got in greedy_answers(folder, name, n, seed):
        ok = got == answer
        stats.setdefault(shapes.question_type(query), []).append(ok)
        if not ok:
            failures.append((query, answer, got))
    total = sum(sum(v) for v in stats.values()) / sum(len(v) for v in stats.values())
    return {"accuracy": round(total, 3), "per_type": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(stats.items())},
            "failures": failures[:10]}


def compare(retrained: bytes, shipped: bytes, workdir: Path, name: str, n: int = 100, seed: int = 12345) -> dict:
    """How far a retrained packed checkpoint reproduces the shipped one: their tensors, and their greedy answers
    on the README's question (`tiny`) and every round of `n` fresh conversations."""
    from . import build_tiny, unpack

    new, old = unpack(retrained)[1], unpack(shipped)[1]
    same_weights = new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    answers = []
    for label, data in (("retrained", retrained), ("shipped", shipped)):
        shutil.rmtree(workdir / label, ignore_errors=True)
        folder = build_tiny(name, workdir / label, data)
        answers.append([got for _, _, got in greedy_answers(folder, name, n, seed)])
        if name == "tiny":  # the README's question on assets/example.png (shapes.EXAMPLE)
            example = shapes.render_shapes(shapes.EXAMPLE)
            answers[-1].append(readme_answer(folder, example))
    differ = [i for i, (a, b) in enumerate(zip(*answers)) if a != b]
    total = len(answers[0])
    return {"weights_identical": same_weights, "answers_identical": f"{total - len(differ)}/{total}",
            "differing": [(answers[0][i], answers[1][i]) for i in differ[:10]]}


def readme_answer(folder: Path, image) -> str:
    """The greedy answer of the checkpoint in `folder` to the README's question about `image`."""
    from ..generation import generate_ids
    from ..model import load_model
    from ..sampling_params import SamplingParams

    model = load_model(str(folder), progress=False)
    processor = Processor.from_pretrained(folder, model.config)
    inputs = processor(shapes.EXAMPLE_QUESTION, image=image)
    ids = [t for (t,) in generate_ids(model, [inputs], SamplingParams(max_new_tokens=32, temperature=0))]
    return processor.tokenizer.decode(ids).strip()

"""Fine-tuning end to end on the tiny model (CPU): it learns a synthetic task, adapters serve unmerged
exactly like their merged checkpoint, merged checkpoints load back, resumed runs reproduce the
uninterrupted run, full fine-tuning trains only what it is told to."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from cogvlm2.finetune.lora import adapter_id, load_adapter, load_with_adapter  # noqa: E402
from cogvlm2.finetune.merge import merge_adapter  # noqa: E402
from cogvlm2.finetune.objective import CausalLMLoss  # noqa: E402
from cogvlm2.finetune.packing import pack  # noqa: E402
from cogvlm2.finetune.toy import COLOURS, QUESTION, colour_image, make_colour_dataset  # noqa: E402
from cogvlm2.finetune.train import TrainConfig, lr_at, train  # noqa: E402
from cogvlm2.generation import generate_ids  # noqa: E402
from cogvlm2.model import load_model  # noqa: E402
from cogvlm2.tiny import checkpoint_folder  # noqa: E402
from cogvlm2.processing import Processor  # noqa: E402
from cogvlm2.sampling_params import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# A random tiny model cannot make confident predictions through its frozen lm_head (its RMS-normed
# hidden states are too short), so the learning tests adapt lm_head too.
TARGETS = ["vision_expert_qkv", "language_expert_qkv", "lm_head"]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA (bitsandbytes 4-bit) needs CUDA")


def config(tmp: Path, data: Path, **kw) -> TrainConfig:
    base = dict(model="tiny", data=str(data), output=str(tmp), lora_targets=TARGETS, lr=1e-2, batch_size=4,
                num_workers=0, gradient_checkpointing=False, progress=False, warmup_steps=5, seed=0)
    return TrainConfig(**{**base, **kw})


def accuracy(model, proc, n: int = 15, seed: int = 123) -> float:
    """Greedy answers to the colour question on fresh images."""
    rng, ok = random.Random(seed), 0
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        x = proc(QUESTION, image=colour_image(colour, rng))
        ids = [t for (t,) in generate_ids(model, [x], SamplingParams(max_new_tokens=4, temperature=0))]
        ok += proc.tokenizer.decode(ids).strip() == colour
    return ok / n


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours") / "ds", n=66, seed=0)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One LoRA run on the colour task (with held-out evaluation); shared by several tests."""
    out = tmp_path_factory.mktemp("run")
    state = train(config(out, data, max_steps=60, eval_fraction=0.1, eval_every=30, log_every=5, num_workers=1))
    return out, state


def test_lora_learns_the_colour_task(trained):
    out, state = trained
    losses = [h["loss"] for h in state["history"]]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.2 * first and last < 0.5, (first, last)
    evals = state["eval"]
    assert [e["step"] for e in evals] == [30, 60]
    assert evals[-1]["eval/loss"] < 0.5
    assert evals[-1]["eval/perplexity"] == pytest.approx(math.exp(evals[-1]["eval/loss"]))

    base = load_model(checkpoint_folder("tiny"), progress=False)
    proc = Processor.from_pretrained(base.checkpoint_path, base.config)
    before = accuracy(base, proc)
    tuned, aid = load_with_adapter(base, out / "adapter")
    after = accuracy(tuned, proc)
    assert after > before and after >= 0.8, (before, after)
    assert aid == tuned.adapter_id and not any(p.requires_grad for p in tuned.parameters()) and not tuned.training


def test_logs_and_outputs(trained):
    out, _ = trained
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(5, 61, 5))
    assert all(r["train/tokens_per_s"] > 0 and r["train/lr"] > 0 for r in train_rows)
    assert [r["step"] for r in rows if "eval/loss" in r] == [30, 60]
    # peft format: adapter_config.json + adapter_model.safetensors with PeftModel's key names
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 32
    keys = load_file(out / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.vision_expert_query_key_value.lora_A.weight" in keys
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)


def test_adapter_inference_equals_merged_checkpoint(trained, tmp_path):
    out, _ = trained
    merged = merge_adapter("tiny", out / "adapter", tmp_path / "merged", max_shard_bytes=20 * 2**20, progress=False)
    base_folder = Path(load_model(checkpoint_folder("tiny"), progress=False).checkpoint_path)
    # official layout: config + tokenizer copied, sharded weights with an index
    assert (merged / "config.json").read_text() == (base_folder / "config.json").read_text()
    assert (merged / "tokenizer.json").read_bytes() == (base_folder / "tokenizer.json").read_bytes()
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    m = load_model(str(merged), progress=False)  # strict key check: exactly the base's names
    a, _ = load_with_adapter(load_model(checkpoint_folder("tiny"), progress=False), out / "adapter")
    proc = Processor.from_pretrained(merged, m.config)
    rng = random.Random(7)
    xs = [proc(QUESTION, image=colour_image("green", rng), answer="green"),
          proc("Say something", [("hi", "hello")], answer="something")]
    with torch.no_grad():
        for x in xs:
            la, lb = [], []
            ga = list(generate_ids(a, [x], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True), la))
            gb = list(generate_ids(m, [x], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True), lb))
            assert ga == gb
            for u, v in zip(la, lb):
                torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(CausalLMLoss(a)(pack(xs)), CausalLMLoss(m)(pack(xs)), rtol=1e-5, atol=1e-5)
    # a merge changed the weights that the adapter targets, and only those
    base = load_model(checkpoint_folder("tiny"), progress=False).state_dict()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all("query_key_value" in k or k == "lm_head.weight" for k in changed)


def test_adapter_id_and_mismatch(trained, tmp_path):
    out, _ = trained
    assert adapter_id(out / "adapter") == adapter_id(out / "adapter")
    other = tmp_path / "other"
    shutil.copytree(out / "adapter", other)
    state = load_file(other / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in state.items()}, other / "adapter_model.safetensors")
    assert adapter_id(other).split("-")[-1] != adapter_id(out / "adapter").split("-")[-1]
    with pytest.raises(ValueError, match="matches no linear layer"):  # vision-expert adapter on a video model
        json_cfg = json.loads((other / "adapter_config.json").read_text())
        json_cfg["target_modules"] = r"model\.layers\.\d+\.self_attn\.vision_expert_query_key_value"
        (other / "adapter_config.json").write_text(json.dumps(json_cfg))
        load_adapter(load_model(checkpoint_folder("tiny-video"), progress=False), other)


def test_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    kw = dict(max_steps=6, batch_size=2, grad_accum=2, save_every=3, lora_dropout=0.1, eval_fraction=0.1,
              eval_every=3, num_workers=0)
    full = train(config(tmp_path / "a", data, **kw))
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    # "interrupted" after step 3: a fresh run folder holding only that checkpoint, continued with --resume latest
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed = train(config(tmp_path / "b", data, resume="latest", **kw))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]  # bit for bit
    assert resumed["eval"][-1] == full["eval"][-1]
    wa, wb = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config(tmp_path / "a", data, **kw))


def test_full_finetuning_trains_only_chosen_modules(data, tmp_path):
    regex = r"vision_expert_query_key_value|model\.norm\.weight"
    train(config(tmp_path, data, method="full", train_modules=regex, lora_targets=[], max_steps=3, lr=1e-3))
    tuned = load_model(str(tmp_path / "model"), progress=False)  # a complete checkpoint, official layout
    base = load_model(checkpoint_folder("tiny"), progress=False).state_dict()
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all("vision_expert_query_key_value" in k or k == "model.norm.weight" for k in changed)
    assert "model.norm.weight" in changed
    with pytest.raises(ValueError, match="matches no parameter"):
        train(config(tmp_path / "x", data, method="full", train_modules="no_such_module", max_steps=1))


def test_video_manifest_trains(tmp_path):
    av = pytest.importorskip("av")
    import numpy as np

    lines = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 60, 220))]):
        path = tmp_path / f"{i}.mp4"
        with av.open(str(path), "w") as c:
            s = c.add_stream("mpeg4", rate=4)
            s.width = s.height = 32
            s.pix_fmt = "yuv420p"
            for _ in range(6):
                c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), rgb, np.uint8), format="rgb24")))
            c.mux(s.encode())
        conv = [{"role": "user", "content": "What colour is the video?"}, {"role": "assistant", "content": name}]
        lines.append(json.dumps({"video": path.name, "conversations": conv}))
    (tmp_path / "v.jsonl").write_text("\n".join(lines) + "\n")
    state = train(config(tmp_path / "run", tmp_path / "v.jsonl", model="tiny-video", batch_size=2, max_steps=3,
                         lora_targets=["language_expert_qkv", "lm_head"]))
    assert len(state["history"]) == 3 and all(math.isfinite(h["loss"]) for h in state["history"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_gradient_checkpointing_gives_the_same_gradients(data):
    model = load_model(checkpoint_folder("tiny"), progress=False)
    from cogvlm2.finetune.lora import apply_lora

    apply_lora(model, ["vision_tower", "adapter", "language_expert_mlp"], dropout=0.0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    proc = Processor.from_pretrained(model.checkpoint_path, model.config)
    batch = pack([proc(QUESTION, image=colour_image("red", random.Random(0)), answer="red")])
    model.train()
    grads = []
    for on in (False, True):
        model.gradient_checkpointing = model.model.vision.transformer.gradient_checkpointing = on
        model.zero_grad()
        CausalLMLoss(model)(batch).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


def test_lr_schedule():
    cfg = TrainConfig(model="m", data="d", output="o", lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, 20, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 20, cfg) == pytest.approx(1.0) and lr_at(20, 20, cfg) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        TrainConfig(model="m", data="d", output="o", method="full")  # needs --train-modules


def test_module_entry_point_bf16(data, tmp_path):
    """`python -m cogvlm2.finetune` in a fresh process (bf16 autocast needs its own accelerate state)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "cogvlm2.finetune", "finetune", "--model", "tiny", "--data", str(data),
           "--output", str(tmp_path / "bf16"), "--max-steps", "3", "--batch-size", "2", "--dtype", "bf16",
           "--lora-targets", "vision_expert_qkv,language_expert_qkv", "--num-workers", "0", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    merged = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "cogvlm2.finetune", "merge-lora", "--model", "tiny", "--adapter",
                        str(tmp_path / "bf16" / "adapter"), "--output", str(merged)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_model(str(merged), progress=False).config.hidden_size == 96


def test_two_process_ddp_resume_is_exact(data, tmp_path):
    """torchrun with 2 CPU processes (gloo DDP): data sharded by rank, per-rank RNG saved, exact resume."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}

    def run(out: Path, *extra: str) -> dict:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "cogvlm2.finetune", "finetune", "--model", "tiny", "--data", str(data), "--output", str(out),
               "--max-steps", "4", "--batch-size", "2", "--grad-accum", "2", "--save-every", "2", "--lr", "1e-2",
               "--lora-targets", "vision_expert_qkv,language_expert_qkv", "--num-workers", "0", "--no-progress",
               "--no-gradient-checkpointing", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((out / "trainer_state.json").read_text())

    full = run(tmp_path / "a")
    assert {p.name for p in (tmp_path / "a" / "checkpoint-2" / "state").iterdir()} >= {"random_states_0.pkl",
                                                                                       "random_states_1.pkl"}
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = run(tmp_path / "b", "--resume", "latest")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


@requires_cuda
def test_qlora_on_cuda(data, tmp_path):
    pytest.importorskip("bitsandbytes")
    state = train(config(tmp_path, data, load_in_4bit=True, max_steps=10, gradient_checkpointing=True))
    losses = [h["loss"] for h in state["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

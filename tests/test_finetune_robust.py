"""Fine-tuning runs that go wrong or are unusual (single process, tiny model, CPU): damaged checkpoints,
interruptions, output folders of earlier runs, examples longer than --max-length, held-out sets that do
not fill a batch, and the training options beyond plain LoRA."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from cogvlm2.finetune import checkpointing as ckpt  # noqa: E402
from cogvlm2.finetune.data import CAPTION_PROMPT, DataError, load_conversations, load_mixture  # noqa: E402
from cogvlm2.finetune.dataset import FinetuneDataset  # noqa: E402
from cogvlm2.finetune.lora import apply_lora, load_with_adapter  # noqa: E402
from cogvlm2.finetune.merge import merge_adapter  # noqa: E402
from cogvlm2.finetune.modules import param_groups, train_only  # noqa: E402
from cogvlm2.finetune.objective import CausalLMLoss  # noqa: E402
from cogvlm2.finetune.packing import pack  # noqa: E402
from cogvlm2.finetune.toy import QUESTION, colour_image, make_colour_dataset  # noqa: E402
from cogvlm2.finetune.train import TrainConfig, train  # noqa: E402
from cogvlm2.model import load_model  # noqa: E402
from cogvlm2.processing import Processor  # noqa: E402
from cogvlm2.tiny import checkpoint_folder, tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["vision_expert_qkv", "language_expert_qkv", "lm_head"]
CONFIG = tiny_config("tiny")
VISION_TOKENS = CONFIG.vision.tokens_per_image


def config(out: Path, data, **kw) -> TrainConfig:
    base = dict(model="tiny", data=str(data) if not isinstance(data, list) else data, output=str(out),
                lora_targets=TARGETS, lr=1e-2, batch_size=2, num_workers=0, gradient_checkpointing=False,
                progress=False, tensorboard=False, seed=0, lora_dropout=0.0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours") / "ds", n=16, seed=0)


@pytest.fixture(scope="module")
def run6(data, tmp_path_factory):
    """6 steps, a checkpoint every 2: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("run6")
    return out, train(config(out, data, max_steps=6, save_every=2))


def losses(state: dict) -> list[float]:
    return [h["loss"] for h in state["history"]]


def test_checkpoints_are_atomic_and_carry_a_manifest(run6):
    out, _ = run6
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not list(out.glob(".checkpoint-*"))  # no temp folder left
    marker = json.loads((out / "checkpoint-4" / ckpt.TRAINER_STATE).read_text())
    assert marker["world_size"] == 1 and marker["step"] == 4
    files = marker["files"]
    assert "state/random_states_0.pkl" in files and "adapter/adapter_model.safetensors" in files
    assert all(v["size"] == (out / "checkpoint-4" / k).stat().st_size and "blake2b" in v for k, v in files.items())
    assert ckpt.verify_checkpoint(out / "checkpoint-4") == []


@pytest.mark.parametrize("damaged", ["state/random_states_0.pkl", "state/model.safetensors"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(run6, tmp_path, data, damaged, capsys):
    out, full = run6
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(out / name, tmp_path / name)
    path = tmp_path / "checkpoint-4" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    assert any(damaged in p and "truncated" in p for p in ckpt.verify_checkpoint(tmp_path / "checkpoint-4"))
    with pytest.raises(ckpt.CheckpointError, match=damaged.split("/")[-1]):  # the file is named, nothing trains
        train(config(tmp_path, data, max_steps=6, save_every=2, resume=str(tmp_path / "checkpoint-4")))
    resumed = train(config(tmp_path, data, max_steps=6, save_every=2, resume="latest"))
    err = capsys.readouterr().out
    assert "skipping damaged checkpoint" in err and damaged in err and "resumed from" in err
    assert "checkpoint-2 at step 2" in err
    assert losses(resumed) == losses(full)  # continued exactly from the previous good checkpoint


def test_altered_content_is_caught_by_the_checksum(run6, tmp_path):
    out, _ = run6
    shutil.copytree(out / "checkpoint-2", tmp_path / "c")
    path = tmp_path / "c" / "state" / "random_states_0.pkl"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert any("checksum" in p for p in ckpt.verify_checkpoint(tmp_path / "c"))


def test_resume_truncates_metrics_and_checks_world_size(run6, tmp_path, data):
    out, full = run6
    shutil.copytree(out, tmp_path / "r")
    r = tmp_path / "r"
    shutil.rmtree(r / "checkpoint-6")  # "killed" after step 6 was logged, before its checkpoint
    resumed = train(config(r, data, max_steps=6, save_every=2, resume="latest"))
    assert losses(resumed) == losses(full)
    steps = [json.loads(line)["step"] for line in (r / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 5-6 of the first run were dropped, not duplicated
    marker = r / "checkpoint-6" / ckpt.TRAINER_STATE
    state = json.loads(marker.read_text())
    marker.write_text(json.dumps({**state, "world_size": 2}))
    shutil.rmtree(r / "adapter")
    with pytest.raises(ckpt.CheckpointError, match="written by 2 process"):
        train(config(r, data, max_steps=8, resume="latest"))


def test_finished_run_is_not_overwritten_without_flag(tmp_path, data):
    out = tmp_path / "o"
    train(config(out, data, max_steps=1))
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(config(out, data, max_steps=1, lr=1e-3))
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    train(config(out, data, max_steps=1, lr=1e-3, overwrite=True))
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_a_checkpoint(tmp_path, data, sig):
    """SIGTERM (preemption) or Ctrl-C sent to the whole process group, data-loader worker included:
    the step finishes, a verified checkpoint is written, the exit is clean."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "cogvlm2.finetune", "finetune", "--model", "tiny", "--data", str(data), "--output",
           str(out), "--max-steps", "400", "--batch-size", "1", "--num-workers", "1", "--no-progress",
           "--no-tensorboard", "--no-gradient-checkpointing"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 200
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    stdout, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, stdout[-3000:]
    assert f"{sig.name}: saving a checkpoint" in stdout and "--resume latest" in stdout
    (saved,) = ckpt.list_checkpoints(out)
    assert ckpt.verify_checkpoint(saved) == [] and 0 < int(saved.name.split("-")[1]) < 400
    assert not (out / "adapter").exists()  # the run is not finished


# ---- --max-length ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_proc():
    model = load_model(checkpoint_folder("tiny"), progress=False)
    return model, Processor.from_pretrained(model.checkpoint_path, model.config)


def long_conversations(tmp_path: Path) -> list:
    rng = random.Random(0)
    (tmp_path / "img.jpg").parent.mkdir(parents=True, exist_ok=True)
    colour_image("red", rng).save(tmp_path / "img.jpg")
    long_q = "describe " * 60
    conv = [{"role": "user", "content": long_q}, {"role": "assistant", "content": "grey " * 10},
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "red"}]
    lines = [json.dumps({"image": "img.jpg", "conversations": conv}),
             json.dumps({"image": "img.jpg", "conversations": conv[:2]})]
    (tmp_path / "long.jsonl").write_text("\n".join(lines) + "\n")
    return load_conversations(tmp_path / "long.jsonl", CONFIG)


def test_max_length_strategies_keep_answers_and_count(tmp_path, tiny_proc):
    _, proc = tiny_proc
    convs = long_conversations(tmp_path)
    limit = VISION_TOKENS + 40
    full = FinetuneDataset(convs, proc, 0, history="full")
    assert all(len(full[(0, i)][0]) > limit for i in range(2))
    ds = FinetuneDataset(convs, proc, 0, history="full", max_length=limit)
    outcomes = {}
    for e in range(6):  # round 2 (history dropped) or round 1 (its long question truncated)
        for i in range(2):
            x, outcome = ds[(e, i)]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            assert len(x) <= limit and sum(label != -100 for label in x.labels) >= 2  # answer tokens kept
            if outcome == "truncated":
                assert x.labels[-1] == CONFIG.eos_token_ids[0]  # the whole answer, EOS included
                assert proc.tokenizer.decode(x.input_ids[-8:]).strip().endswith("grey")
    assert outcomes.get("history_cut") and outcomes.get("truncated") and "fit" not in outcomes
    dropping = FinetuneDataset(convs, proc, 0, history="full", max_length=limit, overlong="drop")
    items = [dropping[(0, 1)]]  # the long single round
    assert items[0][1] == "dropped"
    batch = pack(items)  # a micro-batch dropped whole still runs (no targets)
    assert batch.num_targets == 0 and batch.outcomes == {"dropped": 1}
    with pytest.raises(DataError, match="long.jsonl:2.*exceed --max-length"):
        FinetuneDataset(convs, proc, 0, history="full", max_length=limit, overlong="error")[(0, 1)]


def test_answer_longer_than_max_length_still_trains(tiny_proc):
    _, proc = tiny_proc
    from cogvlm2.finetune.dataset import cut_to

    x = proc("q?", image=colour_image("red", random.Random(1)), answer="word " * 100)
    y = cut_to(x, VISION_TOKENS + 20)
    assert len(y) == VISION_TOKENS + 20 and sum(label != -100 for label in y.labels) >= 10


def test_max_length_reported_and_too_small_refused_before_loading(tmp_path, data):
    with pytest.raises(ValueError, match="below one image"):
        train(config(tmp_path / "x", data, max_length=VISION_TOKENS, max_steps=1))
    assert not (tmp_path / "x").exists()
    state = train(config(tmp_path / "y", data, max_length=VISION_TOKENS + 12, max_steps=2))
    outcomes = state["data"]["outcomes"]
    assert outcomes["truncated"] == 4 and outcomes["fit"] == 0  # 2 steps x 2 examples, each cut


def test_eval_covers_every_held_out_example(tmp_path, data):
    # 16 examples, 20% held out -> 3 (< one batch of 4): evaluated, not dropped or refused
    state = train(config(tmp_path, data, max_steps=1, batch_size=4, eval_fraction=0.2))
    assert state["eval"][-1]["eval/examples"] == 3
    assert state["data"]["unused_per_epoch"] == 13 % 4


def test_eval_data_and_eval_fraction_conflict():
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(model="tiny", data="d", output="o", eval_data="e", eval_fraction=0.1)


def test_load_in_4bit_checked_before_loading(tmp_path, data, monkeypatch):
    import cogvlm2.finetune.train as train_module

    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match="--load-in-4bit"):
        train(config(tmp_path, data, load_in_4bit=True, max_steps=1))


# ---- data formats ----------------------------------------------------------------------------------------

def test_system_caption_and_several_images(tmp_path, tiny_proc):
    _, proc = tiny_proc
    colour_image("red", random.Random(0)).save(tmp_path / "a.jpg")
    lines = [
        {"image": "a.jpg", "conversations": [{"role": "system", "content": "Answer in one word."},
                                             {"role": "user", "content": QUESTION},
                                             {"role": "assistant", "content": "red"}]},
        {"image": "a.jpg", "captions": [{"role": "caption", "content": "A red square on grey."}]},
        {"images": ["a.jpg"], "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    convs = load_conversations(tmp_path / "m.jsonl", CONFIG)
    assert convs[0].system == "Answer in one word." and convs[0].turns == ((QUESTION, "red"),)
    assert convs[1].turns == ((CAPTION_PROMPT, "A red square on grey."),) and convs[1].template == "base"
    ds = FinetuneDataset(convs, proc, 0)
    assert "Answer in one word.\n" + QUESTION in ds[(0, 0)][0].prompt_text
    assert ds[(0, 1)][0].prompt_text == CAPTION_PROMPT  # CogVLM's caption prompt, raw
    bad = {"images": ["a.jpg", "a.jpg"], "conversations": lines[2]["conversations"]}
    late_system = {"image": "a.jpg", "conversations": lines[2]["conversations"] + [{"role": "system", "content": "x"}]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n" + json.dumps(late_system) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations(tmp_path / "bad.jsonl", CONFIG)
    assert "bad.jsonl:1: 2 images in one conversation; CogVLM2 takes one image" in str(e.value)
    assert "bad.jsonl:2" in str(e.value)


def test_official_layout_duplicate_stems_and_upper_case_json(tmp_path):
    ds = make_colour_dataset(tmp_path / "ds", n=4)
    (ds / "labels_en" / "00001.json").rename(ds / "labels_en" / "00001.JSON")
    assert len(load_conversations(ds, CONFIG)) == 4  # *.JSON read
    colour_image("red", random.Random(0)).save(ds / "images" / "00002.png")
    with pytest.raises(DataError, match="two images named 00002"):
        load_conversations(ds, CONFIG)


def test_dataset_mixing_weights(tmp_path):
    a = make_colour_dataset(tmp_path / "a", n=4)
    b = make_colour_dataset(tmp_path / "b", n=6)
    mixed = load_mixture([a, b], CONFIG, weights=[2, 0.5], seed=1)
    from_a = [c for c in mixed if str(a) in c.source]
    from_b = [c for c in mixed if str(b) in c.source]
    assert len(from_a) == 8 and len(from_b) == 3 and len({c.source for c in from_b}) == 3
    assert mixed == load_mixture([a, b], CONFIG, weights=[2, 0.5], seed=1)  # fixed by the seed
    with pytest.raises(ValueError, match="one --data-weights value per"):
        TrainConfig(model="tiny", data=[str(a), str(b)], output="o", data_weights=[1.0])


# ---- what trains -----------------------------------------------------------------------------------------

def test_vision_expert_part_is_the_whole_expert():
    model = load_model(checkpoint_folder("tiny"), progress=False)
    names = train_only(model, "vision_expert")
    kinds = {n.split(".")[3] + "." + n.split(".")[4] for n in names}
    assert kinds == {"self_attn.vision_expert_query_key_value", "self_attn.vision_expert_dense",
                     "mlp.vision_mlp"}, kinds
    assert sum("vision_mlp" in n for n in names) == 3 * CONFIG.num_hidden_layers
    assert set(train_only(model, "adapter")) == {n for n, _ in model.named_parameters() if ".linear_proj." in n}


def test_lora_with_fully_trained_adapter_and_module_lrs(tmp_path, data):
    out = tmp_path / "m"
    state = train(config(out, data, max_steps=3, modules_to_save="adapter", module_lr="adapter=1e-3"))
    assert len(state["history"]) == 3
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    full = [k for k in saved if "lora_" not in k]
    assert full and all(k.startswith("base_model.model.model.vision.linear_proj.") for k in full)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "model.vision.linear_proj.linear_proj" in cfg["modules_to_save"]
    base = load_model(checkpoint_folder("tiny"), progress=False).state_dict()
    tuned, _ = load_with_adapter(load_model(checkpoint_folder("tiny"), progress=False), out / "adapter")
    key = "model.vision.linear_proj.dense_h_to_4h.weight"
    assert not torch.equal(tuned.get_parameter(key), base[key])
    torch.testing.assert_close(tuned.get_parameter(key), saved["base_model.model." + key])
    merged = merge_adapter("tiny", out / "adapter", tmp_path / "merged", progress=False)
    torch.testing.assert_close(load_model(str(merged), progress=False).get_parameter(key), saved["base_model.model." + key])

    model = load_model(checkpoint_folder("tiny"), progress=False)
    apply_lora(model, TARGETS)
    from cogvlm2.finetune.modules import also_train

    also_train(model, "adapter")
    groups = {g["name"]: g for g in param_groups(model, 1e-2, {"adapter": 1e-3}, 0.0)}
    assert groups["adapter"]["lr"] == 1e-3 and groups["default"]["lr"] == 1e-2
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", [{"rslora": True}, {"dora": True}])
def test_rslora_and_dora_merge_equals_unmerged(tmp_path, variant):
    from cogvlm2.finetune.lora import save_adapter

    model = load_model(checkpoint_folder("tiny"), progress=False)
    apply_lora(model, ["vision_expert_qkv", "language_expert_qkv"], r=4, alpha=8, dropout=0.0, **variant)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, mean=1.0 if "magnitude" in n else 0.0, std=0.05)
    cfg = json.loads(save_adapter(model, tmp_path / "a", base_model="tiny").joinpath("adapter_config.json").read_text())
    assert cfg["use_rslora" if "rslora" in variant else "use_dora"] is True
    proc = Processor.from_pretrained(model.checkpoint_path, model.config)
    batch = pack([proc(QUESTION, image=colour_image("red", random.Random(2)), answer="red")])
    unmerged, _ = load_with_adapter(load_model(checkpoint_folder("tiny"), progress=False), tmp_path / "a")
    merged = load_model(str(merge_adapter("tiny", tmp_path / "a", tmp_path / "m", progress=False)), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(CausalLMLoss(merged)(batch), CausalLMLoss(unmerged)(batch), rtol=1e-5, atol=1e-4)


def test_merged_checkpoint_has_inv_freq_and_no_tiny_readme(tmp_path):
    model = load_model(checkpoint_folder("tiny"), progress=False)
    apply_lora(model, ["language_expert_qkv"])
    from cogvlm2.finetune.lora import save_adapter

    save_adapter(model, tmp_path / "a", base_model="tiny")
    out = merge_adapter("tiny", tmp_path / "a", tmp_path / "m", dtype="bf16", progress=False)
    assert not (out / "README.md").exists() and (out / "tokenizer.json").is_file()
    weights = {}
    for f in out.glob("*.safetensors"):
        weights.update(load_file(f))
    inv = weights["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert inv.dtype == torch.bfloat16 and inv.shape == (CONFIG.head_dim // 2,)
    assert len([k for k in weights if k.endswith("rotary_emb.inv_freq")]) == CONFIG.num_hidden_layers
    torch.testing.assert_close(inv.float(), (1.0 / CONFIG.rope_theta ** (torch.arange(0, CONFIG.head_dim, 2) / CONFIG.head_dim)).bfloat16().float())
    load_model(str(out), progress=False)  # still loads (inv_freq is recomputed, not read)


def test_generation_eval_and_best_checkpoint(tmp_path, data):
    from cogvlm2.finetune.generate_eval import normalize, token_f1

    assert normalize("The Red, square!") == "red square" and token_f1("a red square", "red") == pytest.approx(2 / 3)
    state = train(config(tmp_path, data, max_steps=12, batch_size=4, eval_fraction=0.25, eval_every=4, save_every=4,
                         save_total_limit=1, eval_generate=2, eval_max_new_tokens=4, metric_for_best="eval/loss"))
    evals = state["eval"]
    assert [e["step"] for e in evals] == [4, 8, 12]
    assert all(e["eval/samples"] == 2 and 0 <= e["eval/token_f1"] <= 1 and 0 <= e["eval/exact_match"] <= 1
               for e in evals)
    best = state["best"]
    assert best["value"] == min(e["eval/loss"] for e in evals)
    kept = {p.name for p in ckpt.list_checkpoints(tmp_path)}
    assert kept == {"checkpoint-12", f"checkpoint-{best['step']}"}  # the best survives --save-total-limit 1
    assert best["checkpoint"] == str(tmp_path / f"checkpoint-{best['step']}")
    with pytest.raises(ValueError, match="needs --eval-generate"):
        TrainConfig(model="tiny", data="d", output="o", metric_for_best="eval/token_f1")


def test_fp16_training_for_pre_ampere_gpus(tmp_path, data):
    """--dtype fp16: fp16 base, fp32 LoRA weights, loss scaling (a fresh process: its own accelerate state)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cogvlm2.finetune", "finetune", "--model", "tiny", "--data", str(data), "--output",
           str(tmp_path / "fp16"), "--max-steps", "3", "--batch-size", "2", "--dtype", "fp16", "--lr", "1e-2",
           "--lora-targets", "vision_expert_qkv,language_expert_qkv,lm_head", "--num-workers", "0", "--no-progress",
           "--no-tensorboard", "--no-gradient-checkpointing"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 < row["train/loss"] < 50 for row in rows)
    weights = load_file(tmp_path / "fp16" / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


def test_sharded_backends_refuse_text_only_examples():
    """Under ZeRO-3 / FSDP2 a rank whose micro-batch has no image would skip the vision tower's
    collective gathers and stall the others: refused up front, naming the example."""
    from cogvlm2.finetune.data import Conversation
    from cogvlm2.finetune.train import check_media_everywhere

    check_media_everywhere([Conversation("a.json", (("q", "a"),), image=Path("a.jpg"))])
    with pytest.raises(ValueError, match="1 conversation.*m.jsonl:3"):
        check_media_everywhere([Conversation("a.json", (("q", "a"),), image=Path("a.jpg")),
                                Conversation("m.jsonl:3", (("q", "a"),))])


def test_compiled_ops_default_on_for_one_process_only(monkeypatch):
    """--compiled-ops defaults to on in a one-process run (measured on the 19B) with Triton installed, and
    off under several processes (not measured there yet); --compiled-ops / --no-compiled-ops decide."""
    import argparse

    from cogvlm2.finetune.cli import add_arguments
    from cogvlm2.finetune.train import TrainConfig, compiled_ops_enabled

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--model", "tiny", "--data", "d", "--output", "o"]
    given = [p.parse_args(base + flags).compiled_ops for flags in ([], ["--compiled-ops"], ["--no-compiled-ops"])]
    assert given == [None, True, False]
    monkeypatch.setattr("cogvlm2.finetune.train._has_triton", lambda: True)
    for world, auto in (("1", True), ("2", False)):
        monkeypatch.setenv("WORLD_SIZE", world)
        assert [compiled_ops_enabled(TrainConfig(model="tiny", data="d", output="o", compiled_ops=v))
                for v in given] == [auto, True, False]
    monkeypatch.delenv("WORLD_SIZE")
    assert compiled_ops_enabled(TrainConfig(model="tiny", data="d", output="o"))
    monkeypatch.setattr("cogvlm2.finetune.train._has_triton", lambda: False)  # torch.compile could not build kernels
    assert not compiled_ops_enabled(TrainConfig(model="tiny", data="d", output="o"))
    assert compiled_ops_enabled(TrainConfig(model="tiny", data="d", output="o", compiled_ops=True))

"""Multi-process fine-tuning on CPUs (gloo): the step's gradient is the token-weighted mean over all
ranks, DeepSpeed ZeRO-2 / ZeRO-3 really run (and resume exactly), and a backend that cannot run is
refused instead of quietly becoming DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from cogvlm2.finetune.toy import make_colour_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cogvlm2" / "finetune" / "configs"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}

GRAD_WORKER = r'''
import random, sys
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from cogvlm2.finetune.lora import apply_lora
from cogvlm2.finetune.objective import CausalLMLoss
from cogvlm2.finetune.packing import pack
from cogvlm2.finetune.toy import colour_image
from cogvlm2.finetune.train import loss_scale
from cogvlm2.model import load_model
from cogvlm2.tiny import checkpoint_folder
from cogvlm2.processing import Processor

def example(proc, n_answer, seed):
    words = []
    while len(proc.tokenizer.encode(" ".join(words))) + 1 < n_answer:  # + EOS
        words.append("red")
    x = proc("What colour is the square?", image=colour_image("red", random.Random(seed)), answer=" ".join(words))
    assert sum(l != -100 for l in x.labels) == n_answer, sum(l != -100 for l in x.labels)
    return x

def model_and_examples():
    torch.manual_seed(0)
    model = load_model(checkpoint_folder("tiny"), progress=False)
    apply_lora(model, ["vision_expert_qkv", "language_expert_qkv", "lm_head"], dropout=0.0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    proc = Processor.from_pretrained(model.checkpoint_path, model.config)
    return model, [example(proc, 4, 0), example(proc, 132, 1)]

def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

out = sys.argv[1]
model, xs = model_and_examples()
if sys.argv[2] == "single":  # one process, both examples: the token mean
    batch = pack(xs)
    (CausalLMLoss(model)(batch) / batch.num_targets).backward()
    torch.save(grads(model), out)
else:
    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    module = acc.prepare(CausalLMLoss(model))
    batch = pack([xs[acc.process_index]])  # rank 0: 4 answer tokens, rank 1: 132
    scale, n = loss_scale(acc, [batch], grad_accum=1)
    assert n == 136, n
    acc.backward(module(batch) * scale)
    if acc.is_main_process:
        torch.save(grads(model), out)
'''


def torchrun(*args: str, port: int, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def test_two_rank_gradient_is_the_token_weighted_mean(tmp_path):
    """Ranks holding 4 and 132 answer tokens: the DDP gradient equals one process's gradient of the
    mean over all 136 tokens (a mean of per-rank means would weight the 4 tokens 33 times too much)."""
    script = tmp_path / "worker.py"
    script.write_text(GRAD_WORKER)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "single.pt"), "single"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(str(script), str(tmp_path / "ddp.pt"), "ddp", port=29541)
    assert r.returncode == 0, r.stderr[-3000:]
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    assert single.keys() == ddp.keys() and len(single) > 0
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-7, msg=k)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours") / "ds", n=24, seed=0)


def finetune(data: Path, out: Path, *extra: str, port: int) -> dict:
    r = torchrun("-m", "cogvlm2.finetune", "finetune", "--model", "tiny", "--data", str(data), "--output", str(out),
                 "--max-steps", "4", "--batch-size", "2", "--save-every", "2", "--lr", "1e-2", "--lora-dropout", "0",
                 "--lora-targets", "vision_expert_qkv,language_expert_qkv", "--num-workers", "0", "--no-progress",
                 "--no-gradient-checkpointing", "--no-tensorboard", "--eval-fraction", "0.125", *extra, port=port,
                 timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads((out / "trainer_state.json").read_text())



@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_trains_and_resumes_exactly(data, tmp_path, stage):
    """torchrun + --deepspeed ds_zero{2,3}.json on two CPU processes. ZeRO-3 loads the model into host
    memory and partitions it (never whole on a device), and resumes bit for bit."""
    pytest.importorskip("deepspeed")
    cfg = str(CONFIGS / f"ds_zero{stage}.json")
    full = finetune(data, tmp_path / "a", "--deepspeed", cfg, port=29550 + stage)
    state_files = {p.name for p in (tmp_path / "a" / "checkpoint-2" / "state").rglob("*")}
    assert any("optim_states" in n for n in state_files), state_files  # DeepSpeed's own sharded format
    losses = [h["loss"] for h in full["history"]]
    assert len(losses) == 4 and all(0 < v < 50 for v in losses) and losses[-1] < losses[0]
    # 3 held-out examples: rank 0 evaluates 2 packed together, rank 1 one (and a padding pass); under ZeRO-3
    # the ranks must still make the same layer calls
    assert full["eval"][-1]["eval/examples"] == 3
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()
    if stage == 2:
        return  # the resume path is the same; ZeRO-3 exercises it
    assert full["sharded_loading"] == "zero3"
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = finetune(data, tmp_path / "b", "--deepspeed", cfg, "--resume", "latest", port=29560 + stage)
    assert [h["loss"] for h in resumed["history"]] == losses


def test_fsdp_without_cuda_is_refused_not_ddp(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("FSDP runs on CUDA here")
    from cogvlm2.finetune.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP was requested .* no CUDA device"):
        make_accelerator(None, 1, 1.0, "no")


def test_zero3_bf16_full_finetune_trains_only_the_chosen_modules(data, tmp_path):
    """ZeRO-3 in bf16 with fully trained modules (the 19B visual expert + GLU recipe on the tiny model):
    the trainer's fp32 trainable weights used to meet bf16 activations in a matmul ("expected mat1 and
    mat2 to have the same dtype", found on 2 H200s). Now DeepSpeed holds the fp32 master copy and the
    module is bf16: it trains, and the saved model differs from the base in the adapter alone."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from cogvlm2.tiny import checkpoint_folder

    out = tmp_path / "full"
    r = torchrun("-m", "cogvlm2.finetune", "finetune", "--model", "tiny", "--data", str(data), "--output", str(out),
                 "--method", "full", "--train-modules", "adapter", "--dtype", "bf16", "--lr", "1e-2",
                 "--max-steps", "2", "--batch-size", "2", "--deepspeed", str(CONFIGS / "ds_zero3.json"),
                 "--num-workers", "0", "--no-progress", "--no-tensorboard", "--eval-fraction", "0", port=29571)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["sharded_loading"] == "zero3" and len(state["history"]) == 2
    saved = load_file(out / "model" / "model.safetensors")
    base = {}
    for f in Path(checkpoint_folder("tiny")).glob("*.safetensors"):
        base.update(load_file(f))
    changed = {k for k in base if not torch.equal(saved[k], base[k].to(torch.bfloat16))}
    assert changed and all(k.startswith("model.vision.linear_proj.") for k in changed), sorted(changed)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in saved.values())

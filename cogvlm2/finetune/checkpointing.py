"""Training checkpoints: everything `--resume` needs to continue exactly, and the adapter in peft format.

    checkpoint-<step>/
        state/                accelerate's save_state: trainable weights only (frozen base weights are
                              never copied), optimizer, RNG of every rank (python, numpy, torch, cuda),
                              accelerate's step counter; DeepSpeed / FSDP write their sharded formats here
        adapter/              LoRA runs: the adapter so far, in peft format (serve or merge any checkpoint)
        trainer_state.json    step, loss history, run config; written last, so its presence marks a
                              complete checkpoint

The learning-rate schedule and the data order are pure functions of the step, so the step number
is all the trainer itself has to remember.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / f"checkpoint-{step}"


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints under `output`, oldest first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := _NAME.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def keep_only_trainable(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
    """accelerate save_state pre-hook: drop frozen tensors from the model state it is about to write.

    FSDP and DeepSpeed write their (sharded) model states themselves and hand the hook no weights:
    nothing to filter then (zip stops at the shorter list)."""
    for i, (model, state) in enumerate(zip(models, weights)):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in state.items() if k in trainable}


def _is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.value == "DEEPSPEED"


def gathered_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the trainable parameters. Collective: call on every rank.

    Plain and DDP parameters are local already; FSDP2 parameters are DTensors (`full_tensor()`);
    DeepSpeed ZeRO-3 parameters are gathered with GatheredParameters.
    """
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3 partitioned parameter
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=None)
        else:
            ctx = nullcontext()
        with ctx:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p.data
            out[name] = t.detach().to("cpu", copy=True)
    return out


def save_checkpoint(folder: Path, accelerator, model: nn.Module, trainer_state: dict, lora: bool,
                    base_model: str | None) -> Path:
    """Write one checkpoint (all ranks call this). `model` is the unwrapped CogVLM2 model."""
    kwargs = {"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}
    accelerator.save_state(str(folder / "state"), safe_serialization=True, **kwargs)
    state = gathered_trainable_state(model)
    if accelerator.is_main_process:
        if lora:
            from .lora import save_adapter

            save_adapter(model, folder / "adapter", state_dict=state, base_model=base_model)
        (folder / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(folder: Path, accelerator) -> dict:
    """Restore trainable weights, optimizer and RNG from `folder`; return its trainer state."""
    if not (folder / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{folder} is not a complete training checkpoint ({TRAINER_STATE} missing)")
    kwargs = {"load_module_strict": False} if _is_deepspeed(accelerator) else {"strict": False}
    accelerator.load_state(str(folder / "state"), **kwargs)
    return json.loads((folder / TRAINER_STATE).read_text())


def rotate_checkpoints(output: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` complete checkpoints (main process only)."""
    if not keep:
        return
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)

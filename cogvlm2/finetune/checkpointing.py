"""Training checkpoints: everything `--resume` needs to continue exactly, written atomically and
verified before use.

    checkpoint-<step>/
        state/                accelerate's save_state: trainable weights only (frozen base weights are
                              never copied), optimizer, RNG of every rank (python, numpy, torch, cuda),
                              accelerate's step counter; DeepSpeed / FSDP write their sharded formats here
        adapter/              LoRA runs: the adapter so far, in peft format (serve or merge any checkpoint)
        trainer_state.json    step, loss history, run config, world size, and the size (and, up to
                              CHECKSUM_LIMIT, the blake2b digest) of every other file: the completeness marker

Every rank writes into `.checkpoint-<step>.tmp/`; after a barrier (all ranks' files are on disk) the
main process writes the marker and renames the folder to `checkpoint-<step>`, so a checkpoint that is
visible is complete. On resume a checkpoint is verified against its marker; `--resume latest` falls
back to the newest one that verifies and says which it skipped and why.

The learning-rate schedule and the data order are pure functions of the step, so the step number
is all the trainer itself has to remember.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

TRAINER_STATE = "trainer_state.json"
CHECKSUM_LIMIT = 1 << 30  # bigger files (sharded weights / optimizer of large runs) are checked by size only
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is incomplete or damaged; the message names the file."""


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / f"checkpoint-{step}"


def list_checkpoints(output: Path) -> list[Path]:
    """Checkpoints under `output` that carry the completeness marker, oldest first."""
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


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(folder: Path) -> dict[str, dict]:
    """{relative path: {"size": bytes, "blake2b": hex (files up to CHECKSUM_LIMIT)}} of every file."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == TRAINER_STATE:
            continue
        size = path.stat().st_size
        out[rel] = {"size": size, **({"blake2b": _digest(path)} if size <= CHECKSUM_LIMIT else {})}
    return out


def verify_checkpoint(folder: Path) -> list[str]:
    """Problems with `folder` (missing marker, missing / truncated / altered files); [] when it is sound."""
    marker = folder / TRAINER_STATE
    if not marker.is_file():
        return [f"{marker} missing (the checkpoint was never completed)"]
    try:
        state = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{marker}: unreadable ({e})"]
    files = state.get("files")
    if not isinstance(files, dict):
        return [f"{marker}: no file list (written by an older version: it cannot be verified)"]
    problems = []
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: {path.stat().st_size:,} bytes, expected {want['size']:,} (truncated?)")
        elif "blake2b" in want and _digest(path) != want["blake2b"]:
            problems.append(f"{path}: content differs from when it was saved (checksum mismatch)")
    return problems


def save_checkpoint(folder: Path, accelerator, model: nn.Module, trainer_state: dict, lora: bool,
                    base_model: str | None) -> Path:
    """Write one checkpoint atomically (all ranks call this). `model` is the unwrapped CogVLM2 model."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    kwargs = {"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}
    accelerator.save_state(str(tmp / "state"), safe_serialization=True, **kwargs)
    state = gathered_trainable_state(model)
    if accelerator.is_main_process and lora:
        from .lora import save_adapter

        save_adapter(model, tmp / "adapter", state_dict=state, base_model=base_model)
    accelerator.wait_for_everyone()  # every rank's shard, optimizer and RNG file is on disk
    if accelerator.is_main_process:
        marker = {**trainer_state, "world_size": accelerator.num_processes, "files": file_manifest(tmp)}
        (tmp / TRAINER_STATE).write_text(json.dumps(marker, indent=1) + "\n")
        _fsync_dir(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    accelerator.wait_for_everyone()
    return folder


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def choose_resume(output: Path, resume: str, log=print) -> Path | None:
    """The checkpoint to resume from: `resume` (a folder, which must verify) or, for "latest", the newest
    one under `output` that verifies (each damaged one is reported and skipped). None: nothing to resume."""
    if resume != "latest":
        folder = Path(resume)
        problems = verify_checkpoint(folder)
        if problems:
            raise CheckpointError(f"cannot resume from {folder}:\n  " + "\n  ".join(problems[:10])
                                  + "\n(--resume latest falls back to the newest checkpoint that verifies)")
        return folder
    for folder in reversed(list_checkpoints(output)):
        problems = verify_checkpoint(folder)
        if not problems:
            return folder
        log(f"warning: skipping damaged checkpoint {folder}:\n  " + "\n  ".join(problems[:10]))
    return None


def load_checkpoint(folder: Path, accelerator) -> dict:
    """Restore trainable weights, optimizer and RNG from `folder`; return its trainer state."""
    state = json.loads((folder / TRAINER_STATE).read_text())
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != accelerator.num_processes:
        raise CheckpointError(f"{folder} was written by {saved_world} process(es), this run has "
                              f"{accelerator.num_processes}: the data order, the per-rank RNG and sharded states "
                              f"differ; resume with {saved_world} process(es)")
    kwargs = {"load_module_strict": False} if _is_deepspeed(accelerator) else {"strict": False}
    try:
        accelerator.load_state(str(folder / "state"), **kwargs)
    except Exception as e:  # noqa: BLE001 - name the checkpoint whatever the backend raised
        raise CheckpointError(f"loading {folder / 'state'} failed: {type(e).__name__}: {e}") from e
    return state


def rotate_checkpoints(output: Path, keep: int | None, keep_also: Path | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints and `keep_also` (the best one; main process only)."""
    if not keep:
        return
    for old in list_checkpoints(output)[:-keep]:
        if keep_also is None or old.resolve() != keep_also.resolve():
            shutil.rmtree(old, ignore_errors=True)

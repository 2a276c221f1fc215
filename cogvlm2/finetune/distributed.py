"""The distributed backend of a run: which one was asked for (DDP, DeepSpeed ZeRO-2/3, FSDP2), the
accelerate Accelerator that runs it, and sharded loading for the backends that shard weights.

A backend that was asked for either runs or stops the run with a message; it never quietly becomes
another. DeepSpeed runs on CPUs too (gloo), which is how the tests exercise ZeRO-2 / ZeRO-3; accelerate
runs FSDP on accelerators only, so FSDP without CUDA is refused.

Sharded loading: ZeRO-3 and FSDP2 never put the whole model on a GPU. Each rank reads the
checkpoint into host memory (tensor by tensor, see checkpoint.load_weights); ZeRO-3 then partitions
it with `deepspeed.zero.Init(module=...)` (one parameter at a time goes to the GPU, rank 0's copy is
broadcast and each rank keeps its shard), and FSDP2 with accelerate's `cpu_ram_efficient_loading`
(the model goes to the meta device, is sharded there, and rank 0's weights are broadcast shard by shard).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def requested_backend(deepspeed_config: str | None) -> str:
    """"deepspeed", "fsdp" or "ddp" (plain / DDP), from --deepspeed and accelerate launch's environment."""
    if deepspeed_config or _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def make_accelerator(deepspeed_config: str | None, grad_accum: int, max_grad_norm: float, mixed_precision: str):
    """The Accelerator of the requested backend, verified to be that backend."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    backend = requested_backend(deepspeed_config)
    cuda = torch.cuda.is_available()
    if backend == "fsdp" and not cuda:
        raise ValueError("FSDP was requested (accelerate config distributed_type: FSDP) but no CUDA device is "
                           "visible; accelerate runs FSDP on GPUs only. On CPUs use DeepSpeed "
                           "(--config_file zero2.yaml / zero3.yaml) or plain DDP (torchrun).")
    if backend == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ValueError("DeepSpeed was requested but is not installed: pip install 'cogvlm2[deepspeed]'") from None
    # a micro-batch without images leaves the vision-expert weights unused
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if backend == "deepspeed" and not cuda and distributed:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # DeepSpeed's CPU accelerator over gloo
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config) if deepspeed_config else None
    acc = Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision,
                      deepspeed_plugin=plugin, cpu=not cuda and backend == "ddp",  # cpu: torchrun on CPUs -> gloo
                      kwargs_handlers=handlers)
    got = acc.distributed_type.value
    want = {"deepspeed": ("DEEPSPEED",), "fsdp": ("FSDP",)}.get(backend)
    if want and got not in want:
        raise ValueError(f"{backend} was requested but accelerate set up {got}; refusing to train on another backend")
    if backend == "deepspeed" and distributed and acc.num_processes != int(os.environ["WORLD_SIZE"]):
        raise ValueError(f"DeepSpeed sees {acc.num_processes} process(es) of WORLD_SIZE {os.environ['WORLD_SIZE']}")
    ds = acc.state.deepspeed_plugin
    if ds is not None:  # what accelerate cannot infer without a prepared DataLoader
        if ds.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = 1  # one packed micro-batch
        if ds.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            ds.deepspeed_config["gradient_clipping"] = max_grad_norm  # DeepSpeed clips inside its step
    return acc


def zero_stage(accelerator) -> int:
    ds = accelerator.state.deepspeed_plugin
    return int(ds.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if ds is not None else 0


def shards_weights(accelerator) -> bool:
    """ZeRO-3 or FSDP: the model is loaded into host memory and sharded, never whole on a GPU."""
    return zero_stage(accelerator) == 3 or accelerator.distributed_type.value == "FSDP"


def resolved_ds_config(accelerator) -> dict:
    """The DeepSpeed config with accelerate's "auto" values resolved (what zero.Init needs up front)."""
    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    micro = cfg.get("train_micro_batch_size_per_gpu", 1)
    accum = accelerator.gradient_accumulation_steps
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_batch_size"] = micro * accum * accelerator.num_processes
    for section in ("bf16", "fp16"):
        if cfg.get(section, {}).get("enabled") == "auto":
            cfg[section]["enabled"] = accelerator.mixed_precision == section
    zero = cfg.get("zero_optimization", {})
    for k, v in list(zero.items()):
        if v == "auto":
            del zero[k]
    return cfg


def shard_for_zero3(model: nn.Module, accelerator) -> nn.Module:
    """Partition a host-memory model into ZeRO-3 parameters (each rank keeps its shard, on its device)."""
    import deepspeed

    cfg = resolved_ds_config(accelerator)
    dtype = torch.bfloat16 if cfg.get("bf16", {}).get("enabled") else (
        torch.float16 if cfg.get("fp16", {}).get("enabled") else torch.float32)
    if dtype != torch.float32:
        # DeepSpeed keeps the fp32 master copy of a bf16 / fp16 run in its optimizer; the module's own
        # parameters are in the compute dtype (ZeRO-1/2's engine casts the module itself, ZeRO-3 does
        # not cast a module partitioned here), else the trainer's fp32 trainable weights meet bf16
        # activations in a matmul
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    deepspeed.zero.Init(module=model, config_dict_or_path=cfg, dtype=dtype)
    return model


def configure_fsdp_loading(accelerator) -> None:
    """FSDP2: shard on the meta device and broadcast rank 0's weights (the model stays off the GPUs until then)."""
    plugin = accelerator.state.fsdp_plugin
    plugin.cpu_ram_efficient_loading = True
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"

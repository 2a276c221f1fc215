"""CogVLM2 in plain PyTorch: build on the meta device, load official weights straight into place."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_weights, parse_dtype, read_matching, resolve_model_path
from ..devices import release_cached_memory
from .cogvlm import CogVLM2ForCausalLM
from .parallel import ParallelContext, shard_slicer
from .pipeline import place, plan_stages
from .registry import FAMILIES, ModelFamily, family_of, read_config

__all__ = ["CogVLM2ForCausalLM", "FAMILIES", "ModelFamily", "ParallelContext", "family_of", "load_model",
           "read_config", "shard_model"]


INV_FREQ_KEYS = r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"


def load_model(name_or_path: str, dtype: torch.dtype | str = "float32", device: str | torch.device = "cpu",
               progress: bool = True, quant: str | int | None = None, rope_mode: str = "official", *,
               tensor_parallel: ParallelContext | None = None,
               pipeline_devices: Sequence[str | torch.device] | None = None,
               pipeline_capacities: Sequence[float] | None = None) -> CogVLM2ForCausalLM:
    """A local checkpoint folder or a Hugging Face repo id (an embedded model's name, "tiny", "tiny-video",
    "tiny-random", resolves to its folder through `cogvlm2.tiny.checkpoint_folder` first).

    The model is built on the meta device and every tensor is loaded once, directly in `dtype` on
    `device`; the key set must match the official checkpoint exactly. A bitsandbytes 4-bit checkpoint
    (the official int4 ones) loads into fp4 linears as stored; `quant` (see `cogvlm2.quant`) quantizes a
    full-precision checkpoint on the fly, one layer at a time on `device`. The checkpoint's rotary
    `inv_freq` buffers (bf16 in the official files) drive the rotary embedding as in the official code
    (`rope_mode="official"`); `rope_mode="exact"` uses float32 frequencies and positions instead
    (see `RotaryEmbedding`).

    tensor_parallel: this process's rank of a tensor-parallel group (`ParallelContext.from_env()` under
    torchrun); the rank reads only its slices of the checkpoint and `device` should be its GPU
    (`ctx.device`). pipeline_devices: spread consecutive parts of the model over these devices
    (`pipeline.plan_stages`, balanced by parameter bytes, optionally weighted by pipeline_capacities);
    `device` is then ignored. See docs/parallel.md.
    """
    from .. import quant as q

    if tensor_parallel is not None and pipeline_devices is not None:
        raise ValueError("tensor_parallel and pipeline_devices cannot be combined")
    folder = resolve_model_path(name_or_path)
    config = read_config(folder)
    family = family_of(config)
    mode = q.normalize_quant(quant)
    stored = q.checkpoint_quant_type(config.raw)
    if stored is not None and mode not in (None, stored, stored + "-dq"):
        raise ValueError(f"{name_or_path} is already quantized ({stored}); it cannot be re-quantized to {mode}: "
                         f"drop --quant (or use {stored.removesuffix('-dq')}-dq for 8-bit absmax) or use the bf16 "
                         "checkpoint")
    with torch.device("meta"):
        model = family.model_class(config, tp=tensor_parallel)
    dtype = parse_dtype(dtype)
    # the weights never land in a dropped engine's cached KV pool, which they would pin (devices.release_cached_memory)
    release_cached_memory([device] if pipeline_devices is None else pipeline_devices)
    if (stored is not None or mode is not None) and (tensor_parallel is not None or pipeline_devices is not None):
        raise ValueError("quantized models run on one device: tensor_parallel / pipeline_devices need a bf16, fp16 "
                         "or fp32 checkpoint without --quant")
    if stored is not None:
        checks = q.prepare_prequantized(model, stored)
        load_weights(model, folder, dtype=dtype, device=device, progress=progress, keep_dtype=q.KEEP_DTYPE,
                     metadata=checks)
        model.quantization = stored
        if mode is not None and mode != stored:  # fp4 -> fp4-dq: the same codes, 8-bit absmax
            q.compress_statistics(model)
        if q.int8_head(stored):
            q.quantize_lm_head(model)
    elif mode is not None:  # read on the CPU, quantize layer by layer onto the device
        load_weights(model, folder, dtype=dtype, device="cpu", progress=progress)
        q.quantize_model(model, mode, device)
    plan = None if pipeline_devices is None else plan_stages(model, pipeline_devices, pipeline_capacities)
    if stored is None and mode is None:
        slicer = None if tensor_parallel is None else shard_slicer(config, tensor_parallel)
        load_weights(model, folder, dtype=dtype, device=device if plan is None else plan.device_of,
                     progress=progress, slicer=slicer)
    model.rotary.set_frequencies(checkpoint_inv_freq(folder), rope_mode)
    if plan is not None:
        place(model, plan)
    else:
        model.rotary.inv_freq(torch.device(device), model.dtype)  # the table exists before any CUDA-graph capture
    model.checkpoint_path = folder
    return model.eval().requires_grad_(False)


def shard_model(model: CogVLM2ForCausalLM, tensor_parallel: ParallelContext) -> CogVLM2ForCausalLM:
    """This rank's shard of an in-memory model (random weights for benchmarks, a merged fine-tune): the same
    slices `load_model(..., tensor_parallel=...)` reads from a checkpoint, on the model's devices. Replicated
    tensors (the vision tower, norms) are shared with `model`, sharded ones copied."""
    with torch.device("meta"):
        out = family_of(model.config).model_class(model.config, tp=tensor_parallel)
    slicer = shard_slicer(model.config, tensor_parallel)
    state = {}
    for key, t in model.state_dict().items():
        part = slicer(key, tuple(t.shape))
        state[key] = t if part is None else part.read(t).clone()
    out.load_state_dict(state, strict=True, assign=True)
    out.rotary.set_frequencies(model.rotary.source, model.rotary.mode)
    out.checkpoint_path = getattr(model, "checkpoint_path", None)
    return out.eval().requires_grad_(False)


def checkpoint_inv_freq(folder: str | Path) -> torch.Tensor | None:
    """The rotary frequencies stored in a checkpoint (one per layer in the official files, all equal),
    or None when it stores none."""
    found = read_matching(folder, INV_FREQ_KEYS)
    if not found:
        return None
    first = next(iter(found.values()))
    if any(not torch.equal(t, first) for t in found.values()):
        raise CheckpointError(f"{folder}: the layers' rotary_emb.inv_freq buffers differ; one rotary table is supported")
    return first

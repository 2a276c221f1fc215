"""Device and dtype defaults and checks shared by the CLI, the engine and the servers (no argument parsing here)."""

from __future__ import annotations

import gc

import torch

_FROZEN = False  # whether freeze_heap froze the collector's heap (a freeze of the caller's own is not ours to undo)


def auto_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is returned as given."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_dtype(dtype: str = "auto", device: str = "cpu") -> str:
    """"auto" as every official demo chooses: bfloat16 on GPUs of compute capability >= 8 (Ampere and
    later), float16 on older GPUs, float32 on the CPU."""
    if dtype != "auto":
        return dtype
    dev = torch.device(device)
    if dev.type != "cuda":
        return "float32"
    major, _ = torch.cuda.get_device_capability(dev)
    return "bfloat16" if major >= 8 else "float16"


def resolve_device(device: str) -> str:
    """"auto" as `auto_device`; any other value is checked here, before a model loads, so that `--device cuda`
    without a GPU is one clear error instead of a failure deep inside loading."""
    if device == "auto":
        return auto_device(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {device}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: unsupported; use auto, cpu, cuda or cuda:N")
    return device


def release_cached_memory(devices) -> None:
    """Give the CUDA caching allocator's free blocks on these devices back to the driver, after collecting garbage
    (an engine dropped earlier may still be alive in a reference cycle).

    Called before a model's weights or an engine's KV pool are allocated: the allocator splits its cached free
    blocks for new tensors, so an earlier engine's freed KV pool (one segment of most of the GPU), still cached,
    would take the new tensors and then could never be returned while they live: the next engine's memory
    profile would count it as memory used elsewhere and size its KV cache negative. Nothing on the CPU."""
    thaw_heap()  # an engine dropped while frozen (freeze_heap) is collectable again
    cuda = sorted({torch.device(d) for d in devices if torch.device(d).type == "cuda"}, key=str)
    if not cuda or not torch.cuda.is_initialized():
        return  # nothing cached before CUDA's first use
    gc.collect()
    for d in cuda:
        with torch.cuda.device(d):
            torch.cuda.empty_cache()


def freeze_heap() -> None:
    """Collect, then move everything alive (torch's and Triton's own objects, the model's, the engine's) out of the
    garbage collector's reach (gc.freeze), so its full collections during serving scan only what the steps
    allocate: on the full-size model's heap a full collection is a host pause that can outlast the GPU work queued
    ahead of it. The engine does this after it is built when engine.core.GC_FREEZE is set; thaw_heap undoes it."""
    global _FROZEN
    gc.collect()
    gc.freeze()
    _FROZEN = True


def thaw_heap() -> None:
    """Undo freeze_heap (nothing if it did not run): what it froze is collectable again, an engine dropped since
    included. Every engine build and release_cached_memory call it first."""
    global _FROZEN
    if _FROZEN:
        gc.unfreeze()
        _FROZEN = False

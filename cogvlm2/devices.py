"""Device and dtype defaults shared by the CLI, the engine and the servers (no argument parsing here)."""

from __future__ import annotations

import torch


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

"""Deterministic random weights for any CogVLM2 config: the embedded tiny models and full-size benchmarks."""

from __future__ import annotations

import torch
from torch import nn


def scale_random_(name: str, x: torch.Tensor) -> torch.Tensor:
    """x ~ N(0, 1) in place -> the distribution of parameter `name`: linear ~ N(0, 1/fan_in), biases
    ~ N(0, 0.05^2), norms ~ 1 + N(0, 0.1^2), embeddings / boi / eoi ~ N(0, 1), class token and
    positions ~ N(0, 0.25). Keeps activations O(1) through any depth, so random models behave."""
    if "norm" in name and name.endswith("weight"):
        return x.mul_(0.1).add_(1.0)
    if name.endswith("bias"):
        return x.mul_(0.05)
    if "cls_embedding" in name or "position_embedding" in name:
        return x.mul_(0.5)
    if x.dim() >= 2 and "embed_tokens" not in name:
        return x.div_(x[0].numel() ** 0.5)
    return x


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """Materialise a (meta-built) model on `device` with random weights, one tensor at a time.

    Each tensor is drawn in float32 on the device and cast, so a 19B model never needs a host copy.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for prefix, module in model.named_modules():
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            x = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
            x = scale_random_(f"{prefix}.{key}" if prefix else key, x).to(dtype or p.dtype)
            module._parameters[key] = nn.Parameter(x, requires_grad=p.requires_grad)
    return model

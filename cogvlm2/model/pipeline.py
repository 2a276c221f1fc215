"""Pipeline stages: consecutive parts of the model on several devices (e.g. the bf16 19B model on 2 x 24 GB),
with a split balanced by parameter bytes that counts the vision tower, and explicit hand-overs.

The model is a chain of units: vision tower, embed_tokens, decoder layers 0..L-1, final norm + lm_head.
`plan_stages` cuts the chain into len(devices) consecutive stages so that the largest stage, relative to
its device's capacity, is as small as possible (exact, by dynamic programming). The vision tower is 4.4B
of the 19B parameters, so on two cards the first gets the tower, the embedding and fewer decoder layers.

At run time `PipelineStages` moves what crosses a boundary, once per boundary and forward: the hidden
states, the rotary cos/sin, and the batch's index tensors (`batch_to`); the attention backend keeps each
layer's K/V on that layer's device. Requests run one stage after another (no micro-batching): this is
for fitting a model, not for throughput.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .batch import ForwardBatch

__all__ = ["StagePlan", "PipelineStages", "plan_stages", "place"]

VISION, EMBED, HEAD = "model.vision.", "model.embed_tokens.", ("model.norm.", "lm_head.")


def _units(model: nn.Module) -> list[tuple[str, int]]:
    """(name, parameter bytes) of the chain's units in order."""
    n_layers = len(model.model.layers)
    sizes = {"vision": 0, "embed": 0, "head": 0} | {f"layer{i}": 0 for i in range(n_layers)}
    for key, p in model.named_parameters():
        sizes[_unit_of(key)] += p.numel() * p.element_size()
    return [("vision", sizes["vision"]), ("embed", sizes["embed"])] + \
        [(f"layer{i}", sizes[f"layer{i}"]) for i in range(n_layers)] + [("head", sizes["head"])]


def _unit_of(key: str) -> str:
    if key.startswith(VISION):
        return "vision"
    if key.startswith(EMBED):
        return "embed"
    if key.startswith(HEAD):
        return "head"
    if key.startswith("model.layers."):
        return f"layer{int(key.split('.')[2])}"
    raise ValueError(f"{key}: not part of the CogVLM2 chain (vision, embed_tokens, layers, norm, lm_head)")


def _concrete(d: torch.device) -> torch.device:
    """"cuda" -> "cuda:<current>", so device comparisons with tensors' devices hold."""
    return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d


@dataclass(frozen=True)
class StagePlan:
    """Which device holds each unit. stage_of: unit name -> stage index; bytes_per_stage for the report."""

    devices: tuple[torch.device, ...]
    stage_of: dict[str, int]
    bytes_per_stage: tuple[int, ...]

    def device_of(self, key: str) -> torch.device:
        """The device of a checkpoint key (the loader's per-key device)."""
        return self.devices[self.stage_of[_unit_of(key)]]

    def layers_of(self, stage: int) -> list[int]:
        return [int(u[5:]) for u, s in self.stage_of.items() if u.startswith("layer") and s == stage]

    def describe(self) -> str:
        rows = []
        for s, dev in enumerate(self.devices):
            layers = self.layers_of(s)
            parts = [u for u in ("vision", "embed") if self.stage_of[u] == s]
            parts += [f"layers {layers[0]}-{layers[-1]}"] if layers else []
            parts += ["norm + lm_head"] if self.stage_of["head"] == s else []
            rows.append(f"stage {s} ({dev}): {', '.join(parts)} [{self.bytes_per_stage[s] / 2**30:.2f} GiB]")
        return "\n".join(rows)


def plan_stages(model: nn.Module, devices: Sequence[str | torch.device],
                capacities: Sequence[float] | None = None) -> StagePlan:
    """Cut the chain of `model` (any device, meta included) into len(devices) consecutive, non-empty stages
    minimising max(stage bytes / capacity). capacities: relative sizes of the devices (default equal)."""
    devs = tuple(_concrete(torch.device(d)) for d in devices)
    caps = [1.0] * len(devs) if capacities is None else [float(c) for c in capacities]
    units = _units(model)
    k, m = len(devs), len(units)
    if k == 0 or len(caps) != k or any(c <= 0 for c in caps):
        raise ValueError(f"need one positive capacity per device; got devices {devs}, capacities {capacities}")
    if k > m:
        raise ValueError(f"{k} pipeline stages but the model has only {m} units (vision, embed, layers, head)")
    prefix = [0]
    for _, b in units:
        prefix.append(prefix[-1] + b)
    inf = float("inf")
    # best[s][j]: the smallest possible max load of units[:j] on stages[:s]; cut[s][j]: where stage s-1 begins
    best = [[inf] * (m + 1) for _ in range(k + 1)]
    cut = [[0] * (m + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, m - (k - s) + 1):
            for i in range(s - 1, j):
                cost = max(best[s - 1][i], (prefix[j] - prefix[i]) / caps[s - 1])
                if cost < best[s][j]:
                    best[s][j], cut[s][j] = cost, i
    bounds, j = [], m
    for s in range(k, 0, -1):
        bounds.append((cut[s][j], j))
        j = cut[s][j]
    bounds.reverse()
    stage_of = {units[u][0]: s for s, (a, b) in enumerate(bounds) for u in range(a, b)}
    return StagePlan(devs, stage_of, tuple(prefix[b] - prefix[a] for a, b in bounds))


class PipelineStages:
    """The run-time hand-overs of a `StagePlan` (set as `model.stages` by `place`)."""

    def __init__(self, plan: StagePlan, num_layers: int):
        self.plan = plan
        self.vision_device = plan.devices[plan.stage_of["vision"]]
        self.embed_device = plan.devices[plan.stage_of["embed"]]
        self.head_device = plan.devices[plan.stage_of["head"]]
        self.layer_devices = [plan.devices[plan.stage_of[f"layer{i}"]] for i in range(num_layers)]

    @staticmethod
    def move(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """The one place activations cross devices."""
        # non_blocking only towards a GPU: a GPU -> host copy must be complete before the host reads it
        return None if x is None else x.to(device, non_blocking=device.type == "cuda")

    def batch_to(self, batch: ForwardBatch, device: torch.device) -> ForwardBatch:
        """The batch with its tensors on `device` (the attention backend and host segments are shared)."""
        fields = ("input_ids", "positions", "vision_idx", "language_idx", "vision_embeds", "vision_embed_idx")
        if all(getattr(batch, f) is None or getattr(batch, f).device == device for f in fields):
            return batch
        return dataclasses.replace(batch, **{f: self.move(getattr(batch, f), device) for f in fields})

    def enter_layer(self, i: int, h: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor):
        """Hand the activations to layer i's device when it differs from where they are."""
        dev = self.layer_devices[i]
        if h.device == dev:
            return h, batch, cos, sin
        return self.move(h, dev), self.batch_to(batch, dev), self.move(cos, dev), self.move(sin, dev)

    def to_head(self, h: torch.Tensor) -> torch.Tensor:
        return h if h.device == self.head_device else self.move(h, self.head_device)


def place(model: nn.Module, plan: StagePlan) -> nn.Module:
    """Put every parameter on its stage's device (a no-op for weights loaded there) and install the hand-overs."""
    for key, p in model.named_parameters():
        dev = plan.device_of(key)
        if p.device != dev:
            *path, name = key.split(".")
            owner = model.get_submodule(".".join(path))
            owner._parameters[name] = nn.Parameter(p.data.to(dev), requires_grad=p.requires_grad)
    model.stages = PipelineStages(plan, len(model.model.layers))
    for dev in plan.devices:  # the rotary tables exist before any CUDA-graph capture
        model.rotary.inv_freq(dev, model.dtype)
    return model

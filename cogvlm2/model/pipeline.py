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
    loads = [b for _, b in units]
    peak = _partition(loads, caps, None)[0]
    bounds = _partition(loads, caps, peak * (1 + 1e-9))[1]
    stage_of = {units[u][0]: s for s, (a, b) in enumerate(bounds) for u in range(a, b)}
    return StagePlan(devs, stage_of, tuple(sum(loads[a:b]) for a, b in bounds))


def _partition(loads: list[int], caps: list[float], limit: float | None) -> tuple[float, list[tuple[int, int]]]:
    """Cut loads into len(caps) consecutive non-empty runs (exact dynamic programme over cut points).

    limit None: minimise the largest load / capacity; returns it and the runs. With a limit: among the cuts
    whose every run stays within it, minimise the sum of squared load / capacity, so that the stages are
    even and not merely no worse than the largest one.
    """
    k, m = len(caps), len(loads)
    prefix = [0]
    for b in loads:
        prefix.append(prefix[-1] + b)
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(k + 1)]  # best[s][j]: units[:j] on stages[:s]
    cut = [[0] * (m + 1) for _ in range(k + 1)]  # cut[s][j]: where stage s-1 begins
    best[0][0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, m - (k - s) + 1):
            for i in range(s - 1, j):
                load = (prefix[j] - prefix[i]) / caps[s - 1]
                if limit is None:
                    cost = max(best[s - 1][i], load)
                elif load <= limit:
                    cost = best[s - 1][i] + load * load
                else:
                    continue
                if cost < best[s][j]:
                    best[s][j], cut[s][j] = cost, i
    bounds, j = [], m
    for s in range(k, 0, -1):
        bounds.append((cut[s][j], j))
        j = cut[s][j]
    return best[k][m], bounds[::-1]


class PipelineStages:
    """The run-time hand-overs of a `StagePlan` (set as `model.stages` by `place`).

    A hand-over happens wherever the stage changes along the chain (embed -> layer 0, layer i -> layer i+1
    on the next stage, last layer -> head), whatever the devices, so the same code path runs when two stages
    share a device (the CPU tests) as when they do not.
    """

    def __init__(self, plan: StagePlan, num_layers: int):
        self.plan = plan
        stage = plan.stage_of
        self.vision_device = plan.devices[stage["vision"]]
        self.embed_device = plan.devices[stage["embed"]]
        self.head_device = plan.devices[stage["head"]]
        chain = [stage["embed"]] + [stage[f"layer{i}"] for i in range(num_layers)]
        self.boundaries = {i: plan.devices[chain[i + 1]] for i in range(num_layers) if chain[i + 1] != chain[i]}
        self.head_boundary = chain[-1] != stage["head"]

    @staticmethod
    def move(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """The one place activations cross devices."""
        # non_blocking only towards a GPU: a GPU -> host copy must be complete before the host reads it
        return None if x is None else x.to(device, non_blocking=device.type == "cuda")

    def batch_to(self, batch: ForwardBatch, device: torch.device) -> ForwardBatch:
        """The batch with its tensors on `device` (the attention backend and host segments are shared)."""
        fields = ("input_ids", "positions", "vision_embeds", "vision_embed_idx")
        return dataclasses.replace(batch, **{f: self.move(getattr(batch, f), device) for f in fields})

    def enter_layer(self, i: int, h: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor):
        """At the first layer of a stage, hand the activations to its device; elsewhere nothing."""
        dev = self.boundaries.get(i)
        if dev is None:
            return h, batch, cos, sin
        return self.move(h, dev), self.batch_to(batch, dev), self.move(cos, dev), self.move(sin, dev)

    def to_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.move(h, self.head_device) if self.head_boundary else h


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

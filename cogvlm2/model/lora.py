"""LoRA adapters for serving: several adapters held side by side in each target linear, one active per forward.

An adapter is peft's format on disk (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module name>.lora_A.weight` [r, in] / `lora_B.weight` [out, r]), what
`cogvlm2 finetune` writes. Loading wraps each target nn.Linear (or quantized linear) in a `LoRALinear`
that holds the adapters stacked in slots: A [slots, r_max, in], B [slots, out, r_max], the scaling folded
into B and smaller ranks padded with zeros. Which slot a forward uses is one device scalar shared by every
LoRALinear of the model (`LoRASlots.active`; slot 0 is all zeros: the base model), so switching adapters
is a device write, never a host sync, and a captured CUDA graph follows it.

Served unmerged, an adapter computes y = x W^T + (x A^T) B^T; `merge-lora` folds the same product into W.
DoRA adapters and adapters with fully trained modules (modules_to_save) change the base weights
themselves: merge those with `cogvlm2 merge-lora` and serve the merged checkpoint. Under tensor
parallelism each rank keeps its part of A and B, cut like the base weight (`shard_adapter`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRASlots:
    """The slot table of one model: which slot each adapter name holds, and the active slot (device)."""

    def __init__(self, device: torch.device, num_slots: int, max_rank: int):
        self.active = torch.zeros((), dtype=torch.long, device=device)  # 0: no adapter
        self.num_slots = num_slots  # slot 0 included
        self.max_rank = max_rank
        self.names: dict[str, int] = {}  # adapter name -> slot

    def free_slot(self) -> int | None:
        used = set(self.names.values())
        return next((s for s in range(1, self.num_slots) if s not in used), None)

    def activate(self, slot: int) -> None:
        self.active.fill_(slot)  # a device write, no host sync


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, slots: LoRASlots):
        super().__init__()
        self.base = base
        self.slots = slots
        weight = next(p for p in base.parameters() if p.is_floating_point())
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        in_f, out_f = base.in_features, base.out_features
        self.lora_A = nn.Parameter(torch.zeros(slots.num_slots, slots.max_rank, in_f, dtype=dtype,
                                               device=weight.device), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(slots.num_slots, out_f, slots.max_rank, dtype=dtype,
                                               device=weight.device), requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.index_select(0, self.slots.active.view(1))[0]  # [r_max, in]
        b = self.lora_B.index_select(0, self.slots.active.view(1))[0]  # [out, r_max]
        return self.base(x) + (x.to(a.dtype) @ a.T @ b.T).to(x.dtype)

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """a [r, in], b [out, r] (None: clear the slot)."""
        self.lora_A.data[slot].zero_()
        self.lora_B.data[slot].zero_()
        if a is not None:
            r = a.shape[0]
            self.lora_A.data[slot, :r] = a.to(self.lora_A.dtype)
            self.lora_B.data[slot, :, :r] = (b.float() * scale).to(self.lora_B.dtype)


class AdapterError(ValueError):
    """An adapter folder that cannot be served on this model (the message says why)."""


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter_config.json, {module name: (A [r, in], B [out, r])}) of a peft LoRA adapter folder."""
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder} is not a LoRA adapter: {name} missing")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: a {config.get('peft_type')} adapter, not LoRA")
    if config.get("use_dora") or config.get("modules_to_save"):
        raise AdapterError(f"{folder}: DoRA adapters and adapters with fully trained modules change the base "
                           "weights; merge it with `cogvlm2 merge-lora` and serve the merged checkpoint")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / ADAPTER_WEIGHTS)).items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise AdapterError(f"{folder}: unexpected tensor {key} (only LoRA A / B weights can be served)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    broken = [n for n, p in pairs.items() if set(p) != {"A", "B"}]
    if broken or not pairs:
        raise AdapterError(f"{folder}: LoRA weights incomplete ({broken[:3] or 'none'})")
    return config, {n: (p["A"], p["B"]) for n, p in pairs.items()}


def adapter_scale(config: dict, rank: int) -> float:
    alpha = config.get("lora_alpha", rank)
    return alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank


def adapter_id(folder: str | Path) -> str:
    """A stable id for an adapter's content: `<folder name>-<16 hex digits of its config + weights>`.

    Engines key prefix caches by it, so two different adapters never share KV entries."""
    folder = Path(folder)
    h = hashlib.blake2b(digest_size=8)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update((folder / name).read_bytes())
    return f"{folder.resolve().name}-{h.hexdigest()}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules under their base module's name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_signature(model: nn.Module) -> tuple[LoRASlots | None, int]:
    """What a captured CUDA graph of the model depends on: its slot table (a grown table is new tensors) and how
    many linears are wrapped (an adapter may target modules no earlier adapter did, in the same table)."""
    return getattr(model, "lora_slots", None), len(lora_layers(model))


def enable_lora(model: nn.Module, targets: set[str], num_slots: int, max_rank: int) -> LoRASlots:
    """Wrap the named linears in LoRALinear (slot tables of num_slots adapters + the base, rank max_rank).
    Linears wrapped before keep their adapters when the table does not grow."""
    old: LoRASlots | None = getattr(model, "lora_slots", None)
    if old is not None and old.num_slots >= num_slots + 1 and old.max_rank >= max_rank:
        slots = old
    else:
        slots = LoRASlots(model.device, num_slots + 1, max_rank)
        if old is not None:
            slots.names = dict(old.names)
            slots.num_slots = max(slots.num_slots, old.num_slots)
            slots.max_rank = max(slots.max_rank, old.max_rank)
    for name, module in list(model.named_modules()):
        wrapped = isinstance(module, LoRALinear)
        if not wrapped and name not in targets:
            continue
        if wrapped and module.slots is slots:
            continue
        base = module.base if wrapped else module
        new = LoRALinear(base, slots)
        if wrapped:  # grow: copy the adapters already held
            r = module.lora_A.shape[1]
            new.lora_A.data[:module.lora_A.shape[0], :r] = module.lora_A.data
            new.lora_B.data[:module.lora_B.shape[0], :, :r] = module.lora_B.data
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.lora_slots = slots
    return slots


def prepare_adapter(model: nn.Module, folder: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, {module: (A, B)}) of the adapter in `folder` as `model` holds it (this tensor-parallel
    rank's part), checked to fit: AdapterError before anything changes."""
    config, weights = read_adapter(folder)
    tp = getattr(model, "tp", None)
    if tp is not None and tp.world_size > 1:
        weights = shard_adapter(weights, model, tp)
    modules = dict(model.named_modules())
    for module_name, (a, b) in weights.items():
        base = modules.get(module_name)
        base = base.base if isinstance(base, LoRALinear) else base
        if base is None or not hasattr(base, "in_features") or tuple(a.shape[1:]) != (base.in_features,) \
                or tuple(b.shape[:1]) != (base.out_features,) or a.shape[0] != b.shape[1]:
            raise AdapterError(f"adapter {folder}: {module_name} does not fit this model "
                               f"(A {tuple(a.shape)}, B {tuple(b.shape)})")
    return config, weights


def load_adapter_into(model: nn.Module, name: str, folder: str | Path, num_slots: int) -> int:
    """Load the adapter in `folder` into a free slot of `model` under `name`; its slot. The model's
    target linears are wrapped on first use (room for num_slots adapters)."""
    config, weights = prepare_adapter(model, folder)
    rank = max(a.shape[0] for a, _ in weights.values())
    slots = getattr(model, "lora_slots", None)
    if name in (slots.names if slots else {}):
        raise AdapterError(f"an adapter named {name!r} is already loaded")
    in_use = len(slots.names) if slots else 0
    slots = enable_lora(model, set(weights), max(num_slots, in_use + 1), max(rank, slots.max_rank if slots else 0))
    layers = lora_layers(model)
    slot = slots.free_slot()
    for module_name, layer in layers.items():
        a, b = weights.get(module_name, (None, None))
        layer.set_slot(slot, a, b, adapter_scale(config, a.shape[0]) if a is not None else 0.0)
    slots.names[name] = slot
    return slot


def shard_adapter(weights: dict[str, tuple[torch.Tensor, torch.Tensor]], model: nn.Module,
                  tp) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """This tensor-parallel rank's part of each (A [r, in], B [out, r]), cut like its base weight:
    a column-parallel linear (rows of W split: QKV by heads, gate / up, lm_head) keeps A whole and the
    same rows of B; a row-parallel one (input features split: dense, down_proj) keeps the same columns of
    A and B whole, so its partial product B (A_r x_r) joins the base's partial sum before the one
    all-reduce that follows the layer (sum_r B A_r x_r = B A x). Replicated linears keep both whole."""
    from .parallel import shard_slicer

    slicer = shard_slicer(model.config, tp)
    out = {}
    for name, (a, b) in weights.items():
        part = slicer(f"{name}.weight", (b.shape[0], a.shape[1]))  # the full base weight [out, in]
        if part is not None and part.dim == 0:
            b = part.read(b)
        elif part is not None and part.dim == 1:
            a = part.read(a)
        out[name] = (a.contiguous(), b.contiguous())
    return out


def unload_adapter(model: nn.Module, name: str) -> None:
    slots: LoRASlots | None = getattr(model, "lora_slots", None)
    if slots is None or name not in slots.names:
        raise AdapterError(f"no adapter named {name!r} is loaded")
    slot = slots.names.pop(name)
    for layer in lora_layers(model).values():
        layer.set_slot(slot, None, None, 0.0)

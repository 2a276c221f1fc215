"""Which parameters train and at what learning rate: named parts of CogVLM2 (presets over the official
parameter names), full training of chosen parts (alone, or next to LoRA: peft's `modules_to_save`
idea), and per-part learning rates (optimizer parameter groups).

Parts, as regexes searched in parameter names:

    vision_expert    the visual expert of every decoder layer: QKV, attention output and MLP
                     (self_attn.vision_expert_*, mlp.vision_mlp.*)
    language_expert  the same for the language expert
    adapter          the GLU adapter between the vision tower and the LLM (model.vision.linear_proj.*)
    vision_tower     EVA2-CLIP: patch embedding and transformer layers (+ boi / eoi / conv)
    llm              the decoder: embeddings, every layer, final norm, lm_head
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

PARTS = {
    "vision_expert": r"model\.layers\.\d+\.(self_attn\.vision_expert_(query_key_value|dense)|mlp\.vision_mlp)\.",
    "language_expert": r"model\.layers\.\d+\.(self_attn\.language_expert_(query_key_value|dense)|mlp\.language_mlp)\.",
    "adapter": r"model\.vision\.linear_proj\.",
    "vision_tower": r"model\.vision\.(patch_embedding|transformer|conv|boi|eoi)\b",
    "llm": r"^(model\.(embed_tokens|layers|norm)\.|lm_head\.)",
}


def parts_regex(spec: str | Iterable[str]) -> str:
    """'vision_expert,adapter' (part names and / or regexes, comma separated) -> one regex."""
    items = [t for t in spec.replace(",", " ").split() if t] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("no modules given")
    return "|".join(f"(?:{PARTS.get(t, t)})" for t in items)


def train_only(model: nn.Module, spec: str) -> list[str]:
    """Full fine-tuning: parameters whose name matches `spec` train, the rest is frozen."""
    rx = re.compile(parts_regex(spec))
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(rx.search(name)))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"--train-modules {spec!r} matches no parameter (parts: {', '.join(PARTS)}; names look "
                         "like model.layers.0.self_attn.vision_expert_query_key_value.weight)")
    return names


def also_train(model: nn.Module, spec: str) -> list[str]:
    """LoRA + fully trained modules: unfreeze the parameters matching `spec` (not LoRA's own or its
    base layers' weights, which LoRA adapts). Returns their names."""
    rx = re.compile(parts_regex(spec))
    names = [n for n, p in model.named_parameters()
             if rx.search(n.replace(".base_layer.", ".")) and "lora_" not in n]
    wrapped = [n for n in names if ".base_layer." in n]
    if wrapped:
        raise ValueError(f"--modules-to-save {spec!r} overlaps the LoRA targets ({wrapped[0]}): a layer is either "
                         "LoRA-adapted or fully trained")
    if not names:
        raise ValueError(f"--modules-to-save {spec!r} matches no parameter (parts: {', '.join(PARTS)})")
    for n in names:
        model.get_parameter(n).requires_grad_(True)
    return names


def param_groups(model: nn.Module, lr: float, module_lrs: dict[str, float] | None, weight_decay: float) -> list[dict]:
    """Trainable parameters in optimizer groups: one per `module_lrs` entry ({part or regex: lr}, first
    match wins) and the rest at `lr`. Each group's "base_lr" scales the schedule."""
    rules = [(re.compile(parts_regex([k])), k, v) for k, v in (module_lrs or {}).items()]
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key, group_lr = "default", lr
        for rx, k, v in rules:
            if rx.search(name.replace(".base_layer.", ".")):
                key, group_lr = k, v
                break
        groups.setdefault(key, {"params": [], "lr": group_lr, "base_lr": group_lr, "name": key,
                                "weight_decay": weight_decay})["params"].append(p)
    unused = [k for _, k, _ in rules if k not in groups]
    if unused:
        raise ValueError(f"--module-lr {', '.join(unused)}: no trainable parameter matches")
    return list(groups.values())


def parse_module_lrs(value: str | None) -> dict[str, float] | None:
    """'adapter=1e-4,vision_tower=1e-5' -> {'adapter': 1e-4, 'vision_tower': 1e-5}."""
    if not value:
        return None
    out = {}
    for item in value.replace(",", " ").split():
        name, eq, lr = item.partition("=")
        try:
            out[name] = float(lr)
        except ValueError:
            raise ValueError(f"--module-lr expects PART=LR[,PART=LR...], got {item!r}") from None
        if not eq or not name:
            raise ValueError(f"--module-lr expects PART=LR[,PART=LR...], got {item!r}")
    return out

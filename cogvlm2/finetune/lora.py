"""LoRA adapters through peft on the plain CogVLM2 module: choosing target layers, saving and loading
adapters in peft's own format, serving a base model plus an adapter unmerged, and merging.

Our model is a plain nn.Module whose module names are the official checkpoint keys, so peft's
`inject_adapter_in_model` wraps the chosen nn.Linear layers in place and the saved adapter
(`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<official name>.lora_A.weight`)
is the same file `PeftModel.save_pretrained` writes for the official Hugging Face model.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's own names

# Short names for --lora-targets; each is a regex over module names (peft full-matches it).
TARGETS = {
    "vision_expert_qkv": r"model\.layers\.\d+\.self_attn\.vision_expert_query_key_value",
    "language_expert_qkv": r"model\.layers\.\d+\.self_attn\.language_expert_query_key_value",
    "vision_expert_dense": r"model\.layers\.\d+\.self_attn\.vision_expert_dense",
    "language_expert_dense": r"model\.layers\.\d+\.self_attn\.language_expert_dense",
    "vision_expert_mlp": r"model\.layers\.\d+\.mlp\.vision_mlp\.(gate_proj|up_proj|down_proj)",
    "language_expert_mlp": r"model\.layers\.\d+\.mlp\.language_mlp\.(gate_proj|up_proj|down_proj)",
    "adapter": r"model\.vision\.linear_proj\.(linear_proj|dense_h_to_4h|gate_proj|dense_4h_to_h)",
    "vision_tower": r"model\.vision\.transformer\.layers\.\d+\.(attention\.(query_key_value|dense)|mlp\.(fc1|fc2))",
    "lm_head": r"lm_head",
}
DEFAULT_TARGETS = ("vision_expert_qkv", "language_expert_qkv")


def target_regex(targets: Iterable[str]) -> str:
    """Short names (keys of TARGETS) or raw regexes over module names -> one regex (alternation)."""
    parts = [TARGETS.get(t, t) for t in targets]
    if not parts:
        raise ValueError("no LoRA targets given")
    return "|".join(f"(?:{p})" for p in parts)


def matching_linears(model: nn.Module, regex: str) -> list[str]:
    """Names of the nn.Linear modules that `regex` full-matches (what peft will wrap)."""
    rx = re.compile(regex)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and rx.fullmatch(n)]


def apply_lora(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, r: int = 8, alpha: int = 32,
               dropout: float = 0.05, rslora: bool = False, dora: bool = False) -> LoraConfig:
    """Wrap the target linears in LoRA layers, in place; only the LoRA weights stay trainable.

    rslora: scale alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA); dora: weight-decomposed
    LoRA (a trained magnitude per output row), both as peft implements them."""
    targets = list(targets)
    regex = target_regex(targets)
    if not matching_linears(model, regex):
        raise ValueError(f"LoRA targets {targets} match no linear layer of this model; short names: {', '.join(TARGETS)}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex, bias="none",
                        use_rslora=rslora, use_dora=dora)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return config


def saved_modules(model: nn.Module) -> list[str]:
    """Parameters trained in full next to LoRA (--modules-to-save): trainable, not LoRA's own."""
    return [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]


def adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's file keys. `state_dict`: the model's (already gathered) state."""
    state = get_peft_model_state_dict(model, state_dict=state_dict, save_embedding_layers=False)
    # Fully trained modules, under their own names (what PeftModel writes for modules_to_save)
    full = state_dict if state_dict is not None else dict(model.named_parameters())
    state.update({n.replace(".base_layer.", "."): full[n] for n in saved_modules(model)})
    return {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                 base_model: str | None = None) -> Path:
    """Write `folder/adapter_config.json` + `folder/adapter_model.safetensors` (peft format)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    modules = sorted({n.replace(".base_layer.", ".").rpartition(".")[0] for n in saved_modules(model)})
    config.modules_to_save = modules or None
    config.save_pretrained(str(folder))
    config.inference_mode, config.modules_to_save = False, None
    save_file(adapter_state_dict(model, state_dict), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Inject the adapter saved in `folder` into `model` and load its weights (every LoRA weight must be there)."""
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a LoRA adapter: {name} missing")
    config = LoraConfig.from_pretrained(str(folder))
    targets = config.target_modules  # a regex (ours) or a list of name suffixes (peft's other form)
    regex = targets if isinstance(targets, str) else "|".join(rf"(?:.*\.)?{re.escape(t)}" for t in targets)
    if not matching_linears(model, regex):
        raise ValueError(f"adapter {folder} targets {targets!r}, which matches no linear layer of this model")
    saved = config.modules_to_save
    config.modules_to_save = None  # ours are loaded into the base model's own parameters, below
    inject_adapter_in_model(config, model)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    full = {k: v for k, v in state.items() if "lora_" not in k}
    if full and not saved:
        raise ValueError(f"adapter {folder} holds non-LoRA weights ({next(iter(full))}) but no modules_to_save")
    params = dict(model.named_parameters())
    for k, v in full.items():
        target = params.get(k) if k in params else params.get(k.replace(".weight", ".base_layer.weight"))
        if target is None or target.shape != v.shape:
            raise ValueError(f"adapter {folder}: fully trained weight {k} does not fit the model")
        target.data = v.to(device=target.device, dtype=target.dtype)
    state = {k: v for k, v in state.items() if "lora_" in k}
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter {folder} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")
    return config


def adapter_id(folder: str | Path) -> str:
    """A stable id for an adapter's content: `<folder name>-<16 hex digits of its config + weights>`.

    Engines key prefix caches and batches by it, so two different adapters never share KV entries."""
    folder = Path(folder)
    h = hashlib.blake2b(digest_size=8)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update((folder / name).read_bytes())
    return f"{folder.resolve().name}-{h.hexdigest()}"


def load_with_adapter(model: nn.Module, adapter_dir: str | Path) -> tuple[nn.Module, str]:
    """Serve `model` with the LoRA adapter in `adapter_dir` applied unmerged, ready for inference.

    Returns (the same model, LoRA layers injected in place, eval mode, no gradients; its adapter id).
    The id (also set as `model.adapter_id`) is what engines pass as `LLM(model, adapter_id=...)`.
    """
    load_adapter(model, adapter_dir)
    model.eval().requires_grad_(False)
    model.adapter_id = adapter_id(adapter_dir)
    return model, model.adapter_id


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight and drop the LoRA modules, in place.

    W <- round(W + scale * B @ A), the sum taken in float32 and rounded once to W's dtype. Afterwards
    the model has exactly the base model's parameter names again. The base must be full precision
    (merge into the bf16 / fp32 checkpoint, never into a 4-bit one).
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear) or base.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name}: can only merge into a full-precision nn.Linear, got {type(base).__name__}")
        for adapter in module.active_adapters:
            if module.use_dora.get(adapter):  # the magnitude renormalises the sum: peft's own merge, in fp32
                dtype = base.weight.dtype
                base.weight.data = base.weight.data.float()
                module.merge(adapter_names=[adapter])
                base.weight.data = base.weight.data.to(dtype)
                continue
            delta = module.get_delta_weight(adapter)  # [out, in] in the adapter's dtype
            base.weight.data = (base.weight.data.float() + delta.float()).to(base.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    for attr in ("peft_config", "adapter_id"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model

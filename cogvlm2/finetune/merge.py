"""`cogvlm2 merge-lora`: base checkpoint + LoRA adapter -> a complete checkpoint in the official layout
(config.json, sharded safetensors + index, tokenizer and every other file of the base copied) that
`load_model` and the official Hugging Face code both read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import copy_non_weight_files, parse_dtype, save_weights, weight_files
from ..config import ModelConfig
from ..model import load_model
from ..tiny import TINY_NOTE, checkpoint_folder
from .lora import load_adapter, merge_lora

ROTARY_KEY = "model.layers.{}.self_attn.rotary_emb.inv_freq"


def add_rotary_inv_freq(state: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype) -> None:
    """Add each layer's `rotary_emb.inv_freq` (1 / theta^(2i/d), the official files carry it), in `dtype`
    as the official bf16 checkpoints store it; keys the model already gave are kept."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    for i in range(config.num_hidden_layers):
        state.setdefault(ROTARY_KEY.format(i), inv_freq.to(dtype))


def copy_base_files(src: Path, dst: Path) -> None:
    """The base's tokenizer, config and other files, except the embedded tiny model's README (it
    describes the tiny model, not the fine-tuned one)."""
    copy_non_weight_files(src, dst)
    readme = dst / "README.md"
    if readme.is_file() and TINY_NOTE.strip()[:40] in readme.read_text(errors="ignore"):
        readme.unlink()


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype of the checkpoint's first floating tensor (official checkpoints: bfloat16)."""
    for file in weight_files(folder):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


def merge_adapter(base: str, adapter: str | Path, output: str | Path, dtype: str | torch.dtype | None = None,
                  max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Write base + adapter, merged, to `output`; returns the folder. Weights keep the base's stored dtype
    unless `dtype` is given; each merged weight is summed in float32 and rounded once."""
    output = Path(output)
    folder = checkpoint_folder(base)
    stored = stored_dtype(folder)
    out_dtype = parse_dtype(dtype) if dtype is not None else stored
    if output.resolve() == folder.resolve():
        raise ValueError("merge-lora: --output must differ from the base checkpoint folder")
    # Loading in the stored dtype is exact; only a wider output dtype needs a wider load (19B fp32 = 76 GB).
    model = load_model(str(folder), dtype=out_dtype if out_dtype == stored else torch.float32, progress=progress)
    load_adapter(model, adapter)
    merge_lora(model)
    state = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    add_rotary_inv_freq(state, model.config, out_dtype)
    save_weights(state, output, max_shard_bytes=max_shard_bytes, metadata={"merged_adapter": str(adapter)})
    copy_base_files(folder, output)
    return output

"""CogVLM2 in plain PyTorch: build on the meta device, load official weights straight into place."""

from __future__ import annotations

import torch

from ..checkpoint import load_weights, parse_dtype, resolve_model_path
from ..config import ModelConfig
from .cogvlm import CogVLM2ForCausalLM

__all__ = ["CogVLM2ForCausalLM", "load_model"]


def load_model(name_or_path: str, dtype: torch.dtype | str = "float32", device: str | torch.device = "cpu",
               progress: bool = True) -> CogVLM2ForCausalLM:
    """A local folder, a Hugging Face repo id, or an embedded tiny model name ("tiny", "tiny-video").

    The model is built on the meta device and every tensor is loaded once, directly in `dtype` on
    `device`; the key set must match the official checkpoint exactly.
    """
    from ..tiny import resolve_tiny

    folder = resolve_tiny(name_or_path) or resolve_model_path(name_or_path)
    config = ModelConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        model = CogVLM2ForCausalLM(config)
    load_weights(model, folder, dtype=parse_dtype(dtype), device=device, progress=progress)
    model.checkpoint_path = folder
    return model.eval().requires_grad_(False)

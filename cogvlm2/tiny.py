"""The embedded default: tiny CogVLM2-architecture models with deterministic random weights.

Built on first use into a cache folder in the official checkpoint layout (config.json,
model.safetensors, tokenizer.json = the real Llama-3 tokenizer), so every interface runs end to end
on a laptop CPU. Their answers are noise: the weights are random, not trained.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint import save_weights
from .config import IMAGE_ARCH, VIDEO_ARCH, ModelConfig
from .model.random_init import init_random_
from .processing.tokenizer import bundled_tokenizer_path

TINY_NOTE = "embedded tiny model with random weights: its answers are noise"
_VERSION = 2


def tiny_config(name: str = "tiny") -> ModelConfig:
    video = name == "tiny-video"
    return ModelConfig.from_dict({
        "architectures": [VIDEO_ARCH if video else IMAGE_ARCH],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_multi_query_heads": 2, "vocab_size": 128256,
        "max_position_embeddings": 2048 if video else 8192, "rms_norm_eps": 1e-5,
        "template_version": "chat", "bos_token_id": 128000,
        "eos_token_id": 128001 if video else [128001, 128009], "pad_token_id": 128002,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_heads": 2,
                          "image_size": 224, "patch_size": 14, "num_positions": 257, "layer_norm_eps": 1e-6},
    })


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights in the official naming (distribution: `model.random_init`)."""
    from .model.cogvlm import CogVLM2ForCausalLM

    with torch.device("meta"):
        model = CogVLM2ForCausalLM(config)
    return init_random_(model, seed=seed, device="cpu", dtype=torch.float32).state_dict()


def cache_dir() -> Path:
    return Path(os.environ.get("COGVLM2_CACHE", Path.home() / ".cache" / "cogvlm2"))


def build_tiny(name: str, folder: Path) -> Path:
    """Write the tiny checkpoint `name` into `folder` (atomically: a half-written folder never shows)."""
    config = tiny_config(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        save_weights(random_state_dict(config, seed=0 if name == "tiny" else 1), tmp, metadata={"note": TINY_NOTE})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        shutil.copyfile(bundled_tokenizer_path(), tmp / "tokenizer.json")
        (tmp / "README.md").write_text(f"# cogvlm2 {name}\n\n{TINY_NOTE}.\n")
        try:
            tmp.rename(folder)
        except OSError:  # built concurrently by another process: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def resolve_tiny(name: str) -> Path | None:
    """The folder of an embedded tiny model ("tiny" = image chat, "tiny-video"), built if needed; else None."""
    if str(name) not in ("tiny", "tiny-video"):
        return None
    folder = cache_dir() / f"{name}-v{_VERSION}"
    return folder if (folder / "config.json").is_file() else build_tiny(str(name), folder)


def is_tiny(path: str | Path) -> bool:
    return Path(path).name.startswith("tiny") and Path(path).parent == cache_dir()

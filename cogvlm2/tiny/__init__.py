"""The embedded default: tiny CogVLM2-architecture models trained on synthetic coloured shapes.

`tiny` (image chat, visual expert) and `tiny-video` (video, no visual expert) have the CogVLM2
architecture and the real Llama-3 tokenizer, and were trained from scratch by the package's own
trainer on pictures (and clips) of coloured shapes and a few rendered words (`cogvlm2.tiny.shapes`;
recipe: `cogvlm2.tiny.recipe`, `python -m cogvlm2.tiny train`). They know nothing else. They ship as
lzma-compressed float16 safetensors holding only the embedding / lm_head rows of the tokens their
data uses (`weights/*.safetensors.xz`); on first use they are unpacked into a cache folder in the
official checkpoint layout (config.json, model.safetensors, tokenizer.json) with zero rows for every
other token.

`tiny-random` is a test / development model, not a default: the older, smaller tiny geometry (hidden 64,
2 layers, 224-pixel images in 256 patches) with deterministic random weights over the whole vocabulary,
built on first use. It answers noise, at length and rarely with EOS — what tests of the engine, streaming,
stops and quantization need (its widths are multiples of the quantization block sizes).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from ..checkpoint import bundled_tokenizer_path, resolve_model_path, save_weights
from ..config import IMAGE_ARCH, VIDEO_ARCH, ModelConfig
from ..model.random_init import init_random_

NAMES = ("tiny", "tiny-video")
RANDOM_NAME = "tiny-random"
RANDOM_VERSION = 1  # bump when random_config or the random initialisation changes
TINY_NOTE = "embedded tiny model, trained only on synthetic pictures of coloured shapes: it knows nothing else"
RANDOM_NOTE = "embedded test model with random weights: its answers are noise"
TINY_VIDEO_NOTE = "embedded tiny video model, trained only on synthetic clips of moving shapes: it knows nothing else"
WEIGHTS = Path(__file__).with_name("weights")
ROW_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def note(name: str) -> str:
    """What the UI / CLI says about an embedded model."""
    return {"tiny-video": TINY_VIDEO_NOTE, RANDOM_NAME: RANDOM_NOTE}.get(name, TINY_NOTE)


def tiny_config(name: str = "tiny") -> ModelConfig:
    video = name == "tiny-video"
    return ModelConfig.from_dict({
        "architectures": [VIDEO_ARCH if video else IMAGE_ARCH],
        "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_multi_query_heads": 2, "vocab_size": 128256,
        "max_position_embeddings": 2048 if video else 8192, "rms_norm_eps": 1e-5,
        "template_version": "chat", "bos_token_id": 128000,
        "eos_token_id": 128001 if video else [128001, 128009], "pad_token_id": 128002,
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_heads": 4,
                          "image_size": 112, "patch_size": 14, "num_positions": 65, "layer_norm_eps": 1e-6},
    })


def random_config() -> ModelConfig:
    """`tiny-random`'s geometry: image chat with the visual expert; hidden 64 / intermediate 128 (multiples of
    the quantization block sizes), 2 layers, 4 heads over 2 KV heads; vision 224 px in 14 px patches, hidden 32."""
    return ModelConfig.from_dict({
        "architectures": [IMAGE_ARCH],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_multi_query_heads": 2, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "template_version": "chat", "bos_token_id": 128000,
        "eos_token_id": [128001, 128009], "pad_token_id": 128002,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_heads": 2,
                          "image_size": 224, "patch_size": 14, "num_positions": 257, "layer_norm_eps": 1e-6},
    })


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights in the official naming (distribution: `model.random_init`)."""
    from ..model.cogvlm import CogVLM2ForCausalLM

    with torch.device("meta"):
        model = CogVLM2ForCausalLM(config)
    return init_random_(model, seed=seed, device="cpu", dtype=torch.float32).state_dict()


def _header(raw: bytes) -> dict:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def unpack(data: bytes) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """Shipped bytes -> (config, full float32 state dict with zero rows for unused tokens, note)."""
    from safetensors.torch import load

    raw = lzma.decompress(data)
    meta = _header(raw).get("__metadata__", {})
    config = ModelConfig.from_dict(json.loads(meta["config"]))
    state = load(raw)
    ids = state.pop("used_token_ids").long()
    out = {}
    for k, v in state.items():
        v = v.float()
        if k in ROW_KEYS:
            full = torch.zeros(config.vocab_size, v.shape[1])
            full[ids] = v
            v = full
        out[k] = v
    return config, out, meta.get("note", "")


def cache_dir() -> Path:
    return Path(os.environ.get("COGVLM2_CACHE", Path.home() / ".cache" / "cogvlm2"))


def weights_file(name: str) -> Path:
    return WEIGHTS / f"{name}.safetensors.xz"


def build_tiny(name: str, folder: Path, data: bytes | None = None) -> Path:
    """Unpack the shipped checkpoint `name` into `folder` (atomically: a half-written folder never shows)."""
    config, state, text = unpack(data if data is not None else weights_file(name).read_bytes())
    readme = f"# cogvlm2 {name}\n\n{note(name)}.\n\nRecipe: `python -m cogvlm2.tiny train`.\n"
    return _write_checkpoint(folder, config, state, text, readme)


def build_random(folder: Path) -> Path:
    """Write `tiny-random` (random_config, seed-0 random weights) into `folder`, atomically like build_tiny."""
    config = random_config()
    return _write_checkpoint(folder, config, random_state_dict(config, seed=0), RANDOM_NOTE,
                             f"# cogvlm2 {RANDOM_NAME}\n\n{RANDOM_NOTE}.\n")


def _write_checkpoint(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor], text: str,
                      readme: str) -> Path:
    """An official-layout checkpoint folder written under a temporary name and renamed into place; a
    folder built concurrently by another process wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        save_weights(state, tmp, metadata={"note": text})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        shutil.copyfile(bundled_tokenizer_path(), tmp / "tokenizer.json")
        (tmp / "README.md").write_text(readme)
        try:
            tmp.rename(folder)
        except OSError:  # built concurrently by another process: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def resolve_tiny(name: str) -> Path | None:
    """The folder of an embedded tiny model ("tiny" = image chat, "tiny-video", "tiny-random" = the random test
    model), unpacked or built if needed; else None. The folder name of a trained one carries a digest of the
    shipped file, so a retrained checkpoint is unpacked anew."""
    if str(name) == RANDOM_NAME:
        folder = cache_dir() / f"{RANDOM_NAME}-v{RANDOM_VERSION}"
        return folder if (folder / "config.json").is_file() else build_random(folder)
    if str(name) not in NAMES:
        return None
    data = weights_file(str(name)).read_bytes()
    folder = cache_dir() / f"{name}-{hashlib.sha256(data).hexdigest()[:12]}"
    return folder if (folder / "config.json").is_file() else build_tiny(str(name), folder, data)


def checkpoint_folder(name_or_path: str | Path) -> Path:
    """The local folder of an embedded model ("tiny", "tiny-video", "tiny-random"; built on first use), a
    checkpoint folder or a Hub repo id: what `cogvlm2.model.load_model` is given. Every place that takes a
    user's model name resolves it here first; the model package itself knows only folders and repo ids."""
    return resolve_tiny(name_or_path) or resolve_model_path(name_or_path)


def is_tiny(path: str | Path) -> bool:
    return Path(path).name.startswith("tiny") and Path(path).parent == cache_dir()


def tiny_name(path: str | Path) -> str | None:
    """"tiny" / "tiny-video" / "tiny-random" for an embedded model's folder, else None."""
    if not is_tiny(path):
        return None
    if Path(path).name.startswith(RANDOM_NAME):
        return RANDOM_NAME
    return "tiny-video" if Path(path).name.startswith("tiny-video") else "tiny"

"""An official-format int4 tiny checkpoint, built with bitsandbytes' own quantizer and the official key names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cogvlm2.config import ModelConfig
from cogvlm2.processing.tokenizer import bundled_tokenizer_path
from cogvlm2.tiny import random_config, random_state_dict

# config.json's quantization_config of THUDM/cogvlm2-llama3-chat-19B-int4
QUANTIZATION_CONFIG = {
    "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "float32",
    "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
    "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
}


def int4_tiny_config() -> ModelConfig:
    """The tiny-random image model with a vision tower whose widths are multiples of 64 (bitsandbytes' block)."""
    d = random_config().to_dict()
    d["vision_config"] = {**d["vision_config"], "hidden_size": 64, "intermediate_size": 128}
    return ModelConfig.from_dict(d)


def linear_names(config: ModelConfig) -> list[str]:
    from cogvlm2.model.cogvlm import CogVLM2ForCausalLM

    with torch.device("meta"):
        model = CogVLM2ForCausalLM(config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def build_official_int4(folder: Path, fmt: str = "bin", quant_type: str = "fp4",
                        double_quant: bool = False) -> tuple[Path, dict]:
    """Write the checkpoint (double_quant: bitsandbytes' 8-bit absmax, not in the official ones); returns
    (folder, {linear name: (packed, bitsandbytes QuantState)})."""
    import bitsandbytes.functional as bnbf

    config = int4_tiny_config()
    full = random_state_dict(config, seed=3)
    state, quantized = {}, {}
    linears = set(linear_names(config))
    for key, t in full.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and name in linears:
            packed, qs = bnbf.quantize_4bit(t.half(), blocksize=64, quant_type=quant_type,
                                            compress_statistics=double_quant)
            quantized[name] = (packed, qs)
            state[key] = packed
            for k, v in qs.as_dict(packed=True).items():  # absmax, quant_map, quant_state.bitsandbytes__fp4
                state[f"{key}.{k}"] = v
        else:
            state[key] = t.half()
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    raw = {**config.to_dict(), "torch_dtype": "float16",
           "quantization_config": {**QUANTIZATION_CONFIG, "bnb_4bit_quant_type": quant_type,
                                   "bnb_4bit_use_double_quant": double_quant}}
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    shutil.copyfile(bundled_tokenizer_path(), folder / "tokenizer.json")
    return folder, quantized

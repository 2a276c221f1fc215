"""Config: the five official config.json files read into validated dataclasses; bad fields named."""

import json
from pathlib import Path

import pytest
import torch

from cogvlm2.config import ConfigError, ModelConfig
from cogvlm2.model.cogvlm import CogVLM2ForCausalLM

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
IMAGE = ["cogvlm2-llama3-chat-19B", "cogvlm2-llama3-chinese-chat-19B"]
VIDEO = ["cogvlm2-video-llama3-chat", "cogvlm2-video-llama3-base", "cogvlm2-llama3-caption"]


@pytest.mark.parametrize("name", IMAGE)
def test_image_configs(name):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    assert "num_multi_query_heads" not in raw
    cfg = ModelConfig.from_dict(raw)
    assert cfg.num_key_value_heads == 8 and cfg.has_vision_expert and not cfg.is_video
    assert cfg.eos_token_ids == (128001, 128009) and cfg.max_position_embeddings == 8192
    assert cfg.vision.tokens_per_image == 2306 and cfg.head_dim == 128
    assert cfg.default_max_model_len == 8192 + 2303  # an image's 2306 tokens span 3 positions


@pytest.mark.parametrize("name", VIDEO)
def test_video_configs(name):
    cfg = ModelConfig.from_file(CONFIGS / f"{name}.json")
    assert cfg.is_video and not cfg.has_vision_expert
    assert cfg.vision.image_size == 224 and cfg.vision.num_positions == 257 and cfg.vision.tokens_per_image == 66
    assert cfg.max_position_embeddings == 2048 and cfg.template_version == "base"
    assert cfg.default_max_model_len == 2048 + 24 * 63  # 24 frames of 66 tokens, 3 positions each


@pytest.mark.parametrize("name", IMAGE + VIDEO)
def test_official_defaults_by_checkpoint(name):
    """The demos' template per checkpoint: video checkpoints chat/chat except video-base (all three
    video configs say "base"); the caption checkpoint is driven with the caption tool's prompt."""
    from cogvlm2.processing import CAPTION_PROMPT, default_query, default_template, strategy_for

    cfg = ModelConfig.from_file(CONFIGS / f"{name}.json")
    for where in (f"/models/{name}", f"/root/.cache/huggingface/hub/models--THUDM--{name}/snapshots/0a1b2c"):
        template = default_template(cfg, where)
        expected = "base" if name == "cogvlm2-video-llama3-base" else "chat"
        assert template == expected and strategy_for(template) == expected
        assert default_query(cfg, where) == (CAPTION_PROMPT if name == "cogvlm2-llama3-caption" else None)


def test_full_size_parameter_counts():
    """The meta-built architectures have the official sizes: 19.5 B (image) and 12.5 B (video)."""
    sizes = {}
    for name in ("cogvlm2-llama3-chat-19B", "cogvlm2-video-llama3-chat"):
        with torch.device("meta"):
            model = CogVLM2ForCausalLM(ModelConfig.from_file(CONFIGS / f"{name}.json"))
        sizes[name] = sum(p.numel() for p in model.parameters()) / 1e9
    assert 19.4 < sizes["cogvlm2-llama3-chat-19B"] < 19.6, sizes
    assert 12.4 < sizes["cogvlm2-video-llama3-chat"] < 12.6, sizes


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("hidden_size"), "hidden_size"),
    (lambda d: d.update(num_attention_heads="32"), "num_attention_heads"),
    (lambda d: d["vision_config"].pop("image_size"), "image_size"),
    (lambda d: d["vision_config"].update(num_positions=100), "num_positions"),
    (lambda d: d.update(template_version="fancy"), "template_version"),
    (lambda d: d.update(architectures=["LlamaForCausalLM"]), "architectures"),
    (lambda d: d.update(eos_token_id=["x"]), "eos_token_id"),
    (lambda d: d.update(num_hidden_layers=0), "num_hidden_layers"),
    (lambda d: d.pop("vision_config"), "vision_config"),
])
def test_invalid_fields_are_named(mutate, field):
    raw = json.loads((CONFIGS / "cogvlm2-llama3-chat-19B.json").read_text())
    mutate(raw)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(raw)


def test_round_trip_and_file_errors(tmp_path):
    cfg = ModelConfig.from_file(CONFIGS / "cogvlm2-llama3-chat-19B.json")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        ModelConfig.from_file(tmp_path)

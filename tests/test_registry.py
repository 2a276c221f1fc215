"""The model registry: the five official config.json files map to the two CogVLM2 families by `architectures`;
load_model builds the family's model class; the processor answers what media a checkpoint takes."""

import dataclasses
import json
from pathlib import Path

import pytest

from cogvlm2.config import IMAGE_ARCH, VIDEO_ARCH, ConfigError, ModelConfig
from cogvlm2.model import CogVLM2ForCausalLM, load_model
from cogvlm2.model import registry
from cogvlm2.processing import Processor
from cogvlm2.tiny import resolve_tiny

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
IMAGE = ["cogvlm2-llama3-chat-19B", "cogvlm2-llama3-chinese-chat-19B"]
VIDEO = ["cogvlm2-video-llama3-chat", "cogvlm2-video-llama3-base", "cogvlm2-llama3-caption"]


@pytest.mark.parametrize("name", IMAGE + VIDEO)
def test_official_configs_map_to_their_family(name):
    cfg = registry.read_config(CONFIGS / f"{name}.json")
    assert cfg == ModelConfig.from_file(CONFIGS / f"{name}.json")
    family = registry.family_of(cfg)
    assert family is registry.family_of(json.loads((CONFIGS / f"{name}.json").read_text())["architectures"])
    assert family.config_class is ModelConfig and family.model_class is CogVLM2ForCausalLM
    if name in IMAGE:  # one image, routed to the visual expert
        assert family.architecture == IMAGE_ARCH and family.media_kinds == ("image",)
        assert family.max_media_items == 1 and family.vision_expert
    else:  # up to 24 frames, language weights only
        assert family.architecture == VIDEO_ARCH and family.media_kinds == ("video",)
        assert family.max_media_items == 24 and not family.vision_expert
    assert (family.vision_expert, family.max_media_items) == (cfg.has_vision_expert, cfg.max_media_items)


def test_image_and_video_are_two_entries():
    assert set(registry.FAMILIES) == {IMAGE_ARCH, VIDEO_ARCH}
    assert all(arch == f.architecture for arch, f in registry.FAMILIES.items())


def test_unknown_architecture_is_a_clear_error(tmp_path):
    raw = json.loads((CONFIGS / "cogvlm2-llama3-chat-19B.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(ConfigError, match=r"architectures.*CogVLMForCausalLM.*LlavaForConditionalGeneration"):
        registry.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        registry.read_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        registry.read_config(tmp_path / "nope")
    # several architectures: the first registered one decides (as transformers reads the list)
    assert registry.family_of(["Other", VIDEO_ARCH, IMAGE_ARCH]).architecture == VIDEO_ARCH
    assert registry.family_of(IMAGE_ARCH).architecture == IMAGE_ARCH


def test_load_model_builds_the_family_model_class(monkeypatch):
    class Traced(CogVLM2ForCausalLM):
        """The same architecture under another class: load_model must build what the registry names."""

    family = dataclasses.replace(registry.FAMILIES[IMAGE_ARCH], model_class=Traced)
    monkeypatch.setitem(registry.FAMILIES, IMAGE_ARCH, family)
    model = load_model(str(resolve_tiny("tiny-random")), progress=False)
    assert type(model) is Traced


@pytest.mark.parametrize("name, kinds", [("tiny", ("image",)), ("tiny-video", ("video",))])
def test_processor_reports_media_kinds(name, kinds):
    processor = Processor.from_pretrained(resolve_tiny(name))
    assert processor.media_kinds == kinds and processor.family is registry.family_of(processor.config)
    wrong = {"image": "video", "video": "image"}[kinds[0]]
    with pytest.raises(ValueError, match=f"pass an? {kinds[0]}, not an? {wrong}"):
        processor("x", **{wrong: b"not read"})

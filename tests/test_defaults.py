"""The official demos' defaults: greedy decoding, 2,048 new tokens, auto dtype by compute capability,
templates and frame strategies per checkpoint name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cogvlm2.cli import build_parser
from cogvlm2.devices import auto_dtype
from cogvlm2.processing import Processor
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path
from cogvlm2.tiny import tiny_config


def test_cli_decodes_greedily_by_default():
    for argv in (["chat"], ["generate", "prompts.jsonl"]):
        args = build_parser().parse_args(argv)
        assert args.temperature == 0 and args.top_p == 1.0
    args = build_parser().parse_args(["chat", "--video-strategy", "base"])
    assert args.max_new_tokens == 2048 and args.video_strategy == "base" and args.template is None


@pytest.mark.parametrize("capability, expected", [((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_dtype_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert auto_dtype("auto", "cuda") == expected
    assert auto_dtype("auto", "cuda:1") == expected
    assert auto_dtype("auto", "cpu") == "float32" and auto_dtype("float16", "cpu") == "float16"


def test_video_template_and_strategy_follow_the_checkpoint_name():
    """The same config under the three official names: chat/chat, base/base, caption with its prompt.
    With the base template the frames carry no index tokens; the strategy follows unless overridden."""
    cfg, tok = tiny_config("tiny-video"), Tokenizer(bundled_tokenizer_path())
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 2, 40, 52), dtype=np.uint8))
    chat = Processor(cfg, tok, "/models/cogvlm2-video-llama3-chat")
    base = Processor(cfg, tok, "/hub/models--THUDM--cogvlm2-video-llama3-base/snapshots/abc")
    caption = Processor(cfg, tok, "THUDM/cogvlm2-llama3-caption")
    assert (chat.default_template, chat.video_strategy, chat.default_query) == ("chat", "chat", None)
    assert (base.default_template, base.video_strategy) == ("base", "base")
    assert caption.default_query == "Please describe this video in detail."
    per_frame = cfg.vision.tokens_per_image
    x_chat, x_base = chat("q", video=frames), base("q", video=frames)
    assert x_base.prompt_text == "q" and x_chat.prompt_text == "Question: q Answer:"
    assert x_base.input_ids[1 + per_frame] == 128002 and x_chat.input_ids[1 + per_frame] != 128002
    assert base("q", video=frames, template="chat").prompt_text == "Question: q Answer:"


def test_frame_strategy_follows_the_effective_template(monkeypatch):
    import cogvlm2.processing.video as video

    seen = []
    cfg, tok = tiny_config("tiny-video"), Tokenizer(bundled_tokenizer_path())
    size = cfg.vision.image_size
    pixels = torch.zeros(1, 3, size, size)
    monkeypatch.setattr(video, "video_pixels", lambda source, image_size, strategy: seen.append(strategy) or (pixels, "h"))
    base = Processor(cfg, tok, "cogvlm2-video-llama3-base")
    base("q", video="clip.mp4")
    base("q", video="clip.mp4", template="chat")
    base("q", video="clip.mp4", template="vqa")
    base("q", video="clip.mp4", template="chat", video_strategy="base")
    assert seen == ["base", "chat", "chat", "base"]

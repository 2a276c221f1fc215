"""Processing: requests (text, history, image, video) -> `ModelInputs`; the model never sees a tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..config import ModelConfig
from ..model.registry import ModelFamily, family_of, read_config
from .image import ImageError, load_image, transform_image
from .prompt import History, ModelInputs, build_inputs, format_prompt
from .tokenizer import Tokenizer

__all__ = ["Processor", "ModelInputs", "Tokenizer", "ImageError", "format_prompt", "default_template",
           "default_query", "strategy_for", "CAPTION_PROMPT"]


VIDEO_BASE_NAME = "cogvlm2-video-llama3-base"
CAPTION_NAME = "cogvlm2-llama3-caption"
CAPTION_PROMPT = "Please describe this video in detail."  # CogVideo's tools/caption/video_caption.py


def default_template(config: ModelConfig, checkpoint_name: str = "") -> str:
    """The template the official demos use for a checkpoint. Video checkpoints: 'base' only for
    cogvlm2-video-llama3-base, 'chat' otherwise — decided by the checkpoint's name or folder as in
    `video_demo/*` (all three video config.json files say "base"). Image checkpoints: their config's."""
    if not config.is_video:
        return config.template_version
    return "base" if VIDEO_BASE_NAME in checkpoint_name.lower() else "chat"


def default_query(config: ModelConfig, checkpoint_name: str = "") -> str | None:
    """The prompt a checkpoint is driven with when the user gives none: the caption checkpoint's, else None."""
    return CAPTION_PROMPT if config.is_video and CAPTION_NAME in checkpoint_name.lower() else None


class Processor:
    """Builds model inputs for one checkpoint: its tokenizer, image size and default template.

    `checkpoint_name` (the folder or Hub id) picks the official defaults of the video family (see
    `default_template`); the video frame strategy follows the effective template unless given.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, checkpoint_name: str | Path = ""):
        self.config = config
        self.tokenizer = tokenizer
        self.checkpoint_name = str(checkpoint_name)
        self.default_template = default_template(config, self.checkpoint_name)
        self.default_query = default_query(config, self.checkpoint_name)
        self.family: ModelFamily = family_of(config)

    @classmethod
    def from_pretrained(cls, folder: str | Path, config: ModelConfig | None = None) -> "Processor":
        folder = Path(folder)
        return cls(config or read_config(folder), Tokenizer(folder / "tokenizer.json"), folder)

    @property
    def media_kinds(self) -> tuple[str, ...]:
        """What a prompt may carry: ("image",) or ("video",) (the model family's)."""
        return self.family.media_kinds

    def __call__(
        self,
        query: str,
        history: History = (),
        image: str | Path | bytes | Image.Image | None = None,
        video: str | Path | bytes | torch.Tensor | None = None,
        template: str | None = None,
        video_strategy: str | None = None,
        answer: str | None = None,
    ) -> ModelInputs:
        """One prompt. `image` (path, bytes or PIL) for image models; `video` (path, bytes, or
        decoded uint8 frames (C, T, H, W)) for video models. Neither: a text-only prompt.
        `template` None: the checkpoint's default; `video_strategy` None: the template's ('base' for
        'base', else 'chat'), as the official demos pass one value as both."""
        template = template or self.default_template
        size = self.config.vision.image_size
        pixels = digest = None
        if image is not None and video is not None:
            raise ValueError("give an image or a video, not both")
        if image is not None:
            if "image" not in self.media_kinds:
                raise ValueError("this is a video checkpoint: pass a video, not an image")
            pixels, digest = transform_image(load_image(image), size)
        elif video is not None:
            if "video" not in self.media_kinds:
                raise ValueError("this is an image checkpoint: pass an image, not a video")
            from .video import frames_digest, transform_video, video_pixels

            strategy = video_strategy or strategy_for(template)
            if isinstance(video, torch.Tensor):
                pixels, digest = transform_video(video, size), frames_digest(video)
            else:  # decoded and transformed frame by frame (bounded memory), same pixels
                pixels, digest = video_pixels(video, size, strategy)
        inputs = build_inputs(self.tokenizer, self.config, query, history, pixels, digest, template, answer)
        inputs.mark_pixels_finite()  # normalized 8-bit media: finite by construction
        return inputs

    @property
    def video_strategy(self) -> str:
        """The frame strategy of the default template."""
        return strategy_for(self.default_template)


def strategy_for(template: str) -> str:
    """The official demos sample frames with the 'base' strategy for the base template, 'chat' otherwise."""
    return "base" if template == "base" else "chat"


"""Processing: requests (text, history, image, video) -> `ModelInputs`; the model never sees a tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..config import ModelConfig
from .image import ImageError, load_image, transform_image
from .prompt import History, ModelInputs, build_inputs, format_prompt
from .tokenizer import Tokenizer

__all__ = ["Processor", "ModelInputs", "Tokenizer", "ImageError", "format_prompt"]


class Processor:
    """Builds model inputs for one checkpoint: its tokenizer, image size and default template."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer):
        self.config = config
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, folder: str | Path, config: ModelConfig | None = None) -> "Processor":
        folder = Path(folder)
        return cls(config or ModelConfig.from_file(folder / "config.json"), Tokenizer(folder / "tokenizer.json"))

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
        decoded uint8 frames (C, T, H, W)) for video models. Neither: a text-only prompt."""
        size = self.config.vision.image_size
        pixels = digest = None
        if image is not None and video is not None:
            raise ValueError("give an image or a video, not both")
        if image is not None:
            if self.config.is_video:
                raise ValueError("this is a video checkpoint: pass a video, not an image")
            pixels, digest = transform_image(load_image(image), size)
        elif video is not None:
            if not self.config.is_video:
                raise ValueError("this is an image checkpoint: pass an image, not a video")
            from .video import frames_digest, transform_video, video_pixels

            if isinstance(video, torch.Tensor):
                pixels, digest = transform_video(video, size), frames_digest(video)
            else:  # decoded and transformed frame by frame (bounded memory), same pixels
                pixels, digest = video_pixels(video, size, video_strategy or self.video_strategy)
        return build_inputs(self.tokenizer, self.config, query, history, pixels, digest, template, answer)

    @property
    def video_strategy(self) -> str:
        """The official demos sample 'base' for base-template checkpoints, 'chat' otherwise."""
        return "base" if self.config.template_version == "base" else "chat"


"""Item -> ModelInputs on the CPU (read, decode, resize, tokenize): the work the preprocessing pool does.

Runs in worker threads: PIL and PyAV decode and resize, and torch normalises, with the GIL released, so
a few threads keep the engine fed while the main thread steps it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..processing import Processor
from ..processing.image import load_image
from ..processing.prompt import ModelInputs
from .items import Item, read_source


class Preprocessor:
    """query: the prompt for items without their own; template / video_strategy: None = the checkpoint's.

    A video checkpoint captions a still image as a one-frame clip; an image checkpoint refuses videos.
    """

    def __init__(self, processor: Processor, query: str | None = None, template: str | None = None,
                 video_strategy: str | None = None):
        self.processor = processor
        self.query = query
        self.template = template
        self.video_strategy = video_strategy

    def query_for(self, item: Item) -> str:
        query = item.query if item.query is not None else self.query
        if query is None:
            raise ValueError("no prompt: the item has no query and no default prompt was given")
        return query

    def template_for(self, item: Item) -> str:
        """The template the prompt is built with (reported in the rows)."""
        return item.template or self.template or self.processor.default_template

    def __call__(self, item: Item) -> ModelInputs:
        if item.error is not None:
            raise ValueError(item.error)
        query, template = self.query_for(item), item.template or self.template  # None: the Processor's default
        if item.image is not None and "image" not in self.processor.media_kinds:  # a still as a one-frame clip
            frames = torch.from_numpy(np.array(load_image(read_source(item.image)))).permute(2, 0, 1)
            return self.processor(query, item.history, video=frames.unsqueeze(1).contiguous(), template=template)
        image = None if item.image is None else read_source(item.image)
        video = None if item.video is None else read_source(item.video)
        return self.processor(query, item.history, image=image, video=video, template=template,
                              video_strategy=self.video_strategy)


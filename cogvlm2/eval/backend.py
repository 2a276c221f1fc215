"""The engine behind an evaluation: load a checkpoint (adapter, quantization: as `cogvlm2 chat` does) into
an `LLM`, and answer batches of (query, template, image) prompts with it."""

from __future__ import annotations

import argparse
from typing import Sequence

from ..llm import LLM
from ..processing import ImageError
from ..sampling_params import SamplingParams
from .data import DataError


def load_llm(args: argparse.Namespace, **engine_kwargs) -> LLM:
    """`args` carries the shared model arguments (model, dtype, device, lora, and whatever else
    `cogvlm2.arguments.add_model_arguments` defines); the model is loaded as `cogvlm2 chat` loads it."""
    from ..launch import load_from_args

    model, _ = load_from_args(args)
    return LLM(model, adapter_id=getattr(model, "adapter_id", None), **engine_kwargs)


class EngineGenerate:
    """Callable answering a batch of prompts in one continuous-batching pass of the engine."""

    def __init__(self, llm: LLM, params: SamplingParams, use_tqdm: bool = True):
        self.llm, self.params, self.use_tqdm = llm, params, use_tqdm

    def __call__(self, prompts: Sequence[tuple[str, str | None, object]]) -> list[str]:
        inputs = []
        for query, template, image in prompts:
            try:
                inputs.append(self.llm.processor(query, template=template, image=image))
            except (ImageError, OSError, ValueError) as e:
                raise DataError(f"cannot build the prompt for {query[:60]!r}: {e}") from None
        # stripped, as VLMEvalKit's CogVLM2 wrapper returns answers
        return [out.text.strip() for out in self.llm.generate(inputs, self.params, use_tqdm=self.use_tqdm)]

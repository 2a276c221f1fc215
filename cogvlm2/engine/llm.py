"""LLM: offline batch generation (captioning, evaluation) on the engine: prompts in, finished outputs out."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence as Seq

import torch
from tqdm.auto import tqdm

from ..model.cogvlm import CogVLM2ForCausalLM
from ..processing.prompt import ModelInputs
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine
from .protocol import RequestOutput

Prompt = ModelInputs | dict | str


class LLM:
    """LLM("tiny" | folder | hub id | loaded model, dtype=..., device=..., quant=..., **EngineConfig fields).

    A prompt is ModelInputs, a dict of Processor arguments ({"query", "image", "video", "history",
    "template"}), or a plain string (a text-only query).
    """

    def __init__(self, model: str | Path | CogVLM2ForCausalLM = "tiny", dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, quant: str | int | None = None, **engine_kwargs):
        self.engine = LLMEngine.from_pretrained(model, dtype, device, quant=quant, **engine_kwargs)
        self.processor = self.engine.processor
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def to_inputs(self, prompt: Prompt) -> ModelInputs:
        if isinstance(prompt, ModelInputs):
            return prompt
        if self.processor is None:
            raise ValueError("this model has no processor (tokenizer): pass ModelInputs")
        if isinstance(prompt, str):
            return self.processor(prompt)
        if isinstance(prompt, dict):
            return self.processor(**prompt)
        raise TypeError(f"a prompt is ModelInputs, a dict or a str, not {type(prompt).__name__}")

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Final outputs in the order of `prompts` (one SamplingParams for all, or one per prompt)."""
        if isinstance(prompts, (ModelInputs, dict, str)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        inputs = [self.to_inputs(p) for p in prompts]
        ids = []
        try:
            for x, params in zip(inputs, sampling_params):
                ids.append(f"llm-{self._counter}")
                self._counter += 1
                self.engine.add_request(ids[-1], x, params)
        except Exception:
            for i in ids:
                self.engine.abort(i)
            self.engine.step()  # drain the abort outputs
            raise
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]

"""The front-end: requests -> engine inputs (Processor) and engine outputs -> text (detokenizer, stop strings).

    prompt (text, history, image, video) --Processor--> EngineInputs --EngineCore--> token ids
    token ids --TextStream (detokenizer, stop strings, hold-back)--> RequestOutput.text / delta_text

`LLMEngine` is the synchronous front-end over an `EngineCore` (same add_request / abort / step calls,
text filled in); `LLM` runs offline batches on it and `AsyncLLM` (`cogvlm2.async_llm`) runs it in the
engine thread for the servers. The engine stops on ids and lengths only; when a request's text meets a
stop string, the front-end cuts it, reports the request finished ("stop", the string as stop_reason)
and aborts it in the engine, which frees its blocks at once (a token already in flight is discarded).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence as Seq

import torch
from torch import nn
from tqdm.auto import tqdm

from .engine.attention import Attend
from .engine.config import EngineConfig
from .engine.core import EngineCore
from .engine.inputs import EngineInputs
from .engine.protocol import EngineStats, RequestOutput
from .engine.worker import EngineWorker, ModelSpec
from .processing import Processor
from .processing.text_stream import TextStream
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)
Prompt = EngineInputs | dict | str


def load_processor(model: str | Path | nn.Module) -> Processor | None:
    """The processor of a checkpoint ("tiny", a folder, a Hub id) or of a loaded model (from the folder
    it was loaded from); None for a model built in memory (it has no tokenizer)."""
    if isinstance(model, nn.Module):
        folder = getattr(model, "checkpoint_path", None)
        return Processor.from_pretrained(folder, model.config) if folder is not None else None
    from .tiny import checkpoint_folder

    return Processor.from_pretrained(checkpoint_folder(model))


def load_processor_and_model(model: str | Path | nn.Module, dtype: str | torch.dtype | None = None,
                             device: str | torch.device | None = None,
                             quant: str | int | None = None) -> tuple[nn.Module, Processor | None]:
    """A model name ("tiny", a folder, a hub id) or a loaded model -> (model, its processor or None).
    Defaults: CUDA when available (bfloat16 from compute capability 8, else float16), else CPU in float32.
    `quant` quantizes while loading (a loaded model: in place, see cogvlm2.quant)."""
    if not isinstance(model, nn.Module):
        from .model import load_model
        from .tiny import checkpoint_folder

        spec = ModelSpec(model, dtype, device, quant)
        model = load_model(str(checkpoint_folder(model)), dtype=spec.resolved_dtype(), device=spec.resolved_device(),
                           quant=quant)
    elif quant is not None:
        from .quant import quantize_model

        quantize_model(model, quant, model.device)
    return model, load_processor(model)


class LLMEngine:
    """The synchronous front-end: Processor + EngineCore + one TextStream per request.

    model: a loaded model, a ModelSpec or a worker (passed to EngineCore), or an EngineCore.
    processor: the checkpoint's (None: ids only; stop strings then need one)."""

    def __init__(self, model: nn.Module | ModelSpec | EngineWorker | EngineCore, config: EngineConfig | None = None,
                 processor: Processor | None = None, attend: Attend | None = None):
        self.core = model if isinstance(model, EngineCore) else EngineCore(model, config, attend)
        self.processor = processor
        self.streams: dict[str, TextStream] = {}

    @classmethod
    def from_pretrained(cls, model: str | Path | nn.Module = "tiny", dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, attend: Attend | None = None,
                        quant: str | int | None = None, adapters: dict[str, str | Path] | None = None,
                        tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                        shard_vision: bool | None = None, **engine_kwargs) -> "LLMEngine":
        """Build from a checkpoint (the worker loads it) or a loaded model; `adapters`: LoRA adapters
        (name -> folder) that requests select by name. tensor_parallel_size N: one process per GPU,
        each holding 1/N of the model, the vision tower included (shard_vision=False: replicate the tower
        on every rank instead); pipeline_parallel_size N: consecutive layers on N GPUs in this process
        (docs/parallel.md)."""
        if tensor_parallel_size > 1 or pipeline_parallel_size > 1 or shard_vision:
            spec = ModelSpec(model, dtype, device, quant, dict(adapters or {}),
                             tensor_parallel_size=tensor_parallel_size,
                             pipeline_parallel_size=pipeline_parallel_size, shard_vision=shard_vision)
        elif isinstance(model, nn.Module):
            if quant is not None:
                from .quant import quantize_model

                quantize_model(model, quant, model.device)
            spec = ModelSpec(model, adapters=dict(adapters or {}))
        else:
            spec = ModelSpec(model, dtype, device, quant, dict(adapters or {}))
        return cls(spec, EngineConfig(**engine_kwargs), load_processor(model), attend)

    # what callers read of the engine ---------------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def tokenizer(self):
        return self.processor.tokenizer if self.processor else None

    @property
    def worker(self) -> EngineWorker:
        return self.core.worker

    @property
    def model(self) -> nn.Module:
        return self.core.model

    @property
    def runner(self):
        return self.core.runner

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def block_manager(self):
        return self.core.block_manager

    @property
    def seqs(self):
        return self.core.seqs

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded LoRA adapters: name -> adapter id (the prefix-cache key)."""
        return self.core.worker.adapters

    def stats(self) -> EngineStats:
        return self.core.stats()

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor parallelism); also done at interpreter exit."""
        self.core.shutdown()

    # requests -------------------------------------------------------------------------------------

    def add_request(self, request_id: str, inputs: EngineInputs, params: SamplingParams | None = None,
                    arrival_time: float | None = None, adapter: str | None = None) -> None:
        params = params or SamplingParams()
        stream = TextStream(self.tokenizer, params.stop, params.skip_special_tokens)
        self.core.add_request(request_id, inputs, params, arrival_time, adapter=adapter)
        self.streams[request_id] = stream

    def abort(self, request_id: str) -> bool:
        return self.core.abort(request_id)

    def abort_all(self) -> list[str]:
        self.streams.clear()
        return self.core.abort_all()

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One engine step; each output gets its text. A request whose text cannot be made (a failing
        detokenizer) fails alone, as a failing engine request does (finish_reason "abort", error set)."""
        outputs = []
        for out in self.core.step():
            try:
                self._add_text(out)
            except Exception as e:  # noqa: BLE001 - this request's fault alone
                logger.error("request %s failed: %s: %s", out.request_id, type(e).__name__, e, exc_info=e)
                self.core.abort(out.request_id, report=False)
                out.finished, out.finish_reason, out.error = True, "abort", f"{type(e).__name__}: {e}"
            if out.finished:
                self.streams.pop(out.request_id, None)
            outputs.append(out)
        return outputs

    def _add_text(self, out: RequestOutput) -> None:
        """Feed the new ids to the request's TextStream; end the request at a stop string."""
        stream = self.streams.get(out.request_id)
        if stream is None:
            return
        new = out.delta_token_ids
        stopped_by_id = out.finish_reason == "stop" and isinstance(out.stop_reason, int)
        delta = ""
        for token in new[:-1] if stopped_by_id else new:  # a stop id adds no text
            text, stop = stream.push(token)
            delta += text
            if stop is not None:
                if not out.finished:
                    self.core.abort(out.request_id, report=False)
                out.finished, out.finish_reason, out.stop_reason = True, "stop", stop
                break
        else:
            if out.finished and out.finish_reason != "abort":
                delta += stream.flush()  # the end: release held-back text
        out.delta_text, out.text = delta, stream.text


class LLM:
    """LLM("tiny" | folder | hub id | loaded model, dtype=..., device=..., quant=..., adapters=...,
    tensor_parallel_size=N, shard_vision=None | bool, pipeline_parallel_size=N, **EngineConfig fields).

    A prompt is EngineInputs (e.g. the processor's ModelInputs), a dict of Processor arguments
    ({"query", "image", "video", "history", "template"}), or a plain string (a text-only query).
    """

    def __init__(self, model: str | Path | nn.Module = "tiny", dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, quant: str | int | None = None,
                 adapters: dict[str, str | Path] | None = None, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, shard_vision: bool | None = None, **engine_kwargs):
        self.engine = LLMEngine.from_pretrained(model, dtype, device, quant=quant, adapters=adapters,
                                                tensor_parallel_size=tensor_parallel_size,
                                                pipeline_parallel_size=pipeline_parallel_size,
                                                shard_vision=shard_vision, **engine_kwargs)
        self.processor = self.engine.processor
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def to_inputs(self, prompt: Prompt) -> EngineInputs:
        if isinstance(prompt, EngineInputs):
            return prompt
        if self.processor is None:
            raise ValueError("this model has no processor (tokenizer): pass EngineInputs")
        if isinstance(prompt, str):
            return self.processor(prompt)
        if isinstance(prompt, dict):
            return self.processor(**prompt)
        raise TypeError(f"a prompt is EngineInputs, a dict or a str, not {type(prompt).__name__}")

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, adapter: str | None = None) -> list[RequestOutput]:
        """Final outputs in the order of `prompts` (one SamplingParams for all, or one per prompt);
        `adapter`: a loaded LoRA adapter's name for every prompt (None: the base model)."""
        if isinstance(prompts, (EngineInputs, dict, str)):
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
                self.engine.add_request(ids[-1], x, params, adapter=adapter)
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

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor parallelism); also done at interpreter exit."""
        self.engine.shutdown()

"""LLMEngine: the synchronous core (add_request / abort / step), wiring scheduler, runner and outputs.

Not thread-safe: one thread owns an engine (AsyncLLM runs it in its loop thread). Each step
schedules, runs the model once, appends sampled tokens, and returns a RequestOutput for every
request that changed (aborts included).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import load_model
from ..model.cogvlm import CogVLM2ForCausalLM
from ..processing import Processor
from ..processing.prompt import ModelInputs
from ..sampling_params import SamplingParams
from .attention import Attend, default_attend
from .block_manager import BlockManager
from .config import EngineConfig
from .output import OutputProcessor
from .protocol import EngineStats, RequestOutput
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence


def load_processor_and_model(model: str | Path | CogVLM2ForCausalLM, dtype: str | torch.dtype | None = None,
                             device: str | torch.device | None = None) -> tuple[CogVLM2ForCausalLM, Processor | None]:
    """A model name ("tiny", a folder, a hub id) or a loaded model -> (model, its processor or None).
    Defaults: CUDA in bfloat16 when available, else CPU in float32."""
    if not isinstance(model, CogVLM2ForCausalLM):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
        model = load_model(str(model), dtype=dtype, device=device)
    folder = getattr(model, "checkpoint_path", None)
    processor = Processor.from_pretrained(folder, model.config) if folder is not None else None
    return model, processor


class LLMEngine:
    def __init__(self, model: CogVLM2ForCausalLM, config: EngineConfig | None = None, processor: Processor | None = None,
                 attend: Attend | None = None):
        self.model = model
        self.processor = processor
        self.config = (config or EngineConfig()).for_model(model.config)
        if self.config.num_kv_blocks is not None and self.config.num_kv_blocks < self.config.max_blocks_per_seq:
            raise ValueError(f"num_kv_blocks={self.config.num_kv_blocks} cannot hold one sequence of max_model_len="
                             f"{self.config.max_model_len} ({self.config.max_blocks_per_seq} blocks); lower max_model_len")
        self.runner = ModelRunner(model, self.config, attend or default_attend(model.device, self.config.max_model_len))
        self.block_manager = BlockManager(self.runner.kv.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching, self.config.adapter_id)
        self.scheduler = Scheduler(self.config, self.block_manager)
        cfg = model.config
        self.output = OutputProcessor(processor.tokenizer if processor else None, cfg.eos_token_ids,
                                      self.config.max_model_len, cfg.max_position_embeddings)
        self.seqs: dict[str, Sequence] = {}
        self._aborted: list[RequestOutput] = []

    @classmethod
    def from_pretrained(cls, model: str | Path | CogVLM2ForCausalLM = "tiny", dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, attend: Attend | None = None,
                        **engine_kwargs) -> "LLMEngine":
        model, processor = load_processor_and_model(model, dtype, device)
        return cls(model, EngineConfig(**engine_kwargs), processor, attend)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def tokenizer(self):
        return self.processor.tokenizer if self.processor else None

    def validate(self, request_id: str, inputs: ModelInputs, params: SamplingParams) -> None:
        """Raise ValueError with a message fit for the client when the request cannot be served."""
        cfg, n = self.model.config, len(inputs)
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens but max_model_len is {self.max_model_len}: prompt and "
                             f"at least one generated token must fit")
        if inputs.next_position >= cfg.max_position_embeddings:
            raise ValueError(f"the prompt spans {inputs.next_position} positions but the model supports "
                             f"{cfg.max_position_embeddings} (max_position_embeddings)")
        if not all(0 <= t < cfg.vocab_size for t in inputs.input_ids):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
        num_vision = inputs.num_vision_tokens
        frames = 0 if inputs.pixel_values is None else inputs.pixel_values.shape[0]
        if num_vision != frames * cfg.vision.tokens_per_image:
            raise ValueError(f"the prompt has {num_vision} vision tokens but its pixels give "
                             f"{frames} x {cfg.vision.tokens_per_image}")

    def add_request(self, request_id: str, inputs: ModelInputs, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        self.validate(request_id, inputs, params)
        seq = Sequence(request_id, inputs, params, arrival_time)
        self.output.add(seq)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; its final output (finish_reason "abort") comes
        with the next step. False if no such request is unfinished."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        self._aborted.append(self.output.abort(seq))
        return True

    def abort_all(self) -> list[str]:
        """Abort every unfinished request without reporting it (after a failed step); their ids."""
        ids = list(self.seqs)
        for request_id in ids:
            self.abort(request_id)
        self._aborted.clear()
        return ids

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        batch = self.scheduler.schedule()
        tokens = self.runner.execute(batch) if batch.seqs else []
        self.scheduler.update(batch, tokens)
        for seq, token in zip(batch.seqs, tokens):
            if token is None:
                continue
            out = self.output.process(seq, token)
            outputs.append(out)
            if out.finished:
                self.scheduler.finish(seq)
                del self.seqs[seq.request_id]
        if self.runner.vision_cache:
            self.runner.release_vision(self.scheduler.pending_vision())
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_blocks_total=self.block_manager.num_blocks, kv_blocks_free=self.block_manager.num_free)

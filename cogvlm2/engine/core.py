"""EngineCore: the synchronous engine (add_request / abort / step): token ids in, token ids out.

It wires the scheduler, the block manager, the worker (which owns the model and the device) and the
id-level outputs (stop ids, length limits). It knows no tokenizer and no text: the front-end
(`cogvlm2.llm.LLMEngine`) turns requests into `EngineInputs` and outputs into text.

Not thread-safe: one thread owns an engine (AsyncLLM runs it in its loop thread). Each step
schedules, runs the model once, appends sampled tokens, and returns a RequestOutput for every
request that changed (aborts included).

Async scheduling (EngineConfig.async_scheduling) keeps one launched step in flight across calls so
the host work of a step overlaps the device's work on the next:

    step() call k:  launch step k+1 (lookahead: inputs from step k's ids on the device)
                    collect step k, append its ids, check stop ids and lengths, free finished sequences
                    -> outputs of step k        (meanwhile the device computes step k+1)

The lookahead is built whenever every running sequence took part in step k (`Scheduler.schedule_lookahead`
states the rule): those that sampled decode, those in the middle of a prefill compute their next chunk
(its tokens are on the host), and waiting requests are admitted beside them, so neither arrivals under
load nor long chunked prefills (captioning) stall the device. Otherwise (a sequence the budget left out
of step k, or a step that would have to preempt) the call collects step k first and schedules step k+1
as the synchronous engine would, leaving it in flight. A sequence that step k stops
or that is aborted meanwhile also ran in step k+1: that token is discarded when step k+1 is
collected, so every token is reported once, in order. Outputs arrive one call later than without
async scheduling; the tokens are the same.

Failure containment: a request the engine cannot take fails in add_request (ValueError). A step that
raises is retried one sequence at a time over the batches whose ids were not applied (their state is
as before the step): a sequence that fails alone is to blame; it ends with an output whose `error` is
set (finish_reason "abort"), its traceback logged with its request id. The others continue as if
the batch had not failed; waiting requests are untouched, and the engine keeps serving.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..devices import freeze_heap, thaw_heap
from ..sampling_params import SamplingParams
from .attention import Attend
from .block_manager import BlockManager
from .config import EngineConfig
from .inputs import EngineInputs
from .output import OutputProcessor
from .protocol import EngineStats, RequestOutput
from .runner import LaunchedStep
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, SequenceStatus
from .worker import EngineWorker, ModelSpec
from .worker_group import make_worker

# GC_FREEZE: once built, the engine moves the Python heap out of the garbage collector's reach (devices.freeze_heap)
# and the next engine build or model load brings it back (devices.thaw_heap), so a full collection in the middle of
# a step scans only the step's objects. Why: the fp8 one-image TTFT had 3 of 8 rounds 20-80 ms slow with the card
# idling more, not throttled (BENCHMARKS.md, twenty-first session), as a host pause would make them; not measured
# yet (decode_ab.py --set "engine.core.GC_FREEZE=0" --set "engine.core.GC_FREEZE=1"), so off by default;
# COGVLM2_GC_FREEZE=1 turns it on (read at import)
GC_FREEZE = os.environ.get("COGVLM2_GC_FREEZE", "0") == "1"
FINITE_PIXELS_REMEMBERED = 4096  # vision hashes whose pixels need no second finiteness check

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, model: nn.Module | ModelSpec | EngineWorker, config: EngineConfig | None = None,
                 attend: Attend | None = None):
        """model: a built model, a ModelSpec (the worker builds it) or a worker (e.g. a group of ranks)."""
        thaw_heap()  # an earlier engine's frozen heap: collectable again before this one takes memory
        self.worker = model if hasattr(model, "launch") else make_worker(model, attend)
        self.worker.load()
        if config is not None and config.embeddings_on_host:  # before the KV pool is sized from free memory
            move = getattr(self.worker, "move_embeddings_to_host", None)
            if move is None:
                raise ValueError("embeddings_on_host needs the model in this process on one device (not tensor "
                                 "parallel)")
            move()
        cfg = self.worker.model_config
        self.config = (config or EngineConfig()).for_model(cfg)
        num_blocks = self.worker.num_kv_blocks(self.config)
        self.worker.init_cache(self.config, num_blocks)
        self.block_manager = BlockManager(num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching, self.config.adapter_id)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.output = OutputProcessor(cfg.eos_token_ids, self.config.max_model_len, cfg.max_position_embeddings)
        self.seqs: dict[str, Sequence] = {}
        self._aborted: list[RequestOutput] = []
        self._finite_pixels: dict[str, None] = {}  # vision hashes whose pixels were checked finite (oldest first)
        self._in_flight: LaunchedStep | None = None  # launched, not collected (async scheduling only)
        self._outputs: list[RequestOutput] = []  # of the step() call in progress
        self._unapplied: list[ScheduledBatch] = []  # its batches whose ids are not applied yet
        if GC_FREEZE:
            freeze_heap()

    @property
    def model(self):
        return self.worker.model

    @property
    def runner(self):
        return self.worker.runner

    @classmethod
    def from_pretrained(cls, model: str | Path | nn.Module = "tiny", dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, attend: Attend | None = None,
                        quant: str | int | None = None, **engine_kwargs) -> "EngineCore":
        spec = model if isinstance(model, nn.Module) else ModelSpec(model, dtype, device, quant)
        return cls(spec, EngineConfig(**engine_kwargs), attend)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def validate(self, request_id: str, inputs: EngineInputs) -> None:
        """Raise ValueError with a message fit for the client when the request cannot be served."""
        cfg, n = self.worker.model_config, len(inputs)
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
        pixels, size = inputs.pixel_values, cfg.vision.image_size
        if pixels is not None and (pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size)
                                   or not pixels.is_floating_point()):
            raise ValueError(f"pixel_values must be a float tensor [frames, 3, {size}, {size}], got "
                             f"{pixels.dtype} {tuple(pixels.shape)}")
        frames = 0 if pixels is None else pixels.shape[0]
        if num_vision != frames * cfg.vision.tokens_per_image:
            raise ValueError(f"the prompt has {num_vision} vision tokens but its pixels give "
                             f"{frames} x {cfg.vision.tokens_per_image}")
        # a finite sum means every element is finite (NaN and inf propagate); only a sum that is not
        # (an overflow, or a real NaN) pays for the exact check: 1-2 ms instead of 17 ms for a 1344²
        # image. Pixels whose vision hash passed before are not summed again (a later chat turn over
        # the same image): the hash already stands for the pixels in the feature and prefix caches. Nor
        # are the Processor's own, unchanged (finite by construction: `pixels_known_finite`).
        if pixels is not None and inputs.vision_hash not in self._finite_pixels:
            if (not inputs.pixels_known_finite and not bool(torch.isfinite(pixels.sum()))
                    and not bool(pixels.isfinite().all())):
                raise ValueError("pixel_values contain NaN or infinite values")
            if inputs.vision_hash is not None:
                self._finite_pixels[inputs.vision_hash] = None
                if len(self._finite_pixels) > FINITE_PIXELS_REMEMBERED:
                    self._finite_pixels.pop(next(iter(self._finite_pixels)))

    def add_request(self, request_id: str, inputs: EngineInputs, params: SamplingParams | None = None,
                    arrival_time: float | None = None, adapter: str | None = None) -> None:
        """Queue a request; `adapter`: the name of a loaded LoRA adapter (None: the base model)."""
        params = params or SamplingParams()
        self.validate(request_id, inputs)
        slot = self.worker.adapter_slot(adapter)
        seq = Sequence(request_id, inputs, params, arrival_time, slot, self.worker.adapters[adapter] if adapter else None)
        self.output.add(seq)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def add_adapter(self, name: str, path: str | Path) -> str:
        """Load a LoRA adapter that requests can select by `name`; its adapter id."""
        return self.worker.add_adapter(name, path)

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; refused while an unfinished request uses it."""
        slot = self.worker.adapter_slot(name)
        users = [s.request_id for s in self.seqs.values() if s.adapter_slot == slot]
        if users:
            raise ValueError(f"adapter {name!r} is in use by requests {users[:5]}")
        self.worker.remove_adapter(name)

    def abort(self, request_id: str, report: bool = True) -> bool:
        """Stop a request now and free its blocks; its final output (finish_reason "abort") comes
        with the next step unless report=False (the front-end ended it: a stop string). False if no
        such request is unfinished."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        out = self.output.abort(seq)
        if report:
            self._aborted.append(out)
        return True

    def abort_all(self) -> list[str]:
        """Abort every unfinished request without reporting it (shutdown); their ids.
        A step in flight is dropped uncollected."""
        ids = list(self.seqs)
        for request_id in ids:
            self.abort(request_id)
        self._aborted.clear()
        self._in_flight = None
        return ids

    def has_unfinished(self) -> bool:
        """True while step() has work: requests, abort reports, or a launched step to collect."""
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """One step; never raises for a failure it can blame on requests (see the module docstring)."""
        self._outputs, self._aborted, self._unapplied = self._aborted, [], []
        try:
            self._step()
        except Exception as e:  # noqa: BLE001 - contained: only the requests to blame fail
            self._recover(e)
        outputs, self._outputs, self._unapplied = self._outputs, [], []
        return outputs

    def _step(self) -> None:
        prev, launched, self._in_flight = self._in_flight, None, None
        if prev is not None:
            self._unapplied.append(prev.batch)
            lookahead = self.scheduler.schedule_lookahead(prev.batch, self._done_after_next_token)
            if lookahead is not None:
                launched = self.worker.launch(lookahead, prev.sampled)
            self._collect(prev)  # while the device runs the lookahead
        if launched is None:
            batch = self.scheduler.schedule()
            if batch.seqs:
                self._unapplied.append(batch)
                launched = self.worker.launch(batch)
        if launched is not None and not self.config.async_scheduling:
            self._collect(launched)
            launched = None
        self._in_flight = launched
        self.worker.release_vision(self.scheduler.pending_vision)

    def _recover(self, error: Exception) -> None:
        """A step raised: re-run each sequence of the unapplied batches alone; those that fail alone
        are to blame. With no batch to suspect (the scheduler itself failed) every request fails."""
        self._in_flight = None  # a lookahead launched on top of a failed step is dropped (state unchanged)
        suspects: dict[int, tuple[Sequence, int, int, bool]] = {}
        for b in self._unapplied:
            for seq, start, n, sample in zip(b.seqs, b.starts, b.num_new_tokens, b.samples):
                if seq.status == SequenceStatus.RUNNING and seq.num_computed_tokens == start:
                    suspects.setdefault(id(seq), (seq, start, n, sample))
        ids = [seq.request_id for seq, *_ in suspects.values()]
        if not suspects:
            logger.error("engine step failed outside any batch; failing every request: %s", list(self.seqs),
                         exc_info=error)
            for seq in list(self.seqs.values()):
                self._fail(seq, error, log=False)
            return
        logger.warning("engine step failed (%s: %s) for requests %s; retrying them one at a time",
                       type(error).__name__, error, ids, exc_info=error)
        for seq, start, n, sample in suspects.values():
            if seq.status != SequenceStatus.RUNNING or seq.num_computed_tokens != start:
                continue  # finished or failed meanwhile
            self._unapplied = []
            try:
                self._collect(self.worker.launch(ScheduledBatch([seq], [start], [n], [sample])))
            except Exception as e:  # noqa: BLE001 - it fails alone: it is to blame
                self._fail(seq, e)

    def _fail(self, seq: Sequence, error: BaseException, log: bool = True) -> None:
        """End seq with an error output (finish_reason "abort", `error` set) and free its blocks."""
        if log:
            logger.error("request %s failed: %s: %s", seq.request_id, type(error).__name__, error, exc_info=error)
        self.seqs.pop(seq.request_id, None)
        if not seq.is_finished:
            self.scheduler.finish(seq)
        if seq.request_id in self.output.states:
            out = self.output.abort(seq)
        else:
            out = RequestOutput(seq.request_id, seq.num_prompt_tokens, seq.output_ids, finished=True,
                                finish_reason="abort", metrics=seq.metrics)
        out.error = f"{type(error).__name__}: {error}"
        self._outputs.append(out)

    def _done_after_next_token(self, seq: Sequence) -> bool:
        """The token in flight for seq ends it by length, whatever its value: no lookahead for seq."""
        return self.output.at_length_limit(seq, len(seq) + 1)

    def _collect(self, step: LaunchedStep) -> None:
        """Wait for a launched step's ids, append them and report the sequences they changed. A
        sequence that finished or was aborted while the step ran gets nothing: its token is stale.
        A sequence whose output cannot be processed fails alone."""
        tokens = self.worker.collect(step)
        self.scheduler.update(step.batch, tokens)
        self._unapplied = [b for b in self._unapplied if b is not step.batch]
        for seq, token in zip(step.batch.seqs, tokens):
            if token is None or seq.is_finished:  # each sequence appears once: finished before this step
                continue
            try:
                out = self.output.process(seq, token)
            except Exception as e:  # noqa: BLE001 - this request's fault alone
                self._fail(seq, e)
                continue
            self._outputs.append(out)
            if out.finished:
                self.scheduler.finish(seq)
                del self.seqs[seq.request_id]

    def shutdown(self) -> None:
        """Stop the worker's processes (a tensor-parallel group's ranks); idempotent. The engine is
        unusable afterwards."""
        stop = getattr(self.worker, "shutdown", None)
        if stop is not None:
            stop()

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_blocks_total=self.block_manager.num_blocks, kv_blocks_free=self.block_manager.num_free)

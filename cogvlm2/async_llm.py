"""AsyncLLM: the EngineClient for asyncio servers: the front-end engine steps in ONE background thread.

The event loop never runs a model step. Callers talk to the engine thread through a command
queue (add / abort); outputs travel back with `loop.call_soon_threadsafe` into one asyncio.Queue per
request. Leaving a `generate` iterator early (break, client disconnect, task cancellation) aborts
its request, which frees its KV blocks. A request that fails validation gets the exception in its
iterator; a request the engine fails (LLMEngine contains a failing step to the requests it can blame)
gets an EngineRequestError; the loop never dies.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from pathlib import Path
from typing import AsyncIterator

import torch

from torch import nn

from .engine.inputs import EngineInputs
from .engine.protocol import EngineStats, RequestOutput
from .llm import LLMEngine
from .sampling_params import SamplingParams

_STOP = object()
logger = logging.getLogger(__name__)


class EngineRequestError(RuntimeError):
    """The engine failed this request (its traceback is in the server log, under its request id)."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.processor = engine.processor
        self.adapters = engine.adapters  # LoRA adapters requests may select: name -> adapter id
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, bool]] = {}  # + final_only
        self._stats = engine.stats()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_pretrained(cls, model: str | Path | nn.Module = "tiny", dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, **engine_kwargs) -> "AsyncLLM":
        """Load like LLM (blocking: call it via asyncio.to_thread from a running loop). Not started."""
        return cls(LLMEngine.from_pretrained(model, dtype, device, **engine_kwargs))

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> "AsyncLLM":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="cogvlm2-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join()
            self._thread = None
        for request_id in list(self._streams):
            self._deliver(request_id, RuntimeError("the engine was shut down"))

    async def __aenter__(self) -> "AsyncLLM":
        return self.start()

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.shutdown)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # EngineClient --------------------------------------------------------------------------------

    async def generate(self, request_id: str, inputs: EngineInputs, params: SamplingParams | None = None,
                       adapter: str | None = None, final_only: bool = False) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine produces them; final_only: the finished one alone (its
        text and token_ids are whole), so a consumer that does not stream (batch captioning) costs the
        engine thread one hand-over per request instead of one per token."""
        if not self.is_running:
            raise RuntimeError("the engine is not running: call start() or use `async with`")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream, final_only)
        self._commands.put(("add", request_id, self._compact(inputs), params or SamplingParams(), adapter))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def _compact(self, inputs: EngineInputs) -> EngineInputs:
        """Queued pixels in the model's (narrower) float dtype, which the vision tower casts them to
        anyway (same result): a bf16 / fp16 model holds half the bytes per waiting image."""
        pixels, dtype = inputs.pixel_values, self.engine.model.dtype
        if (pixels is None or not pixels.is_floating_point() or not dtype.is_floating_point
                or pixels.element_size() <= torch.finfo(dtype).bits // 8):
            return inputs
        return inputs.with_pixels_in(dtype)  # the Processor's finiteness mark kept: no pixel sum in the engine

    async def abort(self, request_id: str) -> None:
        """Its stream (if still read) ends with a finish_reason "abort" output."""
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    # engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            idle = not self.engine.has_unfinished()
            if not self._run_commands(block=idle):
                return
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the engine could not contain it: the loop lives on
                ids = self.engine.abort_all()
                logger.exception("engine step failed; failing requests %s", ids)
                outputs = []
                for request_id in ids:
                    self._deliver(request_id, EngineRequestError(f"engine step failed: {type(e).__name__}: {e}"))
            for out in outputs:
                self._deliver(out.request_id, EngineRequestError(out.error) if out.error else out)
            self._stats = self.engine.stats()

    def _run_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False on shutdown."""
        while True:
            try:
                cmd = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            if cmd is _STOP:
                self.engine.abort_all()  # free their blocks; shutdown() fails their streams
                return False
            block = False
            if cmd[0] == "add":
                _, request_id, inputs, params, adapter = cmd
                try:
                    self.engine.add_request(request_id, inputs, params, adapter=adapter)
                except ValueError as e:  # refused: the client's error
                    self._deliver(request_id, e)
                except Exception as e:  # noqa: BLE001 - a request that cannot be added fails alone
                    logger.exception("request %s could not be added", request_id)
                    self._deliver(request_id, EngineRequestError(f"{type(e).__name__}: {e}"))
            else:
                self.engine.abort(cmd[1])
            self._stats = self.engine.stats()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is None:  # the caller left (or never listened): drop it
            return
        loop, stream, final_only = target
        if final_only and isinstance(item, RequestOutput) and not item.finished:
            return
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # its event loop is closed
            self._streams.pop(request_id, None)

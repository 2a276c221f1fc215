"""What every endpoint shares: the engine and processor, model names, admission, prompt building and
length checks, and running engine requests so that leaving early (a client gone) always aborts them.

Admission: an engine request is *waiting* from the moment it is admitted until its first output
(media decoding and tokenizing included); past `max_waiting` new requests get 503 with Retry-After.
At most MAX_CONCURRENT_PREPROCESS requests decode media / tokenize at once, in threads, after a cheap
length bound in characters. Shutdown: `begin_shutdown` refuses new requests; `end_requests` (after
the drain time) ends every open one with a 503 error (streams: an error event, then [DONE]).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..engine.protocol import EngineClient, RequestOutput
from ..processing import ImageError, ModelInputs, Processor
from ..processing.video import VideoError
from ..sampling_params import SamplingParams
from . import limits
from .errors import APIError
from .metrics import Metrics

logger = logging.getLogger(__name__)
_SHUTDOWN = object()


@dataclass
class ServerContext:
    engine: EngineClient
    processor: Processor
    model_names: list[str]  # the first is the one reported in responses
    metrics: Metrics
    allow_remote_media: bool = False
    model_root: str = ""  # what /v1/models reports as `root` (never an absolute local path)
    max_waiting: int = limits.MAX_WAITING
    waiting: int = 0  # engine requests in the engine without an output yet
    preparing: int = 0  # engine requests of requests still decoding media / tokenizing
    shutting_down: bool = False
    open_requests: set[asyncio.Queue] = field(default_factory=set)  # output queues of running generate() calls
    _preprocess: asyncio.Semaphore | None = None
    _max_token_chars: int | None = None

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def adapters(self) -> dict[str, str]:
        """LoRA adapters served next to the base model, selected by a request's `model`: name -> id."""
        return getattr(self.engine, "adapters", None) or {}

    def adapter_of(self, model: str) -> str | None:
        """The adapter a (checked) model name selects; None: the base model."""
        return model if model in self.adapters else None

    @property
    def preprocess(self) -> asyncio.Semaphore:
        if self._preprocess is None:
            self._preprocess = asyncio.Semaphore(limits.MAX_CONCURRENT_PREPROCESS)
        return self._preprocess

    @property
    def max_prompt_chars(self) -> int:
        """No prompt with more characters fits the context: max_model_len x the longest token's text."""
        if self._max_token_chars is None:
            tok = self.processor.tokenizer
            self._max_token_chars = max(len(tok.decode([i], skip_special_tokens=False)) for i in range(tok.vocab_size))
        return self.max_model_len * max(self._max_token_chars, 1)

    def admit(self, n: int) -> None:
        """Refuse (503) when the server stops or `n` more waiting requests would pass max_waiting.
        Called before anything is sent (a stream's headers included)."""
        if self.shutting_down:
            raise APIError("the server is shutting down", status=503, code="server_shutting_down",
                           headers={"Retry-After": str(limits.RETRY_AFTER_S)})
        if self.waiting + self.preparing + n > self.max_waiting:
            raise APIError(f"the server is busy: {self.waiting + self.preparing} requests are waiting "
                           f"(limit {self.max_waiting}); retry later", status=503, code="server_overloaded",
                           headers={"Retry-After": str(limits.RETRY_AFTER_S)})

    @contextmanager
    def prepare(self, n: int):
        """Admit n engine requests and count them as waiting while their prompt is built."""
        self.admit(n)
        self.preparing += n
        try:
            yield
        finally:
            self.preparing -= n

    def begin_shutdown(self) -> None:
        self.shutting_down = True

    def end_requests(self) -> None:
        """End every open generation now (the drain time is over)."""
        for q in list(self.open_requests):
            q.put_nowait((None, _SHUTDOWN))

    @property
    def config(self):
        return self.processor.config

    @property
    def media_kinds(self) -> tuple[str, ...]:
        return self.processor.media_kinds

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


class OpenAIServing:
    def __init__(self, ctx: ServerContext):
        self.ctx = ctx

    def check_model(self, name: str | None) -> str:
        """The name reported in the response: the base model's, or a LoRA adapter's when the request names one."""
        if name is not None and name in self.ctx.adapters:
            return name
        if name is not None and name not in self.ctx.model_names:
            served = self.ctx.model_names + list(self.ctx.adapters)
            raise APIError(f"The model '{name}' does not exist; this server serves {served}",
                           status=404, param="model", code="model_not_found")
        return self.ctx.model_name

    async def build_inputs(self, query: str, history, image: bytes | None = None, video: bytes | None = None,
                           text_param: str = "messages", media_param: str = "messages", **template) -> ModelInputs:
        """Decode media and tokenize off the event loop, a few requests at a time, after refusing text
        that cannot fit the context; undecodable media is the client's error (400). `template`: the
        Processor's template / video_strategy (default: the checkpoint's)."""
        chars = len(query) + sum(len(q) + len(a) for q, a in history)
        if chars > self.ctx.max_prompt_chars:
            raise APIError(f"This model's maximum context length is {self.ctx.max_model_len} tokens. However, "
                           f"your messages have {chars} characters, more than any prompt of that many tokens. "
                           "Please reduce the length of the messages.", param=text_param,
                           code="context_length_exceeded")
        async with self.ctx.preprocess:
            try:
                return await asyncio.to_thread(self.ctx.processor, query, history, image=image, video=video,
                                               **template)
            except ImageError as e:
                raise APIError(f"invalid image: {e}", param=media_param) from None
            except (VideoError, FileNotFoundError) as e:
                raise APIError(f"invalid video: {e}", param=media_param) from None

    def max_tokens(self, inputs: ModelInputs, requested: int | None, prompt_param: str = "messages") -> int:
        """Check the prompt (vision tokens included) and the requested output fit the context; the
        default output budget is the rest of the context (as OpenAI). The context counts tokens for the
        KV cache and rotary positions for the model (vision tokens share positions)."""
        limit, n = self.ctx.max_model_len, len(inputs)
        positions = self.ctx.config.max_position_embeddings
        budget = inputs.output_budget(limit, positions)
        vision = f" ({inputs.num_vision_tokens} of them image / video tokens)" if inputs.num_vision_tokens else ""
        if budget < 1:
            raise APIError(f"This model's maximum context length is {limit} tokens ({positions} positions). However, "
                           f"your messages resulted in {n} tokens{vision} spanning {inputs.next_position} positions. "
                           "Please reduce the length of the messages.",
                           param=prompt_param, code="context_length_exceeded")
        if requested is not None and requested > budget:
            raise APIError(f"This model's maximum context length is {limit} tokens ({positions} positions). However, "
                           f"you requested {requested} completion tokens and your messages ({n} tokens{vision}, "
                           f"{inputs.next_position} positions) leave room for {budget}. Please reduce the length "
                           "of the messages or completion.", param="max_tokens", code="context_length_exceeded")
        return requested if requested is not None else budget

    async def generate(self, request_id: str, inputs: ModelInputs, params: list[SamplingParams],
                       adapter: str | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) for `len(params)` engine requests on one prompt, interleaved as they
        come. Each runs in its own task, so leaving this iterator (a disconnect cancels the consumer)
        cancels them and the engine aborts each one and frees its KV blocks. Each counts as waiting
        until its first output. An engine failure is a 500 (logged with the request id)."""
        ctx = self.ctx
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump(i: int, p: SamplingParams) -> None:
            last, started = None, False
            try:
                stream = (ctx.engine.generate(f"{request_id}-{i}", inputs, p) if adapter is None
                          else ctx.engine.generate(f"{request_id}-{i}", inputs, p, adapter=adapter))
                async for out in stream:
                    if not started:
                        started, ctx.waiting = True, ctx.waiting - 1
                    last = out
                    queue.put_nowait((i, out))
            except Exception as e:  # an engine failure reaches the consumer
                queue.put_nowait((i, e))
            finally:
                if not started:
                    ctx.waiting -= 1
                ctx.metrics.observe(last, len(inputs))
                queue.put_nowait((i, end))

        ctx.waiting += len(params)
        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(params)]
        ctx.open_requests.add(queue)
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is end:
                    remaining -= 1
                elif item is _SHUTDOWN:
                    raise APIError("the server is shutting down; the request was stopped", status=503,
                                   code="server_shutting_down")
                elif isinstance(item, ValueError):  # the engine refused the request
                    raise APIError(str(item)) from item
                elif isinstance(item, Exception):
                    logger.error("request %s-%d failed: %s: %s", request_id, i, type(item).__name__, item)
                    raise APIError(f"generation failed: {type(item).__name__}: {item}", status=500) from item
                else:
                    yield i, item
        finally:
            ctx.open_requests.discard(queue)
            for t in tasks:
                t.cancel()

"""What every endpoint shares: the engine and processor, model names, prompt building and length checks,
and running engine requests so that leaving early (a client gone) always aborts them.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import AsyncIterator

from ..engine.protocol import EngineClient, RequestOutput
from ..processing import ImageError, ModelInputs, Processor
from ..processing.video import VideoError
from ..sampling_params import SamplingParams
from .errors import APIError
from .metrics import Metrics


@dataclass
class ServerContext:
    engine: EngineClient
    processor: Processor
    model_names: list[str]  # the first is the one reported in responses
    metrics: Metrics
    allow_remote_media: bool = False
    model_path: str = ""

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def config(self):
        return self.processor.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


class OpenAIServing:
    def __init__(self, ctx: ServerContext):
        self.ctx = ctx

    def check_model(self, name: str | None) -> str:
        if name is not None and name not in self.ctx.model_names:
            raise APIError(f"The model '{name}' does not exist; this server serves {self.ctx.model_names}",
                           status=404, param="model", code="model_not_found")
        return self.ctx.model_name

    async def build_inputs(self, query: str, history, image: bytes | None = None, video: bytes | None = None,
                           **template) -> ModelInputs:
        """Decode media and tokenize off the event loop; undecodable media is the client's error (400).
        `template`: the Processor's template / video_strategy (default: the checkpoint's)."""
        try:
            return await asyncio.to_thread(self.ctx.processor, query, history, image=image, video=video, **template)
        except ImageError as e:
            reason = re.sub(r" ?<[^>]* at 0x[0-9a-f]+>", "", str(e))  # PIL names the in-memory file object
            raise APIError(f"invalid image: {reason}", param="messages") from None
        except (VideoError, FileNotFoundError) as e:
            raise APIError(f"invalid video: {e}", param="messages") from None

    def max_tokens(self, inputs: ModelInputs, requested: int | None) -> int:
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
                           param="messages", code="context_length_exceeded")
        if requested is not None and requested > budget:
            raise APIError(f"This model's maximum context length is {limit} tokens ({positions} positions). However, "
                           f"you requested {requested} completion tokens and your messages ({n} tokens{vision}, "
                           f"{inputs.next_position} positions) leave room for {budget}. Please reduce the length "
                           "of the messages or completion.", param="max_tokens", code="context_length_exceeded")
        return requested if requested is not None else budget

    async def generate(self, request_id: str, inputs: ModelInputs,
                       params: list[SamplingParams]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) for `len(params)` engine requests on one prompt, interleaved as they
        come. Each runs in its own task, so leaving this iterator (a disconnect cancels the consumer)
        cancels them and the engine aborts each one and frees its KV blocks."""
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump(i: int, p: SamplingParams) -> None:
            last = None
            try:
                async for out in self.ctx.engine.generate(f"{request_id}-{i}", inputs, p):
                    last = out
                    queue.put_nowait((i, out))
            except Exception as e:  # an engine failure reaches the consumer
                queue.put_nowait((i, e))
            finally:
                self.ctx.metrics.observe(last, len(inputs))
                queue.put_nowait((i, end))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(params)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is end:
                    remaining -= 1
                elif isinstance(item, ValueError):  # the engine refused the request
                    raise APIError(str(item)) from item
                elif isinstance(item, Exception):
                    raise APIError(f"generation failed: {type(item).__name__}: {item}", status=500) from item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

"""POST /v1/chat/completions: messages -> prompt -> n engine requests -> one response or an SSE stream."""

from __future__ import annotations

import json
import logging
import time
from typing import AsyncIterator

from ..engine.protocol import RequestOutput
from ..processing import ModelInputs
from .conversation import parse_messages
from .errors import APIError
from .limits import MAX_IMAGE_BYTES, MAX_VIDEO_BYTES
from .media import load_media
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ResponseMessage,
    Usage,
    completion_id,
)
from .serving_engine import OpenAIServing

logger = logging.getLogger(__name__)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Everything that can be refused is checked before the first byte is sent, so errors are 4xx
        responses, never a half-written stream."""
        model = self.check_model(request.model)
        with self.ctx.prepare(request.n):
            inputs = await self.prepare_inputs(request)
            max_tokens = self.max_tokens(inputs, request.requested_max_tokens)
            try:
                params = [request.to_sampling_params(max_tokens, i) for i in range(request.n)]
            except ValueError as e:
                raise APIError(str(e)) from None
            self.ctx.admit(0)  # the server may have begun to stop meanwhile
        request_id = completion_id()
        if request.stream:
            return self.stream(request, request_id, model, inputs, params)
        return await self.complete(request_id, model, inputs, params)

    async def prepare_inputs(self, request: ChatCompletionRequest) -> ModelInputs:
        conv = parse_messages(request.messages, self.ctx.media_kinds)
        media = {}
        if conv.media_url is not None:
            limit = MAX_VIDEO_BYTES if conv.media_kind == "video" else MAX_IMAGE_BYTES
            media[conv.media_kind] = await load_media(conv.media_url, conv.media_kind, limit, self.ctx.allow_remote_media)
        return await self.build_inputs(conv.query, conv.history, **media)

    async def complete(self, request_id: str, model: str, inputs: ModelInputs, params) -> ChatCompletionResponse:
        final: dict[int, RequestOutput] = {}
        async for i, out in self.generate(request_id, inputs, params, self.ctx.adapter_of(model)):
            final[i] = out
        choices = [
            Choice(index=i, finish_reason=final[i].finish_reason, message=ResponseMessage(content=final[i].text))
            for i in range(len(params))
        ]
        completion = sum(len(o.token_ids) for o in final.values())
        usage = Usage(prompt_tokens=len(inputs), completion_tokens=completion, total_tokens=len(inputs) + completion)
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    async def stream(self, request: ChatCompletionRequest, request_id: str, model: str, inputs: ModelInputs,
                     params) -> AsyncIterator[str]:
        """OpenAI's SSE: per choice a role chunk, content deltas, a chunk with the finish reason; then
        (with stream_options.include_usage) a usage chunk with no choices; then `data: [DONE]`."""
        created = int(time.time())
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            c = ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage)
            body = c.model_dump(exclude_none=not include_usage)
            body["choices"] = [ch.model_dump() for ch in choices]  # keep finish_reason / logprobs nulls
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        for i in range(len(params)):
            yield chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        generated = [0] * len(params)
        try:
            async for i, out in self.generate(request_id, inputs, params, self.ctx.adapter_of(model)):
                generated[i] = len(out.token_ids)
                if out.delta_text:
                    yield chunk([ChunkChoice(index=i, delta=DeltaMessage(content=out.delta_text))])
                if out.finished:
                    yield chunk([ChunkChoice(index=i, delta=DeltaMessage(), finish_reason=out.finish_reason)])
        except APIError as e:  # headers are sent: the error travels as an event, as OpenAI does
            logger.error("stream %s failed: %s", request_id, e.message)
            yield f"data: {e.to_response().model_dump_json()}\n\n"
        else:
            if include_usage:
                n = sum(generated)
                yield chunk([], Usage(prompt_tokens=len(inputs), completion_tokens=n, total_tokens=len(inputs) + n))
        yield "data: [DONE]\n\n"

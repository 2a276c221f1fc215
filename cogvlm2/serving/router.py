"""HTTP routes only: parse, call the serving object, turn its result into a response."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, TypeVar

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import APIError
from .limits import MAX_VIDEO_BYTES
from .protocol import ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList, VideoQAResponse

router = APIRouter()
T = TypeVar("T")


async def until_disconnect(raw_request: Request, work: Awaitable[T]) -> T | Response:
    """Run `work` unless the client goes away first: then cancel it (which aborts its engine
    requests) and wait until it is cancelled, instead of generating an answer nobody reads."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it finish cancelling (its engine requests are aborted)
    if watcher.done() and not watcher.cancelled():
        with contextlib.suppress(Exception):
            watcher.result()  # a receive() failure means the client is gone too
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening; for the access log, not an error
    return task.result()


@router.get("/health")
async def health(raw_request: Request) -> Response:
    """200 while the engine runs; 503 once its thread has stopped (a supervisor should restart us)."""
    if not getattr(raw_request.app.state.ctx.engine, "is_running", True):
        raise APIError("the engine is not running", status=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    body, content_type = raw_request.app.state.ctx.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models", response_model=ModelList)
async def list_models(raw_request: Request) -> ModelList:
    ctx = raw_request.app.state.ctx
    cards = [ModelCard(id=name, root=ctx.model_root, max_model_len=ctx.max_model_len) for name in ctx.model_names]
    cards += [ModelCard(id=name, root=adapter_id, parent=ctx.model_name, max_model_len=ctx.max_model_len)
              for name, adapter_id in ctx.adapters.items()]  # LoRA adapters, as vLLM lists them
    return ModelList(data=cards)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    result = await until_disconnect(raw_request, raw_request.app.state.chat.create_chat_completion(request))
    if isinstance(result, Response):
        return result
    if isinstance(result, ChatCompletionResponse):
        return JSONResponse(result.model_dump())
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/video_qa", response_model=VideoQAResponse)
async def video_qa(raw_request: Request, video: UploadFile = File(...), question: str = Form(""),
                   temperature: float | None = Form(None)) -> Response:
    data = await video.read(MAX_VIDEO_BYTES + 1)
    if len(data) > MAX_VIDEO_BYTES:
        raise APIError(f"video too large: over {MAX_VIDEO_BYTES} bytes", status=413, param="video")
    result = await until_disconnect(raw_request, raw_request.app.state.video_qa.answer(data, question, temperature))
    return result if isinstance(result, Response) else JSONResponse(result.model_dump())

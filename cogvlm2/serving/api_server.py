"""The FastAPI app: routes, error format, API-key and body-size guards; and running it with uvicorn."""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.protocol import EngineClient
from ..processing import Processor
from .errors import APIError, install_error_handlers
from .limits import MAX_BODY_BYTES
from .metrics import Metrics
from .router import router
from .serving_chat import OpenAIServingChat
from .serving_engine import ServerContext
from .serving_video import ServingVideoQA

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/metrics")  # answered without an API key (probes, scrapers)


async def _send_error(send, err: APIError) -> None:
    body = err.to_response().model_dump_json().encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware run before any parsing: the API key (401), then the body size (413; checked on
    the declared Content-Length and again on the bytes as they arrive)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                message = "Incorrect API key provided." if auth else "Missing API key: send 'Authorization: Bearer <key>'."
                return await _send_error(send, APIError(message, status=401, code="invalid_api_key"))
        limit = self.max_body_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _send_error(send, APIError(f"request body too large: {int(declared)} bytes (limit {limit})",
                                                    status=413))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # an HTTPException passes FastAPI's body parsing unchanged
                    raise StarletteHTTPException(413, f"request body too large: over {limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def build_app(engine: EngineClient, processor: Processor, model_names: list[str], *, api_key: str | None = None,
              allow_remote_media: bool = False, model_path: str = "") -> FastAPI:
    """The app for an engine already running on the event loop that will serve it."""
    app = FastAPI(title="CogVLM2 OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine, model_names[0])
    ctx = ServerContext(engine, processor, list(model_names), metrics, allow_remote_media, model_path)
    app.state.ctx, app.state.metrics = ctx, metrics
    app.state.chat = OpenAIServingChat(ctx)
    app.state.video_qa = ServingVideoQA(ctx)
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key)
    return app


async def run_server(args, sock=None, on_started=None) -> None:
    """`cogvlm2 serve`: load the model, start the engine on this event loop, serve until interrupted.

    `sock`: an already bound socket (tests bind port 0); `on_started(uvicorn_server)` is called once the
    server is constructed, so a caller in another thread can stop it (`server.should_exit = True`).
    """
    import uvicorn

    from .launch import open_engine

    async with open_engine(args) as (engine, processor, model_path):
        names = list(dict.fromkeys([*(args.served_model_name or []), args.model]))  # aliases first, then --model
        app = build_app(engine, processor, names, api_key=args.api_key, allow_remote_media=args.allow_remote_media,
                        model_path=str(model_path))
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
        server = uvicorn.Server(config)
        if on_started is not None:
            on_started(server)
        await server.serve(sockets=[sock] if sock is not None else None)

"""The FastAPI app: routes, error format, API-key, body-size and body-time guards, CORS; and running it
with uvicorn: the port bound before the model loads, the guarded connections of connections.py, and a
bounded drain on SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.protocol import EngineClient
from ..processing import Processor
from . import limits
from .connections import bind_socket, connection_cap, guarded_protocol, quiet_resource_errors
from .errors import APIError, install_error_handlers
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
    the declared Content-Length and again on the bytes as they arrive) and the time the body may take
    to arrive (408 after BODY_TIMEOUT_S)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int = limits.MAX_BODY_BYTES):
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
        seen, body_done, deadline = 0, False, time.monotonic() + limits.BODY_TIMEOUT_S

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:  # later receives wait for the disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    message = await receive()
            except TimeoutError:  # an HTTPException passes FastAPI's body parsing unchanged
                raise StarletteHTTPException(408, f"request body not received within {limits.BODY_TIMEOUT_S:g} s",
                                             headers={"Connection": "close"})  # the rest of the body is garbage
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > limit:
                    raise StarletteHTTPException(413, f"request body too large: over {limit} bytes",
                                                 headers={"Connection": "close"})
            else:
                body_done = True
            return message

        return await self.app(scope, limited_receive, send)


def build_app(engine: EngineClient, processor: Processor, model_names: list[str], *, api_key: str | None = None,
              allow_remote_media: bool = False, model_root: str = "", max_waiting: int = limits.MAX_WAITING,
              allowed_origins: list[str] | None = None) -> FastAPI:
    """The app for an engine already running on the event loop that will serve it. /openapi.json is
    served (behind the API key when there is one); CORS only for `allowed_origins`."""
    app = FastAPI(title="CogVLM2 OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    metrics = Metrics(engine, model_names[0])
    ctx = ServerContext(engine, processor, list(model_names), metrics, allow_remote_media, model_root, max_waiting)
    ctx.max_prompt_chars  # noqa: B018 - scans the vocabulary once now, not on the first request's event loop
    app.state.ctx, app.state.metrics = ctx, metrics
    app.state.chat = OpenAIServingChat(ctx)
    app.state.video_qa = ServingVideoQA(ctx)
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key)
    if allowed_origins:  # outermost: errors from Guard (401, 413) carry the CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])
    return app


# --------------------------------------------------------------------------- running it


def resolve_api_key(args) -> str | None:
    """--api-key, else the first line of --api-key-file, else $COGVLM2_API_KEY."""
    if getattr(args, "api_key", None):
        logger.warning("--api-key is visible in the process list; prefer --api-key-file or $COGVLM2_API_KEY")
        return args.api_key
    path = getattr(args, "api_key_file", None)
    if path:
        try:
            key = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise SystemExit(f"cogvlm2 serve: cannot read --api-key-file {path}: {e.strerror or e}") from None
        if not key:
            raise SystemExit(f"cogvlm2 serve: --api-key-file {path} is empty")
        return key
    return os.environ.get("COGVLM2_API_KEY") or None


def public_root(model: str) -> str:
    """What /v1/models shows as `root`: a hub id or name as given; for a local folder only its name."""
    path = Path(model).expanduser()
    return path.name if path.is_absolute() or path.exists() else model


async def run_server(args, sock=None, on_started=None) -> None:
    """`cogvlm2 serve`: bind the port, load the model, start the engine on this event loop, serve
    until interrupted; then drain for DRAIN_TIMEOUT_S and end what is still open with an error.

    `sock`: an already bound socket (tests bind port 0); `on_started(uvicorn_server)` is called once the
    server is constructed, so a caller in another thread can stop it (`server.should_exit = True`).
    """
    import uvicorn

    from ..launch import open_engine

    api_key = resolve_api_key(args)
    if sock is None:
        sock = bind_socket(args.host, args.port)
    max_connections = connection_cap(getattr(args, "max_connections", None) or limits.MAX_CONNECTIONS)
    quiet_resource_errors(asyncio.get_running_loop())
    async with open_engine(args) as (engine, processor, _):
        names = list(dict.fromkeys([*(args.served_model_name or []), args.model]))  # aliases first, then --model
        app = build_app(engine, processor, names, api_key=api_key, allow_remote_media=args.allow_remote_media,
                        model_root=public_root(args.model),
                        max_waiting=getattr(args, "max_waiting", None) or limits.MAX_WAITING,
                        allowed_origins=getattr(args, "allowed_origins", None))
        ctx: ServerContext = app.state.ctx
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                http=guarded_protocol(max_connections), timeout_keep_alive=limits.KEEP_ALIVE_S,
                                h11_max_incomplete_event_size=limits.MAX_HEADER_BYTES,
                                timeout_graceful_shutdown=int(limits.DRAIN_TIMEOUT_S) + 5,
                                access_log=args.log_level == "debug")

        class Server(uvicorn.Server):
            async def shutdown(self, sockets=None) -> None:
                """New requests get 503; open ones may finish for DRAIN_TIMEOUT_S, then end with an
                error (a stream: an error event and [DONE])."""
                ctx.begin_shutdown()
                drain = asyncio.get_running_loop().call_later(limits.DRAIN_TIMEOUT_S, ctx.end_requests)
                try:
                    await super().shutdown(sockets)
                finally:
                    drain.cancel()

        server = Server(config)
        if on_started is not None:
            on_started(server)
        await server.serve(sockets=[sock])

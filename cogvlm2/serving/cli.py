"""`cogvlm2 serve` (the OpenAI-compatible server): parse, then call the library.

Only the standard library is imported at module level: the top-level CLI lists this sub-command even
when the `serve` extra is not installed; running it without the extra says what to install.
"""

from __future__ import annotations

from ..arguments import add_engine_arguments, require_extra


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat completions with images / videos, /video_qa, /metrics)",
        description="Serve a CogVLM2 checkpoint over an OpenAI-compatible API. See docs/serving.md.")
    add_engine_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                            "(visible in the process list: prefer --api-key-file or $COGVLM2_API_KEY; "
                            "none of the three: no key needed)")
    serve.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="model name(s) clients may send besides --model (e.g. 'cogvlm2', which the official "
                            "request script sends); the first is reported in responses (default: --model)")
    serve.add_argument("--allow-remote-media", action="store_true",
                       help="fetch http(s) image / video URLs (public addresses only); off: data URIs only")
    serve.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                       help="answer CORS requests from these browser origins (e.g. http://localhost:3000, or *); "
                            "default: no CORS headers")
    serve.add_argument("--max-waiting", type=int, default=None,
                       help="engine requests admitted but not started (media decoding, queued) before new requests "
                            "get 503 with Retry-After (default: 128)")
    serve.add_argument("--max-connections", type=int, default=None,
                       help="open connections; past it a new one gets 503 and is closed (default: 1024, lowered "
                            "to fit the open-file limit)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=run_serve)


def run_serve(args) -> int:
    require_extra("serve", "fastapi", "uvicorn", "pydantic", "multipart", "prometheus_client", "httpx")
    import asyncio

    from .api_server import run_server

    asyncio.run(run_server(args))
    return 0

"""`cogvlm2 serve` (the OpenAI-compatible server) and `cogvlm2 web` (the Gradio app): parse, then call the library.

Only the standard library is imported at module level: the top-level CLI lists these sub-commands even
when the `serve` / `web` extras are not installed; running one without its extra says what to install.
"""

from __future__ import annotations

import argparse
import os


def _require(extra: str, *modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        from ..cli import install_hint

        raise SystemExit(f"cogvlm2: error: `cogvlm2 {extra}` needs {', '.join(missing)}: {install_hint(extra)}")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per request, the KV budget (default: max_position_embeddings + the tokens "
                        "that share positions in one image / 24 video frames); positions are checked too")
    p.add_argument("--max-num-seqs", type=int, default=None, help="requests decoded together in one step")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache pool size in blocks (default: sized automatically)")
    p.add_argument("--lora", action="append", default=None, metavar="NAME=PATH",
                   help="serve a LoRA adapter (peft format, e.g. from `cogvlm2 finetune`) unmerged next to the base "
                        "model; requests select it by NAME as their `model` (PATH alone: NAME is the folder's name); "
                        "repeatable")


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

    web = subparsers.add_parser(
        "web", help="Gradio web app: upload an image or video and chat (in-process engine or a running server)",
        description="A browser UI. By default it runs the engine in-process; with --server-url it talks to a "
                    "running `cogvlm2 serve` through the OpenAI API.")
    add_engine_arguments(web)
    web.add_argument("--server-url", default=None, help="e.g. http://127.0.0.1:8000/v1: use that server, load no model")
    web.add_argument("--api-key", default=os.environ.get("COGVLM2_API_KEY"), help="the server's API key (with --server-url)")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=7860)
    web.set_defaults(func=run_web)


def run_serve(args) -> int:
    _require("serve", "fastapi", "uvicorn", "pydantic", "multipart", "prometheus_client", "httpx")
    import asyncio

    from .api_server import run_server

    asyncio.run(run_server(args))
    return 0


def run_web(args) -> int:
    _require("web", "gradio", "httpx")
    import asyncio

    from ..web.app import run_web_app

    asyncio.run(run_web_app(args))
    return 0

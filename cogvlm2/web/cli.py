"""`cogvlm2 web` (the Gradio app): parse, then call the library.

Only the standard library is imported at module level: the top-level CLI lists this sub-command even
when the `web` extra is not installed; running it without the extra says what to install.
"""

from __future__ import annotations

import os

from ..arguments import add_engine_arguments, require_extra


def add_parser(subparsers) -> None:
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


def run_web(args) -> int:
    require_extra("web", "gradio", "httpx")
    import asyncio

    from .app import run_web_app

    asyncio.run(run_web_app(args))
    return 0

"""`cogvlm2 web`: a Gradio app to chat about an uploaded image or video, answers streamed as they come.

The UI only renders and collects: answers come from a backend (backends.py), the engine in this process
or a running server. One image (or video) per conversation, as the model takes; changing it mid-way
applies from the next answer on.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

from ..tiny import TINY_NOTE
from .backends import BackendError, LocalBackend, RemoteBackend

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_MAX_TOKENS = 0.0, 1.0, 2048  # greedy, as the official demos


def _text(content) -> str:
    """A Chatbot message's content as text (Gradio may hand back a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def history_pairs(chat: list[dict]) -> list[tuple[str, str]]:
    """Chatbot messages (user / assistant alternating) -> the model's (query, answer) history."""
    pairs: list[tuple[str, str]] = []
    query = None
    for message in chat:
        if message["role"] == "user":
            query = _text(message["content"]) if query is None else f"{query}\n{_text(message['content'])}"
        elif query is not None:
            pairs.append((query, _text(message["content"])))
            query = None
    return pairs


def build_ui(backend):
    import gradio as gr

    theme = gr.themes.Base(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="CogVLM2", analytics_enabled=False) as ui:
        where = f"server {backend.base_url}" if isinstance(backend, RemoteBackend) else "in-process engine"
        gr.Markdown(f"## CogVLM2 chat\nModel **{backend.model_name or '(server default)'}** · {where}")
        if backend.tiny:
            gr.Markdown(f"⚠️ **Note:** this is the {TINY_NOTE} — the app works end to end, the words do not mean "
                        "anything. Start with `--model THUDM/cogvlm2-llama3-chat-19B` (or a local checkpoint) "
                        "for real answers.", elem_id="tiny-note")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", label="Image", visible="image" in backend.media_kinds,
                                 elem_id="image-input", height=260)
                video = gr.Video(label="Video", visible="video" in backend.media_kinds, elem_id="video-input", height=260)
                temperature = gr.Slider(0, 2, DEFAULT_TEMPERATURE, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1, DEFAULT_TOP_P, step=0.05, label="Top-p", elem_id="top-p")
                max_tokens = gr.Slider(1, 2048, DEFAULT_MAX_TOKENS, step=1, label="Max new tokens",
                                       elem_id="max-tokens")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=460)
                message = gr.Textbox(placeholder="Ask about the image or video, then press Enter", show_label=False,
                                     elem_id="message", lines=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    retry = gr.Button("Retry", elem_id="retry")
                    clear = gr.Button("Clear", elem_id="clear")

        async def answer(chat: list[dict], query: str, image_path, video_path, t, p, n) -> AsyncIterator[list[dict]]:
            media = ("video", video_path) if video_path else ("image", image_path) if image_path else None
            history = history_pairs(chat)
            chat = chat + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
            yield chat
            try:
                async for delta in backend.stream(query, history, media, float(t), float(p), int(n)):
                    chat[-1] = {"role": "assistant", "content": chat[-1]["content"] + delta}
                    yield chat
            except BackendError as e:
                raise gr.Error(str(e)) from None

        async def on_send(query, chat, image_path, video_path, t, p, n):
            if not query or not query.strip():
                yield "", chat
                return
            async for c in answer(chat or [], query, image_path, video_path, t, p, n):
                yield "", c

        async def on_retry(chat, image_path, video_path, t, p, n):
            chat = list(chat or [])
            while chat and chat[-1]["role"] == "assistant":
                chat.pop()
            if not chat:
                yield chat
                return
            query = _text(chat.pop()["content"])
            async for c in answer(chat, query, image_path, video_path, t, p, n):
                yield c

        controls = [image, video, temperature, top_p, max_tokens]
        message.submit(on_send, [message, chatbot, *controls], [message, chatbot])
        send.click(on_send, [message, chatbot, *controls], [message, chatbot])
        retry.click(on_retry, [chatbot, *controls], [chatbot])
        clear.click(lambda: ([], None, None, ""), None, [chatbot, image, video, message])
    ui.theme_for_mount = theme
    return ui


@asynccontextmanager
async def open_backend(args):
    if args.server_url:
        backend = RemoteBackend(args.server_url, args.api_key)
        await backend.connect()
        yield backend
        return
    from ..serving.launch import open_engine
    from ..tiny import is_tiny

    async with open_engine(args) as (engine, processor, model_path):
        yield LocalBackend(engine, processor, args.model, is_tiny(model_path))


async def run_web_app(args, sock=None, on_started=None) -> None:
    """Serve the app with uvicorn on this event loop (the in-process engine runs on the same loop)."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    async with open_backend(args) as backend:
        ui = build_ui(backend)
        app = gr.mount_gradio_app(FastAPI(), ui, path="/", ssr_mode=False, theme=ui.theme_for_mount,
                                  footer_links=[], enable_monitoring=False, mcp_server=False, pwa=False)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                               timeout_graceful_shutdown=5))
        if on_started is not None:
            on_started(server)
        await server.serve(sockets=[sock] if sock is not None else None)

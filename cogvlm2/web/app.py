"""`cogvlm2 web`: a Gradio app to chat about an uploaded image or video, answers streamed as they come.

The UI only renders and collects: answers come from a backend (backends.py), the engine in this process
or a running server. One image (or video) per conversation, as the model takes; changing it mid-way
applies from the next answer on.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

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


def media_payload_path(value) -> str | None:
    """The uploaded file's path from an Image / Video value taken without Gradio's preprocessing (the app
    reads the file itself, so a corrupt upload becomes our readable error, not a decoder traceback)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        inner = value.get("video", value)  # gr.Video wraps its file as {"video": {...}, "subtitles": ...}
        return (inner or {}).get("path") if isinstance(inner, dict) else None
    return getattr(value, "path", None)


def tiny_notice(backend) -> str:
    from ..tiny import note

    kind = "tiny-video" if backend.media_kinds == ("video",) else "tiny"
    better = ("THUDM/cogvlm2-video-llama3-chat" if kind == "tiny-video" else "THUDM/cogvlm2-llama3-chat-19B")
    return (f"ℹ️ **Note:** this is the {note(kind)}. Start with `--model {better}` (or a local checkpoint) "
            "to chat about real photos and videos.")


# The uploaders' buttons keep their size in a narrow column (Gradio's default squeezes the icons). The empty
# video uploader's drop zone takes the block's whole height in Gradio, which pushes the source buttons (upload,
# webcam) past the block's bottom edge, where its overflow: hidden clips them: the drop zone shrinks instead.
CSS = """
#video-input button, #image-input button { min-width: 2rem; }
#video-input .icon-buttons, #image-input .icon-buttons { flex-wrap: nowrap; overflow: visible; }
#video-input svg, #image-input svg { flex-shrink: 0; }
#video-input .video-container { display: flex; flex-direction: column; }
#video-input .upload-container { flex: 1 1 auto; min-height: 0; }
"""


def build_ui(backend):
    import gradio as gr

    theme = gr.themes.Base(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="CogVLM2", analytics_enabled=False) as ui:
        where = f"server {backend.base_url}" if isinstance(backend, RemoteBackend) else "in-process engine"
        gr.Markdown(f"## CogVLM2 chat\nModel **{backend.model_name or '(server default)'}** · {where}")
        if backend.tiny:
            gr.Markdown(tiny_notice(backend), elem_id="tiny-note")
        conversation = gr.State([])  # the authoritative (query, answer) history, kept on the server
        asked = gr.Textbox(visible=False, elem_id="asked")  # the question of one send, carried to its answer
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", label="Image", visible="image" in backend.media_kinds,
                                 elem_id="image-input", height=260)
                video = gr.Video(label="Video", visible="video" in backend.media_kinds, elem_id="video-input",
                                 height=260, min_width=320)
                model = gr.Dropdown(backend.models, value=backend.model_name or None, elem_id="model",
                                    label="Model (base or LoRA adapter)", visible=len(backend.models) > 1,
                                    interactive=True)
                temperature = gr.Slider(0, 2, DEFAULT_TEMPERATURE, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1, DEFAULT_TOP_P, step=0.05, label="Top-p", elem_id="top-p")
                max_tokens = gr.Slider(1, 2048, DEFAULT_MAX_TOKENS, step=1, label="Max new tokens",
                                       elem_id="max-tokens")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=460)
                message = gr.Textbox(placeholder="Ask about the image or video, then press Enter (you can type "
                                                 "while an answer streams: it is sent next)", show_label=False,
                                     elem_id="message", lines=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    retry = gr.Button("Retry", elem_id="retry")
                    clear = gr.Button("Clear", elem_id="clear")

        def render(pairs: list[tuple[str, str]]) -> list[dict]:
            return [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]

        async def respond(pairs, query, image_value, video_value, t, p, n, chosen, request: gr.Request):
            """Answer `query` after the conversation so far; yields (chatbot, conversation) as it streams.
            A stopped answer keeps what was shown (the conversation state is updated on every yield)."""
            if not query or not query.strip():
                yield render(pairs), pairs
                return
            video_path, image_path = media_payload_path(video_value), media_payload_path(image_value)
            media = ("video", video_path) if video_path else ("image", image_path) if image_path else None
            history = list(pairs)
            pairs = history + [(query, "")]
            yield render(pairs), pairs
            try:
                async for delta in backend.stream(query, history, media, float(t), float(p), int(n), chosen or None,
                                                  session=request.session_hash):
                    pairs = history + [(query, pairs[-1][1] + delta)]
                    yield render(pairs), pairs
            except BackendError as e:
                yield render(history), history
                raise gr.Error(str(e)) from None

        def take(query):
            """The first step of a send: the box is emptied once, here; later typing is never overwritten."""
            return "", query

        async def on_retry(pairs, image_value, video_value, t, p, n, chosen, request: gr.Request):
            if not pairs:
                yield [], []
                return
            query = pairs[-1][0]
            async for out in respond(pairs[:-1], query, image_value, video_value, t, p, n, chosen, request):
                yield out

        async def stop_answers(request: gr.Request):
            """Stop / Clear: the backend aborts this session's answers at once (cancelling the UI's task
            alone leaves a stream suspended between two deltas running until it is garbage-collected)."""
            await backend.stop(request.session_hash)

        def check_upload(value, kind: str):
            """Open an upload as the model will, at once: a corrupt file is a short message, and is removed."""
            path = media_payload_path(value)
            problem = backend.check_media(kind, path) if path else None
            if problem:
                gr.Warning(problem)
                return None
            return gr.skip()

        for fn in (respond, on_retry, stop_answers):  # Gradio passes gr.Request by the annotation's class (this
            fn.__annotations__["request"] = gr.Request  # module's annotations are strings, and gr is a local)
        controls = [image, video, temperature, top_p, max_tokens, model]  # model: the adapter of the next answer
        no_pre = {"preprocess": False}  # media reach respond() as uploaded: our own errors, not Gradio's
        answer = {"fn": respond, "inputs": [conversation, asked, *controls], "outputs": [chatbot, conversation], **no_pre}
        # "multiple": a send while an answer streams is queued (Gradio runs it after the running one)
        sends = [trigger(take, [message], [message, asked], trigger_mode="multiple").then(**answer, trigger_mode="multiple")
                 for trigger in (message.submit, send.click)]
        retrying = retry.click(on_retry, [conversation, *controls], [chatbot, conversation], **no_pre)
        running = [*sends, retrying]
        stop.click(stop_answers, None, None, cancels=running, queue=False)
        # cancel first, then empty: a cancelled stream's last update cannot land after the reset
        clear.click(stop_answers, None, None, cancels=running, queue=False).then(
            lambda: ([], [], None, None, ""), None, [chatbot, conversation, image, video, message])
        image.upload(lambda v: check_upload(v, "image"), image, image, **no_pre)
        video.upload(lambda v: check_upload(v, "video"), video, video, **no_pre)
    ui.theme_for_mount = theme
    return ui


@asynccontextmanager
async def open_backend(args):
    if args.server_url:
        backend = RemoteBackend(args.server_url, args.api_key)
        await backend.connect()
        yield backend
        return
    from ..launch import open_engine
    from ..tiny import is_tiny

    async with open_engine(args) as (engine, processor, model_path):
        yield LocalBackend(engine, processor, args.model, is_tiny(model_path))


def free_port(host: str, port: int, tries: int = 100) -> int:
    """`port` if it can be bound on `host`, else the next free one (as Gradio does); checked before any
    model loads."""
    import socket

    for candidate in range(port, port + tries):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return candidate
    raise OSError(f"no free port in {port}..{port + tries - 1} on {host}: pass --port")


async def run_web_app(args, sock=None, on_started=None) -> None:
    """Serve the app with uvicorn on this event loop (the in-process engine runs on the same loop)."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    if sock is None:
        port = free_port(args.host, args.port)
        if port != args.port:
            print(f"port {args.port} is in use: using {port}", flush=True)
        args.port = port
    async with open_backend(args) as backend:
        ui = build_ui(backend)
        app = gr.mount_gradio_app(FastAPI(), ui, path="/", ssr_mode=False, theme=ui.theme_for_mount, css=CSS,
                                  footer_links=[], enable_monitoring=False, mcp_server=False, pwa=False)
        app.state.backend = backend  # as `serve` keeps its context: in-process callers (tests) reach the engine
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                               timeout_graceful_shutdown=5))

        if on_started is not None:
            on_started(server)
        if sock is None:  # say where the app is once it listens (a test's server has its own URL)
            asyncio.get_running_loop().create_task(_announce(server, args.host, args.port))
        await server.serve(sockets=[sock] if sock is not None else None)


async def _announce(server, host: str, port: int) -> None:
    while not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.05)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"Running on http://{shown}:{port}", flush=True)

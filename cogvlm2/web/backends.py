"""Where the web app's answers come from: the engine in this process, or a running server's OpenAI API."""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import uuid
from pathlib import Path
from typing import AsyncIterator

from ..sampling_params import SamplingParams
from ..tiny import NAMES, RANDOM_NAME, is_tiny, resolve_tiny


class BackendError(Exception):
    """A message for the person using the app (bad upload, server error, prompt too long)."""


def readable_media_error(kind: str, path: str | Path, error: BaseException) -> str:
    """A short message about an unreadable upload, without the temporary path it was stored at."""
    reason = str(error).replace(str(path), Path(path).name).strip()
    if "cannot identify image file" in reason or "cannot open image" in reason:
        reason = "not an image file this app can read (PNG, JPEG, WebP, GIF, BMP)"
    reason = reason.split("\n")[0][:200]
    return f"The uploaded {kind} could not be read: {reason}"


def check_media_file(kind: str, path: str | Path) -> str | None:
    """None if the upload decodes as the model will read it, else a readable message."""
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(path) as img:
                img.convert("RGB")
        else:
            from ..processing.video import probe_video

            if probe_video(str(path)).num_frames == 0:
                return "The uploaded video could not be read: it has no frames"
    except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's problem
        return readable_media_error(kind, path, e)
    return None


class LocalBackend:
    """The engine and processor of this process."""

    def __init__(self, engine, processor, model_name: str, tiny: bool):
        self.engine, self.processor = engine, processor
        self.model_name, self.tiny = model_name, tiny
        self.media_kinds = processor.media_kinds
        # what a conversation can run with: the base model, then the engine's LoRA adapters (`web --lora`)
        self.models = [model_name, *getattr(engine, "adapters", {})]
        self._active: dict[str, set[str]] = {}  # session -> its engine requests still streaming

    async def stop(self, session: str) -> None:
        """Abort the session's answers now (Stop / Clear). Cancelling the UI's task alone does not: a
        stream suspended between two deltas is only closed whenever it is garbage-collected."""
        for request_id in self._active.pop(session, set()):
            await self.engine.abort(request_id)

    def check_media(self, kind: str, path: str) -> str | None:
        return check_media_file(kind, path)

    async def stream(self, query: str, history: list[tuple[str, str]], media: tuple[str, str] | None,
                     temperature: float, top_p: float, max_tokens: int,
                     model: str | None = None, session: str | None = None) -> AsyncIterator[str]:
        """Answer deltas; model: one of `models` (None or the base model's name: no adapter); session:
        the key `stop` aborts it by."""
        if model not in (None, *self.models):
            raise BackendError(f"unknown model {model!r}; choose one of {', '.join(self.models)}")
        adapter = None if model in (None, self.model_name) else model
        kw = {media[0]: media[1]} if media else {}
        try:
            inputs = await asyncio.to_thread(self.processor, query, history, **kw)
        except (OSError, ValueError) as e:
            raise BackendError(readable_media_error(media[0], media[1], e) if media else str(e)) from None
        budget = inputs.output_budget(self.engine.max_model_len, self.processor.config.max_position_embeddings)
        if budget < 1:
            raise BackendError(f"the conversation is {len(inputs)} tokens long, the context holds "
                               f"{self.engine.max_model_len}: clear it to start over")
        params = SamplingParams(max_new_tokens=min(max_tokens, budget), temperature=temperature, top_p=top_p)
        request_id = f"web-{uuid.uuid4().hex}"
        active = self._active.setdefault(session, set()) if session is not None else set()
        active.add(request_id)
        try:
            async for out in self.engine.generate(request_id, inputs, params, adapter=adapter):
                if out.delta_text:
                    yield out.delta_text
        finally:
            active.discard(request_id)


def data_uri(path: str | Path, kind: str) -> str:
    mime = mimetypes.guess_type(str(path))[0] or f"{kind}/{'png' if kind == 'image' else 'mp4'}"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


class RemoteBackend:
    """A `cogvlm2 serve` (or any OpenAI-compatible server taking CogVLM2 media parts), streamed over httpx."""

    def __init__(self, server_url: str, api_key: str | None = None, model_name: str | None = None, timeout: float = 600):
        url = server_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else f"{url}/v1"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model_name, self.tiny = model_name or "", False
        self.media_kinds = ("image", "video")  # the server refuses the kind its model does not take
        self.models = [self.model_name] if self.model_name else []  # filled from /v1/models by connect()
        self.timeout = timeout
        self._active: dict[str, set] = {}  # session -> its responses still streaming

    async def connect(self) -> None:
        """Ask the server which model it serves, whether it is the embedded tiny one and which media it
        takes. A server that is down, refuses the key or is not an OpenAI API is an OSError naming the URL."""
        import httpx

        url = f"{self.base_url}/models"
        try:
            async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
                r = await client.get(url, headers=self.headers)
        except httpx.HTTPError as e:
            raise ConnectionError(f"cannot reach the server at {url}: {e or type(e).__name__} "
                                  "(is `cogvlm2 serve` running there?)") from None
        if r.status_code in (401, 403):
            raise PermissionError(f"the server at {url} refused the API key (HTTP {r.status_code}): "
                                  "pass its key with --api-key or $COGVLM2_API_KEY")
        try:
            r.raise_for_status()
            cards = r.json()["data"]
            card = cards[0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            raise ConnectionError(f"{url} did not answer as an OpenAI-compatible server (HTTP {r.status_code})") from None
        self.model_name = self.model_name or card["id"]
        # the base model, then the LoRA adapters the server lists (cards with a "parent", as vLLM's)
        adapters = [c.get("id") for c in cards[1:] if isinstance(c, dict) and c.get("parent") == card["id"]]
        self.models = [self.model_name, *adapters] if self.model_name == card["id"] else [self.model_name]
        root = card.get("root") or ""  # the server's --model value (a local folder: its name only)
        self.tiny = root in (*NAMES, RANDOM_NAME) or (bool(root) and is_tiny(root))
        self.media_kinds = remote_media_kinds(card)

    def check_media(self, kind: str, path: str) -> str | None:
        return check_media_file(kind, path)

    def messages(self, query: str, history: list[tuple[str, str]], media: tuple[str, str] | None) -> list[dict]:
        out: list[dict] = []
        for q, a in history:
            out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        content: list[dict] = [{"type": "text", "text": query}]
        if media:  # the latest user message carries the conversation's one image / video
            kind, path = media
            content.append({"type": f"{kind}_url", f"{kind}_url": {"url": data_uri(path, kind)}})
        out.append({"role": "user", "content": content})
        return out

    async def stop(self, session: str) -> None:
        """Close the session's streaming responses now (the server aborts a request whose client left)."""
        responses = self._active.pop(session, set())
        for response in list(responses):
            responses.discard(response)  # marks it stopped for its stream
            await response.aclose()

    async def stream(self, query: str, history: list[tuple[str, str]], media: tuple[str, str] | None,
                     temperature: float, top_p: float, max_tokens: int,
                     model: str | None = None, session: str | None = None) -> AsyncIterator[str]:
        """Answer deltas; model: the served model or adapter to ask (None: the base model); session: the
        key `stop` closes it by."""
        import httpx

        body = {"model": model or self.model_name or None, "messages": self.messages(query, history, media), "stream": True,
                "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=10), trust_env=False) as client:
            async with client.stream("POST", f"{self.base_url}/chat/completions", json=body, headers=self.headers) as r:
                active = self._active.setdefault(session, set()) if session is not None else set()
                active.add(r)
                try:
                    async for delta in self._deltas(r):
                        yield delta
                except Exception:
                    if r in active:
                        raise
                    return  # stopped: `stop` closed the response under it
                finally:
                    active.discard(r)

    @staticmethod
    async def _deltas(r) -> AsyncIterator[str]:
        """The answer deltas of one streaming chat completion (an error event is a BackendError)."""
        if r.status_code != 200:
            await r.aread()
            raise BackendError(_error_message(r.text, r.status_code))
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise BackendError(event["error"].get("message", "server error"))
            for choice in event.get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    yield delta


def remote_media_kinds(card: dict) -> tuple[str, ...]:
    """What a served model takes: the card's "modalities" when the server reports them, else the
    checkpoint's config.json when its folder ("root", or an embedded tiny model's name) is readable here,
    else both."""
    kinds = card.get("modalities")
    if isinstance(kinds, list) and kinds:
        return tuple(k for k in ("image", "video") if k in kinds) or ("image", "video")
    root = card.get("root")
    if root in (*NAMES, RANDOM_NAME):  # the server names an embedded model, not its folder
        root = str(resolve_tiny(root))
    if root and (Path(root) / "config.json").is_file():
        from ..model.registry import family_of, read_config

        try:
            return family_of(read_config(root)).media_kinds
        except (OSError, ValueError):
            pass
    return ("image", "video")


def _error_message(text: str, status: int) -> str:
    try:
        return f"server error {status}: {json.loads(text)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"server error {status}: {text[:200]}"

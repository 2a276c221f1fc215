"""Video serving, live with the tiny video model: the official `/video_qa` API and `video_url` chat parts."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import av  # noqa: E402
import httpx  # noqa: E402

from cogvlm2.processing import Processor  # noqa: E402
from background_server import BackgroundServer  # noqa: E402
from cogvlm2.tiny import resolve_tiny  # noqa: E402

MAX_LEN = 400  # 3 frames x 18 tokens + text fit; answers stay short


def mp4_bytes(seconds: int = 2, fps: int = 8, size=(64, 48)) -> bytes:
    """A small H.264 (or MPEG-4 part 2) mp4, written with PyAV: a colour that changes every frame."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        codec = next((c for c in ("libx264", "mpeg4") if _has_encoder(c)), None)
        if codec is None:
            pytest.skip("PyAV has no libx264 / mpeg4 encoder")
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(seconds * fps):
            rgb = np.full((size[1], size[0], 3), (i * 16 % 256, 255 - i * 16 % 256, 80), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(["serve", "--model", "tiny-video", "--max-model-len", str(MAX_LEN), "--log-level", "warning"]) as s:
        yield s


@pytest.fixture(scope="module")
def video() -> bytes:
    return mp4_bytes()


def test_video_qa_official_api(server, video):
    r = httpx.post(f"{server.url}/video_qa", files={"video": ("test.mp4", video, "video/mp4")},
                   data={"question": "Describe this video in detail.", "temperature": "0.2"}, timeout=120)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"answer"} and isinstance(r.json()["answer"], str)


def test_video_qa_defaults_are_greedy(server, video):
    """No question asks for a description; no temperature is the official 0.001 with top_k=1: greedy, so
    two calls agree, and agree with an explicit '@Caption' question."""
    answers = [httpx.post(f"{server.url}/video_qa", files={"video": ("a.mp4", video)}, data=data, timeout=120).json()["answer"]
               for data in ({}, {}, {"question": "@Caption", "temperature": "0.9"})]
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize("files, data, match", [
    ({"video": ("bad.mp4", b"not a video at all", "video/mp4")}, {}, "invalid video"),
    (None, {"question": "hi"}, "video"),
    ({"video": ("a.mp4", b"", "video/mp4")}, {}, "video"),
])
def test_video_qa_errors_are_400(server, files, data, match):
    r = httpx.post(f"{server.url}/video_qa", files=files, data=data, timeout=60)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"]


@pytest.mark.parametrize("make, data, param", [
    (lambda v: b"not a video at all", {}, "video"),
    (lambda v: v[:200], {}, "video"),  # truncated: no frames
    (lambda v: mp4_bytes(seconds=1, fps=2, size=(1024, 16)), {}, "video"),  # aspect ratio past VideoLimits
    (lambda v: v, {"question": "long " * 100_000}, "question"),  # cannot fit the context
    (lambda v: v, {"temperature": "nan"}, "temperature"),
])
def test_video_qa_errors_name_the_field(server, video, make, data, param):
    r = httpx.post(f"{server.url}/video_qa", files={"video": ("v.mp4", make(video), "video/mp4")},
                   data=data, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_video_url_chat_part(server, video):
    processor = Processor.from_pretrained(resolve_tiny("tiny-video"))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    uri = "data:video/mp4;base64," + base64.b64encode(video).decode()
    r = client.chat.completions.create(model="tiny-video", max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": uri}}, {"type": "text", "text": "What happens?"}]}])
    assert r.usage.prompt_tokens == len(processor("What happens?", video=video))
    assert r.usage.prompt_tokens > 2 * processor.config.vision.tokens_per_image  # several frames
    with pytest.raises(openai.BadRequestError, match="video model"):
        client.chat.completions.create(model="tiny-video", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])

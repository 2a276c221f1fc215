"""The web app's backends without a browser: what the in-process backend hands the engine, and the OpenAI
messages the remote backend sends."""

from __future__ import annotations

import asyncio
import base64

import pytest
from PIL import Image

from cogvlm2.engine.protocol import EngineStats, RequestOutput
from cogvlm2.processing import Processor
from cogvlm2.tiny import resolve_tiny
from cogvlm2.web.app import history_pairs
from cogvlm2.web.backends import BackendError, LocalBackend, RemoteBackend


class RecordingEngine:
    """An EngineClient that answers 'a', 'b' and keeps what it was given."""

    max_model_len = 1024

    def __init__(self, adapters=()):
        self.calls = []
        self.adapters = {name: f"{name}-id" for name in adapters}
        self.adapter_calls = []

    async def generate(self, request_id, inputs, params, adapter=None):
        self.calls.append((inputs, params))
        self.adapter_calls.append(adapter)
        for i, t in enumerate("ab"):
            yield RequestOutput(request_id, len(inputs), [i], "ab"[: i + 1], [i], t, i == 1, "length" if i else None)

    async def abort(self, request_id):
        pass

    def stats(self):
        return EngineStats(0, 0, 1, 1)


@pytest.fixture(scope="module")
def processor():
    return Processor.from_pretrained(resolve_tiny("tiny"))


async def collect(it) -> list[str]:
    return [x async for x in it]


def test_local_backend_sends_image_history_and_params(processor, tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (20, 10), "green").save(path)
    engine = RecordingEngine()
    backend = LocalBackend(engine, processor, "tiny", tiny=True)
    deltas = asyncio.run(collect(backend.stream("why?", [("what?", "that.")], ("image", str(path)), 0.0, 0.5, 7)))
    assert deltas == ["a", "b"]
    inputs, params = engine.calls[0]
    assert len(inputs) == len(processor("why?", [("what?", "that.")], image=str(path)))
    assert inputs.num_vision_tokens == processor.config.vision.tokens_per_image
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.0, 0.5, 7)


def test_local_backend_reports_bad_uploads_and_long_conversations(processor, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    backend = LocalBackend(RecordingEngine(), processor, "tiny", tiny=True)
    with pytest.raises(BackendError, match="could not be read"):
        asyncio.run(collect(backend.stream("q", [], ("image", str(bad)), 1, 1, 5)))
    with pytest.raises(BackendError, match="clear it"):
        asyncio.run(collect(backend.stream("word " * 2000, [], None, 1, 1, 5)))


def test_remote_backend_messages_carry_the_image_in_the_latest_turn(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8), "red").save(path)
    backend = RemoteBackend("http://127.0.0.1:1")
    assert backend.base_url == "http://127.0.0.1:1/v1"
    messages = backend.messages("and now?", [("what?", "a cat")], ("image", str(path)))
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    url = messages[-1]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,") and base64.b64decode(url.split(",", 1)[1]) == path.read_bytes()


def test_history_pairs_from_chatbot_messages():
    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": [{"type": "text", "text": "q2"}]}, {"role": "assistant", "content": "a2"}]
    assert history_pairs(chat) == [("q1", "a1"), ("q2", "a2")]


def test_local_backend_takes_a_video_file_on_video_models(tmp_path):
    import av
    import numpy as np

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 30, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    processor = Processor.from_pretrained(resolve_tiny("tiny-video"))
    engine = RecordingEngine()
    backend = LocalBackend(engine, processor, "tiny-video", tiny=True)
    assert backend.media_kinds == ("video",)
    asyncio.run(collect(backend.stream("what happens?", [], ("video", str(path)), 0.0, 1.0, 4)))
    inputs, _ = engine.calls[0]
    expected = processor("what happens?", video=str(path))
    assert inputs.input_ids == expected.input_ids and inputs.num_vision_tokens >= 2 * processor.config.vision.tokens_per_image


def test_local_backend_offers_the_base_model_and_its_adapters(processor):
    engine = RecordingEngine(adapters=("pirate", "poet"))
    backend = LocalBackend(engine, processor, "tiny", tiny=True)
    assert backend.models == ["tiny", "pirate", "poet"]
    for model in (None, "tiny", "pirate", "poet"):
        asyncio.run(collect(backend.stream("hi", [], None, 0.0, 1.0, 2, model)))
    assert engine.adapter_calls == [None, None, "pirate", "poet"]
    with pytest.raises(BackendError, match="unknown model 'bard'; choose one of tiny, pirate, poet"):
        asyncio.run(collect(backend.stream("hi", [], None, 0.0, 1.0, 2, "bard")))
    assert LocalBackend(RecordingEngine(), processor, "tiny", tiny=True).models == ["tiny"]


def test_model_dropdown_lists_adapters_and_feeds_every_answer(processor):
    """The UI's model choice goes to every answer (send and retry), and shows only when there is a choice."""
    pytest.importorskip("gradio")
    from cogvlm2.web.app import build_ui

    def dropdown(backend):
        ui = build_ui(backend)
        (found,) = [b for b in ui.blocks.values() if getattr(b, "elem_id", None) == "model"]
        return ui, found

    ui, model = dropdown(LocalBackend(RecordingEngine(adapters=("pirate",)), processor, "tiny", tiny=True))
    assert [value for _, value in model.choices] == ["tiny", "pirate"] and model.value == "tiny" and model.visible
    answers = [d for d in ui.config["dependencies"] if d["outputs"] and len(d["inputs"]) >= 6]
    assert answers and all(model._id in d["inputs"] for d in answers)
    _, model = dropdown(LocalBackend(RecordingEngine(), processor, "tiny", tiny=True))
    assert not model.visible


def test_local_backend_stop_aborts_the_sessions_answers_now(processor):
    """Stop / Clear call backend.stop(session): the session's engine requests are aborted at once (not when
    the suspended stream is garbage-collected), another session's answer goes on."""

    class SlowEngine(RecordingEngine):
        def __init__(self):
            super().__init__()
            self.aborted, self.running = [], {}

        async def generate(self, request_id, inputs, params, adapter=None):
            self.running[request_id] = asyncio.Event()
            for i in range(1000):
                if self.running[request_id].is_set():
                    yield RequestOutput(request_id, len(inputs), [], "", [], "", True, "abort")
                    return
                yield RequestOutput(request_id, len(inputs), [i], "x", [i], "x", False, None)
                await asyncio.sleep(0.001)

        async def abort(self, request_id):
            self.aborted.append(request_id)
            self.running[request_id].set()

    async def main():
        engine = SlowEngine()
        backend = LocalBackend(engine, processor, "tiny", tiny=True)
        mine, other = backend.stream("q", [], None, 1, 1, 5, session="s1"), backend.stream("q", [], None, 1, 1, 5,
                                                                                          session="s2")
        assert await anext(mine) == "x" and await anext(other) == "x"  # both streaming, then suspended
        await backend.stop("s1")
        assert len(engine.aborted) == 1 and list(backend._active) == ["s2"]
        assert [d async for d in mine] == []  # the aborted answer ends: its final output carries no text
        assert await anext(other) == "x"  # the other session's answer goes on
        await other.aclose()
        await backend.stop("nobody")  # a session with nothing running: nothing to do

    asyncio.run(main())

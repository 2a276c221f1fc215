"""The OpenAI-compatible server, live on 127.0.0.1 with the real engine (AsyncLLM) and the tiny model,
driven by the official `openai` client (and raw httpx where the client would hide the wire format)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
import zlib

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from cogvlm2.processing import Processor  # noqa: E402
from background_server import BackgroundServer  # noqa: E402
from cogvlm2.tiny import resolve_tiny  # noqa: E402

KEY = "test-key"
MAX_LEN = 512  # small context: limits are cheap to reach, default answers short


@pytest.fixture(scope="module")
def server():
    argv = ["serve", "--model", "tiny", "--api-key", KEY, "--max-model-len", str(MAX_LEN),
            "--served-model-name", "cogvlm2-tiny", "cogvlm2", "--allow-remote-media", "--log-level", "warning"]
    with BackgroundServer(argv) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def processor():
    return Processor.from_pretrained(resolve_tiny("tiny"))


def image_uri(fmt: str = "PNG", size=(48, 32), color=(200, 40, 40)) -> str:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    if fmt == "GIF":  # two frames: the first is used
        img.save(buf, "GIF", save_all=True, append_images=[Image.new("RGB", size, (0, 0, 255))])
    else:
        img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def user(text: str, image: str | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]}


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics, keyed 'name{label=value,...}' (labels sorted; model_name dropped)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(server, timeout=20) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["cogvlm2_num_requests_running"] == 0 and m["cogvlm2_kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, f"engine not idle: {m}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- happy paths


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["cogvlm2-tiny", "cogvlm2", "tiny"]  # aliases + --model
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key


def test_defaults_are_greedy_and_aliases_answer(client):
    """No sampling fields: greedy, as the official demos (so equal to temperature 0); the official request
    script's model name 'cogvlm2' and the checkpoint name 'tiny' both answer."""
    messages = [user("Describe the picture.", image_uri())]
    implicit = client.chat.completions.create(model="cogvlm2", messages=messages, max_tokens=8)
    explicit = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert implicit.choices[0].message.content == explicit.choices[0].message.content
    assert implicit.model == explicit.model == "cogvlm2-tiny"  # the first served name is reported


def test_non_streaming_with_usage(client, processor):
    r = client.chat.completions.create(model="cogvlm2-tiny", messages=[user("Describe the picture.")], max_tokens=8,
                                       temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "cogvlm2-tiny" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(processor("Describe the picture."))
    assert r.usage.completion_tokens <= 8 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_image_tokens_count_in_the_prompt(client, processor):
    text = client.chat.completions.create(model="tiny", messages=[user("What is it?")], max_tokens=1)
    image = client.chat.completions.create(model="tiny", messages=[user("What is it?", image_uri())], max_tokens=1)
    tokens_per_image = processor.config.vision.tokens_per_image
    assert image.usage.prompt_tokens - text.usage.prompt_tokens == tokens_per_image


def test_streaming_matches_openai_format(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[user("Tell me about it.", image_uri("JPEG"))], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].finish_reason is None
    body, last, usage = chunks[1:-2], chunks[-2], chunks[-1]
    assert all(c.choices[0].finish_reason is None and c.choices[0].delta.content for c in body)
    assert last.choices[0].finish_reason in ("stop", "length") and not last.choices[0].delta.content
    assert usage.choices == [] and usage.usage.total_tokens == usage.usage.prompt_tokens + usage.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    whole = client.chat.completions.create(model="tiny", messages=[user("Tell me about it.", image_uri("JPEG"))],
                                           max_tokens=12, temperature=0)
    assert streamed == whole.choices[0].message.content  # greedy: the same answer either way
    assert usage.usage.completion_tokens == whole.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny", "messages": [user("hi")], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[0][6:])  # no usage field without stream_options


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_common_image_formats(client, fmt):
    r = client.chat.completions.create(model="tiny", messages=[user("What is it?", image_uri(fmt))], max_tokens=1)
    assert r.usage.prompt_tokens > 18


def test_multi_turn_with_the_image_in_history(client, processor):
    image = image_uri("PNG", color=(10, 200, 10))
    messages = [
        {"role": "system", "content": "Answer briefly."},
        user("What colour is it?", image),
        {"role": "assistant", "content": "Green."},
        user("Are you sure?"),
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    expected = processor("Are you sure?", [("Answer briefly.\nWhat colour is it?", "Green.")],
                         image=base64.b64decode(image.split(",", 1)[1]))
    assert r.usage.prompt_tokens == len(expected)


def test_sampling_parameters(client):
    base = dict(model="tiny", messages=[user("Say something.")], max_tokens=10)
    a = client.chat.completions.create(**base, temperature=1.0, top_p=0.9, seed=123)
    b = client.chat.completions.create(**base, temperature=1.0, top_p=0.9, seed=123)
    assert a.choices[0].message.content == b.choices[0].message.content  # seeded: reproducible
    r = client.chat.completions.create(**base, n=3, temperature=1.0, seed=123, presence_penalty=0.5,
                                       frequency_penalty=0.5, extra_body={"top_k": 50, "repetition_penalty": 1.2})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 30  # summed over the choices
    one = client.chat.completions.create(**base, n=1, temperature=1.0, seed=124, presence_penalty=0.5,
                                         frequency_penalty=0.5, extra_body={"top_k": 50, "repetition_penalty": 1.2})
    assert r.choices[1].message.content == one.choices[0].message.content  # choice i samples with seed + i
    greedy = client.chat.completions.create(**base, temperature=0, max_completion_tokens=5)
    assert greedy.usage.completion_tokens <= 5


def test_stop_strings_cut_the_answer(client):
    base = dict(model="tiny", messages=[user("Count.")], max_tokens=20, temperature=0)
    full = client.chat.completions.create(**base).choices[0].message.content
    stop = full[len(full) // 2:][:3]
    if not stop.strip():
        pytest.skip("greedy answer has no usable stop string")
    cut = client.chat.completions.create(**base, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.message.content and full.startswith(cut.message.content)


def test_n_choices_stream(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=4, n=2, stream=True))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert set(finished) == {0, 1}


# --------------------------------------------------------------------------- errors


def error_of(exc_info) -> dict:
    return exc_info.value.body if isinstance(exc_info.value.body, dict) and "message" in exc_info.value.body \
        else exc_info.value.response.json()["error"]


def test_invalid_json_is_a_400(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "invalid JSON" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("kwargs, param", [
    (dict(messages=[]), "messages"),
    (dict(messages=[user("x")], temperature=9), "temperature"),
    (dict(messages=[user("x")], max_tokens=0), "max_tokens"),
    (dict(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]),
     "messages.0.content.0"),
    (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "messages.0"),
])
def test_schema_errors_are_400_not_422(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", **kwargs)
    assert e.value.status_code == 400 and error_of(e)["param"] == param


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[user("hi")])
    assert error_of(e)["code"] == "model_not_found"


def test_last_message_must_be_from_the_user(client):
    with pytest.raises(openai.BadRequestError, match="last message must be from the user"):
        client.chat.completions.create(model="tiny", messages=[user("hi"), {"role": "assistant", "content": "hello"}])


def test_prompt_longer_than_the_context_counting_image_tokens(client, processor):
    words = 1
    while len(processor("hi " * words)) < MAX_LEN - 12:  # an image adds 18 tokens (tiny: 4x4 + boi + eoi)
        words += 4
    text = "hi " * words  # fits alone, not with the image's tokens
    assert len(processor(text)) < MAX_LEN <= len(processor(text, image=Image.new("RGB", (8, 8))))
    client.chat.completions.create(model="tiny", messages=[user(text)], max_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[user(text, image_uri())], max_tokens=1)
    err = error_of(e)
    assert err["code"] == "context_length_exceeded" and "image" in err["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny", messages=[user("hi")], max_tokens=MAX_LEN)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header declaring a huge image (a decompression bomb must be refused before decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("url, match", [
    ("data:image/png;base64," + base64.b64encode(b"this is not an image").decode(), "invalid image"),
    ("data:image/png;base64,!!!", "base64"),
    ("data:image/png;base64," + base64.b64encode(png_claiming(9000, 8000)).decode(), "too large"),
    ("http://127.0.0.1:1/cat.png", "non-public address"),
    ("http://169.254.169.254/latest/meta-data/", "non-public address"),
    ("ftp://example.com/cat.png", "scheme"),
])
def test_bad_images_are_400(client, url, match):
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(model="tiny", messages=[user("What is it?", url)], max_tokens=1)


def test_video_parts_need_a_video_model(client):
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError, match="image model"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [part]}])


def test_api_key_is_required(server):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model="tiny", messages=[user("hi")])
    assert e.value.status_code == 401 and error_of(e)["code"] == "invalid_api_key"
    for path in ("/v1/chat/completions", "/video_qa"):  # no key at all
        r = httpx.post(f"{server.url}{path}", json={"model": "tiny", "messages": [user("hi")]})
        assert r.status_code == 401 and "Missing API key" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_oversized_body_is_413(server):
    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(50):
            yield b"x" * 2**20
        yield b'"}]}'

    r = httpx.post(f"{server.url}/v1/chat/completions", content=body(), timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]


def test_garbage_never_crashes_the_server(server):
    bodies = [b"", b"null", b"[]", b"{}", b'{"messages": "hi"}', b'{"messages": [null]}', b'{"messages": [{}]}',
              b'{"messages": [{"role": "user"}]}', b'{"messages": [{"role": "user", "content": 5}]}',
              b'{"messages": [{"role": "user", "content": [{}]}]}', b'{"messages": [{"role": "user", "content": "x"}], "n": "many"}',
              b'{"messages": [{"role": "user", "content": "x"}], "seed": 1e400}', "\u2603".encode() * 3, b"\xff\xfe",
              b'{"messages": [{"role": "user", "content": "x"}], "stop": {"a": 1}}']
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in bodies:
        r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server.url}/v1/chat/completions", data={"a": "b"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/v1/nothing-here", headers=headers).json()["error"]["message"] == "Not Found"
    assert httpx.get(f"{server.url}/health").status_code == 200


# --------------------------------------------------------------------------- disconnects, load, metrics


def test_disconnect_mid_stream_aborts_and_frees_kv_blocks(server, client):
    before = wait_idle(server)
    stream = client.chat.completions.create(model="tiny", messages=[user("Go on forever.")], max_tokens=MAX_LEN - 20,
                                            temperature=0, stream=True)
    for i, _ in zip(range(5), stream):
        pass
    busy = metrics(server)
    assert busy["cogvlm2_num_requests_running"] == 1 and busy["cogvlm2_kv_cache_usage_perc"] > 0
    stream.close()  # the client goes away mid-answer
    after = wait_idle(server)
    key = "cogvlm2_requests_total{finish_reason=abort}"
    assert after.get(key, 0) == before.get(key, 0) + 1


def test_disconnect_while_waiting_for_a_non_streaming_answer(server):
    before = wait_idle(server)
    # temperature 2: the tiny model's few trained tokens no longer dominate, so it rambles instead of stopping
    body = {"model": "tiny", "messages": [user("Write a long story.")], "max_tokens": MAX_LEN - 20, "temperature": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(0.5, connect=5))
    after = wait_idle(server)
    key = "cogvlm2_requests_total{finish_reason=abort}"
    assert after.get(key, 0) == before.get(key, 0) + 1


def test_32_concurrent_streams_all_complete(server):
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str | None, str]:
        stream = await c.chat.completions.create(model="tiny", messages=[user(f"Question number {i}?")],
                                                 max_tokens=16, stream=True, seed=i)
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return reason, text

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    start = time.monotonic()
    results = asyncio.run(main())
    assert all(reason in ("stop", "length") for reason, _ in results), results
    assert time.monotonic() - start < 60
    wait_idle(server)


def test_metrics_parse_as_prometheus_text(server):
    m = metrics(server)
    for name in ("cogvlm2_num_requests_running", "cogvlm2_num_requests_waiting", "cogvlm2_kv_cache_usage_perc",
                 "cogvlm2_prompt_tokens_total", "cogvlm2_generation_tokens_total",
                 "cogvlm2_time_to_first_token_seconds_count", "cogvlm2_time_per_output_token_seconds_count",
                 "cogvlm2_e2e_request_latency_seconds_count"):
        assert name in m, name
    assert m["cogvlm2_generation_tokens_total"] > 0 and m["cogvlm2_time_to_first_token_seconds_count"] > 0
    assert m.get("cogvlm2_requests_total{finish_reason=length}", 0) > 0
    assert m.get("cogvlm2_http_errors_total{status=400}", 0) > 0


def test_video_qa_needs_a_video_model(server):
    r = httpx.post(f"{server.url}/video_qa", files={"video": ("a.mp4", b"\0" * 100, "video/mp4")},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 400 and "video checkpoint" in r.json()["error"]["message"]

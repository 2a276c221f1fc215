"""Server hardening (issue 9): one regression test per defect, live on 127.0.0.1 with the tiny-random model
(random weights: long answers that rarely end in EOS, so requests last as long as asked).

One bad request never hurts another; every input has bounded memory and time; every refusal is an
OpenAI-format 4xx / 503, never a 500 or a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import struct
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from cogvlm2.serving import limits  # noqa: E402
from background_server import BackgroundServer  # noqa: E402

KEY = "k-hardening"
MAX_LEN = 512
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    argv = ["serve", "--model", "tiny-random", "--api-key", KEY, "--max-model-len", str(MAX_LEN), "--max-connections", "24",
            "--allowed-origins", "http://app.example", "--log-level", "warning"]
    with BackgroundServer(argv) as s:
        yield s


def app_of(server):
    return server._server.config.app


def post(server, body, timeout=60, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}/v1/chat/completions", content=data, timeout=timeout,
                      headers={**AUTH, "Content-Type": "application/json"}, **kw)


def chat(text="hi", **kw) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8, **kw}


def metric(server, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            if (f"{s.name}{{{labels}}}" if labels else s.name) == name:
                total += s.value
    return total


def wait_idle(server, timeout=30):
    deadline = time.monotonic() + timeout
    stats = app_of(server).state.ctx.engine.stats
    while not (stats().num_running == stats().num_waiting == 0 and stats().kv_blocks_free == stats().kv_blocks_total):
        assert time.monotonic() < deadline, f"engine not idle: {stats()}"
        time.sleep(0.05)


def stream_events(server, body, timeout=60) -> list[str]:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        return [line for line in r.iter_lines() if line]


# --------------------------------------------------------------------------- 1. one request kills every stream


def test_1_degenerate_sampling_settings_do_not_hurt_other_streams(server):
    """temperature / repetition_penalty 1e-40 with a seed used to NaN the sampler and abort all 20 streams."""
    results: dict[str, list[str]] = {}

    def run(name, body):
        results[name] = stream_events(server, body)

    jobs = [(f"ok{i}", chat(f"story {i}", max_tokens=12, temperature=1.0, seed=i)) for i in range(4)]
    jobs += [("tiny-t", chat("a", max_tokens=12, temperature=1e-40, seed=3)),
             ("tiny-rp", chat("b", max_tokens=12, temperature=0.7, repetition_penalty=1e-40, seed=4)),
             ("both", chat("c", max_tokens=12, temperature=1e-30, repetition_penalty=1e-38, seed=5, top_p=0.5))]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(results) == {name for name, _ in jobs}
    for name, events in results.items():
        assert events[-1] == "data: [DONE]", name
        assert not any('"error"' in e for e in events), (name, events[-3:])
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length"), name
    wait_idle(server)


def test_1_tiny_temperature_is_greedy(server):
    greedy = post(server, chat("same", max_tokens=12, temperature=0)).json()
    tiny = post(server, chat("same", max_tokens=12, temperature=1e-40, seed=1)).json()
    assert tiny["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------- 3. huge text


def test_3_huge_text_is_refused_before_tokenizing_and_health_stays_fast(server):
    """10 MB of text: a 400 in characters (no tokenizing of megabytes), while /health keeps answering."""
    body = json.dumps(chat("x" * (10 * 2**20)))
    gaps: list[float] = []
    done = threading.Event()

    def probe():
        while not done.is_set():
            t = time.monotonic()
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
            gaps.append(time.monotonic() - t)
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        t = time.monotonic()
        rs = [None, None]

        def send(i):
            rs[i] = post(server, body)

        senders = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for s in senders:
            s.start()
        for s in senders:
            s.join(60)
        elapsed = time.monotonic() - t
    finally:
        done.set()
        prober.join(30)
    for r in rs:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert "characters" in r.json()["error"]["message"]
    assert elapsed < 15, elapsed
    assert gaps and max(gaps) < 2.0, max(gaps)


# --------------------------------------------------------------------------- 4. disconnect during a non-streaming request


def test_4_client_disconnect_during_non_streaming_request_is_not_an_error(server, caplog):
    errors_before = metric(server, "cogvlm2_http_errors_total{status=500}")
    caplog.set_level(logging.ERROR)
    with pytest.raises(httpx.ReadTimeout):
        post(server, chat("keep going", max_tokens=480, temperature=1.0), timeout=0.5)
    wait_idle(server)  # the abandoned request was aborted and its KV freed
    time.sleep(0.2)
    assert metric(server, "cogvlm2_http_errors_total{status=500}") == errors_before
    assert not [r for r in caplog.records if "InvalidStateError" in r.getMessage() or
                (r.exc_info and "InvalidStateError" in repr(r.exc_info[1]))]


# --------------------------------------------------------------------------- 5. malformed images


def _png(size=(4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def _malformed_images() -> dict[str, bytes]:
    png = bytearray(_png())
    png[8:12] = struct.pack(">I", 0xFFFF)  # IHDR chunk length
    bmp = io.BytesIO()
    Image.new("P", (4, 4)).save(bmp, "BMP")
    bmp = bytearray(bmp.getvalue())
    bmp[46:50] = struct.pack("<I", 100000)  # palette size
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(jpeg, "JPEG")
    return {
        "png-bad-ihdr": bytes(png),
        "bmp-bad-palette": bytes(bmp),
        "qoi-truncated": b"qoif" + struct.pack(">II", 4, 4) + bytes([3, 0]) + b"\xfe\x00",  # Pillow: ValueError
        "dds-odd": b"DDS " + struct.pack("<I", 124) + b"\x00" * 120,  # Pillow: NotImplementedError
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",  # never handed to Ghostscript
        "jpeg-truncated": jpeg.getvalue()[:300],
    }


@pytest.mark.parametrize("name", list(_malformed_images()))
def test_5_malformed_images_are_400(server, name):
    uri = "data:image/png;base64," + base64.b64encode(_malformed_images()[name]).decode()
    r = post(server, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": uri}}]}], "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("invalid image: cannot decode image")


@pytest.mark.filterwarnings("ignore")
def test_5_fuzzed_images_only_ever_raise_image_error():
    """Random byte flips and truncations of every allowed format: ImageError or an image, nothing else."""
    import random

    from cogvlm2.processing.image import ImageError, load_image

    rng = random.Random(9)
    seeds = []
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 12), (200, 30, 60)).save(buf, fmt)
        seeds.append(buf.getvalue())
    for _ in range(600):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[:rng.randrange(1, len(data))]
        try:
            assert load_image(bytes(data)).mode == "RGB"
        except ImageError:
            pass


# --------------------------------------------------------------------------- 6. invalid Unicode


@pytest.mark.parametrize("body, param", [
    ('{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', "messages.0.content"),
    ('{"messages": [{"role": "system", "content": "\\udfff"}, {"role": "user", "content": "hi"}]}', "messages.0.content"),
    ('{"model": "\\ud83d", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', "messages.0.content.0"),
])
def test_6_lone_surrogates_are_400(server, body, param):
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(param) and "surrogate" in err["message"]


# --------------------------------------------------------------------------- 7. slow clients, idle connections


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    return out


def test_7_slow_headers_get_408_and_are_closed(server, monkeypatch):
    monkeypatch.setattr(limits, "HEADER_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        t = time.monotonic()
        reply = _read_all(s, 5)
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t < 4
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # silent after connecting: same
        assert _read_all(s, 5).startswith(b"HTTP/1.1 408")


def test_7_slow_body_gets_408(server, monkeypatch):
    monkeypatch.setattr(limits, "BODY_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mess")
        reply = _read_all(s, 5)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"error"' in reply


def test_7_connections_past_the_cap_get_503_and_normal_requests_recover(server):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(24)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            reply = _read_all(extra, 5)
        assert reply.startswith(b"HTTP/1.1 503") and b"too many connections" in reply
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_7_connection_cap_fits_the_open_file_limit(monkeypatch):
    """At `ulimit -n 256` the probe's 300 idle connections exhausted the descriptors: the cap leaves 64 free."""
    import resource

    from cogvlm2.serving.connections import connection_cap

    monkeypatch.setattr(resource, "getrlimit", lambda r: (256, 256))
    monkeypatch.setattr(resource, "setrlimit", lambda r, v: pytest.fail("the hard limit leaves no room"))
    assert connection_cap(1024) == 256 - limits.RESERVED_FDS
    raised = []
    monkeypatch.setattr(resource, "getrlimit", lambda r: (256, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda r, v: raised.append(v))
    assert connection_cap(1024) == 1024 and raised == [(1024 + limits.RESERVED_FDS, 4096)]


def test_7_accept_errors_are_one_line_per_minute(caplog):
    import errno

    from cogvlm2.serving.connections import quiet_resource_errors

    loop = asyncio.new_event_loop()
    try:
        quiet_resource_errors(loop)
        caplog.set_level(logging.WARNING)
        for _ in range(50):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(errno.EMFILE, "Too many open files")})
    finally:
        loop.close()
    lines = [r for r in caplog.records if "out of system resource" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None


# --------------------------------------------------------------------------- 10. engine failures are logged with the request id


def test_10_a_failing_request_fails_alone_and_is_logged(server, caplog):
    """A step that raises only for one request (max_tokens 77 marks it): that request gets a 500 and
    its traceback is logged with its id; the others in the same batches finish normally."""
    runner = app_of(server).state.ctx.engine.engine.runner
    launch = runner.launch

    def failing_launch(batch, source=None):
        if any(s.params.max_new_tokens == 77 for s in batch.seqs):
            raise RuntimeError("injected device failure")
        return launch(batch, source)

    caplog.set_level(logging.WARNING)
    runner.launch = failing_launch
    try:
        results = {}

        def run(name, body):
            results[name] = post(server, body)

        jobs = [(f"ok{i}", chat(f"hello {i}", max_tokens=16, temperature=0)) for i in range(4)]
        jobs.append(("bad", chat("bad one", max_tokens=77, temperature=0)))
        threads = [threading.Thread(target=run, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        runner.launch = launch
    bad = results.pop("bad")
    assert bad.status_code == 500 and "injected device failure" in bad.json()["error"]["message"]
    for r in results.values():
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    failed = [r for r in caplog.records if r.getMessage().startswith("request chatcmpl-") and "failed" in r.getMessage()]
    assert failed and any(r.exc_info for r in failed), [r.getMessage() for r in caplog.records]
    wait_idle(server)


# --------------------------------------------------------------------------- 12. small ones


def test_12_405_has_allow_header(server):
    r = httpx.get(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["type"]


def test_12_models_do_not_expose_local_paths(server):
    cards = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert cards[0]["root"] == "tiny-random" and not any("/" in (c["root"] or "") for c in cards)


def test_12_openapi_is_served_behind_the_key(server):
    assert httpx.get(f"{server.url}/openapi.json", timeout=10).status_code == 401
    spec = httpx.get(f"{server.url}/openapi.json", headers=AUTH, timeout=10).json()
    assert {"/v1/chat/completions", "/v1/models", "/video_qa"} <= set(spec["paths"])


def test_12_api_key_from_file_or_env(tmp_path, monkeypatch):
    from argparse import Namespace

    from cogvlm2.serving.api_server import resolve_api_key

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("COGVLM2_API_KEY", "from-env")
    assert resolve_api_key(Namespace(api_key=None, api_key_file=str(key_file))) == "from-file"
    assert resolve_api_key(Namespace(api_key=None, api_key_file=None)) == "from-env"
    with pytest.raises(SystemExit, match="cannot read"):
        resolve_api_key(Namespace(api_key=None, api_key_file=str(tmp_path / "missing")))


def test_cors_only_for_allowed_origins(server):
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{server.url}/v1/chat/completions", headers=pre, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.post(f"{server.url}/v1/chat/completions", headers={"Origin": "http://app.example"}, json=chat(), timeout=30)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.get(f"{server.url}/health", headers={"Origin": "http://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in r.headers


# --------------------------------------------------------------------------- 8. admission control


@pytest.fixture(scope="module")
def busy_server():
    argv = ["serve", "--model", "tiny-random", "--max-model-len", "8192", "--max-num-seqs", "1", "--max-waiting", "2",
            "--log-level", "warning"]
    with BackgroundServer(argv) as s:
        yield s


def test_8_queue_is_bounded_with_503_and_retry_after(busy_server):
    url = f"{busy_server.url}/v1/chat/completions"
    ctx = app_of(busy_server).state.ctx
    first = threading.Event()
    results = {}

    def long_stream():
        # ~8,000 tokens keep the only slot busy for far longer than the test needs (900 took ~7 s on a
        # loaded 2-core CI machine and the slot came free before the refused request was sent); the
        # stream is closed right after, which aborts it
        body = chat("long", max_tokens=8000, temperature=1.0, stream=True)
        with httpx.stream("POST", url, json=body, timeout=120) as r:
            for n, line in enumerate(line for line in r.iter_lines() if line):
                if n >= 2:  # line 0 is the role chunk, sent before the engine's first output (until then
                    first.set()  # the request counts as waiting); lines 1.. carry generated text
                if results.get("stop"):
                    break

    def short(name):
        results[name] = httpx.post(url, json=chat(name, max_tokens=4), timeout=120)

    runner = threading.Thread(target=long_stream)
    runner.start()
    assert first.wait(60)
    waiters = [threading.Thread(target=short, args=(f"w{i}",)) for i in range(2)]
    for w in waiters:
        w.start()
    deadline = time.monotonic() + 30
    while ctx.waiting + ctx.preparing < 2:
        assert time.monotonic() < deadline, "the two requests never queued"
        time.sleep(0.02)
    refused = httpx.post(url, json=chat("one too many"), timeout=30)
    results["stop"] = True
    runner.join(120)
    for w in waiters:
        w.join(120)
    assert refused.status_code == 503 and refused.headers["retry-after"] == str(limits.RETRY_AFTER_S)
    assert refused.json()["error"]["code"] == "server_overloaded"
    assert results["w0"].status_code == results["w1"].status_code == 200  # the queued ones were served
    assert httpx.post(url, json=chat("after"), timeout=60).status_code == 200


def test_8_queued_pixels_are_held_in_the_model_dtype():
    import torch

    from cogvlm2.engine import AsyncLLM, LLMEngine
    from cogvlm2.llm import load_processor_and_model

    model, processor = load_processor_and_model("tiny", dtype="bfloat16", device="cpu")
    llm = AsyncLLM(LLMEngine(model, processor=processor))
    x = processor("what?", image=Image.new("RGB", (32, 32), (5, 100, 200)))
    compact = llm._compact(x)
    assert x.pixel_values.dtype == torch.float32 and compact.pixel_values.dtype == torch.bfloat16
    assert torch.equal(compact.pixel_values, x.pixel_values.to(torch.bfloat16))  # what the tower computes on anyway
    assert compact.input_ids == x.input_ids and compact.vision_hash == x.vision_hash
    assert x.pixels_known_finite and compact.pixels_known_finite  # the engine need not sum the cast pixels either
    x.pixel_values = x.pixel_values.clone()  # not the Processor's tensor any more: the cast is not vouched for
    assert not llm._compact(x).pixels_known_finite


# --------------------------------------------------------------------------- 9. SSRF: IPv6 wrappings of private IPv4


@pytest.mark.parametrize("address", ["64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::c0a8:1", "::127.0.0.1",
                                     "::ffff:0:7f00:1", "::ffff:127.0.0.1", "2002:7f00:1::", "::a9fe:a9fe", "64:ff9b::808:808"])
def test_9_ipv6_wrappings_of_private_ipv4_are_refused(address):
    import ipaddress

    from cogvlm2.serving.media import is_public_address

    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["2606:4700:4700::1111", "2002:808:808::1", "8.8.8.8"])
def test_9_public_addresses_still_pass(address):
    import ipaddress

    from cogvlm2.serving.media import is_public_address

    assert is_public_address(ipaddress.ip_address(address))


def test_9_nat64_url_is_refused_before_connecting():
    from cogvlm2.serving.errors import APIError
    from cogvlm2.serving.media import fetch_url

    with pytest.raises(APIError, match="non-public"):
        asyncio.run(fetch_url("http://[64:ff9b::7f00:1]:9/x.png", "image", 1000))

"""Server pieces without a running server: message mapping, request conversion, error format, media guards."""

from __future__ import annotations

import asyncio
import base64
import http.server
import ipaddress
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from pydantic import TypeAdapter, ValidationError  # noqa: E402

from cogvlm2.serving.conversation import parse_messages  # noqa: E402
from cogvlm2.serving.errors import APIError, validation_error  # noqa: E402
from cogvlm2.serving.media import decode_data_uri, fetch_url, is_public_address, load_media  # noqa: E402
from cogvlm2.serving.protocol import ChatCompletionRequest, Message  # noqa: E402


def msgs(*items) -> list:
    return TypeAdapter(list[Message]).validate_python(list(items))


def image_part(url="data:image/png;base64,AAAA"):
    return {"type": "image_url", "image_url": {"url": url}}


# --------------------------------------------------------------------------- messages -> CogVLM2 prompt


def test_multi_turn_maps_to_history_with_system_on_first_query():
    conv = parse_messages(msgs(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image_part("data:image/png;base64,A1")]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Its colour?"},
    ), media_kinds=("image",))
    assert conv.history == [("Be brief.\nWhat is it?", "A cat.")]
    assert conv.query == "Its colour?"
    assert (conv.media_kind, conv.media_url) == ("image", "data:image/png;base64,A1")


def test_latest_image_wins_and_consecutive_user_messages_are_turns():
    """As the official API demo: each user message is a turn; one without an answer gets an empty one."""
    conv = parse_messages(msgs(
        {"role": "user", "content": [image_part("data:image/png;base64,OLD")]},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "again"}, image_part("data:image/png;base64,NEW")]},
    ), media_kinds=("image",))
    assert conv.media_url.endswith("NEW") and conv.num_media_ignored == 1
    assert conv.history == [("", ""), ("first", "")]
    assert conv.query == "again"
    conv = parse_messages(msgs({"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                               {"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"},
                               {"role": "user", "content": "c"}), media_kinds=("image",))
    assert conv.history == [("a", ""), ("b", "x\ny")] and conv.query == "c"


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "last message must be from the user"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "before any user message"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA"}}]}],
     "image model"),
])
def test_conversations_the_model_cannot_take(messages, match):
    with pytest.raises(APIError, match=match) as e:
        parse_messages(msgs(*messages), media_kinds=("image",))
    assert e.value.status == 400


def test_video_model_takes_video_parts_only():
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA"}}
    conv = parse_messages(msgs({"role": "user", "content": [video, {"type": "text", "text": "what happens?"}]}), ("video",))
    assert conv.media_kind == "video" and conv.query == "what happens?"
    with pytest.raises(APIError, match="video model"):
        parse_messages(msgs({"role": "user", "content": [image_part()]}), media_kinds=("video",))


# --------------------------------------------------------------------------- request -> SamplingParams


def test_request_converts_itself_and_seeds_each_choice():
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3, "top_p": 0.5, "top_k": -1,
        "max_completion_tokens": 9, "stop": "END", "seed": 5, "n": 3, "frequency_penalty": 0.5,
        "repetition_penalty": 1.1, "some_future_field": {"ignored": True},
    })
    assert req.requested_max_tokens == 9
    params = [req.to_sampling_params(9, i) for i in range(req.n)]
    assert [p.seed for p in params] == [5, 6, 7]
    p = params[0]
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.stop) == (9, 0.3, 0.5, 0, ["END"])
    assert (p.frequency_penalty, p.repetition_penalty) == (0.5, 1.1)


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 1000}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop.0"),
])
def test_schema_errors_name_the_parameter(body, param):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    err = validation_error([{**x, "loc": ("body", *x["loc"])} for x in e.value.errors()])
    assert err.status == 400 and err.param == param and err.message.startswith(param)
    assert err.to_response().model_dump()["error"]["type"] == "invalid_request_error"


def test_stream_options_need_stream():
    with pytest.raises(ValidationError, match="stream_options"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                              "stream_options": {"include_usage": True}})


# --------------------------------------------------------------------------- media


def test_data_uri_decoding_and_limits():
    payload = base64.b64encode(b"\x89PNG....").decode()
    assert decode_data_uri(f"data:image/png;base64,{payload}", "image", 100) == b"\x89PNG...."
    assert decode_data_uri(f"data:;base64,{payload}", "image", 100) == b"\x89PNG...."
    with pytest.raises(APIError, match="too large"):
        decode_data_uri(f"data:image/png;base64,{base64.b64encode(bytes(400)).decode()}", "image", 100)
    with pytest.raises(APIError, match="media type 'text/html'"):
        decode_data_uri(f"data:text/html;base64,{payload}", "image", 100)
    with pytest.raises(APIError, match="base64"):
        decode_data_uri("data:image/png;base64,@@@@", "image", 100)
    with pytest.raises(APIError, match="no ','"):
        decode_data_uri("data:image/png;base64", "image", 100)


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("240.0.0.1", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("2002:7f00:1::", False),  # 6to4 wrapping 127.0.0.1
])
def test_only_public_addresses_are_fetched(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/x.png", "http://localhost:9/x.png", "http://[::1]:9/x.png", "http://10.0.0.1/x.png",
    "http://169.254.169.254/latest/meta-data", "https://0.0.0.0/x.png",
])
def test_remote_urls_to_private_hosts_are_refused_before_connecting(url):
    with pytest.raises(APIError, match="non-public address"):
        run(load_media(url, "image", 1000, allow_remote=True))


def test_remote_urls_need_the_operator_flag_and_http():
    with pytest.raises(APIError, match="--allow-remote-media"):
        run(load_media("https://example.com/cat.png", "image", 1000, allow_remote=False))
    with pytest.raises(APIError, match="scheme 'file'"):
        run(load_media("file:///etc/passwd", "image", 1000, allow_remote=True))


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        routes = {
            "/ok": (200, {}, b"x" * 100),
            "/big": (200, {}, b"x" * 5000),
            "/to-ok": (302, {"Location": "/ok"}, b""),
            "/to-private": (302, {"Location": "http://10.0.0.1/secret"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/missing": (404, {}, b""),
        }
        status, headers, body = routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_http():
    """A plain HTTP server on 127.0.0.1; the fetcher is told to allow loopback for it only."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fetch(url, max_bytes=1000):
    return run(fetch_url(url, "image", max_bytes, allowed=lambda ip: ip.is_loopback, timeout=5))


def test_fetch_follows_checked_redirects_within_limits(local_http):
    assert fetch(f"{local_http}/ok") == b"x" * 100
    assert fetch(f"{local_http}/to-ok") == b"x" * 100
    with pytest.raises(APIError, match="non-public address"):
        fetch(f"{local_http}/to-private")
    with pytest.raises(APIError, match="redirected more than"):
        fetch(f"{local_http}/loop")
    with pytest.raises(APIError, match="too large"):
        fetch(f"{local_http}/big")
    with pytest.raises(APIError, match="HTTP 404"):
        fetch(f"{local_http}/missing")

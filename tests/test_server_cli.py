"""`cogvlm2 serve` as a user runs it: a separate process, answering, and stopping cleanly on Ctrl-C;
and the sub-commands are listed without importing the server's extras."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def test_cli_lists_serve_and_web_without_importing_extras():
    code = ("import sys, cogvlm2.cli as c; p = c.build_parser(); "
            "a = p.parse_args(['serve', '--port', '9', '--allow-remote-media', '--served-model-name', 'x', 'y']); "
            "assert a.func.__name__ == 'run_serve' and a.served_model_name == ['x', 'y'] and a.allow_remote_media; "
            "assert p.parse_args(['web', '--server-url', 'http://h']).func.__name__ == 'run_web'; "
            "heavy = {'fastapi', 'uvicorn', 'gradio', 'prometheus_client', 'torch.cuda'} & set(sys.modules); "
            "assert not heavy - {'torch.cuda'}, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, *extra: str, model: str = "tiny") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cogvlm2.cli", "serve", "--model", model, "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_healthy(httpx, proc, port: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def test_serve_subprocess_answers_and_drains_open_streams_on_ctrl_c():
    """`cogvlm2 serve` answers; on Ctrl-C an open stream gets DRAIN_TIMEOUT_S to finish, then an error
    event and [DONE] (never a cut connection); the process exits cleanly, without a traceback.
    (SIGTERM takes the same path: uvicorn handles both signals alike.)"""
    import threading

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from cogvlm2.serving.limits import DRAIN_TIMEOUT_S

    port = free_port()
    # tiny-random: random weights ramble (EOS is 2 ids in 128k); the trained tiny ends its answers by itself, even
    # sampled at temperature 2, which once closed the stream before the drain began
    proc = _start(port, "--max-model-len", "4096", model="tiny-random")
    try:
        _wait_healthy(httpx, proc, port)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "tiny-random"
        events: list[str] = []
        started = threading.Event()

        def stream():
            body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 4000, "stream": True,
                    "temperature": 1, "seed": 0}  # seeded: the same long stream on every run
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        reader.join(DRAIN_TIMEOUT_S + 30)
        assert not reader.is_alive()
        assert DRAIN_TIMEOUT_S - 0.5 < time.monotonic() - t < DRAIN_TIMEOUT_S + 15
        assert events[-1] == "data: [DONE]"
        assert '"code":"server_shutting_down"' in events[-2].replace(" ", "")
        assert proc.wait(timeout=30) in (0, 130)  # 130: the CLI's exit code for Ctrl-C, after a clean shutdown
        out = proc.stdout.read().decode()
        assert "Traceback" not in out and "CancelledError" not in out, out
        assert "Finished server process" in out
        assert "random weights" in out  # the embedded model says what it is
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_taken_port_is_reported_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "cogvlm2.cli", "serve", "--model", "tiny", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "another server" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Loading weights" not in out.stderr  # before the model loads

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


def test_serve_subprocess_answers_and_stops_on_ctrl_c():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cogvlm2.cli", "serve", "--model", "tiny", "--port", str(port),
                             "--max-model-len", "256"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130)  # 130: the CLI's exit code for Ctrl-C, after a clean shutdown
        out = proc.stdout.read().decode()
        assert "Finished server process" in out, out
        assert "synthetic" in out  # the tiny model says what it is
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""`cogvlm2 chat` in a pseudo-terminal, as a person uses it: Ctrl-C mid-answer returns to the prompt and a
second Ctrl-C quits; readline editing and history; a dragged-and-dropped (quoted, escaped, ~) image path;
a newline after Ctrl-D. Also the errors that must not be tracebacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import signal
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "example.png"
PROMPT = "Human: "


def spawn(*argv: str, env: dict | None = None) -> "pexpect.spawn":
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm", **(env or {})}
    # Ctrl-C as a terminal's shell gives it: a run of the tests in the background (`nohup pytest &`) ignores SIGINT,
    # which the chat would inherit through exec, and then no Ctrl-C would ever reach it
    child = pexpect.spawn(sys.executable, ["-m", "cogvlm2.cli", "chat", *argv], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=120, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return child


@pytest.fixture(scope="module")
def chatty(tmp_path_factory) -> Path:
    """An untrained checkpoint: sampling from it rambles for thousands of tokens (EOS is one id in 128k)."""
    from cogvlm2.tiny.recipe import initial_checkpoint

    import json

    folder = initial_checkpoint("tiny", tmp_path_factory.mktemp("random") / "ckpt", list(range(128256)), seed=0)
    # its end of answer is a reserved id instead of Llama-3's two: a sampled answer then ends only by length (or,
    # one token in 128k, by chance), never by an early EOS before the test's Ctrl-C lands
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = 128255
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_ctrl_c_stops_an_answer_and_a_second_quits(chatty):
    """Waits on what the terminal shows, never on time: robust however loaded the machine is."""
    # 8,000 sampled tokens take minutes on a CPU; seeded, the answer is the same noise on every run, with no EOS
    # in its first 1,500 tokens (an unseeded one could end early by chance: EOS is 2 ids in 128k)
    child = spawn("--model", str(chatty), "--max-new-tokens", "8000", "--temperature", "1", "--seed", "0")
    child.expect(r"image path \(Enter for text only\) >>>>> ")
    child.sendline("")
    child.expect(PROMPT)
    child.sendline("Who are you?")
    child.expect("CogVLM2: ")
    child.expect(r"(?s).{40}")  # the answer is streaming: Ctrl-C lands inside it, not before or after
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(PROMPT)  # back at the prompt, the process alive
    assert child.isalive()
    child.sendintr()  # Ctrl-C at the prompt quits, on a fresh line
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
    assert "Traceback" not in child.before


def test_readline_editing_history_and_a_dropped_path(tmp_path):
    folder = tmp_path / "my pictures"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "it's here.png")
    home = tmp_path  # '~' expands to it
    child = spawn("--max-new-tokens", "40", "--temperature", "0", env={"HOME": str(home)})
    child.expect(r">>>>> ")
    child.sendline("~/my\\ pictures/it\\'s\\ here.png")  # what a drag-and-drop into a terminal types
    child.expect(PROMPT)
    child.send("How many shapes are there?XX")
    child.send("\x7f\x7f")  # backspace twice (readline)
    child.send("\r")
    child.expect("CogVLM2: (.*?)\r\n")
    first = child.match.group(1)
    assert first.strip() and "error" not in first
    child.expect(PROMPT)
    child.send("\x1b[A")  # arrow up: the previous question, as edited, from readline's history
    child.send("\r")
    child.expect("CogVLM2: (.*?)\r\n")
    assert "How many shapes are there?" in child.before and "XX" not in child.before
    assert child.match.group(1).strip()  # answered (with the first round as history)
    child.expect(PROMPT)
    child.sendeof()  # Ctrl-D: quits, leaving the shell prompt on its own line
    child.expect(pexpect.EOF)
    assert child.before.startswith("\r\n")
    child.wait()
    assert child.exitstatus == 0


@pytest.mark.parametrize("argv, message", [
    (["--device", "gpu"], "--device 'gpu': not a device"),
    (["--image", "/no/such/photo.png"], "--image /no/such/photo.png: no such file"),
])
def test_errors_are_one_line_not_tracebacks(argv, message):
    run = subprocess.run([sys.executable, "-m", "cogvlm2.cli", "chat", "--query", "x", *argv], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 1
    assert message in run.stderr and "Traceback" not in run.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error():
    run = subprocess.run([sys.executable, "-m", "cogvlm2.cli", "chat", "--query", "x", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 1 and "CUDA is not available" in run.stderr and "Traceback" not in run.stderr


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cogvlm2.cli", *argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_web_with_a_dead_server_names_the_url():
    pytest.importorskip("gradio")
    run = _cli("web", "--server-url", "http://127.0.0.1:9/v1")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "cannot reach the server at http://127.0.0.1:9/v1/models" in run.stderr


def test_serve_on_a_busy_port_fails_before_loading_the_model():
    pytest.importorskip("fastapi")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        start = time.monotonic()
        run = _cli("serve", "--model", "/no/such/checkpoint", "--port", str(port))
    assert run.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in run.stderr  # the port, not the folder
    assert "Traceback" not in run.stderr and time.monotonic() - start < 60

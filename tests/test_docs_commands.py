"""Every shell block of README.md and docs/serving.md runs as written, against the embedded tiny models.

Each file's ```bash blocks run in order in one bash session (later blocks use the servers earlier ones
started), after these substitutions, which are the only liberties taken:

* the official checkpoints -> `tiny` / `tiny-video` (their names in requests too, consistently);
* ports 8000 / 8001 / 7860 -> free ports of this machine;
* `pip install` / `apt-get install` (the environment is already installed) and the test-suite commands
  (this test runs inside it) are dropped; `cogvlm2 serve` / `cogvlm2 web` go to the background, and the
  session waits until they say where they listen ("Running on http://..." for `web`);
* `photo.jpg` and `clip.mp4` are a synthetic-shapes picture and clip in the session's folder.

A block that cannot run on a CPU in a test's time is listed in SKIP with the reason; a new block must
run or be listed. Any failing command (set -e, -o pipefail) fails the test with the session's output.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("gradio")
if shutil.which("curl") is None or shutil.which("base64") is None:
    pytest.skip("needs curl and base64", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"THUDM/cogvlm2-llama3-chat-19B": "tiny", "THUDM/cogvlm2-video-llama3-chat": "tiny-video",
          "/models/cogvlm2-video-llama3-chat": "tiny-video", "THUDM/cogvlm2-llama3-caption": "tiny-video"}
SKIP = {  # first line of a block -> why it does not run here
    "python -m cogvlm2.finetune.toy data/colours --n 96":
        "minutes of CPU training; the same toy flow (finetune, chat --lora, merge-lora) is tests/test_finetune.py",
    "cogvlm2 caption photos/ -o captions.jsonl --model THUDM/cogvlm2-llama3-chat-19B":
        "needs the user's folders, tar shards and manifests; tests/test_caption.py captions each kind with tiny",
    "cogvlm2 caption clips/ -o captions.parquet --model THUDM/cogvlm2-llama3-caption --ray":
        "needs a Ray cluster",
    "python benchmarks/soak.py --clients 64 --seconds 180":
        "a three-minute soak benchmark (BENCHMARKS.md), not a test",
    "cogvlm2 serve --model THUDM/cogvlm2-llama3-chat-19B --tensor-parallel-size 2":
        "needs 2 GPUs; tests/test_engine_parallel.py runs the engine at TP=2 and PP=2 on the CPU",
    "cogvlm2 eval textvqa":
        "needs the benchmark data (not bundled, never downloaded); tests/test_eval.py runs each benchmark on fixtures",
}
SETUP = re.compile(r"^\s*(\w+=\S*\s+)*(pip install|apt-get|pytest|python -m pytest)\b")  # VAR=value prefixes too

PRELUDE = r"""
set -eo pipefail
cogvlm2() { "$PYTHON" -m cogvlm2.cli "$@"; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_for() {  # wait_for LOG PATTERN PORT: a background server's log says it started and PORT takes connections
  for _ in $(seq 1 600); do  # (uvicorn logs "startup complete" before it listens: a request may be refused between)
    if grep -q "$2" "$1" 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$3") 2>/dev/null; then return 0; fi
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || { cat "$1"; echo "server died"; return 1; }; done
    sleep 0.2
  done
  cat "$1"; echo "server did not start"; return 1
}
"""


def shell_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logical_lines(block: str) -> list[str]:
    """Backslash continuations joined; a heredoc stays one unit with its body."""
    out, lines, i = [], block.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        m = re.search(r"<<\s*'?(\w+)'?", line)
        if m:
            while i + 1 < len(lines) and lines[i].strip() != m.group(1):
                i += 1
                line += "\n" + lines[i]
        out.append(line)
        i += 1
    return out


def session(path: Path, ports: dict[str, str]) -> str:
    script, n = [PRELUDE], 0
    for block in shell_blocks(path):
        first = block.strip().splitlines()[0].split("  #")[0].strip()
        if any(first.startswith(k) or k in block for k in SKIP):
            continue
        for line in logical_lines(block):
            for official, tiny in MODELS.items():
                line = line.replace(official, tiny)
            for port, free in ports.items():
                line = re.sub(rf"\b{port}\b", free, line)
            line = re.sub(r"^((\w+=\S*\s+)*pip install [^&]*&&\s*)+", "", line)
            if SETUP.match(line) or not line.strip() or line.lstrip().startswith("#"):
                continue
            command = line.split("  #")[0].rstrip() if "<<" not in line else line
            if re.match(r"cogvlm2 (serve|web)\b", command):
                n += 1
                log = f"server{n}.log"
                ready = "Running on http" if command.startswith("cogvlm2 web") else "Application startup complete"
                if command.startswith("cogvlm2 serve") and "--port" not in command:
                    command += f" --port {ports['8000']}"
                if command.startswith("cogvlm2 web") and "--port" not in command:
                    command += f" --port {ports['7860']}"
                # the interpreter itself in the background (not the shell function: its subshell's PID is what $!
                # gives, and killing that subshell left the server running after the test)
                command = '"$PYTHON" -m cogvlm2.cli' + command[len("cogvlm2"):]
                port = re.search(r"--port (\d+)", command).group(1)
                script.append(f"{command} > {log} 2>&1 & PIDS+=($!)\nwait_for {log} '{ready}' {port}\n"
                              f"grep -h 'Running on' {log} || true")
            elif re.match(r"cogvlm2 chat\b", command) and "--query" not in command:
                script.append(f"{command} < /dev/null")  # interactive: Ctrl-D at once
            else:
                script.append(command)
    return "\n".join(script) + "\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from cogvlm2.tiny import shapes

    d = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "assets", d / "assets")
    shapes.render_shapes(shapes.EXAMPLE).convert("RGB").save(d / "photo.jpg", quality=95)
    shapes.write_video(shapes.render_video_frames([shapes.Shape("square", "blue", (0, 1), "down")]),
                       d / "clip.mp4")
    return d


@pytest.mark.parametrize("doc", ["README.md", "docs/serving.md"])
def test_every_shell_block_runs(doc, workdir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "COGVLM2_API_KEY": ""}
    for _ in range(3):  # a free port can be taken by another process before the server binds it: new ports
        for log in workdir.glob("server*.log"):
            log.unlink()
        ports = {p: str(free_port()) for p in ("8000", "8001", "7860")}
        script = session(ROOT / doc, ports)
        run = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=900)
        logs = {log.name: log.read_text(errors="replace") for log in sorted(workdir.glob("server*.log"))}
        if run.returncode == 0 or not any("Address already in use" in text for text in logs.values()):
            break
    report = f"--- script\n{script}\n--- stdout\n{run.stdout[-6000:]}\n--- stderr\n{run.stderr[-6000:]}" + "".join(
        f"\n--- {name}\n{text[-3000:]}" for name, text in logs.items())
    assert run.returncode == 0, report
    assert "Traceback" not in run.stderr, report
    if doc == "README.md":  # the first command's answer, and the server's
        assert "\nTwo red circles.\n" in run.stdout, report
    assert f"Running on http://127.0.0.1:{ports['7860']}" in run.stdout, report  # the web app says where it is


def test_every_block_is_run_or_listed():
    """SKIP names only blocks that exist (a renamed block must be looked at again)."""
    text = (ROOT / "README.md").read_text() + (ROOT / "docs/serving.md").read_text()
    assert all(k in text for k in SKIP)

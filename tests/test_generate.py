"""`cogvlm2 generate`: JSONL prompts -> rows streamed as they finish, error rows, resume, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from cogvlm2.cli import main
from cogvlm2.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--max-new-tokens", "5", "--temperature", "0", "--no-progress"]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_rows_errors_and_resume(tmp_path, capsys):
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "green.png")
    lines = [json.dumps("Hello"),
             json.dumps({"id": "café-1", "query": "What colour?", "image": "green.png"}, ensure_ascii=False),
             json.dumps({"query": "And now?", "history": [["Hi", "Hello!"]]}),
             "{not json",
             json.dumps({"qurey": "typo"}),
             json.dumps({"query": "Where?", "image": "missing.png"}),
             json.dumps({"query": "Text", "history": "no"}),
             json.dumps({"id": "café-1", "query": "Same id again"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(tmp_path / "in.jsonl"), "-o", str(out), *FAST]) == 0
    assert "café-1" in out.read_text(encoding="utf-8")  # non-ASCII written as is
    rows = {r["id"]: r for r in rows_of(out)}
    assert sorted(map(str, rows)) == sorted(["1", "café-1", "3", "4", "5", "6", "7"])
    for ok in (1, "café-1", 3):
        assert rows[ok]["error"] is None and 1 <= len(rows[ok]["token_ids"]) <= 5
        assert rows[ok]["finish_reason"] in ("stop", "length")
    assert rows["café-1"]["image"] == "green.png" and rows["café-1"]["line"] == 2
    assert rows["café-1"]["prompt_tokens"] > tiny_config("tiny").vision.tokens_per_image  # the image's vision tokens
    assert "invalid JSON" in rows[4]["error"] and rows[4]["line"] == 4
    assert "unknown key 'qurey'" in rows[5]["error"] and "allowed: id, query" in rows[5]["error"]
    assert "missing.png" in rows[6]["error"] and rows[6]["image"] == "missing.png" and rows[6]["text"] is None
    assert "history" in rows[7]["error"]
    err = capsys.readouterr().err
    assert "3 done, 0 skipped (already in the output), 1 duplicate ids ignored, 4 failed" in err and "tokens/s" in err

    before = out.read_bytes()
    assert main(["generate", str(tmp_path / "in.jsonl"), "-o", str(out), *FAST]) == 0
    assert out.read_bytes() == before
    assert "0 done, 8 skipped" in capsys.readouterr().err


def test_generate_to_stdout(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('"Hi"\n{"id": "b", "query": "Yo"}\n')
    assert main(["generate", str(tmp_path / "in.jsonl"), *FAST]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(str(r["id"]) for r in rows) == ["1", "b"] and all(r["error"] is None for r in rows)


def wait_for_rows(path: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} rows in {path} (exit code {proc.poll()})")


def test_generate_kill_and_resume(tmp_path):
    n = 24
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "query": f"Count to {i}."}) + "\n"
                                               for i in range(n)))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "cogvlm2.cli", "generate", str(tmp_path / "in.jsonl"), "-o", str(out),
           "--device", "cpu", "--temperature", "0", "--max-new-tokens", "24", "--max-num-seqs", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    wait_for_rows(out, proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"id": "p23", "text": "cut by the ki')  # what a kill in the middle of a write leaves
    first = [r["id"] for r in rows_of_complete(out)]
    assert 2 <= len(first) < n
    assert main(cmd[3:] + ["--max-num-seqs", "8"]) == 0  # the same command (in this process: faster), resumed
    ids = [r["id"] for r in rows_of(out)]
    assert len(ids) == len(set(ids)) == n and ids[:len(first)] == first
    assert all(r["error"] is None for r in rows_of(out))


def rows_of_complete(path: Path) -> list[dict]:
    data = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in data[:data.rfind("\n") + 1].splitlines()]

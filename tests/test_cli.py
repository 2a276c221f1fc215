"""`cogvlm2 chat`: a scripted session through stdin (text-only turn, image turn, clear) and one-shot use."""

import io
import subprocess
import sys
from pathlib import Path

from PIL import Image

from cogvlm2.cli import build_parser, run_chat


def _session(script: str, *argv: str) -> str:
    args = build_parser().parse_args(["chat", "--max-new-tokens", "6", "--temperature", "0", *argv])
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO(script), stdout=out) == 0
    return out.getvalue()


def test_scripted_session(tmp_path):
    img = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (255, 0, 0)).save(img)
    script = "\nHello?\nAnd then?\nclear\n" + f"{img}\nWhat is in the image?\nclear\n/no/such/file.png\n"
    out = _session(script)
    # two text-only turns, a second conversation with an image, then a bad path reported without crashing
    assert out.count("CogVLM2: ") == 3
    assert out.count("image path (Enter for text only) >>>>> ") == 4
    assert "error: cannot open image" in out
    answers = [line.split("CogVLM2: ", 1)[1] for line in out.splitlines() if "CogVLM2: " in line]
    assert all(a.strip() for a in answers)
    # History matters: the second text turn differs from asking it fresh.
    fresh = _session("\nAnd then?\n")
    assert fresh.split("CogVLM2: ", 1)[1].splitlines()[0] != answers[1]


def test_one_shot_subprocess(tmp_path):
    img = tmp_path / "blue.jpg"
    Image.new("RGB", (30, 30), (0, 0, 255)).save(img)
    run = subprocess.run([sys.executable, "-m", "cogvlm2.cli", "chat", "--query", "Describe.", "--image", str(img),
                          "--max-new-tokens", "5", "--temperature", "0"], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "synthetic" in run.stderr
    bad = subprocess.run([sys.executable, "-m", "cogvlm2.cli", "chat", "--query", "x", "--model", "/no/such/dir"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert bad.returncode == 1 and "no such folder" in bad.stderr

"""`cogvlm2 chat`: a scripted session through stdin (text-only turn, image turn, clear) and one-shot use."""

import io
import re
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


def test_scripted_session(tmp_path, monkeypatch):
    import cogvlm2.generation as generation

    prompts, stream = [], generation.stream_text

    def recording(model, tokenizer, inputs, params):
        prompts.append(inputs.prompt_text)
        return stream(model, tokenizer, inputs, params)

    monkeypatch.setattr(generation, "stream_text", recording)
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
    # History matters: the second text turn's prompt holds the first round.
    assert prompts[1].count("Question: ") == 2 and "Hello?" in prompts[1] and "Hello?" not in prompts[2]


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


def test_every_model_flag_names_the_embedded_models():
    """`--model` in every sub-command's --help lists the three embedded models, as the user sees it (wrapped)."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    with_model = {name: p for name, p in commands.items() if any("--model" in a.option_strings for a in p._actions)}
    assert {"chat", "serve", "web", "generate", "caption", "eval", "finetune", "merge-lora"} <= set(with_model)
    for name, p in with_model.items():
        text = re.sub(r"-\s+", "-", " ".join(p.format_help().split()))  # argparse wraps after hyphens
        model_help = text.split("--model MODEL", 2)[-1]  # the options section's entry, not the usage line
        for embedded in ("'tiny'", "'tiny-video'", "'tiny-random'"):
            assert embedded in model_help.split(" --", 1)[0], f"`cogvlm2 {name} --help`: --model lacks {embedded}"

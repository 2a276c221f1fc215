"""`cogvlm2 generate`: JSONL prompts (text, image path) -> JSONL outputs through the engine."""

from __future__ import annotations

import json

from PIL import Image

from cogvlm2.cli import main


def test_generate_jsonl(tmp_path, capsys):
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "green.png")
    prompts = ["Hello", {"query": "What colour?", "image": "green.png"},
               {"query": "And now?", "history": [["Hi", "Hello!"]]}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(tmp_path / "in.jsonl"), "-o", str(out), "--device", "cpu", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(len(r["token_ids"]) <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert rows[1]["prompt_tokens"] > 18  # the image's vision tokens
    assert "tokens/s" in capsys.readouterr().err

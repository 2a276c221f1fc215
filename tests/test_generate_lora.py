"""`cogvlm2 generate --lora`: items pick a LoRA adapter by their "adapter" key, or get the run's default; rows say
which one answered, and each answer is the engine's for that adapter. `caption --lora` captions with one adapter."""

from __future__ import annotations

import json

import pytest
from PIL import Image

pytest.importorskip("peft")

import cogvlm2  # noqa: E402
from cogvlm2.cli import main  # noqa: E402
from cogvlm2.llm import LLM  # noqa: E402
from cogvlm2.sampling_params import SamplingParams  # noqa: E402
from test_engine_lora import make_adapter  # noqa: E402

FAST = ["--device", "cpu", "--max-new-tokens", "6", "--temperature", "0", "--no-progress"]
QUERY = "Tell me a joke."
GREEDY = SamplingParams(max_new_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(root / "a", 1, r=4, alpha=8), "b": make_adapter(root / "b", 2, r=8, alpha=16)}


@pytest.fixture(scope="module")
def llm(adapters):
    return LLM("tiny", "float32", "cpu", adapters=adapters)


@pytest.fixture(scope="module")
def expected(llm):
    """Each adapter's (and the base model's) greedy answer token ids, from the engine directly."""
    prompt = llm.engine.processor(QUERY)
    return {name: llm.generate([prompt], GREEDY, use_tqdm=False, adapter=name)[0].token_ids
            for name in (None, "a", "b")}


def test_items_select_adapters(adapters, expected, tmp_path, capsys):
    lines = [{"id": "default", "query": QUERY}, {"id": "base", "query": QUERY, "adapter": None},
             {"id": "a", "query": QUERY, "adapter": "a"}, {"id": "b", "query": QUERY, "adapter": "b"},
             {"id": "unknown", "query": QUERY, "adapter": "c"}, {"id": "typed", "query": QUERY, "adapter": 3}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    lora = ["--lora", f"a={adapters['a']}", "--lora", f"b={adapters['b']}"]
    assert main(["generate", str(tmp_path / "in.jsonl"), "-o", str(out), *lora, "--adapter", "b", *FAST]) == 0
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for item, adapter in (("default", "b"), ("base", None), ("a", "a"), ("b", "b")):
        assert rows[item]["error"] is None and rows[item]["adapter"] == adapter
        assert rows[item]["token_ids"] == expected[adapter], item
    assert expected["a"] != expected[None] and expected["b"] != expected[None]  # the adapters matter
    assert "unknown LoRA adapter 'c'; loaded: a, b" in rows["unknown"]["error"]
    assert "'adapter' must be a --lora adapter's name or null" in rows["typed"]["error"]
    assert "4 done" in capsys.readouterr().err

    # one --lora: items that name none use it; --adapter must name a --lora adapter, checked before loading
    one = tmp_path / "one.jsonl"
    assert main(["generate", str(tmp_path / "in.jsonl"), "-o", str(one), "--lora", f"a={adapters['a']}", *FAST]) == 0
    rows = {r["id"]: r for r in map(json.loads, one.read_text().splitlines())}
    assert rows["default"]["adapter"] == "a" and rows["default"]["token_ids"] == expected["a"]
    assert "unknown LoRA adapter 'b'; loaded: a" in rows["b"]["error"]
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "in.jsonl"), "--adapter", "z", *lora, *FAST]) == 1
    assert "--adapter z: no such --lora adapter; given: a, b" in capsys.readouterr().err


def test_caption_with_an_adapter(adapters, llm, tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(tmp_path / "images" / "red.png")
    out = tmp_path / "captions.jsonl"
    assert main(["caption", str(tmp_path / "images"), "-o", str(out), "--lora", f"a={adapters['a']}",
                 "--prompt", QUERY, *FAST]) == 0
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["error"] is None and row["model"] == "tiny+a"
    want = llm.generate([llm.engine.processor(QUERY, image=Image.open(tmp_path / "images" / "red.png"))],
                        GREEDY, use_tqdm=False, adapter="a")[0]
    assert row["caption"] == want.text.strip() and row["tokens"] == len(want.token_ids)
    with pytest.raises(ValueError, match="adapter 'b': pass its folder"):
        cogvlm2.caption([str(tmp_path / "images" / "red.png")], "tiny", adapter="b", device="cpu")

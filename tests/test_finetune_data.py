"""Fine-tuning data: validation of both layouts (errors name the file), turn sampling, data order, packing."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from cogvlm2.finetune import cli  # noqa: E402
from cogvlm2.finetune.data import DataError, load_conversations  # noqa: E402
from cogvlm2.finetune.dataset import EpochOrder, FinetuneDataset, sample_turn  # noqa: E402
from cogvlm2.finetune.objective import CausalLMLoss  # noqa: E402
from cogvlm2.finetune.packing import pack  # noqa: E402
from cogvlm2.finetune.toy import colour_image, make_colour_dataset  # noqa: E402
from cogvlm2.model import load_model  # noqa: E402
from cogvlm2.processing import Processor  # noqa: E402
from cogvlm2.tiny import checkpoint_folder, tiny_config  # noqa: E402

CONFIG = tiny_config("tiny")
USER, BOT = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


@pytest.fixture
def official(tmp_path):
    return make_colour_dataset(tmp_path / "ds", n=6)


def test_reads_both_layouts(official, tmp_path):
    convs = load_conversations(official, CONFIG)
    assert len(convs) == 6 and all(c.image.is_file() and len(c.turns) == 1 for c in convs)
    manifest = make_colour_dataset(tmp_path / "m.jsonl", n=4, multi_turn=True)
    convs = load_conversations(manifest, CONFIG)
    assert [len(c.turns) for c in convs] == [1, 2, 1, 2]
    assert convs[1].turns[0] == ("What colour is the background?", "grey")
    assert convs[0].image == tmp_path / "m_images" / "00000.jpg"


@pytest.mark.parametrize("case, content, expect", [
    ("empty", {"conversations": []}, "empty conversation"),
    ("odd", {"conversations": [msg(USER, "q"), msg(BOT, "a"), msg(USER, "q2")]}, "odd number of messages"),
    ("order", {"conversations": [msg(BOT, "a"), msg(USER, "q")]}, "must have role 'user'"),
    ("twice", {"conversations": [msg(USER, "q"), msg(USER, "q")]}, "must have role 'assistant'"),
    ("blank", {"conversations": [msg(USER, "q"), msg(BOT, "  ")]}, "no text content"),
    ("nolist", {"text": "hi"}, "no 'conversations'"),
    ("badjson", "{not json", "unreadable JSON"),
])
def test_bad_label_file_is_named(official, case, content, expect):
    bad = official / "labels_en" / "00003.json"
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=expect) as e:
        load_conversations(official, CONFIG)
    assert str(bad) in str(e.value)


def test_missing_and_unreadable_images_are_named(official):
    (official / "images" / "00001.jpg").unlink()
    (official / "images" / "00002.jpg").write_bytes(b"not an image")
    (official / "images" / "extra.png").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_conversations(official, CONFIG)
    text = str(e.value)
    assert "3 problem(s)" in text  # every problem reported at once, not just the first
    assert "00001.json: missing image" in text
    assert "unreadable image" in text and "00002.jpg" in text
    assert "extra.png: image without a label file" in text


def test_manifest_problems_name_file_and_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    colour_image("red", random.Random(0)).save(tmp_path / "ok.jpg")
    conv = [msg(USER, "q"), msg(BOT, "a")]
    lines = [json.dumps({"image": "ok.jpg", "conversations": conv}),
             json.dumps({"image": "missing.jpg", "conversations": conv}),
             "{broken",
             json.dumps({"image": "ok.jpg", "messages": conv[:1]}),
             json.dumps({"video": "ok.jpg", "conversations": conv})]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations(manifest, CONFIG)
    text = str(e.value)
    assert f"{manifest}:2: missing image" in text
    assert f"{manifest}:3: unreadable JSON" in text
    assert f"{manifest}:4: odd number of messages" in text
    assert f"{manifest}:5: has a video but the checkpoint is an image model" in text
    assert ":1:" not in text


def test_cli_rejects_bad_data_before_training(official, tmp_path, capsys):
    bad = official / "labels_en" / "00004.json"
    bad.write_text(json.dumps({"conversations": [msg(USER, "only a question")]}))
    out = tmp_path / "run"
    rc = cli.main(["finetune", "--model", "tiny", "--data", str(official), "--output", str(out),
                   "--max-steps", "1", "--num-workers", "0", "--no-progress"])
    assert rc == 1
    assert str(bad) in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists() and not (out / "adapter").exists()
    assert cli.main(["finetune", "--model", "tiny", "--data", str(tmp_path / "nope"), "--output", str(out),
                     "--validate-only"]) == 1


def test_validate_only(official, capsys):
    assert cli.main(["finetune", "--model", "tiny", "--data", str(official), "--output", "unused",
                     "--validate-only"]) == 0
    assert "ok: 6 conversations" in capsys.readouterr().out


def test_sample_turn_follows_the_official_rule():
    turns = [(f"q{i}", f"a{i}") for i in range(4)]
    rng = random.Random(0)
    seen = Counter()
    for _ in range(4000):
        past, q, a = sample_turn(turns, rng, "official")
        k = int(q[1:])
        assert a == f"a{k}" and past in ([], [turns[k - 1]])
        seen[(k, bool(past))] += 1
    assert seen[(0, True)] == 0  # round 0 never has history
    for k in range(4):
        assert 850 < sum(seen[(k, h)] for h in (False, True)) < 1150  # k uniform
    for k in range(1, 4):
        assert 0.4 < seen[(k, True)] / (seen[(k, True)] + seen[(k, False)]) < 0.6  # history half the time
    past, q, _ = sample_turn(turns, random.Random(1), "full")
    assert past == turns[:int(q[1:])]
    assert sample_turn(turns, random.Random(1), "none")[0] == []


def test_epoch_order_is_deterministic_and_sharded():
    orders = [EpochOrder(23, 2, seed=5, rank=r, world_size=3) for r in range(3)]
    assert orders[0].batches_per_epoch == 3  # 23 // (2 * 3): the tail is dropped
    ep = [o.epoch(1) for o in orders]
    flat = [i for batches in ep for b in batches for _, i in b]
    assert len(flat) == len(set(flat)) == 18  # disjoint across ranks
    assert ep[0] == EpochOrder(23, 2, seed=5, rank=0, world_size=3).epoch(1)
    assert ep[0] != orders[0].epoch(2)
    stream = orders[1].stream(4)  # micro-batch 4 = epoch 1, offset 1
    assert next(stream) == (1, ep[1][1])
    with pytest.raises(ValueError):
        EpochOrder(3, 2, seed=0, world_size=2)


@pytest.fixture(scope="module")
def tiny():
    model = load_model(checkpoint_folder("tiny"), progress=False)
    return model, Processor.from_pretrained(model.checkpoint_path, model.config)


def test_pack_layout(tiny):
    model, proc = tiny
    rng = random.Random(0)
    xs = [proc("What colour?", image=colour_image("red", rng), answer="red"),
          proc("Hi", [("a", "b")], answer="hello there"),
          proc("And?", image=colour_image("blue", rng), answer="blue")]
    b = pack(xs)
    lens = [len(x) for x in xs]
    assert b.cu_seqlens.tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert b.positions.tolist() == sum((x.position_ids for x in xs), [])
    assert b.pixel_values.shape == (2, 3, 112, 112)
    assert b.embed_idx.numel() == 2 * model.config.vision.tokens_per_image
    offsets = [0, lens[0], lens[0] + lens[1]]
    want = [(o + t - 1, x.labels[t]) for o, x in zip(offsets, xs) for t in range(len(x)) if x.labels[t] != -100]
    assert list(zip(b.target_idx.tolist(), b.target_ids.tolist())) == want
    routed = [i for a, e in b.expert_segments for i in range(a, e)]
    assert len(routed) == 2 * (model.config.vision.tokens_per_image - 1)  # boi + patches, not eoi
    assert routed == [offsets[k] + i for k, x in enumerate(xs) for i, v in enumerate(x.vision_expert_mask) if v]
    with pytest.raises(ValueError, match="labels"):
        pack([proc("q")])


def test_packed_loss_equals_separate_losses(tiny):
    model, proc = tiny
    rng = random.Random(1)
    xs = [proc("What colour?", image=colour_image(c, rng), answer=c) for c in ("red", "green")]
    xs.append(proc("Text only", [("q", "a")], answer="fine"))
    loss = CausalLMLoss(model)
    with torch.no_grad():
        packed = loss(pack(xs))
        separate = sum(loss(pack([x])) for x in xs)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-4)


def test_dataset_items_are_deterministic(official, tiny):
    _, proc = tiny
    convs = load_conversations(make_colour_dataset(official.parent / "mt.jsonl", n=6, multi_turn=True), CONFIG)
    ds = FinetuneDataset(convs, proc, seed=3)
    assert ds[(0, 1)][0].input_ids == ds[(0, 1)][0].input_ids
    assert ds[(0, 1)][1] == "fit"
    assert ds[(0, 0)][0].labels[-2:] != [-100, -100]  # answer + EOS are labelled
    variants = {tuple(ds[(e, 1)][0].input_ids) for e in range(12)}
    assert len(variants) > 1  # the sampled round / history changes with the epoch


def test_save_state_hook_tolerates_backends_that_save_models_themselves():
    """FSDP / DeepSpeed hand accelerate's pre-hook the models but no weights (they write sharded
    states themselves); the hook must leave that alone instead of indexing past the list."""
    import torch

    from cogvlm2.finetune.checkpointing import keep_only_trainable

    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    weights: list[dict] = []
    keep_only_trainable([model], weights, "unused")
    assert weights == []
    weights = [dict(model.state_dict())]
    keep_only_trainable([model], weights, "unused")
    assert set(weights[0]) == {"weight"}

"""The model against the official implementation's outputs: every case under $COGVLM2_GOLDEN_DIR.

Each model folder there holds config.json + a gzip-compressed official-format safetensors file; we
write an official checkpoint folder from it and load it through the real loader.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch

from cogvlm2.generation import generate_ids
from cogvlm2.model import load_model
from cogvlm2.model.attention import PaddedKVCache
from cogvlm2.model.batch import ForwardBatch, flatten
from cogvlm2.processing.image import load_image, transform_image
from cogvlm2.processing.prompt import build_inputs
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path
from cogvlm2.processing.detokenizer import IncrementalDetokenizer
from cogvlm2.processing.image import CLIP_STD
from cogvlm2.processing.video import decode_video, probe_video, select_frame_indices, transform_video
from cogvlm2.sampling_params import SamplingParams

GOLDEN = Path(os.environ.get("COGVLM2_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))
VOCAB = 128256
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def _cases() -> list[str]:
    if not GOLDEN.is_dir():
        return []
    return sorted(
        f"{p.parent.name}/{p.stem}"
        for p in GOLDEN.glob("*/*.json")
        if p.name not in ("config.json", "weights_index.json") and (p.parent / "config.json").is_file()
    )


CASES = _cases()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(model, tokenizer) per (model folder, checkpoint file, dtype, device), loaded through the real loader."""
    cache = {}

    def get(name: str, device: str = "cpu", checkpoint: str = "model.safetensors.gz", dtype: str = "float32"):
        key = (name, checkpoint, dtype, device)
        if key not in cache:
            folder = tmp_path_factory.mktemp(name)
            shutil.copyfile(GOLDEN / name / "config.json", folder / "config.json")
            with gzip.open(GOLDEN / name / checkpoint) as src, open(folder / "model.safetensors", "wb") as dst:
                shutil.copyfileobj(src, dst)
            shutil.copyfile(bundled_tokenizer_path(), folder / "tokenizer.json")
            cache[key] = (load_model(str(folder), dtype=dtype, device=device, progress=False), Tokenizer(folder))
        return cache[key]

    return get


def _pixels_of(meta: dict, ref: dict, image_size: int) -> torch.Tensor | None:
    """Pixels as our processing makes them from the case's input file; frame choice and decoded frames of a
    video file checked against the official `load_video` on the way."""
    if meta.get("has_image"):
        return transform_image(load_image(GOLDEN / meta.get("image_file", "image.png")), image_size)[0]
    if not meta.get("has_video"):
        return None
    source = GOLDEN / meta.get("video_file", "video_uint8_CTHW.npy")
    if source.suffix == ".npy":
        return transform_video(torch.from_numpy(np.load(source)), image_size)
    strategy = meta.get("frame_strategy", meta["template_version"])
    info = probe_video(source)
    if "frame_timestamps" in ref:
        np.testing.assert_allclose(info.timestamps, ref["frame_timestamps"][:, 0], rtol=0, atol=1e-6)
    if "frame_ids" in ref:
        assert select_frame_indices(info.timestamps, info.avg_fps, strategy) == ref["frame_ids"].tolist()
    frames = decode_video(source, strategy)
    if "frames_uint8" in ref:
        assert torch.equal(frames, torch.from_numpy(ref["frames_uint8"]))
    return transform_video(frames, image_size)


def _check_pixels(ours: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Exact (1e-6) under the Pillow the golden set was made with (13+). An older Pillow rounds bicubic
    resizing differently by exactly one level on some pixels: allowed there, and only there, after which
    the model is fed the reference pixels so that everything downstream is still checked exactly."""
    diff = (ours - expected).abs()
    if diff.max() <= 1e-6:
        return ours
    assert PILLOW_MAJOR < 13, f"pixel values differ by {diff.max():.3g} under Pillow {PIL.__version__}"
    levels = diff * torch.tensor(CLIP_STD).view(-1, 1, 1) * 255  # per channel: one level = 1/255/std
    assert (levels - levels.round()).abs().max() < 1e-3 and levels.round().max() <= 1, \
        f"pixels differ by more than one level under Pillow {PIL.__version__}"
    return expected


def _inputs(model, tok, meta: dict, ref: dict | None = None):
    cfg = model.config
    pixels = _pixels_of(meta, ref or {}, cfg.vision.image_size)
    history = [tuple(turn) for turn in meta.get("history", [])]
    return build_inputs(tok, cfg, meta["query"], history, pixels, template=meta["template_version"])


def _full(stored: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    out = torch.zeros(*stored.shape[:-1], VOCAB)
    out[..., torch.from_numpy(ids)] = torch.from_numpy(stored.astype(np.float32))
    return out


def _check_decode(model, inputs, ref: dict, batch_axis: bool):
    step_logits = []
    steps = list(generate_ids(model, inputs, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True),
                              output_logits=step_logits))
    generated = torch.tensor(steps).T  # [B, 16]
    expected = torch.from_numpy(ref["generated_ids"]).reshape(len(inputs), -1)
    assert torch.equal(generated, expected), f"generated {generated.tolist()} != {expected.tolist()}"
    logits = torch.stack(step_logits, dim=1).cpu()  # [B, 16, V]
    ref_logits = _full(ref["decode_step_logits"], ref["logits_vocab_ids"]).reshape(logits.shape)
    assert (logits - ref_logits).abs().max() <= 1e-4


def _prefill(model, x, pixels: torch.Tensor | None, device: str, hidden_states: bool):
    """One full-prompt forward pass with a fresh cache: (vision features, hidden states, logits [L, V], cache)."""
    cfg = model.config
    feats = embeds = None
    if pixels is not None:
        feats = model.encode_images(pixels.to(device))
        embeds = feats.reshape(-1, feats.shape[-1])
    cache = PaddedKVCache(1, cfg.num_hidden_layers)
    cache.begin_step(torch.ones(1, len(x), dtype=torch.bool, device=device))
    batch = flatten([x.span()]).to_batch(cache, embeds, device)
    if hidden_states:
        final, hidden = model(batch, output_hidden_states=True)
    else:
        final, hidden = model(batch), None
    return feats, hidden, model.compute_logits(final), cache


def _teacher_forced(model, x, logits: torch.Tensor, cache, forced: list[int], device: str) -> torch.Tensor:
    """Decode-step logits [len(forced), V] when the stored ids are fed back one at a time (KV cache)."""
    rows, position = [logits[-1]], x.next_position
    for token in forced[:-1]:
        cache.begin_step(torch.ones(1, 1, dtype=torch.bool, device=device))
        step = ForwardBatch(torch.tensor([token], device=device), torch.tensor([position], device=device), cache)
        rows.append(model.compute_logits(model(step))[-1])
        position += 1
    return torch.stack(rows).cpu()


def _check_bf16_case(model, x, pixels, ref: dict, meta: dict, device: str):
    """A bfloat16 run against the official bfloat16 run: the tolerances the case itself documents
    (`suggested_tolerance`, calibrated on equivalent and non-equivalent paths of the official code)."""
    tol = meta["suggested_tolerance"]
    _, _, logits, cache = _prefill(model, x, pixels, device, hidden_states=False)
    logits = logits.cpu()
    expected = _full(ref["prefill_logits"], ref["logits_vocab_ids"])
    assert (logits - expected).abs().max() <= tol["prefill_logits_max_abs_diff"]
    assert (logits[-1] - expected[-1]).abs().max() <= tol["prefill_logits_last_row_max_abs_diff"]
    forced = ref["generated_ids"].tolist()
    steps = _teacher_forced(model, x, logits.to(device), cache, forced, device)
    expected_steps = _full(ref["decode_step_logits"], ref["logits_vocab_ids"])
    assert (steps - expected_steps).abs().max() <= tol["decode_step_logits_teacher_forced_max_abs_diff"]
    gaps = meta["decode_top1_top2_gaps"]
    decided = [i for i, gap in enumerate(gaps) if gap >= 0.25]  # the rule of `suggested_tolerance["generated_ids"]`
    assert [int(steps[i].argmax()) for i in decided] == [forced[i] for i in decided]


@pytest.mark.skipif(not CASES, reason=f"no golden cases under {GOLDEN}")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_golden_case(case: str, device: str, models):
    """Every case in the model dtype it names (float32 unless `model_dtype` says otherwise), on every
    available device (on CUDA with TF32 off: the float32 tolerances are float32's)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model_name, case_name = case.split("/")
    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    ref = dict(np.load(GOLDEN / f"{case}.npz"))
    dtype = meta.get("model_dtype", "float32")
    model, tok = models(model_name, device, meta.get("checkpoint", "model.safetensors.gz"), dtype)

    if "members" in meta:  # a right-padded batch of other cases of the same model
        inputs = [_inputs(model, tok, json.loads((GOLDEN / model_name / f"{m}.json").read_text()))
                  for m in meta["members"]]
        for row, x in enumerate(inputs):
            n = len(x)
            assert x.input_ids == ref["input_ids"][row, :n].tolist()
            assert (ref["attention_mask"][row, n:] == 0).all() and (ref["attention_mask"][row, :n] == 1).all()
            assert x.position_ids == ref["position_ids"][row, :n].tolist()
            assert x.token_type_ids == ref["token_type_ids"][row, :n].tolist()
            x.pixel_values = _check_pixels(x.pixel_values, torch.from_numpy(ref["pixel_values"][row]).unsqueeze(0))
        _check_decode(model, inputs, ref, batch_axis=True)
        return

    x = _inputs(model, tok, meta, ref)
    assert x.input_ids == ref["input_ids"].tolist()
    assert x.token_type_ids == ref["token_type_ids"].tolist()
    assert x.position_ids == ref["position_ids"].tolist()
    pixels = x.pixel_values
    if "pixel_values" in ref:
        pixels = x.pixel_values = _check_pixels(pixels, torch.from_numpy(ref["pixel_values"]).reshape(pixels.shape))
    if dtype != "float32":
        _check_bf16_case(model, x, pixels, ref, meta, device)
        return

    with torch.no_grad():
        feats, hidden, logits, _ = _prefill(model, x, pixels, device, hidden_states="hidden_states" in ref)
    if "vision_features" in ref:
        expected_feats = torch.from_numpy(ref["vision_features"]).reshape(feats.shape)
        assert (feats.cpu() - expected_feats).abs().max() <= 1e-5
    if hidden is not None:
        assert (torch.stack(hidden).cpu() - torch.from_numpy(ref["hidden_states"])).abs().max() <= 1e-4
    logits = logits.cpu()
    if "prefill_logits" in ref:
        assert (logits - _full(ref["prefill_logits"], ref["logits_vocab_ids"])).abs().max() <= 1e-4
    else:  # long video prompts store the language rows only
        rows = torch.from_numpy(ref["prefill_logits_language_rows"])
        assert (logits[rows] - _full(ref["prefill_logits_language"], ref["logits_vocab_ids"])).abs().max() <= 1e-4
    _check_decode(model, [x], ref, batch_axis=False)


def test_golden_set_present():
    """The default golden set ships with the repository's workspace; make its absence loud."""
    if "COGVLM2_GOLDEN_DIR" not in os.environ and not GOLDEN.is_dir():
        pytest.skip("no golden set beside this checkout")
    assert CASES, f"{GOLDEN} holds no cases"


ROTARY_CASES = [c for c in CASES if "rotary_as_computed" in json.loads((GOLDEN / f"{c}.json").read_text())]


@pytest.mark.skipif(not ROTARY_CASES, reason=f"no golden case under {GOLDEN} documents its rotary table")
@pytest.mark.parametrize("case", ROTARY_CASES)
def test_golden_rotary_table(case: str, models):
    """The frequencies come from the checkpoint's buffer, held in the model dtype as the official buffer is,
    and a bf16 model rounds its positions as the official bf16 model does; rope_mode="exact" is different."""
    model_name, _ = case.split("/")
    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    rotary = meta["rotary_as_computed"]
    dtype = getattr(torch, meta.get("model_dtype", "float32"))
    model, _ = models(model_name, "cpu", meta.get("checkpoint", "model.safetensors.gz"), meta.get("model_dtype", "float32"))
    table = model.rotary.inv_freq(torch.device("cpu"), dtype)
    assert table.dtype == getattr(torch, rotary["inv_freq_buffer_dtype_in_model"])
    assert table.float().tolist() == rotary["inv_freq_values"]
    rounded = rotary.get("bf16_position_values_from_257")
    if rounded:
        positions = torch.tensor([p for p, _ in rounded])
        assert positions.to(table.dtype).float().tolist() == [v for _, v in rounded]
    exact = type(model.rotary)(model.config)
    exact.set_frequencies(None, "exact")
    assert exact.inv_freq(torch.device("cpu"), dtype).tolist() == pytest.approx(rotary["inv_freq_exact_fp32_values"], rel=1e-7)
    assert not torch.equal(exact.inv_freq(torch.device("cpu"), dtype).float(), table.float())


DECODE = json.loads((GOLDEN / "decode.json").read_text()) if (GOLDEN / "decode.json").is_file() else None


@pytest.mark.skipif(DECODE is None, reason=f"no decode.json under {GOLDEN}")
@pytest.mark.parametrize("entry", DECODE["sequences"] if DECODE else [], ids=lambda e: e["name"])
def test_golden_decode(entry: dict):
    """Decoded text as the official tokenizer returns it (its clean-up rule included), and streamed text
    that adds up to the same string: a space the clean-up removes is never emitted early (the official
    streamer, which does emit it, is the one that differs: `stream_text` there)."""
    tok = Tokenizer(bundled_tokenizer_path(), clean_up_tokenization_spaces=DECODE["tokenizer"]["clean_up_tokenization_spaces"])
    ids = entry["ids"]
    assert tok.decode(ids) == entry["decode_skip_special"]
    assert tok.decode(ids, skip_special_tokens=False) == entry["decode_keep_special"]
    assert tok.decode(ids, clean_up=False) == entry["decode_skip_special_no_cleanup"]
    for skip, expected in ((True, entry["decode_skip_special"]), (False, entry["decode_keep_special"])):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        deltas = [detok.push(i) for i in ids] + [detok.flush()]
        assert "".join(deltas) == expected == detok.text

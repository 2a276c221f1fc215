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
import pytest
import torch

from cogvlm2.generation import generate_ids
from cogvlm2.model import load_model
from cogvlm2.model.attention import PaddedKVCache
from cogvlm2.model.batch import ForwardBatch, expert_indices
from cogvlm2.processing.image import load_image, transform_image
from cogvlm2.processing.prompt import build_inputs
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path
from cogvlm2.processing.video import transform_video
from cogvlm2.sampling_params import SamplingParams

GOLDEN = Path(os.environ.get("COGVLM2_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))
VOCAB = 128256


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
    cache = {}

    def get(name: str, device: str = "cpu"):
        if (name, device) not in cache:
            folder = tmp_path_factory.mktemp(name)
            shutil.copyfile(GOLDEN / name / "config.json", folder / "config.json")
            with gzip.open(GOLDEN / name / "model.safetensors.gz") as src, open(folder / "model.safetensors", "wb") as dst:
                shutil.copyfileobj(src, dst)
            shutil.copyfile(bundled_tokenizer_path(), folder / "tokenizer.json")
            cache[name, device] = (load_model(str(folder), device=device, progress=False), Tokenizer(folder))
        return cache[name, device]

    return get


def _inputs(model, tok, meta: dict):
    cfg = model.config
    pixels = None
    if meta.get("has_image"):
        pixels, _ = transform_image(load_image(GOLDEN / meta.get("image_file", "image.png")), cfg.vision.image_size)
    elif meta.get("has_video"):
        frames = torch.from_numpy(np.load(GOLDEN / meta.get("video_file", "video_uint8_CTHW.npy")))
        pixels = transform_video(frames, cfg.vision.image_size)
    history = [tuple(turn) for turn in meta.get("history", [])]
    return build_inputs(tok, cfg, meta["query"], history, pixels, template=meta["template_version"])


def _full(stored: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    out = torch.zeros(*stored.shape[:-1], VOCAB)
    out[..., torch.from_numpy(ids)] = torch.from_numpy(stored)
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


@pytest.mark.skipif(not CASES, reason=f"no golden cases under {GOLDEN}")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_golden_case(case: str, device: str, models):
    """float32 on every available device (on CUDA with TF32 off: the tolerances are float32's)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model_name, case_name = case.split("/")
    model, tok = models(model_name, device)
    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    ref = dict(np.load(GOLDEN / f"{case}.npz"))

    if "members" in meta:  # a right-padded batch of other cases of the same model
        inputs = [_inputs(model, tok, json.loads((GOLDEN / model_name / f"{m}.json").read_text()))
                  for m in meta["members"]]
        for row, x in enumerate(inputs):
            n = len(x)
            assert x.input_ids == ref["input_ids"][row, :n].tolist()
            assert (ref["attention_mask"][row, n:] == 0).all() and (ref["attention_mask"][row, :n] == 1).all()
            assert x.position_ids == ref["position_ids"][row, :n].tolist()
            assert x.token_type_ids == ref["token_type_ids"][row, :n].tolist()
            torch.testing.assert_close(x.pixel_values[0], torch.from_numpy(ref["pixel_values"][row]), atol=1e-6, rtol=0)
        _check_decode(model, inputs, ref, batch_axis=True)
        return

    x = _inputs(model, tok, meta)
    assert x.input_ids == ref["input_ids"].tolist()
    assert x.token_type_ids == ref["token_type_ids"].tolist()
    assert x.position_ids == ref["position_ids"].tolist()
    cfg = model.config
    embeds = embed_idx = None
    if "pixel_values" in ref:
        expected_px = torch.from_numpy(ref["pixel_values"]).reshape(x.pixel_values.shape)
        assert (x.pixel_values - expected_px).abs().max() <= 1e-6
        with torch.no_grad():
            feats = model.encode_images(x.pixel_values.to(device)).cpu()
        expected_feats = torch.from_numpy(ref["vision_features"]).reshape(feats.shape)
        assert (feats - expected_feats).abs().max() <= 1e-5
        embeds = feats.reshape(-1, feats.shape[-1]).to(device)
        embed_idx = torch.tensor(x.token_type_ids).nonzero().squeeze(1).to(device)

    # One full-prompt forward pass, no cache reuse: hidden states and logits at every position.
    cache = PaddedKVCache(1, cfg.num_hidden_layers)
    cache.begin_step(torch.ones(1, len(x), dtype=torch.bool, device=device))
    mask = torch.tensor(x.vision_expert_mask, device=device)
    vis, lang = expert_indices(mask) if cfg.has_vision_expert else (None, None)
    batch = ForwardBatch(torch.tensor(x.input_ids, device=device), torch.tensor(x.position_ids, device=device), cache,
                         vis, lang, embeds, embed_idx)
    with torch.no_grad():
        final, hidden = model(batch, output_hidden_states=True)
        logits = model.compute_logits(final).cpu()
    hs = torch.stack(hidden).cpu()
    assert (hs - torch.from_numpy(ref["hidden_states"])).abs().max() <= 1e-4
    assert (logits - _full(ref["prefill_logits"], ref["logits_vocab_ids"])).abs().max() <= 1e-4
    _check_decode(model, [x], ref, batch_axis=False)


def test_golden_set_present():
    """The default golden set ships with the repository's workspace; make its absence loud."""
    if "COGVLM2_GOLDEN_DIR" not in os.environ and not GOLDEN.is_dir():
        pytest.skip("no golden set beside this checkout")
    assert CASES, f"{GOLDEN} holds no cases"

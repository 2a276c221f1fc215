"""The vision tower's attention backends (`cogvlm2.model.vit_attention`): SDPA by default and wherever FlashAttention-4
cannot run; the fa4 backend's layout contract with flash_attn.cute ([B, N, H, d] views in, a [B, H, N, d] view of
its output back, scale d^-0.5), its fallback when the package does not import, and on a GPU with flash-attn-4
installed its numbers against SDPA."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from cogvlm2.model import vit_attention as va


def _qkv(b: int = 2, n: int = 37, h: int = 3, d: int = 16, dtype=torch.float32, device="cpu"):
    """q, k, v as the tower makes them: [B, H, N, d] views of one [B, N, 3, H, d] projection."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, 3, h, d, generator=g).to(device, dtype)
    return x.permute(2, 0, 3, 1, 4).unbind(0)


def test_default_is_sdpa():
    q, k, v = _qkv()
    assert va.BACKEND == "sdpa"
    assert torch.equal(va.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with mock.patch.object(va, "BACKEND", "fa4"):  # asked for, but a CPU tensor: SDPA
        assert not va.fa4_applies(q)
        assert torch.equal(va.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_fa4_backend_hands_flash_attention_its_layout():
    """With the backend applying (patched in here: no GPU), attention() calls flash_attn_func on [B, N, H, d] views
    of the projection's memory with scale d^-0.5 and returns its output as a [B, H, N, d] view."""
    q, k, v = _qkv()
    calls = []

    def fake_flash_attn_func(q_, k_, v_, softmax_scale):
        calls.append((q_, k_, v_, softmax_scale))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q_, k_, v_)), scale=softmax_scale)
        return out.transpose(1, 2).contiguous(), None  # [B, N, H, d] and an lse, as flash_attn_func returns

    with mock.patch.object(va, "fa4_applies", lambda q_: True), \
            mock.patch.object(va, "_fa4_func", fake_flash_attn_func):
        out = va.attention(q, k, v)
    (q_, k_, v_, scale), = calls
    assert q_.shape == (2, 37, 3, 16) and q_.data_ptr() == q.data_ptr() and k_.data_ptr() == k.data_ptr()
    assert v_.data_ptr() == v.data_ptr() and scale == 16 ** -0.5
    assert out.shape == (2, 3, 37, 16)
    assert out.transpose(1, 2).reshape(2, 37, 48).data_ptr() == out.data_ptr()  # the tower's reshape copies nothing
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)


def test_fa4_that_does_not_import_falls_back_with_a_warning(caplog):
    q, k, v = _qkv()
    with mock.patch.object(va, "fa4_applies", lambda q_: True), mock.patch.object(va, "_fa4_func", None), \
            mock.patch.dict(sys.modules, {"flash_attn": None, "flash_attn.cute": None}), \
            caplog.at_level(logging.WARNING, logger=va.__name__):
        out = va.attention(q, k, v)
        assert va._fa4_func is False and "does not import" in caplog.text
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_backend_variable_is_checked_at_import():
    """An unknown COGVLM2_VIT_ATTENTION is an error at import (a fresh interpreter), not a silent SDPA."""
    run = subprocess.run([sys.executable, "-c", "import cogvlm2.model.vit_attention"], capture_output=True, text=True,
                         env={**os.environ, "COGVLM2_VIT_ATTENTION": "flash3"})
    assert run.returncode != 0 and "expected 'sdpa' or 'fa4'" in run.stderr


def test_the_tower_attends_through_it():
    """The vision tower's Attention goes through vit_attention.attention (unquantized projections)."""
    from cogvlm2.config import VisionConfig
    from cogvlm2.model.vision import Attention

    cfg = VisionConfig(hidden_size=48, num_heads=3, intermediate_size=96, num_hidden_layers=1, image_size=28,
                       patch_size=14, num_positions=5)
    attn = Attention(cfg).eval()
    x = torch.randn(2, 5, 48)
    with mock.patch.object(va, "attention", wraps=va.attention) as spy, torch.no_grad():
        attn(x)
    assert spy.call_count == 1 and spy.call_args.args[0].shape == (2, 3, 5, 16)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_fa4_against_sdpa_cuda():
    """On sm_90 / sm_100 with flash-attn-4 installed (the fa4 extra): the backend ran and agrees with SDPA at the
    tower's head dim 112, a token count that is no multiple of the tiles, one and two images."""
    pytest.importorskip("flash_attn.cute")
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("flash-attn-4's forward is sm_90 / sm_100's")
    with mock.patch.object(va, "BACKEND", "fa4"):
        for b, n in ((1, 1000), (2, 333)):
            q, k, v = _qkv(b, n, 16, 112, torch.bfloat16, "cuda")
            assert va.fa4_applies(q) and va._fa4()
            out = va.attention(q, k, v)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            assert out.shape == (b, 16, n, 112) and out.dtype == torch.bfloat16
            assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, (b, n)

"""The vision tower's attention: full (non-causal) softmax(q k^T / sqrt(d)) v over one image's 9,217 tokens.

Backends (`COGVLM2_VIT_ATTENTION`):

    sdpa  torch's scaled_dot_product_attention (the default; cuDNN's kernel on Hopper, ~550 TFLOP/s at the
          tower's head dim 112 on an H200: ~79 ms of a one-image bf16 prefill over the 63 layers)
    fa4   FlashAttention-4's CuTe-DSL forward (the `fa4` extra, `flash-attn-4`), whose sm_90 kernel follows
          FlashAttention-3: warp-specialized producer / consumer warpgroups, TMA loads, the softmax overlapping
          the wgmma products. Taken for 16-bit CUDA tensors on sm_90 / sm_100 without autograd (fine-tuning keeps
          SDPA); anywhere else, or where the package does not import (a warning, once), SDPA runs. Measured on an
          H200 (flash-attn-4 4.0.0b36, cutlass-dsl 4.8.1) at the tower's shape it is no faster than cuDNN: 1.12-1.18
          against 1.13-1.26 ms an image and layer, ~530 TFLOP/s either way (FA4 takes its 128 x 128 tile for head
          dims 97-128 on sm_90), the same error against float32; so sdpa stays the default.

q, k and v come in as [B, H, N, d] views of the tower's QKV projection ([B, N, 3, H, d]); FlashAttention takes
[B, N, H, d], the same memory seen without the transpose, and its [B, N, H, d] output goes back as a [B, H, N, d]
view, so the tower's `.transpose(1, 2).reshape(B, N, H * d)` copies nothing either way.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKEND = os.environ.get("COGVLM2_VIT_ATTENTION", "sdpa")
if BACKEND not in ("sdpa", "fa4"):
    raise ValueError(f"COGVLM2_VIT_ATTENTION={BACKEND!r}: expected 'sdpa' or 'fa4'")

_fa4_func = None  # flash_attn.cute.flash_attn_func once imported; False where it does not import


def _fa4():
    """flash-attn-4's forward, or False (with a warning, once) where the package or its DSL does not load."""
    global _fa4_func
    if _fa4_func is None:
        try:
            from flash_attn.cute import flash_attn_func
        except Exception as e:  # noqa: BLE001 - ImportError, or the CuTe DSL's native libraries failing to load
            logger.warning("COGVLM2_VIT_ATTENTION=fa4, but flash-attn-4 does not import (%s: %s); the vision tower "
                           "attends through SDPA", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            _fa4_func = False
        else:
            _fa4_func = flash_attn_func
    return _fa4_func


def fa4_applies(q: torch.Tensor) -> bool:
    """Whether the fa4 backend is asked for and can run on q: 16-bit, CUDA sm_90 / sm_100, no autograd."""
    return (BACKEND == "fa4" and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and q.requires_grad)
            and torch.cuda.get_device_capability(q.device)[0] in (9, 10))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v [B, H, N, d] (any strides, d contiguous) -> [B, H, N, d]."""
    if fa4_applies(q):
        fn = _fa4()
        if fn:
            out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=q.shape[-1] ** -0.5)
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)

"""The vision tower's fp8 attention kernel (`cogvlm2.quant.fp8_attention`) against torch's SDPA.

On the CPU the kernels run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1) with 16-bit floats in
place of e4m3 (the interpreter emulates the float8 cast wrongly): the tiling, the padding of tokens and head dim,
the online softmax, the scales and the output layout are checked there; on a GPU the real fp8 path is checked
against bf16 SDPA, and the 16-bit path against it tightly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tests.interpreted import run_interpreted  # noqa: E402

# (images, heads, tokens, head dim, (BLOCK_M, BLOCK_N, warps, stages)): tokens not a multiple of the blocks, a
# head dim padded (24 -> 32, the ViT's 112 -> 128), a single partial tile, blocks of different sizes
SHAPES = [(2, 3, 77, 24, (32, 16, 4, 1)), (1, 2, 64, 32, (16, 32, 4, 1)), (1, 1, 5, 8, (16, 16, 4, 1)),
          (1, 2, 40, 112, (16, 16, 4, 1))]


def _qkv(b: int, h: int, n: int, d: int, device: str, dtype: torch.dtype, seed: int = 0):
    """q, k, v as the tower makes them: views of one [B, N, 3, H, D] projection (strided, d contiguous)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(b, n, 3, h, d, generator=g) * torch.tensor([2.0, 1.0, 0.5]).view(1, 1, 3, 1, 1))
    return qkv.to(device, dtype).permute(2, 0, 3, 1, 4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qdtype: torch.dtype, block_n: int) -> torch.Tensor:
    """What the kernels compute, in torch: q, k, v rounded to qdtype per (image, head), the online softmax over
    tiles of block_n keys with each tile's probabilities rounded to qdtype relative to the running maximum."""
    def rounded(x):
        s = (x.float().abs().amax(dim=(2, 3), keepdim=True) / 448).clamp(min=1e-12)
        return (x.float() / s).clamp(-448, 448).to(qdtype).float(), s

    (qq, sq), (kq, sk), (vq, sv) = rounded(q), rounded(k), rounded(v)
    s = (qq @ kq.transpose(-1, -2)) * (sq * sk / q.shape[-1] ** 0.5 * 1.4426950408889634)  # log2 units
    m = torch.full(s.shape[:-1], float("-inf"), device=s.device)
    l, acc = torch.zeros_like(m), torch.zeros(*s.shape[:-1], q.shape[-1], device=s.device)
    for t in range(0, s.shape[-1], block_n):
        tile = s[..., t:t + block_n]
        m_new = torch.maximum(m, tile.amax(-1))
        p, alpha = torch.exp2(tile - m_new[..., None]), torch.exp2(m - m_new)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p.to(qdtype).float() @ vq[..., t:t + block_n, :]
        m = m_new
    return acc * sv / l[..., None]


def check(device: str, dtype: torch.dtype, qdtype: torch.dtype, tol: float, shapes=SHAPES) -> None:
    from cogvlm2.quant.fp8_attention import fp8_attention, min_k, quantize_heads

    for b, h, n, d, config in shapes:
        q, k, v = _qkv(b, h, n, d, device, dtype)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        out = fp8_attention(q, k, v, qdtype=qdtype, config=config)
        assert out.shape == (b, h, n, d) and out.dtype == dtype, out.shape
        # a transposed view of a [B, N, H, D] buffer: the tower's reshape to [B, N, H * D] copies nothing
        assert out.transpose(1, 2).reshape(b, n, h * d).data_ptr() == out.data_ptr()
        err = _rel(out, ref)
        assert err < tol, (b, h, n, d, config, err)
        if n <= 1000:  # and what it computes, rounding included, against the same steps in torch
            em = emulated(q, k, v, qdtype, max(config[1], min_k(qdtype)))
            assert _rel(out, em) < 1e-2, (b, h, n, d, config, _rel(out, em))
    # the scales' maxima, read in place from the strided views over several tiles of tokens
    from cogvlm2.quant.fp8_attention import head_amax

    for x in _qkv(2, 3, 200, 112, device, dtype, seed=2):
        assert torch.equal(head_amax(x), x.float().abs().amax(dim=(2, 3)).reshape(-1))
    # the quantizing pass: per (image, head) scale, zero padding of tokens and head dim, v transposed
    q, _, v = _qkv(2, 3, 10, 24, device, dtype, seed=1)
    qq, scale = quantize_heads(q, qdtype, pad_to=16)
    vt, vscale = quantize_heads(v, qdtype, transpose=True, pad_to=16)
    assert qq.shape == (2, 3, 16, 32) and vt.shape == (2, 3, 32, 16) and scale.shape == (6,)
    assert torch.equal(scale, (q.float().abs().amax(dim=(2, 3)) / 448).reshape(-1))
    assert not qq[:, :, 10:].float().any() and not qq[..., 24:].float().any() and not vt[:, :, :, 10:].float().any()
    back = qq[:, :, :10, :24].float() * scale.view(2, 3, 1, 1)
    assert _rel(back, q) < (0.04 if qdtype.itemsize == 1 else 1e-3)
    assert _rel(vt[:, :, :24, :10].float().transpose(-1, -2) * vscale.view(2, 3, 1, 1), v) < (
        0.04 if qdtype.itemsize == 1 else 1e-3)


def test_fp8_attention_interpreted():
    run_interpreted(__file__, "fp8 attention ok")


def test_fp8_attention_compiles_for_hopper():
    """Without a GPU: the kernels compile for sm_90 (Triton's own ptxas) with e4m3 wgmma, key / value loads
    pipelined through shared memory (cp.async), no register spills, within the 227 KB of shared memory a block
    may use, for every tile shape the benchmark tries."""
    from cogvlm2.quant import fp8_attention as fa
    from tests.hopper_compile import compile_for_hopper

    signature = {"q_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv", "vt_ptr": "*fp8e4nv", "o_ptr": "*bf16", "sq_ptr": "*fp32",
                 "sk_ptr": "*fp32", "sv_ptr": "*fp32", "H": "i32", "softmax_scale": "fp32", "sob": "i32", "soh": "i32",
                 "son": "i32"}
    for block_m, block_n, warps, stages in {fa.CONFIG, (128, 64, 4, 3), (128, 128, 4, 2), (64, 128, 4, 3)}:
        kernel = compile_for_hopper(fa._attention_kernel, signature, dict(N=9217, NP=9344, D=112, DP=128,
                                    BLOCK_M=block_m, BLOCK_N=block_n), num_warps=warps, num_stages=stages)
        ptx = kernel.asm["ptx"]
        assert "wgmma.mma_async" in ptx and "e4m3" in ptx, (block_m, block_n)
        assert "cp.async" in ptx and "ld.local" not in ptx, (block_m, block_n)
        assert kernel.metadata.shared <= 232448, (block_m, block_n, kernel.metadata.shared)
    amax = compile_for_hopper(fa._amax_heads_kernel, {"x_ptr": "*bf16", "amax_ptr": "*fp32", "H": "i32", "sxb": "i32",
                                                     "sxh": "i32", "sxn": "i32"},
                              dict(N=9217, D=112, DP=128, BLOCK=64), num_warps=4)
    assert "atom.global" in amax.asm["ptx"] and "ld.local" not in amax.asm["ptx"]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_fp8_attention_cuda():
    from cogvlm2.quant.fp8_attention import CONFIG

    shapes = SHAPES + [(2, 16, 1000, 112, CONFIG), (1, 16, 9217, 112, CONFIG)]  # the ViT's shape last
    # the kernels with 16-bit operands (tiles of 64 keys, 2 stages: 16-bit tiles of the fp8 shape would not fit
    # shared memory)
    check("cuda", torch.bfloat16, torch.float16, 1e-2, [s[:4] + ((128, 64, 8, 2),) if s[4] == CONFIG else s
                                                        for s in shapes])
    # e4m3 q, k, v and probabilities: ~5-8% from exact attention on these inputs (q twice k's scale: sharp
    # softmax), almost all of it q and k's rounding; the emulation checks the rest to 1%
    check("cuda", torch.bfloat16, torch.float8_e4m3fn, 0.1, shapes)


@cuda
def test_fp8_projection_attends_in_fp8_when_enabled():
    """The tower attends through its QKV projection's class: an Fp8Linear's attention is the fp8 kernels while
    FP8_ATTENTION is set (the default; COGVLM2_FP8_ATTENTION=0 clears it), else SDPA."""
    from unittest import mock

    from cogvlm2.quant import Fp8Linear
    from cogvlm2.quant import linear as quant_linear
    from cogvlm2.quant.fp8_attention import CONFIG

    q, k, v = _qkv(1, 4, 300, 112, "cuda", torch.bfloat16)
    with torch.inference_mode():
        with mock.patch.object(quant_linear, "FP8_ATTENTION", False):
            assert torch.equal(Fp8Linear.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
        with mock.patch.object(quant_linear, "FP8_ATTENTION", True):
            fp8 = Fp8Linear.attention(q, k, v)
    assert _rel(fp8, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) < 0.1
    assert _rel(fp8, emulated(q, k, v, torch.float8_e4m3fn, CONFIG[1])) < 1e-2


def test_fp8_attention_default_and_opt_out():
    """On by default; the environment variable turns it off at import (a fresh interpreter)."""
    code = "from cogvlm2.quant import linear; print(linear.FP8_ATTENTION)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("COGVLM2_FP8_ATTENTION", None)
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    off = subprocess.run([sys.executable, "-c", code], env={**env, "COGVLM2_FP8_ATTENTION": "0"},
                         capture_output=True, text=True, timeout=120)
    assert (on.stdout.strip(), off.stdout.strip()) == ("True", "False"), (on.stderr, off.stderr)


if __name__ == "__main__":  # run by test_fp8_attention_interpreted under TRITON_INTERPRET=1
    check("cpu", torch.float32, torch.float16, 2e-3)
    print("fp8 attention ok")

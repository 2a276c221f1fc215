"""Programmatic dependent launch (cogvlm2/pdl.py): when it applies, how it is turned off, that the kernels compile
with it for sm_90, and on a GPU that a decode-shaped chain of the PDL kernels captured in a CUDA graph computes
exactly what it computes without PDL, eagerly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from cogvlm2 import pdl  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_off_the_gpu_and_opt_out():
    assert pdl.options(torch.zeros(2)) == {"PDL": False}  # Triton's interpreter: no launch option, no PTX
    code = "from cogvlm2 import pdl; print(pdl.ENABLED)"
    for value, expected in ((None, "True"), ("0", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "COGVLM2_PDL"}
        if value is not None:
            env["COGVLM2_PDL"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr)


def test_decode_kernels_wait_before_they_read_for_hopper():
    """Each element-wise / attention kernel of the decode step waits for its predecessor before its first load
    (the GEMVs' own order, weights first, is checked in test_gemv.py)."""
    from cogvlm2.engine.kernels import decode_attention as da
    from cogvlm2.engine.kernels import kv_store
    from cogvlm2.model import triton_ops
    from tests.hopper_compile import compile_for_hopper

    kernels = [
        (triton_ops._add_rms_norm_kernel, {"x_ptr": "*bf16", "d_ptr": "*bf16", "w_ptr": "*bf16", "sum_ptr": "*bf16",
                                           "out_ptr": "*bf16", "xe_ptr": "*i32", "xo_ptr": "*i32", "sx_ptr": "*fp32",
                                           "sq_ptr": "*i32", "stride_x": "i32", "stride_d": "i32", "stride_s": "i32",
                                           "stride_o": "i32", "dim": "i32", "eps": "fp32"},
         dict(BLOCK=4096, A8_GROUP=128), 16),  # with the W4A8 row (ops.FOLD_A8): still waits first
        (triton_ops._rotary_kernel, {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "stride_x": "i32",
                                     "stride_c": "i32", "HEADS_TOTAL": "i32"}, dict(HALF=64, BLOCK=64, HEADS=8), 4),
        (kv_store._store_kv_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16",
                                     "slot_ptr": "*i64", "stride_k": "i32", "stride_v": "i32"},
         dict(ROW=1024, BLOCK=1024), 4),
        (da._stage2, {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "so_b": "i32", "so_h": "i32",
                      "so_s": "i32", "sl_b": "i32", "sl_h": "i32", "sout_b": "i32", "sout_h": "i32"},
         dict(NUM_SPLITS=19, SPLITS_PAD=32, HEAD_DIM=128, HEAD_PAD=128), 4),
    ]
    for fn, signature, constexprs, warps in kernels:
        ptx = compile_for_hopper(fn, signature, constexprs | {"PDL": True}, num_warps=warps).asm["ptx"]
        assert ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait") < \
            ptx.index("ld.global"), fn
        off = compile_for_hopper(fn, signature, constexprs | {"PDL": False}, num_warps=warps).asm["ptx"]
        assert "griddepcontrol" not in off, fn


def _chain(x: torch.Tensor, layers: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """A decode step's kernel order at one row: add + RMSNorm, QKV GEMV, rotary, output GEMV, add + RMSNorm,
    gate / up with SiLU, down: every PDL kernel after another one."""
    from cogvlm2.model import gemv, triton_ops

    delta = torch.zeros_like(x)
    for norm, qkv, dense, gate, up, down, cos, sin in layers:
        x, h = triton_ops.add_rms_norm(x, delta, norm, 1e-5)
        q = gemv.gemv(h, qkv)
        triton_ops.rotary_(q, cos, sin, q.shape[-1] // 128, 128)
        x, h = triton_ops.add_rms_norm(x, gemv.gemv(q, dense), norm, 1e-5)
        delta = gemv.gemv(gemv.gemv_silu_mul(h, gate, up), down)
    return x + delta


@cuda
def test_pdl_chain_in_a_cuda_graph_equals_eager_without(monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90")
    g = torch.Generator(device="cuda").manual_seed(0)
    d, f = 1024, 2816

    def w(*shape):
        return (torch.randn(*shape, generator=g, device="cuda") / shape[-1] ** 0.5).bfloat16()

    pos = torch.tensor([5.0], device="cuda")[:, None] / 10000 ** (torch.arange(64, device="cuda") / 64)
    layers = [(1 + w(d) / 8, w(3 * d, d), w(d, 3 * d), w(f, d), w(f, d), w(d, f), pos.cos(), pos.sin())
              for _ in range(6)]
    x = torch.randn(1, d, generator=g, device="cuda").bfloat16()
    monkeypatch.setattr(pdl, "ENABLED", False)
    expected = _chain(x, layers)
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.options(x) == {"PDL": True, "launch_pdl": True}
    assert torch.equal(_chain(x, layers), expected)  # eager with PDL
    static = x.clone()
    _chain(static, layers)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(static, layers)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
    static.copy_(x * 2)  # new inputs through the same graph
    graph.replay()
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert torch.equal(out, _chain(x * 2, layers))

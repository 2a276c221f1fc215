"""The int8 lm_head (quant.LM_HEAD_INT8): formats.quantize_int8 within half a step of every weight, Int8Linear as
the float32 product it defines, the Triton kernels (one-row GEMV, tile of 2+ rows) equal to that product to float32
summation order (interpreted on the CPU, compiled for sm_90, and on a GPU at the lm_head's real shape, in CUDA
graphs), and the switch putting it on the tiny model's lm_head under --quant (on the fly and the official int4
checkpoint), with the engine equal to the reference loop."""

from __future__ import annotations

import sys
import os
import subprocess
from unittest import mock

import pytest
import torch

from cogvlm2.quant import Int8Linear, formats

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (rows, N, K): one row (GEMV), a few rows padded to 16, 17-64 (BLOCK_M 32 / 64), more than 64 (a grid axis over
# row blocks), N and K off the blocks, K shorter than one block
CASES = [(1, 37, 200), (1, 70, 2100), (2, 37, 200), (5, 50, 300), (17, 33, 64), (33, 70, 1000), (64, 16, 40),
         (70, 45, 130), (130, 20, 96)]


def _expected(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x.double() @ q.double().t()) * s.double()


def check(device: str, dtype: torch.dtype) -> None:
    """int8_linear at every case and swept config: within float32 summation error of the exact product, rounded
    once to x's dtype; leading dims kept; bad weights refused."""
    from cogvlm2.quant import int8_kernels as ik

    g = torch.Generator().manual_seed(0)
    for rows, n, k in CASES:
        q, s = formats.quantize_int8(torch.randn(n, k, generator=g))
        q, s = q.to(device), s.to(device)
        x = torch.randn(rows, k, generator=g).to(device, dtype)
        xc, qc, sc = x.cpu(), q.cpu(), s.cpu()
        exact = _expected(xc, qc, sc)
        bm = 1 if rows == 1 else ik.block_m(rows)
        for config in [None] + ik.CANDIDATES[bm]:
            got = ik.int8_linear(x, q, s, config).cpu()
            assert got.shape == (rows, n) and got.dtype == dtype
            # one rounding to dtype (half a unit in the last place of the result; a whole one in Triton's interpreter,
            # whose float32 -> 16-bit casts may truncate) after a float32 sum of k products and the scale's multiply
            # (the standard bound (k + 2) u of a float32 sum over the terms' magnitudes)
            ulp = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
            terms = (xc.double().abs() @ qc.double().abs().t()) * sc.double()
            bound = exact.abs() * ulp * (0.5 if device == "cuda" else 1.0) + terms * (k + 2) * 2.0 ** -24
            assert ((got.double() - exact).abs() <= bound * 1.01 + 1e-30).all(), (rows, n, k, config)
    x3 = torch.randn(2, 1, q.shape[1], generator=g).to(device, dtype)
    assert ik.int8_linear(x3, q, s).shape == (2, 1, q.shape[0])
    with pytest.raises(ValueError, match="int8 weight"):
        ik.int8_linear(x3, q.float(), s)
    with pytest.raises(ValueError, match="float32 scale"):
        ik.int8_linear(x3, q, s.half())


def test_quantize_int8_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 96, generator=g) * torch.logspace(-3, 2, 10)[:, None]
    w[3] = 0  # an all-zero row: scale clamped, codes 0, nothing undefined
    q, s = formats.quantize_int8(w, chunk=3)  # rows in chunks: the same as in one
    q1, s1 = formats.quantize_int8(w)
    assert torch.equal(q, q1) and torch.equal(s, s1)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.abs().max() == 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()
    assert (q[3] == 0).all() and torch.isfinite(s).all()


def test_int8_linear_is_the_float32_product():
    """On the CPU the module computes (x @ q^T) * scale in float32, once rounded: close to the float layer it came
    from (~0.4% at 127 levels), with its bias; its buffers are the quantizer's and take a byte a weight."""
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(256, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 256, generator=g) / 16)
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (48,)
    assert q.weight_bytes() == 48 * 256 + 48 * 4  # a byte a weight and a float32 scale a row (the bias: a parameter)
    x = torch.randn(5, 256, generator=g)
    y = q(x)
    assert torch.equal(y, formats.int8_matmul(x, q.weight, q.weight_scale) + lin.bias)
    ref = lin(x).detach()
    assert 0 < ((y - ref).norm() / ref.norm()).item() < 1e-2
    assert set(q.state_dict()) == {"weight", "weight_scale", "bias"}


def test_int8_kernels_interpreted():
    pytest.importorskip("triton")
    from tests.interpreted import run_interpreted

    run_interpreted(__file__, "int8 ok")


def test_int8_kernels_compile_for_hopper():
    """Every swept config compiles for sm_90 without spills, the tile with tensor-core MMAs, and the loads pipelined
    (cp.async) where stages > 1."""
    pytest.importorskip("triton")
    from cogvlm2.quant import int8_kernels as ik
    from tests.hopper_compile import compile_for_hopper

    gemv = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32"}
    tile = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32", "N": "i32",
            "stride_xm": "i32", "stride_om": "i32"}
    for bm, configs in ik.CANDIDATES.items():
        for block_n, block_k, warps, stages in configs:
            if bm == 1:
                kernel = compile_for_hopper(ik._int8_gemv_kernel, gemv, dict(K=4096, BLOCK_N=block_n,
                                            BLOCK_K=block_k, STAGES=stages), num_warps=warps, num_stages=stages)
            else:
                kernel = compile_for_hopper(ik._int8_tile_kernel, tile, dict(
                    K=4096, BLOCK_N=block_n, BLOCK_M=bm, BLOCK_K=block_k, STAGES=stages, PRECISION="tf32"),
                    num_warps=warps, num_stages=stages)
                assert "mma" in kernel.asm["ptx"], (bm, block_n, block_k)
            ptx = kernel.asm["ptx"]
            assert ("cp.async" in ptx) == (stages > 1) and "ld.local" not in ptx, (bm, block_n, block_k, stages)


def _tiny_logits(model, x) -> torch.Tensor:
    from cogvlm2.generation import generate_ids
    from cogvlm2.sampling_params import SamplingParams

    out = []
    next(iter(generate_ids(model, [x], SamplingParams(temperature=0, max_new_tokens=1), out)))
    return out[0]


def test_switch_puts_int8_on_the_lm_head_under_quant():
    """LM_HEAD_INT8 "auto" (the default): `--quant int4` and `fp8` of the tiny model have an Int8Linear lm_head, the
    bitsandbytes-style fp4 keeps the float one ("1": it too; "0": none); the int8 head's first logits are within ~1%
    of the float head's, and the engine equals the reference loop token for token; nothing changes without --quant;
    a bad switch value is refused at import."""
    from cogvlm2 import quant
    from cogvlm2.engine import LLM
    from cogvlm2.generation import generate_ids
    from cogvlm2.model import load_model
    from cogvlm2.sampling_params import SamplingParams
    from cogvlm2.tiny import checkpoint_folder

    folder = checkpoint_folder("tiny-random")
    assert quant.LM_HEAD_INT8 == "auto"
    assert [quant.int8_head(m) for m in ("int4", "fp8", "fp4", "nf4", "4", "8")] == [True, True] + [False] * 4
    assert isinstance(load_model(folder, dtype="float32", quant="fp8").lm_head, Int8Linear)
    assert type(load_model(folder, dtype="float32", quant="fp4").lm_head) is torch.nn.Linear
    with mock.patch.object(quant, "LM_HEAD_INT8", "1"):
        assert isinstance(load_model(folder, dtype="float32", quant="fp4").lm_head, Int8Linear)
    with mock.patch.object(quant, "LM_HEAD_INT8", "0"):
        plain = load_model(folder, dtype="float32", quant="int4")
    assert type(plain.lm_head) is torch.nn.Linear
    model = load_model(folder, dtype="float32", quant="int4")
    assert type(load_model(folder, dtype="float32").lm_head) is torch.nn.Linear
    llm = LLM("tiny-random", dtype="float32", device="cpu", quant="int4", num_kv_blocks=64, max_model_len=512)
    assert isinstance(model.lm_head, Int8Linear) and isinstance(llm.engine.model.lm_head, Int8Linear)
    bad = subprocess.run([sys.executable, "-c", "import cogvlm2.quant"], capture_output=True, text=True,
                         env={**os.environ, "COGVLM2_LM_HEAD_INT8": "yes"})
    assert bad.returncode != 0 and "COGVLM2_LM_HEAD_INT8 must be auto, 0 or 1" in bad.stderr
    x = llm.processor("hello there")
    ref, got = _tiny_logits(plain, x), _tiny_logits(model, x)
    assert 0 < ((got - ref).norm() / ref.norm()).item() < 2e-2
    greedy = SamplingParams(temperature=0, ignore_eos=True, max_new_tokens=6)
    (out,) = llm.generate([x], greedy, use_tqdm=False)
    assert out.token_ids == [t for (t,) in generate_ids(llm.engine.model, [x], greedy)]


def test_switch_on_the_official_int4_checkpoint(tmp_path):
    """The official int4 checkpoints keep their fp16 lm_head by default (as the official implementation does);
    LM_HEAD_INT8 "1" makes it int8 after loading."""
    pytest.importorskip("bitsandbytes")
    from cogvlm2 import quant
    from cogvlm2.model import load_model
    from tests.quant_fixtures import build_official_int4

    folder, _ = build_official_int4(tmp_path / "bin", "bin")
    assert type(load_model(str(folder), dtype="float32").lm_head) is torch.nn.Linear
    with mock.patch.object(quant, "LM_HEAD_INT8", "1"):
        model = load_model(str(folder), dtype="float32")
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight.dtype == torch.int8


@cuda
def test_int8_kernels_cuda():
    """On the GPU: every case and config in bf16 and fp16; the lm_head's real shape (128,256 x 4,096) at 1 / 32 rows
    within float32 summation error of the exact product; CUDA-graph replays equal to eager launches."""
    from cogvlm2.quant import int8_kernels as ik

    check("cuda", torch.bfloat16)
    check("cuda", torch.float16)
    g = torch.Generator(device="cuda").manual_seed(3)
    q, s = formats.quantize_int8(torch.randn(128256, 4096, device="cuda", generator=g, dtype=torch.bfloat16))
    for rows in (1, 32):
        x = torch.randn(rows, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
        exact = (x.float() @ q.float().t()) * s
        got = ik.int8_linear(x, q, s)
        assert ((got.float() - exact).norm() / exact.norm()).item() < 3e-3, rows
        ik.int8_linear(x, q, s)  # compiled before capture
        graph, out = torch.cuda.CUDAGraph(), None
        with torch.cuda.graph(graph):
            out = ik.int8_linear(x, q, s)
        x.copy_(torch.randn(rows, 4096, device="cuda", generator=g, dtype=torch.bfloat16))
        graph.replay()
        assert torch.equal(out, ik.int8_linear(x, q, s)), rows


if __name__ == "__main__":  # under TRITON_INTERPRET=1 (test_int8_kernels_interpreted)
    check("cpu", torch.float32)
    check("cpu", torch.float16)  # the 16-bit path; Triton's interpreter gets bf16 tiles wrong (the GPU test runs them)
    print("int8 ok")
    sys.exit(0)

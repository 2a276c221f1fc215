"""Fused Triton ops of the decoder against their torch reference (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import contextlib
import sys
from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

from tests.interpreted import run_interpreted  # noqa: E402


def check_ops(device: str) -> None:
    from cogvlm2.model import ops, triton_ops

    g = torch.Generator().manual_seed(0)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        x = (3 * torch.randn(7, 96, generator=g)).to(device, dtype)
        w = (1 + 0.1 * torch.randn(96, generator=g)).to(device, dtype)
        with torch.enable_grad():  # the torch reference path
            ref = ops.rms_norm(x, w, 1e-5)
        assert (triton_ops.rms_norm(x, w, 1e-5).float() - ref.float()).abs().max() <= tol * ref.abs().max()
        # the residual add fused into the RMSNorm: bit for bit the add (rounded as torch does) then rms_norm;
        # Triton's CPU interpreter rounds float32 -> bfloat16 by truncation (the GPU rounds to nearest even, as
        # torch does), so there bfloat16 agrees to one rounding
        d = (3 * torch.randn(7, 96, generator=g)).to(device, dtype)
        total, normed = triton_ops.add_rms_norm(x, d, w, 1e-5)
        ref_total, ref_normed = x + d, triton_ops.rms_norm(x + d, w, 1e-5)
        if device == "cuda" or dtype == torch.float32:
            assert torch.equal(total, ref_total) and torch.equal(normed, ref_normed)
        for a, b in ((total, ref_total), (normed, ref_normed)):
            assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()
        gate, up = (torch.randn(5, 300, generator=g).to(device, dtype) for _ in range(2))
        ref = torch.nn.functional.silu(gate) * up
        assert (triton_ops.silu_mul(gate, up).float() - ref.float()).abs().max() <= tol * ref.abs().max()
        # the halves of one gate / up product (ops.FUSE_GATE_UP) read in place: the contiguous copies' numbers, bit
        # for bit, at several rows, one row and with leading dims; rows not evenly spaced are copied first
        for shape in ((5, 600), (1, 600), (2, 3, 600)):
            gu = torch.randn(*shape, generator=g).to(device, dtype)
            halves = gu[..., :300], gu[..., 300:]
            got = triton_ops.silu_mul(*halves)
            assert got.shape == shape[:-1] + (300,) and got.is_contiguous()
            assert torch.equal(got, triton_ops.silu_mul(*(h.contiguous() for h in halves))), shape
        odd = torch.randn(300, 5, generator=g).to(device, dtype).t()  # columns not contiguous
        assert torch.equal(triton_ops.silu_mul(odd, up), triton_ops.silu_mul(odd.contiguous(), up))
        check_a8_outputs(device, dtype, g)
        check_add_layer_norm(device, dtype, g)
        for d in (16, 24):  # 24: the tiny model's head dim, whose half is no power of 2
            hq, hkv, n = 4, 2, 9
            qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(device, dtype)
            cos, sin = ops.rotary_cos_sin(torch.randint(0, 5000, (n,), generator=g).to(device),
                                          ops.inv_freq_formula(d, 500000.0).to(device, dtype))
            with torch.enable_grad():
                q_ref, k_ref, v_ref = ops.rotary_qkv(qkv.clone(), cos, sin, hq, hkv, d)
            # a program a head (decode) and ROTARY_HEADS heads a program (prefill; 8 of these 6: the rest masked)
            for min_tokens in (10**9, 1):
                rotated = qkv.clone()
                with mock.patch.object(triton_ops, "ROTARY_MIN_TOKENS", min_tokens):
                    triton_ops.rotary_(rotated, cos, sin, hq + hkv, d)
                q, k, v = rotated.split([hq * d, hkv * d, hkv * d], dim=-1)
                for a, b in ((q, q_ref), (k, k_ref), (v, v_ref)):
                    assert (a.reshape(b.shape).float() - b.float()).abs().max() <= tol * b.abs().max()


def check_a8_outputs(device: str, dtype: torch.dtype, g: torch.Generator) -> None:
    """add_rms_norm_a8 / silu_mul_a8 (ops.FOLD_A8): their output is the plain kernel's, and their W4A8 row is what
    quantize_a8 makes of that output, bit for bit; None where it does not apply (several rows, a norm row that is
    not a power of two, a SiLU-mul row of partial groups, no group)."""
    from cogvlm2.model import triton_ops
    from cogvlm2.quant import triton_kernels as tk

    for dim, group in ((512, 128), (64, 64)):
        x, d = ((3 * torch.randn(1, dim, generator=g)).to(device, dtype) for _ in range(2))
        w = (1 + 0.1 * torch.randn(dim, generator=g)).to(device, dtype)
        total, normed, a8 = triton_ops.add_rms_norm_a8(x, d, w, 1e-5, group)
        pair = triton_ops.add_rms_norm(x, d, w, 1e-5)
        assert torch.equal(total, pair[0]) and torch.equal(normed, pair[1])
        assert all(torch.equal(a, b) for a, b in zip(a8, tk.quantize_a8(normed, group))), (dim, group)
    for n in (1152, 2048, 128):  # a partial last program, two full ones, one group
        gate, up = (torch.randn(1, n, generator=g).to(device, dtype) for _ in range(2))
        out, a8 = triton_ops.silu_mul_a8(gate, up, 128)
        assert torch.equal(out, triton_ops.silu_mul(gate, up))
        assert all(torch.equal(a, b) for a, b in zip(a8, tk.quantize_a8(out, 128))), n
        # FP4_A8: the fp4 W4A8 row (absmax blocks of 64, the activations alone) as quantize_fp4_a8 makes it
        out, a8 = triton_ops.silu_mul_a8(gate, up, tk.FP4_A8)
        assert torch.equal(out, triton_ops.silu_mul(gate, up)) and len(a8) == 2
        assert all(torch.equal(a, b) for a, b in zip(a8, tk.quantize_fp4_a8(out))), n
    g4 = torch.Generator().manual_seed(4)  # its own: the checks after this one keep their inputs
    x, d = ((3 * torch.randn(1, 512, generator=g4)).to(device, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(512, generator=g4)).to(device, dtype)
    total, normed, a8 = triton_ops.add_rms_norm_a8(x, d, w, 1e-5, tk.FP4_A8)
    pair = triton_ops.add_rms_norm(x, d, w, 1e-5)
    assert torch.equal(total, pair[0]) and torch.equal(normed, pair[1]) and len(a8) == 2
    assert all(torch.equal(a, b) for a, b in zip(a8, tk.quantize_fp4_a8(normed)))
    x, d = (torch.randn(2, 512, generator=g).to(device, dtype) for _ in range(2))
    w = torch.ones(512, device=device, dtype=dtype)
    assert triton_ops.add_rms_norm_a8(x, d, w, 1e-5, 128)[2] is None  # two rows
    assert triton_ops.add_rms_norm_a8(x[:1, :384], d[:1, :384], w[:384], 1e-5, 128)[2] is None  # not a power of 2
    assert triton_ops.add_rms_norm_a8(x[:1], d[:1], w, 1e-5, 0)[2] is None
    assert triton_ops.silu_mul_a8(x[:1, :192], d[:1, :192], 128)[1] is None  # 1.5 groups
    assert triton_ops.silu_mul_a8(x, d, 128)[1] is None


def check_add_layer_norm(device: str, dtype: torch.dtype, g: torch.Generator) -> None:
    """triton_ops.add_layer_norm (ops.VISION_ADD_NORM): x + F.layer_norm(y) as torch computes it (float32: to
    rounding; 16-bit: within a couple of roundings of the output, the statistics being summed in another order and
    Triton's interpreter truncating to bfloat16), and its fp8 rows exactly what fp8_quantize_rows makes of its
    output."""
    from cogvlm2.model import triton_ops
    from cogvlm2.quant import triton_kernels as tk

    for rows, dim in ((7, 96), (3, 1792)):  # a width that is no power of two (the 19B tower's 1,792)
        x, y = ((3 * torch.randn(rows, dim, generator=g)).to(device, dtype) for _ in range(2))
        w, b = ((1 + 0.1 * torch.randn(dim, generator=g)).to(device, dtype) for _ in range(2))
        norm = torch.nn.functional.layer_norm(y, (dim,), w, b, 1e-6)
        ref = x + norm
        out, q, s = triton_ops.add_layer_norm(x.view(1, rows, dim), y.view(1, rows, dim), w, b, 1e-6)
        assert out.shape == (1, rows, dim) and q is None and s is None
        # 16-bit: ~3 steps of bfloat16 (2^-7 relative each) of the larger addend: x + LayerNorm(y) may cancel, so
        # the bound scales with the addends, not the sum (against the sum alone some seeds needed 4 steps)
        tol = 1e-5 if dtype == torch.float32 else 2.5e-2
        bound = tol * (x.float().abs() + norm.float().abs()).clamp(min=1)
        assert ((out.view(rows, dim).float() - ref.float()).abs() <= bound).all()
        if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
            continue  # fp8 casts in Triton: cc 8.9+
        out8, q, s = triton_ops.add_layer_norm(x, y, w, b, 1e-6, fp8=True)
        ref_q, ref_s = tk.fp8_quantize_rows(out8)
        # the sum as without fp8 to rounding (compiled, the fp8 variant may contract the norm's multiply-adds
        # differently: float32 at width 1,792 differed in the last bit on the H200), its rows exactly quantized
        assert ((out8.float() - ref.float()).abs() <= bound).all()
        assert torch.equal(s, ref_s)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def check_vision_add_norm(device: str) -> None:
    """ops.VISION_ADD_NORM in the vision tower of tiny-random: the image features as the torch ops give them (to
    rounding; float32 model), in bf16 and quantized to fp8, where every fp8 QKV and fc1 but the first QKV takes its
    rows from the fused kernel (fewer row quantizations by two a layer, less the last layer's next QKV)."""
    from unittest import mock

    from cogvlm2.model import load_model, ops
    from cogvlm2.quant import linear as quant_linear
    from cogvlm2.quant import quantize_model
    from cogvlm2.quant import triton_kernels as tk
    from cogvlm2.tiny import checkpoint_folder

    model = load_model(str(checkpoint_folder("tiny-random")), progress=False, device=device)
    v = model.config.vision
    images = torch.randn(2, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(1)).to(device)
    patches = []
    if device == "cpu":  # what the fused checks answer for a CUDA tensor on an H100 / H200, here for the CPU ones
        on = lambda x: not torch.is_grad_enabled()  # noqa: E731
        patches = [mock.patch.object(ops, "_fused", on), mock.patch.object(quant_linear, "_kernel_ok", on),
                   mock.patch.object(torch.cuda, "get_device_capability", lambda *a: (9, 0))]
    for quant in (None, "fp8"):
        if quant:
            quantize_model(model, quant, device)
        feats, calls = {}, {}
        for fused in (False, True):
            with contextlib.ExitStack() as stack, torch.inference_mode():
                for patch in patches:
                    stack.enter_context(patch)
                stack.enter_context(mock.patch.object(ops, "VISION_ADD_NORM", fused))
                rows = stack.enter_context(mock.patch.object(tk, "fp8_quantize_rows", wraps=tk.fp8_quantize_rows))
                feats[fused] = model.encode_images(images)
                calls[fused] = rows.call_count
        assert ((feats[True] - feats[False]).abs().max() / feats[False].abs().max()).item() < 1e-4, quant
        layers = v.num_hidden_layers
        if quant:  # per layer 4 row quantizations (QKV, dense, fc1, fc2 with its GELU) and the adapter's 4
            assert calls[False] == 4 * layers + 4 and calls[True] == calls[False] - (2 * layers - 1), calls


def test_vision_add_norm_interpreted():
    run_interpreted(__file__, "vision ok", "vision", timeout=600)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vision_add_norm_cuda():
    check_vision_add_norm("cuda")


def check_fold_a8(device: str) -> None:
    """ops.FOLD_A8 in the model: tiny-random quantized to int4, and to the official fp4 layout (its W4A8 row,
    triton_kernels.FP4_A8), on the residual stream with the fused kernels, one prompt at a time (one decode row):
    the same tokens and logits, bit for bit, as without the fold, with fewer quantize launches (decode per step: the
    first layer's QKV and each layer's dense instead of QKV, dense, gate + up and down in every layer)."""
    for mode, quantizer in (("int4", "quantize_a8"), ("fp4", "quantize_fp4_a8")):
        _check_fold_a8(device, mode, quantizer)


def _check_fold_a8(device: str, mode: str, quantizer: str) -> None:
    from unittest import mock

    from PIL import Image

    from cogvlm2.generation import generate_ids
    from cogvlm2.model import load_model, ops
    from cogvlm2.processing import Processor
    from cogvlm2.quant import linear as quant_linear
    from cogvlm2.quant import quantize_model
    from cogvlm2.quant import triton_kernels as tk
    from cogvlm2.sampling_params import SamplingParams
    from cogvlm2.tiny import checkpoint_folder

    folder = checkpoint_folder("tiny-random")
    model = load_model(str(folder), progress=False, device=device)
    quantize_model(model, mode, device)
    model.residual_stream = True
    layers = len(model.model.layers)
    proc = Processor.from_pretrained(folder)
    params = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    kernels = {}
    if device == "cpu":  # what ops._fused and the quantized layers answer for a CUDA tensor, here for the CPU ones
        on = lambda x: not torch.is_grad_enabled()  # noqa: E731
        kernels = {"ops": mock.patch.object(ops, "_fused", on),
                   "quant": mock.patch.object(quant_linear, "_kernel_ok", on)}
    for prompt in (proc("What is it?", image=Image.new("RGB", (40, 30), (200, 10, 10))), proc("Tell me a story.")):
        runs = {}
        for fold in (False, True):
            with contextlib.ExitStack() as stack, torch.inference_mode():
                for patch in kernels.values():
                    stack.enter_context(patch)
                stack.enter_context(mock.patch.object(ops, "FOLD_A8", fold))
                quantize = stack.enter_context(mock.patch.object(tk, quantizer, wraps=getattr(tk, quantizer)))
                logits = []
                tokens = list(generate_ids(model, [prompt], params, output_logits=logits))
                runs[fold] = tokens, logits, quantize.call_count
        (tokens, logits, plain), (fold_tokens, fold_logits, folded) = runs[False], runs[True]
        steps = plain // (4 * layers)  # decode steps: QKV, dense, gate + up (shared), down in each layer
        assert steps == params.max_new_tokens - 1 and plain == 4 * layers * steps, (mode, plain)
        assert folded == (1 + layers) * steps, (mode, folded, steps)
        assert fold_tokens == tokens and all(torch.equal(a, b) for a, b in zip(fold_logits, logits))


def test_a8_fold_kernels_compile_for_hopper():
    """The RMSNorm and SiLU-mul kernels with their W4A8 row (A8_GROUP) compile for sm_90 at the 19B model's sizes
    (a 4,096 row in one program; 1,024 values a SiLU-mul program) without register spills, with the row's four
    outputs stored on top of the plain kernel's."""
    from cogvlm2.model import triton_ops
    from tests.hopper_compile import compile_for_hopper

    a8 = {"xe_ptr": "*i32", "xo_ptr": "*i32", "sx_ptr": "*fp32", "sq_ptr": "*i32"}
    norm = {"x_ptr": "*bf16", "d_ptr": "*bf16", "w_ptr": "*bf16", "sum_ptr": "*bf16", "out_ptr": "*bf16"} | a8 | {
        "stride_x": "i32", "stride_d": "i32", "stride_s": "i32", "stride_o": "i32", "dim": "i32", "eps": "fp32"}
    silu = {"g_ptr": "*bf16", "u_ptr": "*bf16", "out_ptr": "*bf16"} | a8 | {"n": "i32", "cols": "i32",
                                                                         "row_stride": "i32"}
    for kernel, signature, block, warps, extra in (
            (triton_ops._add_rms_norm_kernel, norm, 4096, 16, {}),
            (triton_ops._silu_mul_kernel, silu, triton_ops.SILU_MUL_BLOCK, 4, {"STRIDED": False})):
        stores = []
        for group in (0, 128, -64):  # none, int4's W4A8 row, the fp4 one (triton_kernels.FP4_A8)
            ptx = compile_for_hopper(kernel, signature, dict(BLOCK=block, PDL=True, A8_GROUP=group, **extra),
                                     num_warps=warps).asm["ptx"]
            assert "ld.local" not in ptx, (kernel.__name__, group)
            stores.append(ptx.count("st.global"))
        assert stores[1] >= stores[0] + 4 and stores[2] >= stores[0] + 2, (kernel.__name__, stores)
    # SiLU-mul over the halves of one gate / up product (ops.FUSE_GATE_UP): rows `row_stride` apart, no spills
    ptx = compile_for_hopper(triton_ops._silu_mul_kernel, silu, dict(BLOCK=triton_ops.SILU_MUL_BLOCK, PDL=True,
                                                                     A8_GROUP=0, STRIDED=True), num_warps=4).asm["ptx"]
    assert "ld.local" not in ptx and "ld.global" in ptx


def test_add_layer_norm_compiles_for_hopper():
    """The vision tower's add + LayerNorm for sm_90 at its 1,792 width, plain and with the fp8 rows: no spills, the
    sum converted to e4m3 only with them."""
    from cogvlm2.model import triton_ops
    from tests.hopper_compile import compile_for_hopper

    signature = {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
                 "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "stride_x": "i32", "stride_y": "i32", "dim": "i32",
                 "eps": "fp32"}
    for fp8 in (False, True):
        ptx = compile_for_hopper(triton_ops._add_layer_norm_kernel, signature,
                                 dict(BLOCK=2048, FP8=fp8, FP8_MAX=448.0), num_warps=8).asm["ptx"]
        assert "ld.local" not in ptx and ("e4m3" in ptx) == fp8, fp8


def test_fold_a8_interpreted():
    run_interpreted(__file__, "fold ok", "fold", timeout=600)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fold_a8_cuda():
    check_fold_a8("cuda")


def test_ops_interpreted():
    run_interpreted(__file__, "ops ok")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ops_cuda():
    check_ops("cuda")


def tiny_greedy_runs(setups: dict, max_new_tokens: int) -> dict:
    """{name: (greedy tokens, logits of each step)} of tiny-random over an image prompt and a text prompt, once
    per setup (a function that prepares the model and the ops)."""
    from PIL import Image

    from cogvlm2.generation import generate_ids
    from cogvlm2.model import load_model
    from cogvlm2.processing import Processor
    from cogvlm2.sampling_params import SamplingParams
    from cogvlm2.tiny import checkpoint_folder

    folder = checkpoint_folder("tiny-random")
    model = load_model(str(folder), progress=False)
    proc = Processor.from_pretrained(folder)
    batch = [proc("What is it?", image=Image.new("RGB", (40, 30), (200, 10, 10))), proc("Tell me a story.")]
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
    runs = {}
    with torch.inference_mode():
        for name, setup in setups.items():
            setup(model)
            logits = []
            runs[name] = list(generate_ids(model, batch, params, output_logits=logits)), logits
    return runs


def check_fused_model() -> None:
    """The tiny model through every fused op of the CUDA inference path (Triton kernels, here interpreted on
    the CPU, the residual stream, gate and up as one GEMM) against the plain torch path: the same greedy tokens,
    logits equal to float32 rounding, in prefill (image and text rows) and decode."""
    from cogvlm2.model import ops
    from cogvlm2.model.cogvlm import fuse_gate_up

    def setup(fused: bool):
        def prepare(model):
            # what ops._fused answers for a CUDA tensor, here for the CPU ones
            ops._fused = (lambda x: not torch.is_grad_enabled()) if fused else (lambda x: False)
            model.residual_stream = fused
            if fused:  # and gate / up as one GEMM, as the engine's Worker sets up on CUDA
                assert fuse_gate_up(model) > 0
        return prepare

    runs = tiny_greedy_runs({"plain": setup(False), "fused": setup(True)}, max_new_tokens=6)
    (tokens, fused_logits), (ref_tokens, ref_logits) = runs["fused"], runs["plain"]
    assert tokens == ref_tokens
    assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(fused_logits, ref_logits)) < 1e-5


def test_fused_model_path_interpreted():
    run_interpreted(__file__, "fused model ok", "model", timeout=600)


def test_residual_stream_equals_the_layer_loop():
    """The decoder on the residual stream (the engine's: the 64 residual adds of the 19B model fused into the
    RMSNorms after them where the kernels run) gives the plain layer loop's logits bit for bit, in prefill (image
    and text tokens routed to their experts) and in decode steps (here both with the torch ops; the kernel's
    equality to them: check_ops); only the engine's Worker turns it on."""
    from cogvlm2.engine.worker import Worker
    from cogvlm2.model import load_model
    from cogvlm2.tiny import checkpoint_folder

    runs = tiny_greedy_runs({stream: (lambda model, s=stream: setattr(model, "residual_stream", s))
                             for stream in (False, True)}, max_new_tokens=4)
    (_, stream), (_, plain) = runs[True], runs[False]
    assert len(stream) == 4 and all(torch.equal(a, b) for a, b in zip(stream, plain))
    model = load_model(str(checkpoint_folder("tiny-random")), progress=False)
    assert not model.residual_stream  # training, the reference loop: the plain layer loop
    Worker(model).load()
    assert model.residual_stream


if __name__ == "__main__" and sys.argv[1:] == ["model"]:
    check_fused_model()
    print("fused model ok")
elif __name__ == "__main__" and sys.argv[1:] == ["vision"]:
    check_vision_add_norm("cpu")
    print("vision ok")
elif __name__ == "__main__" and sys.argv[1:] == ["fold"]:
    check_fold_a8("cpu")
    print("fold ok")
elif __name__ == "__main__":
    check_ops("cpu")
    print("ops ok")


def test_mlp_pairs_gate_and_up_where_the_layer_can():
    """ops.mlp with x prepared for gate and up (`shared`) asks the gate for both products in one launch
    (`matmul_pair`, e.g. int4's W4A8 GEMV over both weights) and uses them; where it declines (None) or has no such
    method, each layer is called with `shared`."""
    from cogvlm2.model import ops

    class Layer(torch.nn.Linear):
        def __init__(self, pair):
            super().__init__(8, 8, bias=False)
            self.pair, self.calls = pair, []

        def forward(self, x, shared=None):
            self.calls.append(shared)
            return super().forward(x)

        def matmul_pair(self, other, x, shared):
            self.calls.append(("pair", shared))
            return (super().forward(x), other.weight.new_ones(1, 8)) if self.pair else None

    torch.manual_seed(0)
    x, down = torch.randn(1, 8), torch.nn.Linear(8, 8, bias=False)
    for pair in (True, False):
        gate, up = Layer(pair), Layer(False)
        expected = down(torch.nn.functional.silu(gate(x)) * (torch.ones(1, 8) if pair else up(x)))
        gate.calls.clear(), up.calls.clear()
        assert torch.allclose(ops.mlp(gate, up, down, x, shared="row"), expected)
        assert gate.calls == [("pair", "row")] + ([] if pair else ["row"])
        assert up.calls == ([] if pair else ["row"])


def test_fuse_gate_up_makes_gate_and_up_halves_of_one_weight():
    """cogvlm.fuse_gate_up (what the engine does to a CUDA model): every MLP's gate and up become the halves of one
    tensor, state_dict unchanged; 2+ rows then go through one product over it (ops.gate_up_weight) with the unfused
    layers' numbers, one row, autograd, FUSE_GATE_UP off or parameters that are no longer its views do not; fusing
    again does nothing."""
    from cogvlm2.model import load_model, ops
    from cogvlm2.model.cogvlm import MLP, fuse_gate_up
    from cogvlm2.tiny import checkpoint_folder

    model = load_model(str(checkpoint_folder("tiny-random")), dtype="float32", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert fuse_gate_up(model) == len(mlps) > 0 and fuse_gate_up(model) == 0
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    mlp = mlps[0]
    g, u = mlp.gate_proj, mlp.up_proj
    x = torch.randn(4, g.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        both = ops.gate_up_weight(g, u, x)
        assert both is not None and both.shape == (2 * g.out_features, g.in_features)
        assert ops.gate_up_weight(g, u, x[:1]) is None  # one row: the GEMV's (on CUDA)
        fused = mlp(x)
        with mock.patch.object(ops, "FUSE_GATE_UP", False):
            assert ops.gate_up_weight(g, u, x) is None
            plain = mlp(x)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    with torch.enable_grad():
        assert ops.gate_up_weight(g, u, x) is None
    model.double()  # new parameter tensors: no longer the halves of the kept one
    with torch.inference_mode():
        assert ops.gate_up_weight(g, u, x.double()) is None and mlp(x.double()).shape == fused.shape

"""Fused Triton ops of the decoder against their torch reference (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import sys

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
        for d in (16, 24):  # 24: the tiny model's head dim, whose half is no power of 2
            hq, hkv, n = 4, 2, 9
            qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(device, dtype)
            cos, sin = ops.rotary_cos_sin(torch.randint(0, 5000, (n,), generator=g).to(device),
                                          ops.inv_freq_formula(d, 500000.0).to(device, dtype))
            with torch.enable_grad():
                q_ref, k_ref, v_ref = ops.rotary_qkv(qkv.clone(), cos, sin, hq, hkv, d)
            triton_ops.rotary_(qkv, cos, sin, hq + hkv, d)
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            for a, b in ((q, q_ref), (k, k_ref), (v, v_ref)):
                assert (a.reshape(b.shape).float() - b.float()).abs().max() <= tol * b.abs().max()


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
    the CPU, and the residual stream) against the plain torch path: the same greedy tokens, logits equal to
    float32 rounding, in prefill (image and text rows) and decode."""
    from cogvlm2.model import ops

    def setup(fused: bool):
        def prepare(model):
            # what ops._fused answers for a CUDA tensor, here for the CPU ones
            ops._fused = (lambda x: not torch.is_grad_enabled()) if fused else (lambda x: False)
            model.residual_stream = fused
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
elif __name__ == "__main__":
    check_ops("cpu")
    print("ops ok")

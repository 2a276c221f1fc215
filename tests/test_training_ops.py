"""Training-path speed-ups against the eager reference: the torch.compile'd RMSNorm / rotary /
SiLU-and-multiply (ops.compile_training_ops) and grouped-query packed attention give the same loss and
gradients as the plain torch code, with gradient checkpointing on (what the trainer runs)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from cogvlm2.finetune.lora import apply_lora  # noqa: E402
from cogvlm2.finetune.objective import CausalLMLoss  # noqa: E402
from cogvlm2.finetune.packing import pack  # noqa: E402
from cogvlm2.finetune.toy import QUESTION, colour_image  # noqa: E402
from cogvlm2.model import load_model, ops  # noqa: E402
from cogvlm2.model.attention import PackedAttention  # noqa: E402
from cogvlm2.processing import Processor  # noqa: E402
from cogvlm2.tiny import checkpoint_folder  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def lora_model(device: str):
    model = load_model(str(checkpoint_folder("tiny")), device=device, progress=False)
    apply_lora(model, ["vision_expert_qkv", "language_expert_qkv"], dropout=0.0)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    model.train()
    model.gradient_checkpointing = True
    proc = Processor.from_pretrained(model.checkpoint_path, model.config)
    batch = pack([proc(QUESTION, image=colour_image(c, random.Random(i)), answer=c)
                  for i, c in enumerate(["red", "blue"])]).to(device)
    return model, batch


def loss_and_grads(model, batch, autocast: bool) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = CausalLMLoss(model)(batch)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def compare(device: str, backend: str, autocast: bool, rtol: float) -> None:
    model, batch = lora_model(device)
    ops._compile.cache_clear()
    try:
        ops.compile_training_ops(False)
        ref_loss, ref_grads = loss_and_grads(model, batch, autocast)
        ops.compile_training_ops(True, (device,), backend)
        loss, grads = loss_and_grads(model, batch, autocast)
        assert ops._compile.cache_info().currsize == 3  # rms_norm, rotary, silu_mul all went through compile
    finally:
        ops.compile_training_ops(False)
    assert loss == pytest.approx(ref_loss, rel=rtol)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert (g - ref).abs().max() <= rtol * ref.abs().max() + 1e-12


def test_compiled_training_ops_trace_the_eager_math():
    """CPU: the same graphs through AOTAutograd (no code generation: fast); fp32 gives identical numbers."""
    compare("cpu", "aot_eager", autocast=False, rtol=1e-6)


def test_compiled_training_ops_leave_inference_alone():
    model, batch = lora_model("cpu")
    ops._compile.cache_clear()
    ops.compile_training_ops(True, ("cpu",), "aot_eager")
    try:
        with torch.no_grad():  # inference: eager (and the Triton kernels on CUDA), never compiled
            CausalLMLoss(model)(batch)
    finally:
        ops.compile_training_ops(False)
    assert ops._compile.cache_info().currsize == 0


@cuda
def test_compiled_training_ops_on_cuda_match_eager():
    """CUDA: inductor's fused kernels (bf16 autocast, as the trainer runs) against eager torch."""
    compare("cuda", "inductor", autocast=True, rtol=2e-2)


@cuda
def test_packed_attention_grouped_query_heads_on_cuda():
    """bf16 on CUDA hands SDPA the Hkv heads (enable_gqa); output and gradients equal the repeated-heads path."""
    g = torch.Generator().manual_seed(0)
    n, hq, hkv, d = 300, 8, 2, 64
    q, k, v = (torch.randn(n, h, d, generator=g).cuda().bfloat16().requires_grad_() for h in (hq, hkv, hkv))
    out = PackedAttention([0, 120, 300])(0, q, k, v)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = []
    for a, b in ((0, 120), (120, 300)):
        ks = k2[a:b].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        vs = v2[a:b].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        ref.append(F.scaled_dot_product_attention(q2[a:b].transpose(0, 1)[None], ks[None], vs[None],
                                                  is_causal=True)[0].transpose(0, 1))
    ref = torch.cat(ref)
    ref.float().square().sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, (q2.grad, k2.grad, v2.grad)):
        assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()


def test_packed_attention_keeps_examples_apart():
    """CPU fp32 (repeated heads): each example attends causally to itself only."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(10, 4, 8, generator=g), torch.randn(10, 2, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    out = PackedAttention([0, 4, 10])(0, q, k, v)
    alone = PackedAttention([0, 6])(0, q[4:], k[4:], v[4:])
    torch.testing.assert_close(out[4:], alone)
    torch.testing.assert_close(out[:4], PackedAttention([0, 4])(0, q[:4], k[:4], v[:4]))

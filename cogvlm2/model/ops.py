"""Elementwise ops of the decoder: plain torch (the reference, used on CPU and for training) and fused
Triton kernels used on CUDA in inference, where each saved launch matters at decode (about 1,400
tiny kernels per step become about 500).

The fused path is taken only for CUDA tensors with autograd off; the Triton kernels compute in
float32 exactly as the torch code does, so they agree to float32 rounding (tests/test_model_ops.py).

Training (autograd on) can fuse too, opt-in: `compile_training_ops(True)` (the trainer's
`--compiled-ops`) runs the same torch code of RMSNorm, rotary and SiLU-and-multiply through
torch.compile on CUDA tensors that need gradients, so each becomes one fused kernel forward and one
backward instead of 5-10 eager elementwise kernels (each reading / writing [N, D] in float32) per call,
recomputation included. Inductor is told to round where eager rounds (emulate_precision_casts), so the
math is the eager code's; tests/test_model_ops.py checks losses and gradients against it.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:  # Triton is optional: CPU installs and training never need it
    from . import gemv as gemv_kernel
    from . import triton_ops
except ImportError:  # pragma: no cover - exercised on machines without triton
    gemv_kernel = triton_ops = None

# Batch-1 decode's plain linears (no bias, CUDA, autograd off: the language expert's QKV and dense, the MLP, the
# lm_head) through the one-row Triton GEMV of gemv.py instead of cuBLAS: on an H200 it streams the TP=1 decode
# weights at 94% of copy bandwidth (cuBLAS 87%) and TP=2's at 83% (cuBLAS 70%), engine batch-1 decode 201 -> 219
# tok/s (BENCHMARKS.md). On by default; COGVLM2_DECODE_GEMV=0 (read at import) keeps cuBLAS
DECODE_GEMV = os.environ.get("COGVLM2_DECODE_GEMV", "1") != "0"
# 2-64 rows (batched decode, short prefills) through gemv.skinny (tensor cores, whole weight rows a program, no K
# split) instead of cuBLAS: off, measured slower than cuBLAS at 8-64 rows on the H200 (gemv.py);
# COGVLM2_DECODE_SKINNY=1 turns it on at import
DECODE_SKINNY = os.environ.get("COGVLM2_DECODE_SKINNY", "0") == "1"
# SKINNY_MAX_WEIGHT: with DECODE_SKINNY, only weights of at most this many elements take the skinny GEMM (0: every
# one), e.g. 33,554,432 (32 Mi) for the attention's QKV and dense, which cuBLAS reads at 78% / 63% of copy bandwidth
# at 32 rows on the H200, while the MLP's (90-101%) and the lm_head stay on cuBLAS (gemv.py's split of K is for
# them; not yet measured in the engine). COGVLM2_SKINNY_MAX_WEIGHT (read at import)
SKINNY_MAX_WEIGHT = int(os.environ.get("COGVLM2_SKINNY_MAX_WEIGHT", "0"))
# Batch-1 decode's QKV projection, the rotary of q and k and the K/V store into the paged cache in one kernel
# (gemv.gemv_rotary: two launches a layer less, bit-equal to the three). On by default: on the H200 235.8 -> 236.3
# tok/s at batch 1 (benchmarks/decode_ab.py, two rounds each, BENCHMARKS.md); COGVLM2_DECODE_QKV_ROTARY=0 (read at
# import) keeps the three
DECODE_QKV_ROTARY = os.environ.get("COGVLM2_DECODE_QKV_ROTARY", "1") != "0"
# FOLD_A8: for int4 decode at batch 1 the kernels that produce a linear's input row (add + RMSNorm before the QKV
# and the MLP, SiLU-mul before down) also write it quantized for the W4A8 GEMV (quant.triton_kernels), so the GEMV
# needs no quantize launch (96 fewer a step; bit-equal, tests/test_model_ops.py). On: engine int4 decode at batch 1
# 340.3 -> 356.4 tok/s on the H200 (`benchmarks/decode_ab.py --quant int4 --set "model.ops.FOLD_A8=0" --set
# "model.ops.FOLD_A8=1"`, two rounds, BENCHMARKS.md, fourteenth session). The official fp4 layout's W4A8 row too
# (quant.triton_kernels.FP4_A8): its batch-1 decode 305.7 -> 316.3 tok/s (the same A/B with `--quant fp4`, fifteenth
# session). COGVLM2_FOLD_A8=0 (read at import) turns it off
FOLD_A8 = os.environ.get("COGVLM2_FOLD_A8", "1") != "0"
# VISION_ADD_NORM: the vision tower's post-norm residual (x + LayerNorm(y), twice a layer) in one kernel instead of
# torch's two, which under --quant fp8 also writes the sum quantized for the next fp8 linear (QKV or fc1), so its
# row-quantize pass goes too: ~7 B of the ~13 B an element those passes move (the H200 fp8 prefill profile of
# 2026-12-01: LayerNorm 4.5 + adds 3.1 + fp8 row quantizer 17.1 ms of TTFT). Not bit-equal to torch's LayerNorm
# (float32 statistics summed in another order). On: TTFT on the H200 fp8 203.2 -> 199.5 ms, bf16 284.2 -> 282.0
# (`benchmarks/decode_ab.py [--quant fp8] --set "model.ops.VISION_ADD_NORM=0" --set "model.ops.VISION_ADD_NORM=1"
# --batches '' --ttft 3`, two rounds, BENCHMARKS.md, fourteenth session); COGVLM2_VISION_ADD_NORM=0 (read at import)
# turns it off
VISION_ADD_NORM = os.environ.get("COGVLM2_VISION_ADD_NORM", "1") != "0"
# FUSE_GATE_UP: 2+ rows (batched decode, prefill) through the MLP's gate and up as one GEMM over the weight they are
# the halves of (cogvlm.fuse_gate_up, done by the engine on CUDA), the product's halves going to SiLU-mul as strided
# views: on the H200 cuBLAS reads [28,672, 4,096] at 32 rows at 101% of copy bandwidth against 93% for each half
# (the 32 layers' gate + up 1.835 against 2 x 0.996 ms, `benchmarks/kernels_gpu.py --only shapes`). In the engine:
# bf16 batch-32 step 7.54 -> 7.48 ms, TTFT 284.4 -> 281.4 ms, batch 1 unchanged (its one row: the fused GEMV)
# (`benchmarks/decode_ab.py --set "model.ops.FUSE_GATE_UP=0" --set "model.ops.FUSE_GATE_UP=1" --batches 1,32
# --ttft 3 --rounds 2`, BENCHMARKS.md, eighteenth session). COGVLM2_FUSE_GATE_UP=0 (read at import) turns it off
FUSE_GATE_UP = os.environ.get("COGVLM2_FUSE_GATE_UP", "1") != "0"


def _fused(x: torch.Tensor) -> bool:
    return triton_ops is not None and x.is_cuda and not torch.is_grad_enabled()


_COMPILED_TRAINING = {"enabled": False, "device_types": ("cuda",), "backend": "inductor"}


def compile_training_ops(enabled: bool, device_types: tuple[str, ...] = ("cuda",), backend: str = "inductor") -> None:
    """Route RMSNorm, rotary and SiLU-and-multiply through torch.compile when autograd records them
    (training) on these device types; off (the default): plain eager torch. Inference is unaffected.
    backend: torch.compile's ("aot_eager" traces the same graphs without generating kernels: tests)."""
    _COMPILED_TRAINING.update(enabled=bool(enabled), device_types=tuple(device_types), backend=backend)


def _compiled_training(x: torch.Tensor) -> bool:
    return (_COMPILED_TRAINING["enabled"] and torch.is_grad_enabled() and x.requires_grad
            and x.device.type in _COMPILED_TRAINING["device_types"])


def _compiled(fn):
    return _compile(fn, _COMPILED_TRAINING["backend"])


@functools.cache
def _compile(fn, backend: str):
    """fn through torch.compile: one graph, any token count, eager's rounding of bf16 intermediates."""
    options = {"emulate_precision_casts": True} if backend == "inductor" else None
    return torch.compile(fn, backend=backend, dynamic=True, fullgraph=True, options=options)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As the official RMSNorm: normalise in float32, multiply by the weight in float32, cast back."""
    if _fused(x):
        return triton_ops.rms_norm(x, weight, eps)
    if _compiled_training(x):
        return _compiled(_rms_norm)(x, weight, eps)
    return _rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta, weight)): a residual add and the RMSNorm after it, one kernel on CUDA
    (equal bit for bit to the two ops there), the two ops elsewhere."""
    if _fused(x):
        return triton_ops.add_rms_norm(x, delta, weight, eps)
    total = x + delta
    return total, rms_norm(total, weight, eps)


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, norm: torch.nn.LayerNorm,
                   consumer: torch.nn.Module | None = None) -> tuple[torch.Tensor, object]:
    """(x + norm(y), shared): the vision tower's post-norm residual, one kernel where the fused kernels run and
    VISION_ADD_NORM is set (float32 statistics like torch's, summed in another order: equal to the last bit or so),
    which also quantizes the sum for `consumer` when that is an fp8 linear that can take it (`shares_fp8`: shared,
    passed to its call); the two torch ops and shared None otherwise."""
    if VISION_ADD_NORM and _fused(x) and norm.weight is not None and norm.bias is not None:
        fp8 = consumer is not None and hasattr(consumer, "shares_fp8") and consumer.shares_fp8(x)
        out, q, s = triton_ops.add_layer_norm(x, y, norm.weight, norm.bias, norm.eps, fp8)
        return out, (q, s) if fp8 else None
    return x + norm(y), None


def a8_group(layers: tuple[torch.nn.Module, ...], x: torch.Tensor) -> int:
    """With FOLD_A8, the group size in which `layers` (all reading one row shaped like x) would each quantize it for
    their W4A8 GEMV (`shares_a8`, e.g. quant.Int4Linear), so its producer can do it once; else 0."""
    shares = getattr(layers[0], "shares_a8", None) if FOLD_A8 and _fused(x) else None
    return shares(x, *layers[1:]) if shares is not None else 0


def add_rms_norm_a8(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                    group: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """add_rms_norm's pair and, with `group` (a8_group) where the fused kernel can, the normed row quantized for the
    W4A8 GEMV in the same kernel (None otherwise: the layers quantize it themselves)."""
    if group and _fused(x):
        return triton_ops.add_rms_norm_a8(x, delta, weight, eps, group)
    return (*add_rms_norm(x, delta, weight, eps), None)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if _fused(gate):
        return triton_ops.silu_mul(gate, up)
    if _compiled_training(gate):
        return _compiled(_silu_mul)(gate, up)
    return _silu_mul(gate, up)


def _plain(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    return (type(layer) is torch.nn.Linear and layer.bias is None and gemv_kernel is not None and x.is_cuda
            and not torch.is_grad_enabled())


def _gemv_applies(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    return DECODE_GEMV and x.numel() == x.shape[-1] and _plain(layer, x)


def linear(layer: torch.nn.Module, x: torch.Tensor, shared=None) -> torch.Tensor:
    """layer(x); through a plain bias-free nn.Linear a single row goes through the Triton GEMV when DECODE_GEMV is
    set, and 2 to SKINNY_MAX_ROWS rows through the skinny GEMM when DECODE_SKINNY is (any other layer, a LoRA
    wrapper or a quantized linear included, is called as is). `shared`: x prepared for the layer by whoever made x
    (layer.shared_input's kind, e.g. an int4 layer's W4A8 row), passed on."""
    if shared is not None:
        return layer(x, shared)
    if _gemv_applies(layer, x):
        return gemv_kernel.gemv(x, layer.weight)
    if _skinny_applies(layer, x):
        return gemv_kernel.skinny(x, layer.weight)
    return layer(x)


def _skinny_applies(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    return DECODE_SKINNY and _plain(layer, x) and 1 < x.numel() // max(x.shape[-1], 1) <= gemv_kernel.SKINNY_MAX_ROWS \
        and (not SKINNY_MAX_WEIGHT or layer.weight.numel() <= SKINNY_MAX_WEIGHT)


def gate_up_silu_mul(gate: torch.nn.Module, up: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu_mul(gate(x), up(x)): where the GEMV (one row) or the skinny GEMM (a few) applies to both layers, one
    kernel computes both and the activation (the same numbers as the three calls, bit for bit); quantized layers
    that can share work on their common input (`shared_input`) do it once."""
    if _gemv_applies(gate, x) and _gemv_applies(up, x):
        return gemv_kernel.gemv_silu_mul(x, gate.weight, up.weight)
    if _skinny_applies(gate, x) and _skinny_applies(up, x):
        return gemv_kernel.skinny_silu_mul(x, gate.weight, up.weight)
    both = gate_up_weight(gate, up, x)
    if both is not None:
        gu = torch.nn.functional.linear(x, both)
        n = gate.weight.shape[0]
        return silu_mul(gu[..., :n], gu[..., n:])
    shared = gate.shared_input(x, up) if hasattr(gate, "shared_input") else None  # e.g. int4's W4A8 row, once
    return silu_mul(*_gate_up(gate, up, x, shared))


def gate_up_weight(gate: torch.nn.Module, up: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The one weight whose halves gate's and up's weights are (cogvlm.fuse_gate_up), where x's 2+ rows go through
    it (FUSE_GATE_UP; plain bias-free nn.Linear layers, autograd off); None otherwise, e.g. after the parameters were
    replaced or moved and are no longer its views."""
    both = getattr(gate, "gate_up_weight", None)
    if not (FUSE_GATE_UP and both is not None and type(gate) is type(up) is torch.nn.Linear and gate.bias is None
            and up.bias is None and x.numel() > x.shape[-1] and not torch.is_grad_enabled()):
        return None
    return both if both.device == x.device and halves_of(both, gate.weight, up.weight) else None


def halves_of(both: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether g and u are the first and second halves (by rows) of `both`, as views."""
    n = g.shape[0]
    return (both.shape[0] == n + u.shape[0] and g.shape[1:] == u.shape[1:] == both.shape[1:] and both.is_contiguous()
            and g.data_ptr() == both.data_ptr() and u.data_ptr() == both.data_ptr() + n * both.stride(0) * both.itemsize
            and g.stride() == u.stride() == both.stride())


def _gate_up(gate: torch.nn.Module, up: torch.nn.Module, x: torch.Tensor, shared) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate(x), up(x)), x prepared for both by `shared` where not None: one launch where the layers can pair
    (`matmul_pair`, e.g. int4's W4A8 GEMV or Gluon tile over both weights), else a call each."""
    pair = getattr(gate, "matmul_pair", None)
    both = pair(up, x, shared) if pair is not None else None
    if both is not None:
        return both
    return (gate(x, shared), up(x, shared)) if shared is not None else (linear(gate, x), linear(up, x))


def mlp(gate: torch.nn.Module, up: torch.nn.Module, down: torch.nn.Module, x: torch.Tensor,
        shared=None) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) as gate_up_silu_mul and linear compute it; `shared`: x already prepared for gate
    and up (add_rms_norm_a8's), and with FOLD_A8 the SiLU-mul kernel prepares its output for down likewise."""
    if shared is None:
        return linear(down, gate_up_silu_mul(gate, up, x))
    g, u = _gate_up(gate, up, x, shared)
    group = a8_group((down,), g)
    if group:
        act, act_a8 = triton_ops.silu_mul_a8(g, u, group)
        return linear(down, act, act_a8)
    return linear(down, silu_mul(g, u))


ROPE_MODES = ("official", "exact")


def inv_freq_formula(head_dim: int, theta: float) -> torch.Tensor:
    """The rotary frequencies 1 / theta^(2j/d) in float32 on the CPU (what the official code computes at init)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device="cpu", dtype=torch.float32) / head_dim)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, head_dim/2] in float32 for positions [N], computed in the dtype of `inv_freq`.

    This is the official `FastRotaryEmbedding` (pos_idx_in_fp32=False): the position index is cast to
    the buffer's dtype, `position * inv_freq` and cos/sin are evaluated in that dtype. With a float32
    buffer every step is exact float32; with a bfloat16 buffer (a bf16 model) positions above 256 round
    (257 -> 256, 259 -> 260, ...) and so do the angles and cos/sin, exactly as the official bf16 model.
    """
    angles = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (GPT-NeoX) rotation over the full head dim, in float32. x [N, H, d]; cos/sin [N, d/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused QKV output [N, (Hq + 2 Hkv) d] -> rotated q [N, Hq, d], rotated k [N, Hkv, d], v [N, Hkv, d].

    The fused path rotates q and k in place inside `qkv` (one kernel) and returns views.
    """
    n = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if _fused(qkv) and qkv.is_contiguous():
        triton_ops.rotary_(qkv, cos, sin, num_heads + num_kv_heads, head_dim)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return q.view(n, num_heads, head_dim), k.view(n, num_kv_heads, head_dim), v.view(n, num_kv_heads, head_dim)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    rotate = _compiled(_rotate_qk) if _compiled_training(qkv) else _rotate_qk
    q, k = rotate(q.reshape(n, num_heads, head_dim), k.reshape(n, num_kv_heads, head_dim), cos, sin)
    return q, k, v.reshape(n, num_kv_heads, head_dim)


def qkv_rotary(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
               num_kv_heads: int, head_dim: int, store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               shared=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """rotary_qkv(linear(layer, x, shared), ...) and whether k / v were also stored: the projection of language rows
    and the rotary of q and k; one kernel where the one-row GEMV applies and DECODE_QKV_ROTARY is set (the same
    numbers, bit for bit), which with `store` (k_cache, v_cache, slots: the attention backend's kv_destination) also
    writes k and v into the paged cache (True last), so the backend's store launch is not needed."""
    if DECODE_QKV_ROTARY and _gemv_applies(layer, x) and cos.dtype == torch.float32 and cos.shape[0] == 1 \
            and (head_dim // 2) % gemv_kernel.CONFIG[0] == 0:
        n, q_size, kv_size = x.shape[0], num_heads * head_dim, num_kv_heads * head_dim
        qkv = gemv_kernel.gemv_rotary(x, layer.weight, cos, sin, num_heads + num_kv_heads, head_dim, store=store)
        q, k, v = qkv.view(n, -1).split([q_size, kv_size, kv_size], dim=-1)
        return (q.view(n, num_heads, head_dim), k.view(n, num_kv_heads, head_dim), v.view(n, num_kv_heads, head_dim),
                store is not None)
    return (*rotary_qkv(linear(layer, x, shared), cos, sin, num_heads, num_kv_heads, head_dim), False)


def _rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

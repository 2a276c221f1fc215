"""Quantized drop-in replacements for nn.Linear (inference only): fp4/nf4 (the official int4 checkpoints'
bitsandbytes layout), group-wise int4, and fp8 with dynamic per-token activation scales.

Each keeps `in_features`, `out_features` and a `bias` in the model dtype. On CUDA with autograd off the
4-bit layers run the Triton kernels of `triton_kernels.py`; elsewhere (CPU, training) they dequantize
with the torch reference of `formats.py` and call F.linear, which is the exact reference the kernels
are tested against. fp8 uses torch._scaled_mm on GPUs that have it (compute capability >= 8.9) and
otherwise computes the same quantized product in float32.

State-dict keys of Fp4Linear are the official ones: `weight` (packed uint8 [N*K/2, 1]), `weight.absmax`
(float32 per 64 weights) and `weight.quant_map` (the 16 code values). The fourth official key,
`weight.quant_state.bitsandbytes__<fp4|nf4>`, is metadata (type, block size, shape): the loader checks it
with `Fp4Linear.check_quant_state` instead of storing it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import formats

try:  # Triton is optional: CPU installs never need it
    from . import triton_kernels
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton_kernels = None


def _kernel_ok(x: torch.Tensor) -> bool:
    return triton_kernels is not None and x.is_cuda and not torch.is_grad_enabled()


def _rename_keys(renames: dict[str, str]):
    def hook(module, state_dict, prefix, local_metadata):
        for old, new in renames.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
    return hook


class QuantLinear(nn.Module):
    """Shared shape, bias and reference forward: y = x @ dequantize(x.dtype)^T + bias. A subclass defines
    `dequantize(dtype)`: the weight [out_features, in_features] in `dtype`, as its kernels see it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def matmul(self, x: torch.Tensor, shared=None) -> torch.Tensor:
        """x @ W^T; `shared` (what a subclass's shared_input returned: x prepared for its kernels) unused here."""
        return F.linear(x, self.dequantize(x.dtype))

    def forward(self, x: torch.Tensor, shared=None) -> torch.Tensor:
        """self(x); `shared`: what shared_input(x, ...) returned, for each of the layers it was asked for."""
        y = self.matmul(x, shared)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward_gelu(self, h: torch.Tensor) -> torch.Tensor:
        """self(F.gelu(h)) with the exact GELU: the vision MLP's second linear calls this, so a layer that can
        apply the GELU inside its own input pass (Fp8Linear) does."""
        return self(F.gelu(h))

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


_FP4_KEYS = {"weight_absmax": "weight.absmax", "weight_quant_map": "weight.quant_map",
             "weight_nested_absmax": "weight.nested_absmax", "weight_nested_quant_map": "weight.nested_quant_map"}


class Fp4Linear(QuantLinear):
    """bitsandbytes 4-bit layout (fp4 or nf4, blocks of 64 along the flattened row-major weight); `nested`:
    8-bit absmax (bitsandbytes' double quantization: two more keys, `weight.nested_absmax` and
    `weight.nested_quant_map`, and the offset in the quant state)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant_type: str = "fp4",
                 blocksize: int = formats.BNB_BLOCKSIZE, dtype: torch.dtype | None = None, nested: bool = False):
        super().__init__(in_features, out_features, bias, dtype)
        if in_features % blocksize:
            raise ValueError(f"in_features {in_features} is not a multiple of the 4-bit block size {blocksize}")
        self.quant_type, self.blocksize, self.nested = quant_type, blocksize, nested
        self.nested_offset = 0.0  # python float: read by the kernels without a device sync
        n = out_features * in_features
        self.register_buffer("weight", torch.empty(n // 2, 1, dtype=torch.uint8))
        absmax_dtype = torch.uint8 if nested else torch.float32
        self.register_buffer("weight_absmax", torch.empty(n // blocksize, dtype=absmax_dtype))
        self.register_buffer("weight_quant_map", formats.code_table(quant_type))
        if nested:
            self.register_buffer("weight_nested_absmax", torch.empty(-(-n // blocksize // formats.NESTED_BLOCKSIZE)))
            self.register_buffer("weight_nested_quant_map", torch.empty(256))
        self.register_state_dict_post_hook(_rename_keys(_FP4_KEYS))
        self.register_load_state_dict_pre_hook(_rename_keys({v: k for k, v in _FP4_KEYS.items()}))

    @torch.no_grad()
    def compress_statistics(self) -> "Fp4Linear":
        """Float32 absmax -> 8-bit (nested) in place: 3 bytes fewer per 64 weights; the codes are unchanged."""
        if not self.nested:
            a8, nested_absmax, code, offset = formats.quantize_absmax(self.weight_absmax)
            self.weight_absmax = a8
            self.register_buffer("weight_nested_absmax", nested_absmax)
            self.register_buffer("weight_nested_quant_map", code.to(a8.device))
            self.nested, self.nested_offset = True, offset
        return self

    def absmax(self) -> torch.Tensor:
        """The float32 absmax [N*K/64] (dequantized when nested)."""
        if not self.nested:
            return self.weight_absmax
        return formats.dequantize_absmax(self.weight_absmax, self.weight_nested_absmax, self.weight_nested_quant_map,
                                         self.nested_offset)

    def _nested_args(self):
        return (self.weight_nested_absmax, self.weight_nested_quant_map, self.nested_offset) if self.nested else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "fp4", device: torch.device | str | None = None,
                    use_bitsandbytes: bool = False) -> "Fp4Linear":
        """Quantize `linear` on `device` (default: its own); bitsandbytes' quantizer when asked (same codes)."""
        w = linear.weight.detach().to(device or linear.weight.device)
        with torch.device(w.device):
            q = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type,
                    dtype=linear.weight.dtype)
        if use_bitsandbytes:
            import bitsandbytes.functional as bnbf

            packed, state = bnbf.quantize_4bit(w, blocksize=q.blocksize, quant_type=quant_type)
            absmax = state.absmax
        else:
            packed, absmax = formats.quantize_4bit(w, quant_type, q.blocksize)
        q.weight.copy_(packed.view(q.weight.shape))
        q.weight_absmax.copy_(absmax)
        if q.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def quant_state_key(self) -> str:
        return f"weight.quant_state.bitsandbytes__{self.quant_type}"

    def check_quant_state(self, t: torch.Tensor) -> None:
        """Raise ValueError unless the checkpoint's packed quant state describes this layer; a nested
        layer takes its offset from it."""
        state = formats.parse_bnb_quant_state(t)
        want = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "shape": [self.out_features, self.in_features], "nested": self.nested}
        got = {k: state.get(k) for k in want}
        got["shape"] = list(got["shape"] or [])
        got["nested"] = "nested_offset" in state
        if self.nested and state.get("nested_blocksize") != formats.NESTED_BLOCKSIZE:
            raise ValueError(f"nested block size {state.get('nested_blocksize')} (only {formats.NESTED_BLOCKSIZE} is "
                             "supported)")
        if got != want:
            raise ValueError(f"bitsandbytes quant state {got} does not match the layer {want}")
        if self.nested:
            self.nested_offset = float(state["nested_offset"])

    def quant_state(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return formats.bnb_quant_state(self.quant_type, (self.out_features, self.in_features), dtype, self.blocksize,
                                       self.nested_offset if self.nested else None)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if triton_kernels is not None and self.weight.is_cuda:
            return triton_kernels.fp4_dequantize(self.weight, self.weight_absmax, self.weight_quant_map,
                                                 self.out_features, self.in_features, dtype, self.blocksize,
                                                 self._nested_args())
        return formats.dequantize_4bit(self.weight, self.absmax(), self.weight_quant_map,
                                       (self.out_features, self.in_features), dtype, self.blocksize)

    def _pair_table(self, dtype: torch.dtype):
        """The tile kernel's 256-entry pair table for `dtype` (triton_kernels.pair_table), built once per dtype,
        device and quant_map version; not kept when built during CUDA-graph capture (it would live in the graph's
        memory pool), so such a call builds it inside the graph instead."""
        if dtype == torch.float32:
            return None
        lut = self.weight_quant_map
        key = (dtype, lut.device, lut.data_ptr(), lut._version)
        cache = self.__dict__.setdefault("_pair_tables", {})
        if key not in cache:
            table = triton_kernels.pair_table(lut, dtype, self.quant_type == "fp4")
            if torch.cuda.is_current_stream_capturing():
                return table
            cache.clear()
            cache[key] = table
        return cache[key]

    def matmul(self, x: torch.Tensor, shared=None) -> torch.Tensor:
        if _kernel_ok(x):
            return triton_kernels.fp4_linear(x, self.weight, self.weight_absmax, self.weight_quant_map,
                                             self.out_features, self.blocksize, self.quant_type == "fp4",
                                             self._nested_args(), self._pair_table(x.dtype), shared)
        return super().matmul(x)

    def _a8_applies(self, x: torch.Tensor) -> bool:
        return _kernel_ok(x) and triton_kernels.fp4_a8_applies(x, self.weight, self.blocksize,
                                                               self.quant_type == "fp4", self._nested_args())

    def shares_a8(self, x: torch.Tensor, *others: nn.Module) -> int:
        """triton_kernels.FP4_A8 when this layer and `others`, all reading x, would each quantize it for the fp4 W4A8
        GEMV (x one row on the GPU, every layer an fp4 Fp4Linear with 64-blocks and float32 absmax), else 0: then
        the kernel that produced x can write that row once (model.ops.FOLD_A8)."""
        if all(type(o) is Fp4Linear and o._a8_applies(x) for o in (self, *others)):
            return triton_kernels.FP4_A8
        return 0

    def shared_input(self, x: torch.Tensor, *others: nn.Module):
        """x prepared once for this layer and `others` that read the same x (the MLP's gate and up), or None where
        that saves nothing: the decode row quantized to int8 for the fp4 W4A8 GEMV (one launch instead of one per
        layer), where every one of them takes x through it (SHARE_A8_INPUT)."""
        layers = (self, *others)
        if SHARE_A8_INPUT and all(type(o) is Fp4Linear and o._a8_applies(x) for o in layers):
            return triton_kernels.quantize_fp4_a8(x)
        return None

    def matmul_pair(self, other: nn.Module, x: torch.Tensor, shared=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(self(x), other(x)) in one launch (PAIR_A8: one row through the fp4 W4A8 GEMV, 2-64 rows through the
        Gluon fp4 tile's ring) where x is on the GPU and both layers are fp4 of one shape with 64-blocks and float32
        absmax, neither with a bias (the MLP's gate and up); None otherwise."""
        if not (PAIR_A8 and type(other) is Fp4Linear and self.bias is None and other.bias is None
                and other.weight.shape == self.weight.shape and self.quant_type == other.quant_type == "fp4"
                and self.blocksize == other.blocksize == 64 and not (self.nested or other.nested) and _kernel_ok(x)):
            return None
        return triton_kernels.fp4_linear_pair(x, (self.weight, self.weight_absmax),
                                              (other.weight, other.weight_absmax), self.out_features, shared)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, quant_type={self.quant_type}, blocksize={self.blocksize}"
                + (", nested" if self.nested else ""))


class Int4Linear(QuantLinear):
    """Group-wise asymmetric int4 (GPTQ-compatible qweight / qzeros / scales, see formats.py)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = formats.INT4_GROUP,
                 dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, dtype)
        if in_features % group_size or out_features % 8:
            raise ValueError(f"int4 needs in_features % {group_size} == 0 and out_features % 8 == 0, "
                             f"got {in_features} -> {out_features}")
        self.group_size = group_size
        self.register_buffer("qweight", torch.empty(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(in_features // group_size, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(in_features // group_size, out_features, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None,
                    group_size: int = formats.INT4_GROUP) -> "Int4Linear":
        w = linear.weight.detach().to(device or linear.weight.device)
        with torch.device(w.device):
            q = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, dtype=w.dtype)
        qweight, qzeros, scales = formats.quantize_int4(w, group_size)
        q.qweight.copy_(qweight)
        q.qzeros.copy_(qzeros)
        q.scales.copy_(scales)
        if q.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if triton_kernels is not None and self.qweight.is_cuda:
            return triton_kernels.int4_dequantize(self.qweight, self.qzeros, self.scales, dtype, self.group_size)
        return formats.dequantize_int4(self.qweight, self.qzeros, self.scales, dtype)

    def matmul(self, x: torch.Tensor, shared=None) -> torch.Tensor:
        if _kernel_ok(x):
            return triton_kernels.int4_linear(x, self.qweight, self.qzeros, self.scales, self.group_size, shared)
        return super().matmul(x)

    def shares_a8(self, x: torch.Tensor, *others: nn.Module) -> int:
        """The group size when this layer and `others`, all reading x, would each quantize it for the W4A8 GEMV
        (x one row on the GPU, every layer an Int4Linear of the same group size), else 0: then one quantization
        (quantize_a8, or the kernel that produced x: model.ops.FOLD_A8) can serve them all."""
        if (_kernel_ok(x) and triton_kernels.a8_row_applies(x)
                and all(type(o) is Int4Linear and o.group_size == self.group_size for o in others)):
            return self.group_size
        return 0

    def shared_input(self, x: torch.Tensor, *others: nn.Module):
        """x prepared once for this layer and `others` that read the same x (the MLP's gate and up), or None where
        that saves nothing: the decode row quantized to int8 for the W4A8 GEMV (one launch instead of one per
        layer), where shares_a8."""
        group = self.shares_a8(x, *others) if SHARE_A8_INPUT else 0
        return triton_kernels.quantize_a8(x, group) if group else None

    def matmul_pair(self, other: nn.Module, x: torch.Tensor, shared=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(self(x), other(x)) in one launch (PAIR_A8: one row through the W4A8 GEMV, 2-64 rows through the Gluon
        tile) where x is on the GPU and `other` an Int4Linear of the same shape and group, neither with a bias (the
        MLP's gate and up); None otherwise."""
        if not (PAIR_A8 and type(other) is Int4Linear and self.bias is None and other.bias is None
                and other.group_size == self.group_size and other.qweight.shape == self.qweight.shape
                and _kernel_ok(x)):
            return None
        return triton_kernels.int4_linear_pair(x, (self.qweight, self.qzeros, self.scales),
                                               (other.qweight, other.qzeros, other.scales), self.group_size, shared)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class Int8Linear(QuantLinear):
    """int8 weight [N, K] with a float32 scale per output row (symmetric, formats.quantize_int8), 16-bit
    activations: y = (x @ q^T) * scale, summed in float32 and rounded once (int8_kernels.py on CUDA, the same
    product in float32 elsewhere). What a 4-bit model's lm_head becomes under LM_HEAD_INT8 (cogvlm2.quant)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, dtype)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> "Int8Linear":
        w = linear.weight.detach().to(device or linear.weight.device)
        with torch.device("meta"):  # the buffers are the quantizer's own tensors: no second 0.5 GB copy
            q = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype)
        q.weight, q.weight_scale = formats.quantize_int8(w)
        if q.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().to(w.device), requires_grad=False)
        return q

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def matmul(self, x: torch.Tensor, shared=None) -> torch.Tensor:
        if _kernel_ok(x) and x.dtype in (torch.bfloat16, torch.float16):
            from .int8_kernels import int8_linear

            return int8_linear(x, self.weight, self.weight_scale)
        return formats.int8_matmul(x, self.weight, self.weight_scale)


# SHARE_A8_INPUT: the MLP's gate and up (both int4, or both in the official fp4 layout) read one W4A8 quantization of
# the decode row instead of one each: 32 launches fewer a decode step, bit-equal (tests/test_quant_kernels.py). Engine
# int4 decode at batch 1 on the H200: 334.9 -> 340.3 tok/s (benchmarks/decode_ab.py, two rounds, BENCHMARKS.md,
# fourteenth session)
SHARE_A8_INPUT = True
# PAIR_A8: the MLP's gate and up (both int4, or both in the official fp4 layout) as one launch over both weights
# (Int4Linear / Fp4Linear.matmul_pair): the W4A8 GEMVs at batch 1 (32 launches fewer a step; int4: 2 x 224 column
# blocks need no K split), the Gluon tiles at 2-64 rows (int4's, the fp4 ring: 32 launches and split-K sums fewer a
# step at batch 32); the same numbers as the two launches at the pair's K split, bit for bit (it may split less:
# twice the column blocks fill the SMs; tests/test_quant_kernels.py, test_gluon_kernels.py). On (H200, int8 lm_head
# on: int4 batch 1 380 -> 413 tok/s, batch 32 6.53 -> 6.22 ms; official fp4 layout 337 -> 346 tok/s, 7.11 -> 6.86 ms;
# BENCHMARKS.md); COGVLM2_PAIR_A8=0 at import turns it off
PAIR_A8 = os.environ.get("COGVLM2_PAIR_A8", "1") == "1"

# fp8 knobs that benchmarks/quant_gpu.py times against each other: FP8_FUSE puts the bias into _scaled_mm's
# epilogue and the vision MLP's GELU into the activation-quantizing pass (each saves a pass over the output:
# for the ViT's fc1, 9,217 x 15,360 bf16 per image and layer); FP8_FAST_ACCUM: _scaled_mm's fast accumulation
# (Hopper's fp8 MMA without periodic promotion to float32): on since measured on an H200 (BENCHMARKS.md) at
# TTFT 240 -> 226 ms with the sampled linears' error vs bf16 unchanged (0.0375 against 0.0374)
FP8_FUSE = True
FP8_FAST_ACCUM = True
# FP8_ATTENTION: the vision tower's attention on e4m3 tensor cores too (`Fp8Linear.attention`, fp8_attention.py).
# On an H200: TTFT 226 -> 216 ms, 0.96 against cuDNN's 1.18 ms an image and layer at four images (captioning);
# its error against exact attention is ~5% (random ViT-shaped inputs; the fp8 linears': ~3.7%). On by default
# under --quant fp8; COGVLM2_FP8_ATTENTION=0 keeps the tower's attention in bf16
FP8_ATTENTION = os.environ.get("COGVLM2_FP8_ATTENTION", "1") != "0"


def _scaled_mm_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 9)


class Fp8Linear(QuantLinear):
    """e4m3 weight with a float32 scale per output channel; activations quantized per token on the fly.

    y = (q_x @ q_w^T) * s_x[:, None] * s_w[None, :]: on CUDA (cc >= 8.9, bf16) one torch._scaled_mm with
    row-wise scales on the fp8 tensor cores; on older GPUs the same product in the model dtype (fp8
    values are exact there; the weights still take one byte); on the CPU in float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, dtype)
        if in_features % 16 or out_features % 16:
            raise ValueError(f"fp8 needs in/out features divisible by 16, got {in_features} -> {out_features}")
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> "Fp8Linear":
        w = linear.weight.detach().to(device or linear.weight.device)
        with torch.device(w.device):
            q = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype)
        weight, scale = formats.quantize_fp8(w)
        q.weight.copy_(weight)
        q.weight_scale.copy_(scale)
        if q.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def shares_fp8(self, x: torch.Tensor) -> bool:
        """Whether this layer quantizes x per row with the Triton kernel (so the kernel that makes x may do it
        instead and pass (q, s) as `shared`)."""
        return FP8_FUSE and _kernel_ok(x) and torch.cuda.get_device_capability(x.device) >= (8, 9)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
               shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x @ W^T (+ bias); gelu: of F.gelu(x). With _scaled_mm the bias is added in its epilogue (one
        rounding to the output dtype), and the GELU is applied by the quantizing kernel. `shared`: x already
        quantized per row, (float8_e4m3fn [rows, K], float32 [rows, 1]) as fp8_quantize_rows makes it."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] == 0:
            return x.new_empty(*shape[:-1], self.out_features)
        fused = _kernel_ok(x) and torch.cuda.get_device_capability(x.device) >= (8, 9)  # Triton's fp8 casts
        if shared is not None:
            qx, sx = shared
        elif fused:
            qx, sx = triton_kernels.fp8_quantize_rows(x2, gelu=gelu)  # [M, K], [M, 1]
        else:
            qx, sx = formats.quantize_fp8_rows(F.gelu(x2) if gelu else x2)
        if _scaled_mm_ok(x):
            y = torch._scaled_mm(qx, self.weight.t(), scale_a=sx, scale_b=self.weight_scale[None, :],
                                 bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype,
                                 use_fast_accum=FP8_FAST_ACCUM)
            return y.view(*shape[:-1], self.out_features)
        if x.is_cuda:  # no fp8 tensor cores (cc < 8.9): the fp8 values are exact in bf16 / fp16
            y = (F.linear(qx.to(x.dtype), self.weight.to(x.dtype)) * sx * self.weight_scale[None, :]).to(x.dtype)
        else:
            y = ((qx.float() @ self.weight.float().t()) * sx * self.weight_scale[None, :]).to(x.dtype)
        y = y if bias is None else y + bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor, shared=None) -> torch.Tensor:
        if shared is not None:  # what shares_fp8 promised: FP8_FUSE is set
            return self.matmul(x, bias=self.bias, shared=shared)
        return self.matmul(x, bias=self.bias) if FP8_FUSE else super().forward(x)

    def forward_gelu(self, h: torch.Tensor) -> torch.Tensor:
        return self.matmul(h, bias=self.bias, gelu=True) if FP8_FUSE else super().forward_gelu(h)

    @staticmethod
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The vision tower's attention over the outputs of an fp8 QKV projection (the tower looks this up on
        its projection's class): softmax(q k^T / sqrt(d)) v, with both products in e4m3 when FP8_ATTENTION
        is set and the GPU has fp8 tensor cores, else torch's SDPA."""
        if FP8_ATTENTION and _kernel_ok(q) and _scaled_mm_ok(q):
            from .fp8_attention import fp8_attention

            return fp8_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

"""Weight quantization for inference: the official int4 checkpoints (bitsandbytes fp4) and `--quant` modes.

    mode     weights                                      matmul                                from
    4 = fp4  bitsandbytes fp4, blocks of 64 (0.5625 B/w)  our Triton fp4 kernels                bf16, fp4 ckpt
    nf4      the same layout with the NF4 code            the same kernels                      bf16
    fp4-dq   fp4 / nf4 with 8-bit absmax (0.516 B/w)      the same kernels                      bf16, fp4 ckpt
    int4     group-wise asym. int4, group 128 (GPTQ)      our Triton int4 kernels               bf16
    8 = int8 LLM.int8 (bitsandbytes, threshold 6.0)       bitsandbytes (eager: no CUDA graphs)  bf16
    fp8      e4m3, per-channel scale; per-token x scale   torch._scaled_mm (fp8 tensor cores)   bf16

Every nn.Linear but lm_head is quantized (language and vision experts, the EVA tower, the GLU adapter),
as in the official int4 checkpoints (LM_HEAD_INT8: int8 for int4 / fp8); a layer whose shape the format
cannot hold (only tiny test models have such layers) stays in the model dtype. On-the-fly modes quantize one
layer at a time on the target device, so the GPU never holds the unquantized model.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch
from torch import nn

from . import formats
from .linear import Fp4Linear, Fp8Linear, Int4Linear, Int8Linear, QuantLinear

__all__ = ["QUANT_MODES", "Fp4Linear", "Fp8Linear", "Int4Linear", "Int8Linear", "QuantLinear", "normalize_quant",
           "checkpoint_quant_type", "prepare_prequantized", "quantize_model", "quantize_lm_head",
           "compress_statistics", "int8_head", "KEEP_DTYPE", "weight_bytes"]

QUANT_MODES = ("4", "8", "fp4", "nf4", "fp4-dq", "nf4-dq", "int4", "int8", "fp8")
SKIP = ("lm_head",)
# LM_HEAD_INT8: the lm_head in int8 with a float32 scale per vocabulary row (Int8Linear): half of its 1.05 GB for
# every decode step to read, ~0.9% of relative error on the logits (Gaussian rows; a 4-bit linear's own is ~10%).
# "auto" (default): under --quant int4 / fp8, our own formats (H200, int4: batch 1 367 -> 379 tok/s, batch 32 6.58 ->
# 6.56 ms; BENCHMARKS.md); the bitsandbytes modes (4 / 8 / fp4 / nf4 and their -dq) and the official int4 checkpoints
# keep the checkpoint's lm_head, as the official implementation does. "1": every quantized model; "0": none
# (COGVLM2_LM_HEAD_INT8 at import)
LM_HEAD_INT8 = os.environ.get("COGVLM2_LM_HEAD_INT8", "auto")
INT8_HEAD_MODES = ("int4", "fp8")
if LM_HEAD_INT8 not in ("auto", "0", "1"):
    raise ValueError(f"COGVLM2_LM_HEAD_INT8 must be auto, 0 or 1, not {LM_HEAD_INT8!r}")


def int8_head(mode: str) -> bool:
    """Whether a model quantized as `mode` (a --quant mode or an official checkpoint's type) gets an int8 lm_head."""
    return LM_HEAD_INT8 == "1" or (LM_HEAD_INT8 == "auto" and mode in INT8_HEAD_MODES)


KEEP_DTYPE = (r"\.weight\.absmax$", r"\.weight\.quant_map$", r"\.weight\.nested_absmax$",
              r"\.weight\.nested_quant_map$")  # checkpoint tensors that stay float32


def normalize_quant(quant: str | int | None) -> str | None:
    """None / '' / 'none' -> None; 4 -> 'fp4' (the official demos' bitsandbytes default); 8 -> 'int8'."""
    if quant is None or str(quant).lower() in ("", "none"):
        return None
    q = str(quant).lower()
    if q not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    return {"4": "fp4", "8": "int8"}.get(q, q)


def checkpoint_quant_type(raw_config: dict) -> str | None:
    """The mode of a bitsandbytes 4-bit checkpoint (config.json's quantization_config): 'fp4' / 'nf4', with
    '-dq' when its absmax are double-quantized; None for a full-precision checkpoint."""
    qc = raw_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes" or not qc.get("load_in_4bit", False):
        raise ValueError(f"unsupported quantization_config {qc}: only bitsandbytes 4-bit checkpoints load")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type not in ("fp4", "nf4"):
        raise ValueError(f"unsupported bnb_4bit_quant_type {quant_type!r}")
    return quant_type + ("-dq" if qc.get("bnb_4bit_use_double_quant", False) else "")


def _linears(model: nn.Module, skip: tuple[str, ...] = SKIP) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] not in skip]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _fits(mode: str, linear: nn.Linear) -> bool:
    k, n = linear.in_features, linear.out_features
    if mode in ("fp4", "nf4", "fp4-dq", "nf4-dq"):
        return k % formats.BNB_BLOCKSIZE == 0
    if mode == "int4":
        return _int4_group(k) is not None and n % 8 == 0
    if mode == "fp8":
        return k % 16 == 0 and n % 16 == 0
    return True


def _int4_group(k: int) -> int | None:
    """Group 128; a narrower layer (tiny test models only: every real CogVLM2 width is a multiple of 128)
    takes the largest of 64 / 32 that divides it."""
    return next((g for g in (formats.INT4_GROUP, 64, 32) if k % g == 0), None)


def prepare_prequantized(model: nn.Module, mode: str) -> dict[str, Callable[[torch.Tensor], None]]:
    """Swap the linears of a meta-device model for Fp4Linear (as a bitsandbytes 4-bit checkpoint of `mode`,
    see checkpoint_quant_type, stores them); return {checkpoint key: check} for the quant-state keys the
    loader validates instead of storing."""
    checks = {}
    quant_type, nested = mode.removesuffix("-dq"), mode.endswith("-dq")
    for name, linear in _linears(model):
        with torch.device("meta"):
            q = Fp4Linear(linear.in_features, linear.out_features, linear.bias is not None, quant_type, nested=nested)
        _set(model, name, q)
        checks[f"{name}.{q.quant_state_key()}"] = q.check_quant_state
    return checks


def _int8_linear(linear: nn.Linear, device: torch.device | str) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # a ValueError: the CLIs report it as a bad option, without a traceback
        raise ValueError("--quant 8 (LLM.int8) needs bitsandbytes: pip install 'cogvlm2[quant]'") from e
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=6.0, device="meta")
    q.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes as the weight moves


def quantize_model(model: nn.Module, quant: str | int, device: torch.device | str | None = None,
                   use_bitsandbytes: bool | None = None) -> nn.Module:
    """Replace the model's linears (lm_head excepted) by `quant` ones on `device`, one layer at a time, in
    place; then move the rest of the model there. fp4/nf4 use bitsandbytes' quantizer when it is installed
    (`use_bitsandbytes=None`), else ours, which gives the same codes. Returns the model."""
    mode = normalize_quant(quant)
    if mode is None:
        return model.to(device) if device is not None else model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if use_bitsandbytes is None:
        use_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    for name, linear in _linears(model):
        if not _fits(mode, linear):
            continue
        if mode in ("fp4", "nf4", "fp4-dq", "nf4-dq"):
            q = Fp4Linear.from_linear(linear, mode.removesuffix("-dq"), device, use_bitsandbytes)
            if mode.endswith("-dq"):
                q.compress_statistics()
        elif mode == "int4":
            q = Int4Linear.from_linear(linear, device, _int4_group(linear.in_features))
        elif mode == "fp8":
            q = Fp8Linear.from_linear(linear, device)
        else:
            q = _int8_linear(linear, device)
        _set(model, name, q)
        linear.weight = None  # drop the full-precision copy now, not at the end
    if mode == "int8":
        model.supports_cuda_graphs = False  # LLM.int8's outlier split has data-dependent shapes
    model.quantization = mode
    model.to(device)
    if int8_head(mode):
        quantize_lm_head(model)
    return model


def quantize_lm_head(model: nn.Module) -> nn.Module:
    """The model's lm_head (a plain nn.Linear) as an Int8Linear on its own device, in place (see LM_HEAD_INT8);
    a model without one, or whose lm_head is already something else, is left as it is."""
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear and head.weight.device.type != "meta":
        model.lm_head = Int8Linear.from_linear(head)
    return model


def compress_statistics(model: nn.Module) -> nn.Module:
    """8-bit absmax for every Fp4Linear of a loaded model (an official int4 checkpoint -> 'fp4-dq'), in place."""
    for module in model.modules():
        if isinstance(module, Fp4Linear):
            module.compress_statistics()
    if getattr(model, "quantization", None) in ("fp4", "nf4"):
        model.quantization += "-dq"
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized or not): what the weights occupy on the device."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen or t.device.type == "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total

"""Weight formats in plain torch: the reference quantizers / dequantizers the kernels are tested against.

fp4 / nf4 (bitsandbytes' 4-bit layout, what the official int4 checkpoints hold): the row-major weight
[N, K] is flattened and cut into blocks of 64; each block keeps its absmax (float32) and each element a
4-bit index into a 16-entry code table (`quant_map`, values in [-1, 1]); two indices per byte, the
first element in the high nibble. Dequantized: quant_map[code] * absmax[block], in float32. With
double quantization (bitsandbytes' "nested" statistics) the absmax themselves are 8-bit: absmax =
nested_quant_map[a8] * nested_absmax[block // 256] + nested_offset (1 byte instead of 4 per 64 weights).

int4 (ours, GPTQ-compatible): asymmetric, group-wise along K (group 128). qweight int32 [K/8, N]
packs 8 consecutive k of one column, k = 8i + j in bits 4j..4j+3; qzeros int32 [K/G, N/8] packs 8
consecutive columns the same way; scales [K/G, N] in the model dtype. Dequantized:
(q - z) * s. The zero point is stored as is (GPTQ "v2" / AutoRound convention, no -1 offset).

fp8: e4m3 weights [N, K] with one float32 scale per output channel (amax / 448).
"""

from __future__ import annotations

import json

import torch

BNB_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
INT4_GROUP = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# bitsandbytes' fp4 code (a sign bit + 3 magnitude bits, e2m1 with its own exponent bias, scaled to max 1).
# Magnitudes by index 0..7: 0, 1/192 (the subnormal), 8/12, 12/12, 4/12, 6/12, 2/12, 3/12; 8..15 negate them.
FP4_CODE = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25,
            -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -0.5, -1 / 6, -0.25)
# NF4 (QLoRA): the 16 quantiles of a standard normal, scaled to [-1, 1].
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def code_table(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 code values of 'fp4' or 'nf4' as float32."""
    if quant_type not in ("fp4", "nf4"):
        raise ValueError(f"4-bit quant type must be 'fp4' or 'nf4', not {quant_type!r}")
    return torch.tensor(FP4_CODE if quant_type == "fp4" else NF4_CODE, dtype=torch.float32, device=device)


def quantize_4bit(w: torch.Tensor, quant_type: str = "fp4",
                  blocksize: int = BNB_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N*K/2, 1], absmax float32 [N*K/blocksize]): each value scaled by its
    block's absmax goes to the nearest code (as bitsandbytes' quantize_4bit)."""
    if w.shape[-1] % blocksize:
        raise ValueError(f"in_features {w.shape[-1]} is not a multiple of the block size {blocksize}")
    code = code_table(quant_type, w.device)
    blocks = w.reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    order = torch.argsort(code)
    sorted_code = code[order]
    q = order[torch.bucketize(scaled, (sorted_code[1:] + sorted_code[:-1]) / 2)].to(torch.uint8)
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1), absmax


def unpack_4bit(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Packed uint8 -> codes int64 [N, K] (high nibble first)."""
    b = packed.reshape(-1)
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(shape).long()


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, shape: tuple[int, int],
                    dtype: torch.dtype, blocksize: int = BNB_BLOCKSIZE) -> torch.Tensor:
    """-> w [N, K] in `dtype`: quant_map[code] * absmax[block] computed in float32, then rounded once."""
    vals = quant_map.float()[unpack_4bit(packed, shape)]  # [N, K]
    return (vals.view(-1, blocksize) * absmax.float().view(-1, 1)).view(shape).to(dtype)


def nested_code() -> torch.Tensor:
    """Our 256 levels for 8-bit absmax (uniform in [-1, 1]; the checkpoint stores whichever code it used)."""
    return torch.linspace(-1, 1, 256, dtype=torch.float32)


def quantize_absmax(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor, float]:
    """float32 absmax [B] -> (uint8 [B], nested_absmax float32 [ceil(B / 256)], nested_quant_map [256], offset):
    the mean is taken out, then each block of 256 is scaled by its own absmax and rounded to the nearest level."""
    code = nested_code().to(absmax.device)
    offset = absmax.float().mean()
    a = absmax.float() - offset
    pad = (-a.numel()) % blocksize
    blocks = torch.nn.functional.pad(a, (0, pad)).view(-1, blocksize)
    nested = blocks.abs().amax(dim=1).clamp(min=1e-38)
    scaled = (blocks / nested[:, None]).clamp(-1, 1).reshape(-1)[:a.numel()]
    q = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2).to(torch.uint8)
    return q, nested, code, offset.item()


def dequantize_absmax(a8: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: float,
                      blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """-> float32 absmax: nested_map[a8] * nested_absmax[i // 256] + offset (bitsandbytes' order of operations)."""
    scale = nested_absmax.float().repeat_interleave(blocksize)[:a8.numel()]
    return nested_map.float()[a8.long()] * scale + offset


def bnb_quant_state(quant_type: str, shape: tuple[int, int], dtype: torch.dtype,
                    blocksize: int = BNB_BLOCKSIZE, nested_offset: float | None = None) -> torch.Tensor:
    """The `weight.quant_state.bitsandbytes__<type>` entry: bitsandbytes' non-tensor state, JSON as uint8."""
    state = {"quant_type": quant_type, "blocksize": blocksize, "dtype": str(dtype).removeprefix("torch."),
             "shape": list(shape)}
    if nested_offset is not None:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=nested_offset)
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def parse_bnb_quant_state(t: torch.Tensor) -> dict:
    try:
        return json.loads(bytes(t.to(torch.uint8).tolist()).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable bitsandbytes quant state: {e}") from e


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """uint4 values int [R, C] -> int32 [R/8, C], row 8i + j in bits 4j."""
    q = q.to(torch.int32).view(q.shape[0] // 8, 8, q.shape[1])
    shifts = (torch.arange(8, device=q.device, dtype=torch.int32) * 4).view(1, 8, 1)
    return (q << shifts).sum(dim=1, dtype=torch.int32)  # disjoint bits: the sum is an OR (wraps into the sign)


def _unpack_rows(p: torch.Tensor) -> torch.Tensor:
    shifts = (torch.arange(8, device=p.device, dtype=torch.int32) * 4).view(1, 8, 1)
    return ((p.unsqueeze(1) >> shifts) & 0xF).reshape(p.shape[0] * 8, p.shape[1])


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (qweight int32 [K/8, N], qzeros int32 [K/G, N/8], scales float32 [K/G, N]), min/max per group."""
    n, k = w.shape
    if k % group or n % 8:
        raise ValueError(f"int4 needs in_features % {group} == 0 and out_features % 8 == 0, got [{n}, {k}]")
    g = w.float().t().reshape(k // group, group, n)  # [K/G, G, N]
    lo = g.amin(dim=1).clamp(max=0)
    hi = g.amax(dim=1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-8)  # [K/G, N]
    zeros = (-lo / scales).round().clamp(0, 15)
    q = (g / scales[:, None] + zeros[:, None]).round().clamp(0, 15).reshape(k, n)
    return _pack_rows(q), _pack_rows(zeros.t().contiguous()).t().contiguous(), scales


def dequantize_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """-> w [N, K] in `dtype`: (q - z) * s in float32, rounded once."""
    q = _unpack_rows(qweight).float()  # [K, N]
    z = _unpack_rows(qzeros.t().contiguous()).t().float()  # [K/G, N]
    group = q.shape[0] // scales.shape[0]
    w = (q.view(-1, group, q.shape[1]) - z[:, None]) * scales.float()[:, None]
    return w.reshape(q.shape).t().to(dtype)


def int4_to_tinygemm(qweight: torch.Tensor, qzeros: torch.Tensor,
                     scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The group-wise int4 layout above as torch's own int4 kernel (`aten._weight_int4pack_mm`, gpt-fast's
    and torchao's "tinygemm") reads it: (codes int32 [N, K], scales_and_zeros [K/G, N, 2] in the scales'
    dtype). tinygemm dequantizes (q - 8) * s + zero with a float zero per group, so zero = (8 - z) * s gives
    our (q - z) * s (the zero rounded once to the scales' dtype)."""
    q = _unpack_rows(qweight).t().contiguous()  # [N, K]
    z = _unpack_rows(qzeros.t().contiguous()).t().float()  # [K/G, N]
    zero = (8 - z) * scales.float()
    return q, torch.stack([scales.float(), zero], dim=-1).to(scales.dtype).contiguous()


def tinygemm_pack(codes: torch.Tensor, inner_k_tiles: int = 8) -> torch.Tensor:
    """codes int32 [N, K] (0..15) packed for `aten._weight_int4pack_mm` on the codes' device: on CUDA from
    bytes holding two codes each (the even column in the high nibble), on the CPU from the int32 codes."""
    if codes.is_cuda:
        pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), inner_k_tiles)


def tinygemm_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] (bf16) @ the packed int4 weight^T -> [M, N] with torch's int4 kernel of x's device."""
    op = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    return op(x, packed, group, scales_and_zeros)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], float32 scale [N]); w ~ q * scale[:, None]."""
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1]): one dynamic scale per token."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_int8(w: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 [N, K], float32 scale [N]): symmetric per row, w ~ q * scale[:, None], |q| <= 127 (round to
    nearest, so each weight is within scale / 2). Rows `chunk` at a time: the float32 copy of a 128K-row lm_head
    would be 2 GB."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], chunk):
        part = w[i:i + chunk].float()
        s = (part.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q[i:i + chunk] = torch.round(part / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[i:i + chunk] = s
    return q, scale


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference product of x [..., K] and an int8 weight: (x @ q^T) * scale in float32, rounded once to x's
    dtype (what the kernels compute, to float32 summation order)."""
    return ((x.float() @ q.float().t()) * scale).to(x.dtype)

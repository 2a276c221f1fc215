"""Triton kernels behind `model.ops` on CUDA: RMSNorm (alone and after a residual add), SiLU-and-multiply,
in-place rotary on fused QKV.

Triton launches a kernel on the *current* CUDA device and its current stream, whatever device its tensors are
on. Under pipeline stages the layers of a later stage live on another GPU than the current one, so each
wrapper makes its tensors' device current for the launch (`_on`): the kernel then runs on that GPU, in order
with the torch ops around it on that GPU's stream. Without it the kernel ran on GPU 0, reaching GPU 1's memory
over peer access, unordered with GPU 1's stream (a race: wrong values, or an illegal-address error without
peer access).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import pdl
from ..quant.triton_kernels import A8Row, a8_buffers, store_a8_groups, store_fp4_a8_groups


def _on(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make x's GPU current for a launch (a no-op when it already is: one device, or the current stage)."""
    if not x.is_cuda:  # Triton's CPU interpreter (the tests)
        return contextlib.nullcontext()
    index = x.get_device()
    return torch.cuda.device(index) if index != torch.cuda.current_device() else contextlib.nullcontext()


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, dim, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * (x * r)).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with unit stride along the last dim (what the row kernels index)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    shape = x.shape
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(shape[-1])
        with _on(x2):
            _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), shape[-1], eps, BLOCK=block,
                                             num_warps=min(16, max(1, block // 256)), **pdl.options(x2))
    return out.view(shape)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, xe_ptr, xo_ptr, sx_ptr, sq_ptr, stride_x, stride_d,
                         stride_s, stride_o, dim, eps, BLOCK: tl.constexpr, PDL: tl.constexpr, A8_GROUP: tl.constexpr):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    a = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(d_ptr + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
    s = (a + b).to(sum_ptr.dtype.element_ty)  # the residual add as torch rounds it
    tl.store(sum_ptr + row * stride_s + cols, s, mask=ok)
    x = s.to(tl.float32)  # then _rms_norm_kernel's arithmetic on the rounded sum
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = (w * (x * r)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y, mask=ok)
    if A8_GROUP > 0:  # one row of exactly BLOCK values: its groups for the W4A8 GEMV, from the values stored
        NG: tl.constexpr = BLOCK // A8_GROUP
        g = tl.arange(0, NG)
        store_a8_groups(tl.reshape(y.to(tl.float32), (NG, A8_GROUP)), xe_ptr, xo_ptr, sx_ptr, sq_ptr, g, g < NG,
                        A8_GROUP)
    if A8_GROUP < 0:  # FP4_A8: the fp4 W4A8 row (absmax blocks of -A8_GROUP)
        FG: tl.constexpr = -A8_GROUP
        g = tl.arange(0, BLOCK // FG)
        store_fp4_a8_groups(tl.reshape(y.to(tl.float32), (BLOCK // FG, FG)), xe_ptr, sx_ptr, g, g < BLOCK // FG, FG)


def a8_fits(x: torch.Tensor, group: int) -> bool:
    """Whether the row kernels here can quantize their output x for the W4A8 GEMV (group > 0: int4's; FP4_A8: the
    fp4 one's): one row, a power of two long (the norm's one program holds it whole), whole groups."""
    dim, size = x.shape[-1], abs(group)
    return size > 0 and x.numel() == dim and dim % size == 0 and dim == triton.next_power_of_2(dim)


def _a8_pointers(a8, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The row kernels' four a8 arguments (xe, xo, sx, sq) for an int4 A8Row, an fp4 (xw, sx) or none (unused)."""
    if a8 is None:
        return out, out, out, out
    if len(a8) == 2:
        return a8[0], a8[0], a8[1], a8[1]
    return a8[0][0], a8[0][1], a8[1], a8[2]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) in one pass: the sum rounded to x's dtype, then normed exactly as
    `rms_norm` norms it (so the pair equals the two separate ops bit for bit)."""
    return add_rms_norm_a8(x, delta, weight, eps, 0)[:2]


def add_rms_norm_a8(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                    a8_group: int) -> tuple[torch.Tensor, torch.Tensor, A8Row | None]:
    """add_rms_norm's pair and a8: with `a8_group` where a8_fits, the normed row quantized for the W4A8 GEMV as
    quantize_a8 would quantize it (in the same kernel; FP4_A8: as quantize_fp4_a8 would), else None."""
    shape = x.shape
    x2, d2 = _rows(x), _rows(delta)
    total = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    group = a8_group if a8_fits(x, a8_group) else 0
    a8 = a8_buffers(shape[-1], group, x.device) if group else None
    xe, xo, sx, sq = _a8_pointers(a8, out)
    if x2.shape[0]:
        block = triton.next_power_of_2(shape[-1])
        with _on(x2):
            _add_rms_norm_kernel[(x2.shape[0],)](x2, d2, weight, total, out, xe, xo, sx, sq, x2.stride(0),
                                                 d2.stride(0), total.stride(0), out.stride(0), shape[-1], eps,
                                                 BLOCK=block, num_warps=min(16, max(1, block // 256)),
                                                 A8_GROUP=group, **pdl.options(x2))
    return total.view(shape), out.view(shape), a8


@triton.jit
def _add_layer_norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, out_ptr, q_ptr, s_ptr, stride_x, stride_y, dim, eps,
                           BLOCK: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """x + LayerNorm(y) of one row (the vision tower's post-norm residual), each step rounded as torch rounds it:
    the norm's output to the tensor dtype, then the sum; FP8: the sum also quantized per row for an fp8 linear, as
    quant.triton_kernels._fp8_rows_kernel quantizes a row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    y = tl.load(y_ptr + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(y, axis=0) / dim
    d = tl.where(ok, y - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / dim + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    normed = (d * rstd * w + b).to(out_ptr.dtype.element_ty).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    out = (x + normed).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * dim + cols, out, mask=ok)
    if FP8:
        o = out.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(o), axis=0) / FP8_MAX, 1e-12)
        q = tl.minimum(tl.maximum(o * (1.0 / scale), -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + row * dim + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(s_ptr + row, scale)


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x + F.layer_norm(y, ...), q, s) in one pass over the rows (torch's roundings; the norm's float32 statistics
    may differ from torch's kernel in the last bit); fp8: with the sum quantized per row as fp8_quantize_rows does
    (q float8_e4m3fn [rows, D], s float32 [rows, 1]), else None, None."""
    shape = x.shape
    x2, y2 = _rows(x), _rows(y)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    q = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device) if fp8 else None
    s = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device) if fp8 else None
    if x2.shape[0]:
        block = triton.next_power_of_2(shape[-1])
        with _on(x2):
            _add_layer_norm_kernel[(x2.shape[0],)](x2, y2, weight, bias, out, q if fp8 else out, s if fp8 else out,
                                                   x2.stride(0), y2.stride(0), shape[-1], eps, BLOCK=block, FP8=fp8,
                                                   FP8_MAX=448.0, num_warps=min(16, max(1, block // 256)))
    return out.view(shape), q, s


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, xe_ptr, xo_ptr, sx_ptr, sq_ptr, n, cols, row_stride,
                     BLOCK: tl.constexpr, PDL: tl.constexpr, A8_GROUP: tl.constexpr, STRIDED: tl.constexpr):
    """out = silu(g) * u over n values; STRIDED: g and u are rows of `cols` values `row_stride` apart (the halves of
    one gate / up product), out contiguous."""
    pdl.enter(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    src = offs
    if STRIDED:
        row = offs // cols
        src = row * row_stride + (offs - row * cols)
    g = tl.load(g_ptr + src, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + src, mask=ok, other=0.0).to(tl.float32)
    # as torch: silu in float32 rounded to the tensor dtype, then the product in float32, rounded
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    y = (s * u).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, y, mask=ok)
    if A8_GROUP > 0:  # one row: this program's groups for the W4A8 GEMV (n a multiple of the group)
        NG: tl.constexpr = BLOCK // A8_GROUP
        grp = tl.program_id(0) * NG + tl.arange(0, NG)
        store_a8_groups(tl.reshape(y.to(tl.float32), (NG, A8_GROUP)), xe_ptr, xo_ptr, sx_ptr, sq_ptr, grp,
                        grp * A8_GROUP < n, A8_GROUP)
    if A8_GROUP < 0:  # FP4_A8: the fp4 W4A8 row
        FG: tl.constexpr = -A8_GROUP
        blk = tl.program_id(0) * (BLOCK // FG) + tl.arange(0, BLOCK // FG)
        store_fp4_a8_groups(tl.reshape(y.to(tl.float32), (BLOCK // FG, FG)), xe_ptr, sx_ptr, blk, blk * FG < n, FG)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up as torch computes it."""
    return silu_mul_a8(gate, up, 0)[0]


def silu_mul_a8(gate: torch.Tensor, up: torch.Tensor, a8_group: int) -> tuple[torch.Tensor, A8Row | None]:
    """(silu_mul(gate, up), a8): a8 as add_rms_norm_a8's, for one row of whole groups, else None."""
    cols = gate.shape[-1]
    (g2, sg), (u2, su) = _spaced_rows(gate, cols), _spaced_rows(up, cols)
    if sg != su or gate.shape != up.shape:
        (g2, sg), (u2, su) = (gate.contiguous(), cols), (up.contiguous(), cols)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    size = abs(a8_group)
    group = a8_group if size > 0 and gate.numel() == gate.shape[-1] and n % size == 0 and \
        SILU_MUL_BLOCK % size == 0 else 0
    a8 = a8_buffers(n, group, gate.device) if group else None
    xe, xo, sx, sq = _a8_pointers(a8, out)
    if n:
        with _on(gate):
            _silu_mul_kernel[(triton.cdiv(n, SILU_MUL_BLOCK),)](g2, u2, out, xe, xo, sx, sq, n, cols, sg,
                                                                BLOCK=SILU_MUL_BLOCK, A8_GROUP=group,
                                                                STRIDED=sg != cols, **pdl.options(gate))
    return out, a8


def _spaced_rows(t: torch.Tensor, cols: int) -> tuple[torch.Tensor, int]:
    """t as [rows, cols] rows of contiguous values and the distance between rows: a view where t's rows are evenly
    spaced (e.g. one half of a [rows, 2 x cols] product), else a contiguous copy."""
    if t.stride(-1) == 1 and t.numel():
        try:
            v = t.view(-1, cols)
            return v, v.stride(0) if v.shape[0] > 1 else cols
        except RuntimeError:
            pass
    return t.contiguous(), cols


SILU_MUL_BLOCK = 1024  # SiLU-mul's values a program


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, stride_x, stride_c, HEADS_TOTAL, HALF: tl.constexpr, BLOCK: tl.constexpr,
                   HEADS: tl.constexpr, PDL: tl.constexpr):
    """One token and HEADS of its rotated heads (a program per head made a prefill's 2K tokens x 40 heads ~90K
    programs of 64 pairs: 113 us a layer on an H200, 10x its bytes' time)."""
    pdl.enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    j = tl.arange(0, BLOCK)  # BLOCK: HALF rounded up to a power of 2 (tl.arange's rule), the rest masked
    ok = (j < HALF)[None, :] & (head < HEADS_TOTAL)[:, None]
    base = x_ptr + tok * stride_x + head[:, None] * 2 * HALF + j[None, :]
    x1 = tl.load(base, mask=ok).to(tl.float32)
    x2 = tl.load(base + HALF, mask=ok).to(tl.float32)
    c = tl.load(cos_ptr + tok * stride_c + j, mask=j < HALF)[None, :]
    s = tl.load(sin_ptr + tok * stride_c + j, mask=j < HALF)[None, :]
    tl.store(base, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=ok)
    tl.store(base + HALF, (x1 * s + x2 * c).to(x_ptr.dtype.element_ty), mask=ok)


# rotated heads a program once a batch has this many tokens (a prefill); fewer tokens (decode) keep a program a head
ROTARY_HEADS, ROTARY_MIN_TOKENS = 8, 256


def rotary_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_rotated_heads: int, head_dim: int) -> None:
    """Rotate the first `num_rotated_heads` heads (q then k) of each row of qkv [N, W] in place."""
    if qkv.shape[0]:
        heads = ROTARY_HEADS if qkv.shape[0] >= ROTARY_MIN_TOKENS else 1
        with _on(qkv):
            _rotary_kernel[(qkv.shape[0], triton.cdiv(num_rotated_heads, heads))](
                qkv, cos.contiguous(), sin.contiguous(), qkv.stride(0), head_dim // 2, num_rotated_heads,
                HALF=head_dim // 2, BLOCK=triton.next_power_of_2(head_dim // 2), HEADS=heads, **pdl.options(qkv))

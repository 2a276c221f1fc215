"""The Triton 4-bit kernels (fp4/nf4 bitsandbytes layout, group-wise int4) against the torch reference
(formats.py): dequantization bit-exact, matmuls to float32 rounding, at every row count (1 = GEMV,
2..64 = fused tensor-core tile, more = dequantize + GEMM).

On CPU the kernels run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1); on a GPU they run
compiled in bf16, under CUDA graphs, and inside the engine (graphs against eager, token for token).
"""

from __future__ import annotations

import contextlib
import re
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")

from cogvlm2.quant import formats  # noqa: E402
from tests.interpreted import run_interpreted  # noqa: E402

SHAPES = [(48, 256), (40, 192), (72, 512)]  # [N, K]: N not a multiple of the tile, K of 64 (fp4) / 128 (int4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


ROWS = (1, 2, 3, 16, 17, 32, 64, 65)  # GEMV or the 16-row tile, tiles of 16 / 32 / 64 rows padded or full, + cuBLAS


@contextlib.contextmanager
def _settings(tk, **tables):
    """Temporarily update triton_kernels' dicts (CONFIGS, ONE_ROW, FP4_ARITH) by name."""
    saved = {name: dict(getattr(tk, name)) for name in tables}
    try:
        for name, values in tables.items():
            getattr(tk, name).update(values)
        yield
    finally:
        for name, values in saved.items():
            getattr(tk, name).update(values)


def _row_kernels(m: int, fp4: bool) -> list[tuple[str, bool]]:
    """(ONE_ROW kernel, FP4_ARITH) pairs to run m rows with: a single row goes through the GEMV (fp4: codes
    from the table and from their bits) and through the 16-row tensor-core tile; more rows have one kernel."""
    if m != 1:
        return [("tile", False)]
    return [("gemv", False), ("tile", False)] + ([("gemv", True)] if fp4 else [])


def check_a8_fused(tk, x, qweight, qzeros, scales, group, expected) -> None:
    """W4A8 with its launches folded into the GEMV (A8_FUSED: the split-K sum by the last program per column block,
    x quantized in each program's prologue; alone and together) equals the three launches bit for bit, at several
    splits (one slice: no sum to fold), twice in a row (the counters go back to 0); and past A8_QUANT_MAX_GROUPS
    groups a slice, the quantize launch comes back."""
    config = tk.CONFIGS[("int4", "gemv-a8")]
    for split in (1, 2, 4, -2):
        with _settings(tk, ONE_ROW={"int4": "gemv-a8"}, CONFIGS={("int4", "gemv-a8"): (*config[:4], split)},
                       A8_FUSED={"sum": False, "quant": False}):
            three = tk.int4_linear(x, qweight, qzeros, scales, group)
            assert tk.a8_row_applies(x)  # x quantized once beforehand (gate and up share it): the same numbers
            a8 = tk.quantize_a8(x, group)
            for _ in range(2):
                assert torch.equal(tk.int4_linear(x, qweight, qzeros, scales, group, a8), three), split
            for fuse in ((True, False), (False, True), (True, True)):
                with _settings(tk, A8_FUSED={"sum": fuse[0], "quant": fuse[1]}):
                    for _ in range(2):
                        assert torch.equal(tk.int4_linear(x, qweight, qzeros, scales, group), three), (split, fuse)
                    with mock.patch.object(tk, "A8_QUANT_MAX_GROUPS", 0):
                        assert torch.equal(tk.int4_linear(x, qweight, qzeros, scales, group), three), (split, fuse)
    assert torch.equal(three, expected)  # the last split is the default's (-2)
    # INT4_A8_LONG_K_SPLIT (here from this K on): the split it names instead of the config's, the same numbers
    with _settings(tk, ONE_ROW={"int4": "gemv-a8"}, CONFIGS={("int4", "gemv-a8"): (*config[:4], 4)}):
        four = tk.int4_linear(x, qweight, qzeros, scales, group)
    with _settings(tk, ONE_ROW={"int4": "gemv-a8"}), mock.patch.object(tk, "INT4_A8_LONG_K_SPLIT", 4), \
            mock.patch.object(tk, "A8_LONG_K", x.shape[-1]):
        assert torch.equal(tk.int4_linear(x, qweight, qzeros, scales, group), four)
    from cogvlm2.counters import _BUFFERS

    assert not any(buf.any() for (user, dev), buf in _BUFFERS.items() if dev == x.device)  # all back to 0


def check_a8_pair(tk, x, first, second, group) -> None:
    """Two int4 weights of one shape in one W4A8 launch (int4_linear_pair, PAIR_A8: the MLP's gate and up) equal the
    two int4_linear calls at the pair's K split bit for bit: K split or not, the sum folded or not, x quantized
    beforehand or not, twice in a row (the pair's counters back to 0); Int4Linear.matmul_pair under the switch, None
    without it."""
    from cogvlm2.counters import _BUFFERS
    from cogvlm2.quant import linear as ql

    second = tuple(t.to(x.device, a.dtype) for t, a in zip(second, first))  # the scales in the model dtype
    config = tk.CONFIGS[("int4", "gemv-a8")]
    n, k = first[0].shape[1], x.shape[-1]
    for split in (1, 2, 4, -2):  # -2: the pair's own split (twice the column blocks: it may split less)
        alone = tk.launch_split(split, config[0], n, k, group, x.device, 2)
        for fused in (False, True):
            with _settings(tk, ONE_ROW={"int4": "gemv-a8"}, A8_FUSED={"sum": fused, "quant": False}):
                with _settings(tk, CONFIGS={("int4", "gemv-a8"): (*config[:4], alone)}):
                    two = (tk.int4_linear(x, *first, group), tk.int4_linear(x, *second, group))
                with _settings(tk, CONFIGS={("int4", "gemv-a8"): (*config[:4], split)}):
                    for a8 in (None, tk.quantize_a8(x, group), None):
                        pair = tk.int4_linear_pair(x, first, second, group, a8)
                        assert all(torch.equal(p, t) for p, t in zip(pair, two)), (split, fused, a8 is None)
    assert not any(buf.any() for (user, dev), buf in _BUFFERS.items() if dev == x.device)  # all back to 0
    gate, up = ql.Int4Linear(k, n, group_size=group), ql.Int4Linear(k, n, group_size=group)
    for layer, (qw, qz, sc) in ((gate, first), (up, second)):
        layer.qweight, layer.qzeros, layer.scales = qw, qz, sc
    with _settings(tk, ONE_ROW={"int4": "gemv-a8"}), mock.patch.object(ql, "_kernel_ok", lambda x: True):
        with mock.patch.object(ql, "PAIR_A8", False):
            assert gate.matmul_pair(up, x) is None
        with mock.patch.object(ql, "PAIR_A8", True):
            pair = gate.matmul_pair(up, x)
            assert all(torch.equal(p, t) for p, t in zip(pair, tk.int4_linear_pair(x, first, second, group)))


def check_fp4_a8_pair(tk, x, first, second, n) -> None:
    """Two fp4 weights of one shape in one fp4 W4A8 launch (fp4_linear_pair, PAIR_A8) equal the two fp4_linear calls
    bit for bit, with K split (the sum folded) or not, x quantized beforehand or not; None where the GEMV does not
    apply (ONE_ROW "gemv")."""
    lut = formats.code_table("fp4", x.device)
    second = tuple(t.to(x.device) for t in second)
    config = tk.CONFIGS[("fp4", "gemv-a8")]
    for split in (1, 2):
        with _settings(tk, ONE_ROW={"fp4": "gemv-a8"}, CONFIGS={("fp4", "gemv-a8"): (*config[:4], split)}):
            two = [tk.fp4_linear(x, *w, lut, n, is_fp4=True) for w in (first, second)]
            for a8 in (None, tk.quantize_fp4_a8(x)):
                pair = tk.fp4_linear_pair(x, first, second, n, a8)
                assert all(torch.equal(p, t) for p, t in zip(pair, two)), (split, a8 is None)
    with _settings(tk, ONE_ROW={"fp4": "gemv"}):
        assert tk.fp4_linear_pair(x, first, second, n) is None


def check_fp4_a8(tk, x, w, packed, absmax, lut, ref_w, tol) -> None:
    """ONE_ROW fp4 "gemv-a8" (the official fp4 layout times int8 activations): x quantized per absmax block of 64
    as the int4 W4A8 quantizes a group, the products exact integers (values x 192), so the result is the dequantized
    weights times that quantized x to float rounding; against the unquantized weights the error is the 4-bit
    weights' and hardly more. nf4, 8-bit absmax or another block size keep the float GEMV."""
    n, k = ref_w.shape
    with _settings(tk, ONE_ROW={"fp4": "gemv-a8"}):
        got = tk.fp4_linear(x, packed, absmax, lut, n, is_fp4=True)
    xb = x.float().view(k // 64, 64)  # x quantized as the kernel does it, in float32
    sx = (xb.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30)
    xs = xb / sx
    xq = (xs + torch.where(xs >= 0, 0.5, -0.5)).trunc().double() * sx.double()  # round half away from zero
    # the packed row, for x whose quotients are exact (sx a power of two): byte b of word j holds k = 4j + (b ^ 1)
    g = torch.Generator().manual_seed(k)
    xi = torch.randint(-127, 128, (k // 64, 64), generator=g)
    xi[:, 0] = 127
    xw, sxw = tk.quantize_fp4_a8((xi * 0.25).view(1, k).to(x.device, x.dtype))
    assert torch.equal(sxw.cpu(), torch.full((k // 64,), 0.25))
    nbytes = xw.cpu().view(torch.int8).view(k // 4, 4).to(torch.int64)  # little-endian bytes
    assert torch.equal(nbytes, xi.view(k // 4, 4)[:, [1, 0, 3, 2]])
    assert got.shape == (1, n) and got.dtype == x.dtype
    assert _rel(got, (xq.view(1, k) @ ref_w.double().t()).float()) < max(tol, 1e-5), ("fp4 gemv-a8", n, k)
    exact = x.float() @ w.float().t()
    w4a16, w4a8 = _rel(x.float() @ ref_w.float().t(), exact), _rel(got, exact)
    assert 0.03 < w4a16 and w4a8 < 1.02 * w4a16, ("fp4 W4A8 against the unquantized weights", n, k, w4a16, w4a8)
    # FP4_A8_LONG_K_SPLIT (here from this K on): K split in two, the partials added by the column block's last
    # program: the same sums in another order, twice in a row (the counters go back to 0)
    from cogvlm2.counters import _BUFFERS

    with _settings(tk, ONE_ROW={"fp4": "gemv-a8"}), mock.patch.object(tk, "FP4_A8_LONG_K_SPLIT", 2), \
            mock.patch.object(tk, "A8_LONG_K", k):
        for _ in range(2):
            halves = tk.fp4_linear(x, packed, absmax, lut, n, is_fp4=True)
            assert _rel(halves, got) < max(tol, 1e-5), ("fp4 gemv-a8 split K", n, k)
    assert not any(buf.any() for (user, dev), buf in _BUFFERS.items() if dev == x.device)


def check_kernels(device: str, dtype: torch.dtype, rows=ROWS, tol: float = 1e-5) -> None:
    from cogvlm2.quant import triton_kernels as tk

    g = torch.Generator().manual_seed(0)
    for quant_type in ("fp4", "nf4"):
        for n, k in SHAPES:
            w = torch.randn(n, k, generator=g).to(device)
            packed, absmax = formats.quantize_4bit(w, quant_type)
            lut = formats.code_table(quant_type, device)
            ref_w = formats.dequantize_4bit(packed, absmax, lut, (n, k), dtype)
            assert torch.equal(tk.fp4_dequantize(packed, absmax, lut, n, k, dtype), ref_w), (quant_type, n, k)
            a8, nabs, nmap, offset = formats.quantize_absmax(absmax)  # 8-bit absmax (double quantization)
            nested = (nabs, nmap.to(device), offset)
            ref_nested = formats.dequantize_4bit(packed, formats.dequantize_absmax(a8, *nested), lut, (n, k), dtype)
            assert torch.equal(tk.fp4_dequantize(packed, a8, lut, n, k, dtype, nested=nested), ref_nested)
            for m in (1, 33):
                x = torch.randn(m, k, generator=g).to(device, dtype)
                for kernel, _ in _row_kernels(m, False):
                    with _settings(tk, ONE_ROW={"fp4": kernel}):
                        got = tk.fp4_linear(x, packed, a8, lut, n, nested=nested)
                    assert _rel(got, x.float() @ ref_nested.float().t()) < tol, ("nested", quant_type, n, k, m, kernel)
            for m in rows:
                x = torch.randn(m, k, generator=g).to(device, dtype)
                for kernel, arith in _row_kernels(m, quant_type == "fp4"):
                    with _settings(tk, ONE_ROW={"fp4": kernel}, FP4_ARITH={"gemv": arith}):
                        got = tk.fp4_linear(x, packed, absmax, lut, n, is_fp4=quant_type == "fp4")
                    assert got.shape == (m, n) and got.dtype == dtype
                    err = _rel(got, x.float() @ ref_w.float().t())
                    assert err < tol, (quant_type, kernel, arith, n, k, m, err)
                    if kernel == "gemv":  # the same sums added once after the loop (FP4_SUM_ONCE)
                        with _settings(tk, ONE_ROW={"fp4": kernel}, FP4_ARITH={"gemv": arith},
                                       FP4_SUM_ONCE={"gemv": True}):
                            once = tk.fp4_linear(x, packed, absmax, lut, n, is_fp4=quant_type == "fp4")
                        assert _rel(once, x.float() @ ref_w.float().t()) < tol, (quant_type, arith, n, k, m)
                if m == 1 and quant_type == "fp4":
                    check_fp4_a8(tk, x, w, packed, absmax, lut, ref_w, tol)
                    check_fp4_a8_pair(tk, x, (packed, absmax), formats.quantize_4bit(w.flip(0), "fp4"), n)
    check_split_k(device, dtype, g, tol)
    for n, k in [(48, 256), (40, 384), (64, 128)]:
        for group in (128, 64):
            w = torch.randn(n, k, generator=g).to(device)
            qweight, qzeros, scales = formats.quantize_int4(w, group)
            scales = scales.to(dtype)
            ref_w = formats.dequantize_int4(qweight, qzeros, scales, dtype)
            assert torch.equal(tk.int4_dequantize(qweight, qzeros, scales, dtype, group), ref_w), (n, k, group)
            for m in rows:
                x = torch.randn(m, k, generator=g).to(device, dtype)
                for kernel, _ in _row_kernels(m, False) + ([("gemv2", False)] if m == 1 else []):
                    with _settings(tk, ONE_ROW={"int4": kernel}, TILE_A8={"int4": 0}):  # bf16 tile (W4A8: below)
                        got = tk.int4_linear(x, qweight, qzeros, scales, group)
                    assert got.shape == (m, n) and got.dtype == dtype
                    err = _rel(got, x.float() @ ref_w.float().t())
                    assert err < tol, ("int4", kernel, n, k, group, m, err)
                if m in (2, 17, 64):  # the W4A8 tile (padded to 16, 32, 64 rows): ~0.7% from the int8 rows, next to
                    # the weights' ~10%
                    with _settings(tk, TILE_A8={"int4": 2}):
                        got = tk.int4_linear(x, qweight, qzeros, scales, group)
                    exact = x.float() @ w.float().t()
                    w4a16, w4a8 = _rel(x.float() @ ref_w.float().t(), exact), _rel(got, exact)
                    assert got.shape == (m, n) and got.dtype == dtype and _rel(got, x.float() @ ref_w.float().t()) \
                        < max(tol, 1.5e-2) and w4a8 < 1.02 * w4a16, ("int4 tile-a8", n, k, group, m, w4a16, w4a8)
                if m == 1:  # W4A8: x quantized to int8 per group of the weight's, ~0.3% of error
                    with _settings(tk, ONE_ROW={"int4": "gemv-a8"}):
                        got = tk.int4_linear(x, qweight, qzeros, scales, group)
                    err = _rel(got, x.float() @ ref_w.float().t())
                    assert got.shape == (1, n) and got.dtype == dtype and err < max(tol, 1e-2), (
                        "int4 gemv-a8", n, k, group, err)
                    # the default one-row int4 kernel: against the unquantized weights its error is the 4-bit
                    # weights' (~10% here) and hardly more (the int8 activations add ~0.5% in quadrature)
                    exact = x.float() @ w.float().t()
                    w4a16, w4a8 = _rel(x.float() @ ref_w.float().t(), exact), _rel(got, exact)
                    assert 0.03 < w4a16 and w4a8 < 1.02 * w4a16, ("W4A8 against bf16", n, k, group, w4a16, w4a8)
                    check_a8_fused(tk, x, qweight, qzeros, scales, group, got)
                    check_a8_pair(tk, x, (qweight, qzeros, scales), formats.quantize_int4(w.flip(0), group), group)
    # (37, 1792) at 8,192 elements a program: four rows a program, the last one partial
    for (m, k), elems in zip([(1, 64), (7, 4096), (3, 5000), (37, 1792), (37, 1792)], [1, 8192, 1, 1, 8192]):
        x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10).to(device, dtype)
        x[0, :] = 0 if m > 1 else x[0, :]  # an all-zero token keeps a finite scale
        with mock.patch.object(tk, "FP8_ROW_ELEMENTS", elems):
            q, s = tk.fp8_quantize_rows(x)
        rq, rs = formats.quantize_fp8_rows(x)
        assert torch.equal(s, rs) and q.dtype == torch.float8_e4m3fn
        if device == "cuda":  # Triton's interpreter emulates the float8 cast wrongly (126.9 -> 64), hardware does not
            same = (q.float() == rq.float()).float().mean().item()  # a division may round differently, rarely
            assert same > 0.999 and torch.allclose(q.float(), rq.float(), rtol=0.13, atol=2**-9), (m, k, same)
        # the vision MLP's GELU in the same pass: the rows of F.gelu(x), the GELU rounded to x's dtype first
        with mock.patch.object(tk, "FP8_ROW_ELEMENTS", elems):
            q, s = tk.fp8_quantize_rows(x, gelu=True)
        rq, rs = formats.quantize_fp8_rows(torch.nn.functional.gelu(x))
        assert torch.allclose(s, rs, rtol=1e-6 if device == "cuda" else 1e-2), (m, k)
        if device == "cuda":
            same = (q.float() == rq.float()).float().mean().item()
            assert same > 0.999 and torch.allclose(q.float(), rq.float(), rtol=0.13, atol=2**-9), (m, k, same)
    x3 = torch.randn(2, 3, 256, generator=g).to(device, dtype)  # leading dims and a non-contiguous view
    packed, absmax = formats.quantize_4bit(torch.randn(48, 256, generator=g).to(device))
    lut = formats.code_table("fp4", device)
    out = tk.fp4_linear(x3.transpose(0, 1), packed, absmax, lut, 48)
    assert out.shape == (3, 2, 48)
    assert torch.equal(out, tk.fp4_linear(x3.transpose(0, 1).contiguous(), packed, absmax, lut, 48))
    assert tk.fp4_linear(x3[:0, 0], packed, absmax, lut, 48).shape == (0, 48)


def check_split_k(device: str, dtype: torch.dtype, g: torch.Generator, tol: float) -> None:
    """Every launch shape the benchmark sweep may install: K cut into slices (float32 partials added by a
    second kernel), several steps per slice, table or bit decoding, nested absmax; 1 row (GEMV) and a tile."""
    from cogvlm2.quant import triton_kernels as tk

    n, k = 40, 512
    w = torch.randn(n, k, generator=g).to(device)
    packed, absmax = formats.quantize_4bit(w, "fp4")
    lut = formats.code_table("fp4", device)
    a8, nabs, nmap, offset = formats.quantize_absmax(absmax)
    nested = (nabs, nmap.to(device), offset)
    ref = formats.dequantize_4bit(packed, absmax, lut, (n, k), dtype).float()
    ref_nested = formats.dequantize_4bit(packed, formats.dequantize_absmax(a8, *nested), lut, (n, k), dtype).float()
    qweight, qzeros, scales = formats.quantize_int4(w, 64)
    scales = scales.to(dtype)
    ref_int4 = formats.dequantize_int4(qweight, qzeros, scales, dtype).float()
    gemv = ((1, 8, 64, False), (2, 16, 128, True), (8, 16, 256, False), (4, 32, 64, True))
    # tile: several BLOCK_K per absmax block / group and the reverse, fixed and automatic (0) K slices
    tile = ((1, 16, 32, False), (2, 32, 128, False), (8, 16, 256, False), (0, 64, 64, False), (0, 16, 512, False))
    for m in (1, 6):
        x = torch.randn(m, k, generator=g).to(device, dtype)
        for path, configs in (("gemv", gemv), ("tile", tile)) if m == 1 else (("tile", tile),):
            for split, block_n, block_k, arith in configs:
                with _settings(tk, CONFIGS={("fp4", path): (block_n, block_k, 4, 2, split),
                                            ("int4", path): (block_n, block_k, 4, 2, split)},
                               ONE_ROW={"fp4": path, "int4": path}, FP4_ARITH={"gemv": arith}):
                    got = tk.fp4_linear(x, packed, absmax, lut, n, is_fp4=True)
                    assert _rel(got, x.float() @ ref.t()) < tol, ("fp4", m, split, block_n, block_k, arith)
                    got = tk.fp4_linear(x, packed, a8, lut, n, is_fp4=True, nested=nested)
                    assert _rel(got, x.float() @ ref_nested.t()) < tol, ("fp4-dq", m, split, block_n, block_k, arith)
                    # codes not 16-byte aligned (a view into a checkpoint buffer): the GEMV hands over to the tile
                    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=device)[1:].view(-1, 1)
                    shifted.copy_(packed)
                    got = tk.fp4_linear(x, shifted, absmax, lut, n, is_fp4=True)
                    assert _rel(got, x.float() @ ref.t()) < tol, ("fp4 unaligned", split, block_n, block_k, arith)
                    got = tk.int4_linear(x, qweight, qzeros, scales, 64)
                    assert got.dtype == dtype and _rel(got, x.float() @ ref_int4.t()) < tol, ("int4", m, split, block_k)


def test_tile_split_covers_the_sms_the_asked_number_of_times():
    from cogvlm2.quant import triton_kernels as tk

    cpu = torch.device("cpu")  # 8 "SMs" (the interpreter's stand-in)
    assert tk._tile_split(3, 10, cpu) == 3  # given
    assert tk._tile_split(0, 2, cpu) == 4  # 2 programs x 4 slices cover 8 SMs once
    assert tk._tile_split(-2, 2, cpu) == 8  # twice
    assert tk._tile_split(-4, 1, cpu) == 16  # four times would take 32 slices: at most 16
    assert tk._tile_split(0, 20, cpu) == 1


def test_w4a8_gemv_compiles_for_hopper():
    """The W4A8 GEMV's GPU path (inline PTX dp4a, which Triton's interpreter cannot run) compiles for sm_90 into
    integer dot products without register spills, for every launch config the benchmark sweeps."""
    from cogvlm2.quant import triton_kernels as tk
    from tests.hopper_compile import compile_for_hopper

    signature = {"x_ptr": "*bf16", "xe_ptr": "*i32", "xo_ptr": "*i32", "sx_ptr": "*fp32", "sq_ptr": "*i32",
                 "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "out_ptr": "*fp32", "final_ptr": "*bf16",
                 "count_ptr": "*i32", "N": "i32", "qw2_ptr": "*i32", "qz2_ptr": "*i32", "s2_ptr": "*bf16",
                 "out2_ptr": "*fp32", "final2_ptr": "*bf16"}
    quantize = compile_for_hopper(tk._quantize_a8_kernel, {"x_ptr": "*bf16", "xe_ptr": "*i32", "xo_ptr": "*i32",
                                                            "sx_ptr": "*fp32", "sq_ptr": "*i32"},
                                  dict(GROUP=128, PDL=False), num_warps=4).asm["ptx"]
    assert "ld.local" not in quantize and quantize.count("st.global") >= 4  # xe, xo, sx, sq
    for block_n, _, warps, stages, split in tk.CANDIDATES[("int4", "gemv-a8")]:
        for fused in (False, True):  # A8_FUSED off, or both on (at the largest slice the quant may take)
            k = 14336 if fused else 4096
            split_k = abs(split) or 2
            while fused and k // 128 // split_k > tk.A8_QUANT_MAX_GROUPS:
                split_k *= 2
            groups = k // 128 // split_k
            kernel = compile_for_hopper(tk._int4_gemv_a8_kernel, signature, dict(
                K=k, BLOCK_N=block_n, GROUP=128, SPLIT_K=split_k, ASM=True, STAGES=stages, FUSED_QUANT=fused,
                NG_PAD=triton.next_power_of_2(groups), FUSED_SUM=fused, L2_ROWS=0, PDL=fused, PAIR=fused),
                num_warps=warps, num_stages=stages)  # fused: also the gate / up pair (PAIR_A8)
            ptx = kernel.asm["ptx"]
            assert "dp4a.u32.s32" in ptx and "ld.local" not in ptx, (block_n, warps, fused)  # no spills
            assert ("cp.async" in ptx) == (stages > 1), (block_n, warps, stages)  # prefetched steps ahead
            # the sum: one acq_rel atomic at GPU scope on the block's counter, the partials read past L1
            assert ("atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx) == fused, (block_n, fused)
            assert ("griddepcontrol.wait" in ptx) == fused, (block_n, fused)  # A8_FUSED["pdl"]: waits first
            assert not fused or ptx.index("griddepcontrol.wait") < ptx.index("ld.global"), block_n
            assert "prefetch" not in ptx
        # A8_L2_PREFETCH_BYTES: the program's codes prefetched into L2 line by line, all before the PDL wait, no
        # global load before it; the quantize launch before it with PDL too
        split_k = abs(split) or 2
        kernel = compile_for_hopper(tk._int4_gemv_a8_kernel, signature, dict(
            K=4096, BLOCK_N=block_n, GROUP=128, SPLIT_K=split_k, ASM=True, STAGES=stages, FUSED_QUANT=False,
            NG_PAD=1, FUSED_SUM=True, L2_ROWS=triton.next_power_of_2(4096 // split_k // 8), PDL=True, PAIR=False),
            num_warps=warps, num_stages=stages)
        ptx = kernel.asm["ptx"]
        wait = ptx.index("griddepcontrol.wait")
        prefetches = [m.start() for m in re.finditer(r"prefetch\.global\.L2", ptx)]
        assert prefetches and max(prefetches) < wait < ptx.index("ld.global") and "ld.local" not in ptx, block_n
    quantize = compile_for_hopper(tk._quantize_a8_kernel, {"x_ptr": "*bf16", "xe_ptr": "*i32", "xo_ptr": "*i32",
                                                            "sx_ptr": "*fp32", "sq_ptr": "*i32"},
                                  dict(GROUP=128, PDL=True), num_warps=4).asm["ptx"]
    assert quantize.index("griddepcontrol.launch_dependents") < quantize.index("griddepcontrol.wait") \
        < quantize.index("ld.global")


def _run_ptx(text: str, operands: list[int]) -> int:
    """Execute the straight-line PTX of an inline asm block ($0 its output, $1.. the 32-bit operands) by the PTX ISA's
    documented semantics of the few instructions it may use: mov / and / or / shr (.b32, .u32), prmt.b32 (default
    mode: each selector nibble's low 3 bits pick one of the 8 bytes of {b, a}, its bit 3 replicates that byte's sign
    bit), dp4a.u32.s32 (c + the sum of a's unsigned bytes times b's signed bytes)."""
    regs = {f"${i + 1}": v & 0xFFFFFFFF for i, v in enumerate(operands)}

    def val(tok: str) -> int:
        return regs[tok] if tok in regs else int(tok, 0) & 0xFFFFFFFF

    def sbyte(v: int, i: int) -> int:
        b = (v >> (8 * i)) & 0xFF
        return b - 256 if b >= 128 else b

    for line in text.replace("{", "").replace("}", "").split(";"):
        parts = line.replace(",", " ").split()
        if not parts or parts[0] == ".reg":
            continue
        op, dst, *src = parts
        a = [val(t) for t in src]
        if op == "mov.b32":
            r = a[0]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "xor.b32":
            r = a[0] ^ a[1]
        elif op == "sub.s32":
            r = a[0] - a[1]
        elif op == "shr.u32":
            r = a[0] >> a[1]
        elif op == "prmt.b32":
            pool = [(a[0] >> (8 * i)) & 0xFF for i in range(4)] + [(a[1] >> (8 * i)) & 0xFF for i in range(4)]
            r = 0
            for i in range(4):
                sel = (a[2] >> (4 * i)) & 0xF
                byte = pool[sel & 7]
                r |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << (8 * i)
        elif op == "dp4a.u32.s32":
            r = a[2] + sum(((a[0] >> (8 * i)) & 0xFF) * sbyte(a[1], i) for i in range(4))
        else:
            raise AssertionError(f"the model has no {op}")
        regs[dst] = r & 0xFFFFFFFF
    out = regs["$0"]
    return out - 2**32 if out >= 2**31 else out


def test_fp4_dot8_ptx_computes_the_exact_dot():
    """_fp4_dot8's PTX (FP4_DOT8_PTX, run on the GPU), executed by the instructions' documented semantics, gives the
    exact sum of (fp4 value x 192) x int8 activation over a word's 8 codes, for random words and activations packed
    as quantize_fp4_a8 packs them (the negative codes' products summed apart); the GPU run checks the same against
    the dequantized weights (check_fp4_a8)."""
    from cogvlm2.quant import triton_kernels as tk

    mag = [0, 1, 128, 192, 64, 96, 32, 48]  # bitsandbytes fp4 |value| x 192 for the codes 0-7; bit 3 the sign
    assert [round(abs(v) * 192) for v in formats.code_table("fp4", "cpu").tolist()[:8]] == mag

    def pack(xs):
        return sum((x & 0xFF) << (8 * i) for i, x in enumerate(xs))

    g = torch.Generator().manual_seed(5)
    for _ in range(3000):
        codes = torch.randint(0, 16, (8,), generator=g).tolist()  # the codes of k = 8p .. 8p + 7
        xq = torch.randint(-127, 128, (8,), generator=g).tolist()
        word = sum(((codes[2 * t] << 4) | codes[2 * t + 1]) << (8 * t) for t in range(4))  # bitsandbytes' bytes
        lo, hi = [xq[b ^ 1] for b in range(4)], [xq[4 + (b ^ 1)] for b in range(4)]
        exact = sum((-1 if c & 8 else 1) * mag[c & 7] * x for c, x in zip(codes, xq))
        assert _run_ptx(tk.FP4_DOT8_PTX.value, [word, pack(lo), pack(hi)]) == exact, (codes, xq)


def test_fp4_gemv_a8_compiles_for_hopper():
    """The fp4 W4A8 GEMV's GPU path (inline PTX: PRMT lookups and IDP4A, which the interpreter cannot run) compiles
    for sm_90 at every swept config without spills; its activation quantizer too; and the fp4 GEMV summing once
    (FP4_SUM_ONCE) at its swept configs (benchmarks/kernel_sass.py counts their loops' instructions: ~5.1 a code
    for the W4A8 GEMV against the float fp4 GEMV's ~12, and no barrier left in the latter's loop with Triton 3.6)."""
    from cogvlm2.quant import triton_kernels as tk
    from tests.hopper_compile import compile_for_hopper

    signature = {"xw_ptr": "*i32", "sx_ptr": "*fp32", "w_ptr": "*i32", "absmax_ptr": "*fp32", "out_ptr": "*fp32",
                 "final_ptr": "*bf16", "count_ptr": "*i32", "N": "i32", "w2_ptr": "*i32", "absmax2_ptr": "*fp32",
                 "out2_ptr": "*fp32", "final2_ptr": "*bf16"}
    for block_n, block_k, warps, stages, split in tk.CANDIDATES[("fp4", "gemv-a8")]:
        for lines, fused in ((0, False), (triton.next_power_of_2(4096 // split // 256), False),
                             (0, True)):  # fused: FP4_A8_LONG_K_SPLIT's K = 14,336
            kernel = compile_for_hopper(tk._fp4_gemv_a8_kernel, signature, dict(
                K=14336 if fused else 4096, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=2 if fused else split,
                STAGES=stages, ASM=True, L2_LINES=lines, FUSED_SUM=fused, PDL=lines > 0, PAIR=fused),
                num_warps=warps, num_stages=stages)
            ptx, where = kernel.asm["ptx"], (block_n, block_k, stages, lines, fused)  # lines: L2 prefetch
            assert ("atom.global.gpu.acq_rel.add" in ptx) == fused, where  # the last program per block sums
            assert "prmt.b32" in ptx and "dp4a.u32.s32" in ptx and "ld.local" not in ptx, where
            # the program's codes prefetched into L2 line by line, all before the PDL wait, no global load before it
            prefetches = [m.start() for m in re.finditer(r"prefetch\.global\.L2", ptx)]
            assert bool(prefetches) == (lines > 0) == ("griddepcontrol.wait" in ptx), where
            first_read = re.search(r"ld\.global|cp\.async", ptx).start()  # pipelined steps: cp.async only
            assert not lines or max(prefetches) < ptx.index("griddepcontrol.wait") < first_read, where
    for launch_pdl in (False, True):  # PDL: before the prefetching GEMV
        quantize = compile_for_hopper(tk._quantize_fp4_a8_kernel, {"x_ptr": "*bf16", "xw_ptr": "*i32",
                                                                   "sx_ptr": "*fp32"},
                                      dict(GROUP=64, PDL=launch_pdl), num_warps=1).asm["ptx"]
        assert "ld.local" not in quantize and quantize.count("st.global") >= 2
        assert not launch_pdl or quantize.index("griddepcontrol.launch_dependents") \
            < quantize.index("griddepcontrol.wait") < quantize.index("ld.global")
    fp4 = {"x_ptr": "*bf16", "w_ptr": "*i32", "absmax_ptr": "*fp32", "lut_ptr": "*fp32", "nabs_ptr": "*fp32",
           "nmap_ptr": "*fp32", "offset": "fp32", "out_ptr": "*bf16", "N": "i32"}
    for block_n, block_k, warps, stages, _ in tk.CANDIDATES[("fp4", "gemv")]:
        once = compile_for_hopper(tk._fp4_gemv_kernel, fp4, dict(
            K=4096, BLOCK_N=block_n, BLOCK_K=block_k, BLOCKSIZE=64, ARITH=True, NESTED=False, SPLIT_K=1,
            STAGES=stages, SUM_ONCE=True), num_warps=warps, num_stages=stages)
        assert "ld.local" not in once.asm["ptx"] and once.metadata.shared <= 227 * 1024, (block_n, block_k, stages)


def test_w4a8_tile_compiles_for_hopper():
    """The W4A8 tile (2-64 rows) for sm_90 at every swept config and row count: int8 wgmma (s32.s8.s8), the steps
    prefetched through shared memory, no spills, shared memory within a block's 227 KB; the row quantizer too."""
    from cogvlm2.quant import triton_kernels as tk
    from tests.hopper_compile import compile_for_hopper

    quantize = compile_for_hopper(tk._quantize_rows_kernel, {"x_ptr": "*bf16", "xq_ptr": "*i8", "sx_ptr": "*fp32",
                                                              "sq_ptr": "*i32", "stride_xm": "i32"},
                                  dict(K=4096, GROUP=128), num_warps=4).asm["ptx"]
    assert "ld.local" not in quantize and quantize.count("st.global") >= 3  # xq, sx, sq
    signature = {"xq_ptr": "*i8", "sx_ptr": "*fp32", "sq_ptr": "*i32", "qw_ptr": "*i32", "qz_ptr": "*i32",
                 "s_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32", "stride_om": "i32"}
    for block_n, _, warps, stages, _ in tk.CANDIDATES[("int4", "tile-a8")]:
        for rows in (16, 32, 64):
            kernel = compile_for_hopper(tk._int4_a8_mma_kernel, signature, dict(
                K=4096, BLOCK_M=rows, BLOCK_N=block_n, GROUP=128, SPLIT_K=1), num_warps=warps,
                num_stages=stages)
            ptx = kernel.asm["ptx"]
            assert re.search(r"mma[\w.]*s32\.s8\.s8", ptx) and "ld.local" not in ptx, (block_n, rows)
            assert ("cp.async" in ptx) == (stages > 1) and kernel.metadata.shared <= 227 * 1024, (block_n, rows)


def test_split_tiles_compile_for_hopper():
    """The three 4-bit tiles with K split (float32 partials, added by _splitk_sum_kernel) for sm_90 at their default
    configs: no spills, no atomics. (Their last program adding the partials instead, TILE_FUSED_SUM, was slower on
    the H200: int4 batch 32 9.04 against 8.93 ms, BENCHMARKS.md; removed.)"""
    from cogvlm2.quant import triton_kernels as tk
    from tests.hopper_compile import compile_for_hopper

    ends = {"out_ptr": "*fp32", "M": "i32", "N": "i32"}
    kernels = [
        (tk._int4_mma_kernel, {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16"} | ends
         | {"stride_xm": "i32", "stride_om": "i32"}, dict(BLOCK_K=128, GROUP=128), tk.CONFIGS[("int4", "tile")]),
        (tk._int4_a8_mma_kernel, {"xq_ptr": "*i8", "sx_ptr": "*fp32", "sq_ptr": "*i32", "qw_ptr": "*i32",
                                  "qz_ptr": "*i32", "s_ptr": "*bf16"} | ends | {"stride_om": "i32"}, dict(GROUP=128),
         tk.CONFIGS[("int4", "tile-a8")]),
        (tk._fp4_mma_kernel, {"x_ptr": "*bf16", "w_ptr": "*u8", "absmax_ptr": "*fp32", "lut_ptr": "*i32",
                              "nabs_ptr": "*fp32", "nmap_ptr": "*fp32", "offset": "fp32"} | ends
         | {"stride_xm": "i32", "stride_om": "i32"}, dict(BLOCK_K=64, BLOCKSIZE=64, NESTED=False, SCALE=1.0),
         tk.CONFIGS[("fp4", "tile")])]
    for fn, signature, extra, (block_n, _, warps, stages, _) in kernels:
        kernel = compile_for_hopper(fn, signature, dict(K=4096, BLOCK_M=32, BLOCK_N=block_n, SPLIT_K=4, **extra),
                                    num_warps=warps, num_stages=stages)
        ptx = kernel.asm["ptx"]
        assert "atom." not in ptx and "ld.local" not in ptx, fn.__name__


def test_int4_gemv2_compiles_for_hopper():
    """The int4 GEMV without in-loop reductions ("gemv2") for sm_90 at every swept config: its nibble-to-float is
    one lop3 (inline PTX, which the interpreter cannot run), stages > 1 prefetch through shared memory, no spills."""
    from cogvlm2.quant import triton_kernels as tk
    from tests.hopper_compile import compile_for_hopper

    signature = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "out_ptr": "*fp32", "N": "i32"}
    for block_n, _, warps, stages, split in tk.CANDIDATES[("int4", "gemv2")]:
        kernel = compile_for_hopper(tk._int4_gemv2_kernel, signature, dict(K=4096, BLOCK_N=block_n, GROUP=128,
                                    SPLIT_K=2, STAGES=stages, ASM=True), num_warps=warps, num_stages=stages)
        ptx, config = kernel.asm["ptx"], (block_n, warps, stages)
        assert "lop3.b32" in ptx and ", 0xEA;" in ptx and "ld.local" not in ptx, config
        assert ("cp.async" in ptx) == (stages > 1) and kernel.metadata.shared <= 232448, config


def test_gemv_prefetch_compiles_for_hopper():
    """The one-row GEMVs for sm_90 at every swept config: stages > 1 pipelines the code loads through shared memory
    (cp.async, within the 227 KB a block may use), stages = 1 keeps them as plain loads, never a register spill."""
    from cogvlm2.quant import triton_kernels as tk
    from tests.hopper_compile import compile_for_hopper

    int4 = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "out_ptr": "*fp32", "N": "i32"}
    fp4 = {"x_ptr": "*bf16", "w_ptr": "*i32", "absmax_ptr": "*fp32", "lut_ptr": "*fp32", "nabs_ptr": "*fp32",
           "nmap_ptr": "*fp32", "offset": "fp32", "out_ptr": "*fp32", "N": "i32"}
    for fmt, fn, signature in [("int4", tk._int4_gemv_kernel, int4), ("fp4", tk._fp4_gemv_kernel, fp4)]:
        for block_n, block_k, warps, stages, split in tk.CANDIDATES[(fmt, "gemv")]:
            split, block_k = tk._split(4096, split, block_k, 128 if fmt == "int4" else 64)
            extra = dict(GROUP=128) if fmt == "int4" else dict(BLOCKSIZE=64, ARITH=True, NESTED=False, SUM_ONCE=False)
            kernel = compile_for_hopper(fn, signature, dict(K=4096, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                                                            STAGES=stages, **extra), num_warps=warps,
                                        num_stages=stages)
            ptx, config = kernel.asm["ptx"], (fmt, block_n, block_k, warps, stages, split)
            assert ("cp.async" in ptx) == (stages > 1) and "ld.local" not in ptx, config
            assert kernel.metadata.shared <= 232448, (config, kernel.metadata.shared)


def test_fp8_rows_compile_for_hopper():
    """fp8_quantize_rows' pass for sm_90 at the vision MLP's fc2 input (15,360 wide): the GELU's reciprocal is one
    rcp.approx (not div.full's sequence) beside its exp2, no clamp before the e4m3 conversion (cvt.rn.satfinite
    saturates by itself), no spills; the pass is issue-bound there, so each instruction an element counts."""
    from cogvlm2.quant import triton_kernels as tk
    from tests.hopper_compile import compile_for_hopper

    signature = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "K": "i32", "stride_x": "i32"}
    for gelu in (False, True):
        constexprs = dict(FP8_MAX=448.0, ROWS=1, BLOCK=16384, GELU=gelu, ASM=True)
        ptx = compile_for_hopper(tk._fp8_rows_kernel, signature, constexprs, divisible=("K",), num_warps=16).asm["ptx"]
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "min.f32" not in ptx and "ld.local" not in ptx, gelu
        # as launched (K = 15,360 specialized 16-divisible): ~8 PTX instructions an element, ~25 with the GELU
        body = [ln for ln in ptx.splitlines() if ln.strip()[:1].isalpha() and not ln.strip().startswith("ld.param")]
        assert len(body) <= (26 if gelu else 9) * 32, (gelu, len(body) / 32)
        assert ptx.count("rcp.approx.ftz.f32") == (32 if gelu else 0) and ptx.count("div.full.f32") <= 2, gelu
        assert ptx.count("ex2.approx.ftz.f32") == (32 if gelu else 0), gelu


def test_kernels_interpreted():
    run_interpreted(__file__, "quant kernels ok", timeout=600)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_kernels_cuda_bf16():
    check_kernels("cuda", torch.bfloat16, rows=(1, 2, 3, 8, 16, 24, 32, 48, 64, 65, 256, 2300), tol=1e-2)


@cuda
def test_every_candidate_config_cuda():
    """Each launch config the benchmark may install, on the LM's K (4096, 14336) and an N that is not a multiple
    of the tile, in bf16 against the reference dequantization; tile configs at 1, 24 and 64 rows."""
    from cogvlm2.quant import triton_kernels as tk

    g = torch.Generator().manual_seed(1)
    for n, k in ((200, 4096), (72, 14336)):
        w = torch.randn(n, k, generator=g).cuda()
        packed, absmax = formats.quantize_4bit(w, "fp4")
        lut = formats.code_table("fp4", "cuda")
        ref4 = formats.dequantize_4bit(packed, absmax, lut, (n, k), torch.bfloat16).float()
        qweight, qzeros, scales = formats.quantize_int4(w)
        scales = scales.to(torch.bfloat16)
        ref_int4 = formats.dequantize_int4(qweight, qzeros, scales, torch.bfloat16).float()
        for (fmt, path), configs in tk.CANDIDATES.items():
            rows = {"tile-gl1": (1,), "tile-gl": (2,), "tile-gl16": (16,), "tile-gl32": (24,), "tile-gl64": (64,)}
            for m in (1,) if path.startswith("gemv") else rows.get(path, (1, 24, 64)):
                x = torch.randn(m, k, generator=g).cuda().bfloat16()
                for config in configs:
                    for arith in (True, False) if (fmt, path) == ("fp4", "gemv") else (False,):
                        with _settings(tk, CONFIGS={(fmt, path): config},
                                       ONE_ROW={fmt: "tile-gl" if path == "tile-gl1" else path},
                                       FP4_ARITH={"gemv": arith}, TILE_A8={"int4": 2 if path == "tile-a8" else 0},
                                       TILE_GLUON={fmt: path.startswith("tile-gl")}):
                            if fmt == "int4":
                                got = tk.int4_linear(x, qweight, qzeros, scales, 128)
                                err = _rel(got, x.float() @ ref_int4.t())
                            else:
                                err = _rel(tk.fp4_linear(x, packed, absmax, lut, n, is_fp4=True), x.float() @ ref4.t())
                        assert err < (1.5e-2 if path == "tile-a8" else 1e-2), (fmt, path, config, arith, m, n, k, err)


def _replays_equal(call, expected, replays: int, where) -> None:
    """call() captured in a CUDA graph (compiled and its buffers allocated beforehand by the caller), then replayed
    `replays` times, its output zeroed before each: every replay equals `expected`."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for _ in range(replays):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected), where


@cuda
def test_kernels_cuda_graph_replay():
    from cogvlm2.quant import Fp4Linear, Fp8Linear, Int4Linear

    lin = torch.nn.Linear(512, 384, bias=True).cuda().bfloat16()
    layers = [Fp4Linear.from_linear(lin), Int4Linear.from_linear(lin), Fp8Linear.from_linear(lin)]
    with torch.inference_mode():
        for layer in layers:
            for m in (1, 8, 32):
                x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
                eager = layer(x)
                graph = torch.cuda.CUDAGraph()
                static = x.clone()
                with torch.cuda.graph(graph):
                    out = layer(static)
                static.copy_(x)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, eager), (type(layer).__name__, m)
                assert _rel(eager, lin(x)) < 0.2


@cuda
def test_w4a8_fused_in_cuda_graphs():
    """A8_FUSED (sum and quant) under CUDA graph replay on the LM's shapes: equal to the three launches, replay
    after replay."""
    from cogvlm2.quant import triton_kernels as tk

    g = torch.Generator().manual_seed(2)
    for n, k in ((4096, 4096), (6144, 4096), (4096, 14336)):
        qweight, qzeros, scales = formats.quantize_int4(torch.randn(n, k, generator=g).cuda())
        scales = scales.bfloat16()
        x = torch.randn(1, k, generator=g).cuda().bfloat16()
        with torch.inference_mode(), _settings(tk, ONE_ROW={"int4": "gemv-a8"}):
            with _settings(tk, A8_FUSED={"sum": False, "quant": False, "pdl": False}):
                three = tk.int4_linear(x, qweight, qzeros, scales, 128)
            with _settings(tk, A8_FUSED={"sum": True, "quant": True, "pdl": True}):
                static = x.clone()
                tk.int4_linear(static, qweight, qzeros, scales, 128)  # counters allocated outside the capture
                _replays_equal(lambda: tk.int4_linear(static, qweight, qzeros, scales, 128), three, 20, (n, k))
            # A8_L2_PREFETCH_BYTES (the 8 MiB of 4,096 x 4,096 codes allowed, the larger ones not): the quantize
            # launch and the GEMV under PDL, the codes prefetched into L2 first; the same output, in a graph too
            with mock.patch.object(tk, "A8_L2_PREFETCH_BYTES", 9 << 20):
                assert torch.equal(tk.int4_linear(x, qweight, qzeros, scales, 128), three), (n, k)
                _replays_equal(lambda: tk.int4_linear(static, qweight, qzeros, scales, 128), three, 5, (n, k))


@cuda
def test_w4a8_pair_in_cuda_graphs():
    """PAIR_A8 on the GPU: the MLP's gate and up (14,336 x 4,096) in one W4A8 launch equal the two launches at the
    pair's K split, with the sum folded or not (int4 and the official fp4 layout), replay after replay; and the tiny
    int4 / fp4 engines with the pair switched on give the same tokens with CUDA graphs as eagerly."""
    from cogvlm2.engine import LLM
    from cogvlm2.quant import linear as ql
    from cogvlm2.quant import triton_kernels as tk
    from cogvlm2.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(4)
    first, second = ((*w[:2], w[2].bfloat16()) for w in (formats.quantize_int4(torch.randn(14336, 4096, generator=g)
                                                                                .cuda()) for _ in range(2)))
    x = torch.randn(1, 4096, generator=g).cuda().bfloat16()
    with torch.inference_mode(), _settings(tk, ONE_ROW={"int4": "gemv-a8"}):
        config = tk.CONFIGS[("int4", "gemv-a8")]
        alone = tk.launch_split(config[4], config[0], 14336, 4096, 128, x.device, 2)  # the pair's K split
        for fused in (False, True):
            with _settings(tk, A8_FUSED={"sum": fused, "quant": False, "pdl": False}):
                with _settings(tk, CONFIGS={("int4", "gemv-a8"): (*config[:4], alone)}):
                    two = (tk.int4_linear(x, *first, 128), tk.int4_linear(x, *second, 128))
                pair = tk.int4_linear_pair(x, first, second, 128)
                assert all(torch.equal(p, t) for p, t in zip(pair, two)), fused
                for i in range(2):
                    _replays_equal(lambda i=i: tk.int4_linear_pair(x, first, second, 128)[i], two[i], 5, (fused, i))
        # the official fp4 layout's pair (its W4A8 GEMV), K split (the sum folded) by the config
        lut = formats.code_table("fp4", "cuda")
        fp4 = [formats.quantize_4bit(torch.randn(14336, 4096, generator=g).cuda(), "fp4") for _ in range(2)]
        two = [tk.fp4_linear(x, *w, lut, 14336, is_fp4=True) for w in fp4]
        assert all(torch.equal(p, t) for p, t in zip(tk.fp4_linear_pair(x, *fp4, 14336), two))
        _replays_equal(lambda: tk.fp4_linear_pair(x, *fp4, 14336)[1], two[1], 5, "fp4")
    params = SamplingParams(temperature=0, ignore_eos=True, max_new_tokens=12)
    for quant in ("int4", "fp4"):
        outs = []
        with mock.patch.object(ql, "PAIR_A8", True):
            for eager in (True, False):
                llm = LLM("tiny", dtype="bfloat16", device="cuda", quant=quant, enforce_eager=eager,
                          max_model_len=512, num_kv_blocks=256, max_num_seqs=8)
                prompts = [llm.processor(f"question {i}") for i in range(3)]  # alone (W4A8), then together (tiles)
                outs.append([o.token_ids for p in prompts for o in llm.generate([p], params, use_tqdm=False)])
                outs[-1] += [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                del llm
        assert outs[0] == outs[1], quant


@cuda
def test_fp4_a8_prefetch_in_cuda_graphs():
    """The official fp4 layout's W4A8 GEMV with A8_L2_PREFETCH_BYTES (the 8 MiB of 4,096 x 4,096 codes allowed, the
    larger ones not): it and its quantize launch under PDL, the codes prefetched into L2 first; the same output as
    without, in a CUDA graph too, replay after replay."""
    from cogvlm2.quant import triton_kernels as tk

    g = torch.Generator().manual_seed(5)
    lut = formats.code_table("fp4", "cuda")
    for n, k in ((4096, 4096), (6144, 4096), (4096, 14336)):
        packed, absmax = formats.quantize_4bit(torch.randn(n, k, generator=g).cuda(), "fp4")
        x = torch.randn(1, k, generator=g).cuda().bfloat16()
        with torch.inference_mode(), _settings(tk, ONE_ROW={"fp4": "gemv-a8"}):
            with mock.patch.object(tk, "A8_L2_PREFETCH_BYTES", 0):
                plain = tk.fp4_linear(x, packed, absmax, lut, n, is_fp4=True)
            with mock.patch.object(tk, "A8_L2_PREFETCH_BYTES", 9 << 20):
                assert torch.equal(tk.fp4_linear(x, packed, absmax, lut, n, is_fp4=True), plain), (n, k)
                static = x.clone()
                _replays_equal(lambda: tk.fp4_linear(static, packed, absmax, lut, n, is_fp4=True), plain, 5, (n, k))
            # FP4_A8_LONG_K_SPLIT: the down projection's K split, summed by the last program: to rounding, and the
            # same replay after replay
            with mock.patch.object(tk, "FP4_A8_LONG_K_SPLIT", 2):
                halves = tk.fp4_linear(x, packed, absmax, lut, n, is_fp4=True)
                assert _rel(halves, plain) < 1e-2, (n, k)
                _replays_equal(lambda: tk.fp4_linear(static, packed, absmax, lut, n, is_fp4=True), halves, 5, (n, k))


@cuda
def test_split_tiles_in_cuda_graphs():
    """The 4-bit tiles under CUDA graph replay on the LM's shapes with the default configs (K split to cover the
    SMs, the partials added by a second kernel): equal to the eager call, replay after replay."""
    from cogvlm2.quant import triton_kernels as tk

    g = torch.Generator().manual_seed(3)
    lut = formats.code_table("fp4", "cuda")
    for n, k in ((4096, 4096), (6144, 4096), (4096, 14336)):
        w = torch.randn(n, k, generator=g).cuda()
        packed, absmax = formats.quantize_4bit(w, "fp4")
        qweight, qzeros, scales = formats.quantize_int4(w)
        scales = scales.bfloat16()
        for fmt, m in (("int4", 8), ("int4", 32), ("int4", 48), ("fp4", 32)):
            def call(x, fmt=fmt):
                if fmt == "fp4":
                    return tk.fp4_linear(x, packed, absmax, lut, n, is_fp4=True)
                return tk.int4_linear(x, qweight, qzeros, scales, 128)
            x = torch.randn(m, k, generator=g).cuda().bfloat16()
            with torch.inference_mode():
                eager = call(x)
                static = x.clone()
                _replays_equal(lambda: call(static), eager, 10, (fmt, m, n, k))


def test_gate_and_up_share_the_w4a8_row():
    """ops.gate_up_silu_mul with int4 gate and up: on CUDA at one row the two read one W4A8 quantization of x (one
    quantize launch fewer) with the same numbers as quantizing for each; nothing is shared on the CPU, for other
    layer types or group sizes, for several rows or a strided row, where the W4A8 GEMV would not quantize x itself,
    or with SHARE_A8_INPUT off."""
    from cogvlm2.model import ops
    from cogvlm2.quant import Int4Linear, linear as quant_linear
    from cogvlm2.quant import triton_kernels as tk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(4)
    gate_f, up_f = (torch.nn.Linear(256, 384, bias=False).to(device, dtype) for _ in range(2))
    gate, up = Int4Linear.from_linear(gate_f), Int4Linear.from_linear(up_f)
    x = torch.randn(1, 256, generator=g).to(device, dtype)
    group = gate.group_size
    with mock.patch.object(quant_linear, "_kernel_ok", lambda t: True):  # the decision a GPU row gets, on any device
        assert gate.shares_a8(x, up) == group and gate.shares_a8(x) == group
        assert gate.shares_a8(x, gate_f) == 0 and gate.shares_a8(x, Int4Linear.from_linear(up_f, group_size=64)) == 0
        assert gate.shares_a8(torch.cat([x, x]), up) == 0 and gate.shares_a8(x.expand(1, 256)[:, ::2], up) == 0
        with mock.patch.dict(tk.A8_FUSED, quant=True):  # each GEMV program quantizes its own slice: nothing to share
            assert gate.shares_a8(x, up) == 0
        with mock.patch.dict(tk.ONE_ROW, int4="gemv"):  # bf16 activations: nothing quantized
            assert gate.shares_a8(x, up) == 0
    with torch.inference_mode():
        assert up.shared_input(x, gate_f) is None and up.shared_input(x[:0], gate) is None
        assert gate.shared_input(torch.cat([x, x]), up) is None
        assert gate.shared_input(x, Int4Linear.from_linear(up_f, group_size=64)) is None
        with mock.patch.object(quant_linear, "SHARE_A8_INPUT", False):
            assert gate.shared_input(x, up) is None
            separate = ops.gate_up_silu_mul(gate, up, x)
        shared = gate.shared_input(x, up)
        if device == "cpu":
            assert shared is None
            return
        assert shared is not None and len(shared) == 3
        with mock.patch.object(tk, "quantize_a8", wraps=tk.quantize_a8) as quantize:
            together = ops.gate_up_silu_mul(gate, up, x)
        assert quantize.call_count == 1 and torch.equal(together, separate)
        with mock.patch.object(quant_linear, "SHARE_A8_INPUT", False), \
                mock.patch.object(tk, "quantize_a8", wraps=tk.quantize_a8) as quantize:
            ops.gate_up_silu_mul(gate, up, x)
        assert quantize.call_count == 2


def test_fp4_gate_and_up_share_the_a8_row():
    """ops.gate_up_silu_mul with gate and up in the official fp4 layout: on CUDA at one row the two read one
    quantize_fp4_a8 of x (one launch fewer) with the same numbers as quantizing for each; nothing is shared on the
    CPU, with nf4, 8-bit absmax, another layer type, several rows, the float GEMV, or SHARE_A8_INPUT off."""
    from cogvlm2.model import ops
    from cogvlm2.quant import Fp4Linear, linear as quant_linear
    from cogvlm2.quant import triton_kernels as tk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(6)
    gate_f, up_f = (torch.nn.Linear(256, 384, bias=False).to(device, dtype) for _ in range(2))
    gate, up = Fp4Linear.from_linear(gate_f), Fp4Linear.from_linear(up_f)
    x = torch.randn(1, 256, generator=g).to(device, dtype)
    with mock.patch.object(quant_linear, "_kernel_ok", lambda t: True), \
            mock.patch.object(tk, "quantize_fp4_a8", lambda t: "row"):  # the decisions a GPU row gets, anywhere
        with _settings(tk, ONE_ROW={"fp4": "gemv-a8"}):
            assert gate.shared_input(x, up) == "row" and gate.shared_input(x) == "row"
            assert gate.shared_input(x, gate_f) is None and gate.shared_input(torch.cat([x, x]), up) is None
            assert gate.shared_input(x, Fp4Linear.from_linear(up_f, "nf4")) is None
            assert gate.shared_input(x, Fp4Linear.from_linear(up_f).compress_statistics()) is None
            with mock.patch.object(quant_linear, "SHARE_A8_INPUT", False):
                assert gate.shared_input(x, up) is None
        with _settings(tk, ONE_ROW={"fp4": "gemv"}):  # bf16 activations: nothing quantized
            assert gate.shared_input(x, up) is None
    with torch.inference_mode():
        if device == "cpu":
            assert gate.shared_input(x, up) is None
            return
        with _settings(tk, ONE_ROW={"fp4": "gemv-a8"}):
            with mock.patch.object(quant_linear, "SHARE_A8_INPUT", False), \
                    mock.patch.object(tk, "quantize_fp4_a8", wraps=tk.quantize_fp4_a8) as quantize:
                separate = ops.gate_up_silu_mul(gate, up, x)
            assert quantize.call_count == 2
            with mock.patch.object(tk, "quantize_fp4_a8", wraps=tk.quantize_fp4_a8) as quantize:
                together = ops.gate_up_silu_mul(gate, up, x)
            assert quantize.call_count == 1 and torch.equal(together, separate)


@cuda
def test_tinygemm_layout_cuda():
    """The CUDA packing of `formats.tinygemm_pack` (two codes per byte) gives the CPU kernel's product."""
    from cogvlm2.quant import formats

    g = torch.Generator().manual_seed(1)
    qweight, qzeros, scales = formats.quantize_int4(torch.randn(256, 1024, generator=g) / 16)
    codes, sz = formats.int4_to_tinygemm(qweight, qzeros, scales.bfloat16())
    x = torch.randn(5, 1024, generator=g).bfloat16()
    cpu = formats.tinygemm_linear(x, formats.tinygemm_pack(codes), sz, formats.INT4_GROUP)
    gpu = formats.tinygemm_linear(x.cuda(), formats.tinygemm_pack(codes.cuda()), sz.cuda(), formats.INT4_GROUP)
    assert _rel(gpu.cpu(), cpu) < 1e-2


@cuda
def test_fp8_scaled_mm_matches_reference():
    from cogvlm2.quant import Fp8Linear

    lin = torch.nn.Linear(512, 256, bias=True).bfloat16()
    layer = Fp8Linear.from_linear(lin)
    x = torch.randn(37, 512, dtype=torch.bfloat16)
    with torch.inference_mode():
        cpu = layer(x)
        gpu = layer.cuda()(x.cuda()).cpu()
    assert _rel(gpu, cpu) < 1e-2 and _rel(cpu, lin(x)) < 0.05
    # the fusions (bias in _scaled_mm's epilogue, the GELU in the quantizing pass) and fast accumulation
    # against the unfused product on the GPU
    from cogvlm2.quant import linear as quant_linear

    xg = x.cuda()
    with torch.inference_mode():
        fused, fused_gelu = layer(xg), layer.forward_gelu(xg)
        with mock.patch.object(quant_linear, "FP8_FUSE", False):
            plain, plain_gelu = layer(xg), layer(torch.nn.functional.gelu(xg))
        with mock.patch.object(quant_linear, "FP8_FAST_ACCUM", not quant_linear.FP8_FAST_ACCUM):
            fast = layer(xg)  # the other accumulation mode
    assert _rel(fused, plain) < 1e-2 and _rel(fused_gelu, plain_gelu) < 1e-2 and _rel(fast, plain) < 1e-2
    assert _rel(plain_gelu, lin(torch.nn.functional.gelu(x)).cuda()) < 0.05


@cuda
@pytest.mark.parametrize("quant", ["fp4", "int4", "fp8"])
def test_engine_cuda_graphs_equal_eager(quant):
    """Five prompts decoded together, then one alone (batch 1: int4's W4A8 GEMV with its split-K sum folded, whose
    counters must exist before the graphs are captured): the CUDA graphs give the eager engine's tokens."""
    from cogvlm2.engine import LLM
    from cogvlm2.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, ignore_eos=True, max_new_tokens=12)
    outs = []
    for eager in (True, False):
        llm = LLM("tiny", dtype="bfloat16", device="cuda", quant=quant, enforce_eager=eager, max_model_len=512,
                  num_kv_blocks=256, max_num_seqs=8)
        prompts = [llm.processor(f"question {i}") for i in range(5)]
        outs.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        outs[-1] += [o.token_ids for o in llm.generate(prompts[:1], params, use_tqdm=False)]
        del llm
    assert outs[0] == outs[1]


def strict_scalar_index() -> None:
    """Make this interpreter index run-time scalars as Triton 3.6's does (int() of a 1-element array, which
    NumPy >= 2.4 rejects), so a kernel that uses one as a range bound fails here too, not only there."""
    import triton.runtime.interpreter as interpreter

    scope = getattr(interpreter, "_LangPatchScope", None)
    if scope is None:  # another Triton: its own rules apply
        return
    set_attr = scope.set_attr

    def strict(self, obj, name, value):
        if name == "__index__":
            value = lambda t: int(t.handle.data)  # noqa: E731
        return set_attr(self, obj, name, value)
    scope.set_attr = strict


if __name__ == "__main__":  # run by test_kernels_interpreted under TRITON_INTERPRET=1
    strict_scalar_index()
    check_kernels("cpu", torch.float32)
    # fp16 takes the tile kernels' 16-bit path (codes as float pairs, x permuted to the pairs' K order), which
    # bf16 shares on the GPU; Triton's interpreter multiplies bf16 tiles wrongly, fp16 correctly
    check_kernels("cpu", torch.float16, rows=(1, 2, 17, 64), tol=2e-3)
    print("quant kernels ok")

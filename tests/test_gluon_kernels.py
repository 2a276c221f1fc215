"""The Gluon int4 tile (cogvlm2/quant/gluon_kernels.py): its layouts, how it compiles for sm_90 (on any machine:
Triton bundles ptxas), and on a GPU its products against the dequantized weights and the Triton tile."""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from cogvlm2.quant import formats  # noqa: E402
from cogvlm2.quant import gluon_kernels as gk  # noqa: E402
from cogvlm2.quant import triton_kernels as tk  # noqa: E402
from tests.hopper_compile import compile_for_hopper  # noqa: E402

needs_gluon = pytest.mark.skipif(gk.gluon is None, reason="this Triton has no Gluon")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PATHS = ("tile-gl", "tile-gl16", "tile-gl32", "tile-gl64")
CONFIGS = sorted({c[:4] for path in PATHS for c in tk.CANDIDATES[("int4", path)]})  # without the split


def _cover(bases: list[list[int]], shape: list[int]) -> torch.Tensor:
    """How many (register, lane, warp) indices a linear layout with these bases maps to each element of `shape` (an
    index's set bits XOR their bases)."""
    count = torch.zeros(shape, dtype=torch.int64)
    for bits in range(1 << len(bases)):
        pos = [0] * len(shape)
        for i, base in enumerate(bases):
            if bits >> i & 1:
                pos = [a ^ b for a, b in zip(pos, base)]
        count[tuple(pos)] += 1
    return count


@needs_gluon
@pytest.mark.parametrize("block_n,block_k,warps", sorted({c[:3] for c in CONFIGS}))
def test_layouts_give_each_element_to_one_thread(block_n, block_k, warps):
    """The words' load layout puts each packed word of the tile in exactly one register of one thread (the warps
    split the rows), and each warp holds the whole activation tile, each element once: no load is duplicated in a
    warp, none is missed."""
    for block_m in (8, 32, 64):
        lay = gk.layouts(block_n, block_k, block_m, warps)
        w = lay["words"]
        assert (_cover(w.reg_bases + w.lane_bases + w.warp_bases, [block_n, block_k // 8]) == 1).all()
        for name, rows in (("x", block_k), ("x32", block_k // 2)):  # bf16 activations / int32 pairs of them
            x = _cover(lay[name].reg_bases + lay[name].lane_bases, [rows, block_m])
            assert (x == 1).all() and all(b == [0, 0] for b in lay[name].warp_bases), name


@needs_gluon
def test_tile_compiles_for_hopper_without_shared_memory():
    """Every swept config, bf16 and fp16, 8 / 32 / 64 rows, the activations loaded a step ahead or in their step,
    paired by nibble or by byte, for sm_90: mma.sync m16n8k16 on operands that never touch shared memory (0 bytes of
    it, no ld/st.shared), the dequantization as packed FMAs, no register spills."""
    for (block_n, block_k, warps, flags), rows, dt in itertools.product(CONFIGS, (8, 32, 64), ("bf16", "fp16")):
        lay = gk.layouts(block_n, block_k, rows, warps)
        kernel = compile_for_hopper(
            gk._int4_mma2_kernel, {"x_ptr": f"*{dt}", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": f"*{dt}",
                                   "out_ptr": "*fp32", "M": "i32", "N": "i32", "stride_xm": "i32", "stride_om": "i32"},
            dict(K=4096, BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=128, SPLIT_K=2, X_AHEAD=bool(flags & 1),
                 BYTE_PAIRS=bool(flags & 2), L_WORDS=lay["words"], L_X=lay["x32" if flags & 2 else "x"],
                 L_MMA=lay["mma"], L_A=lay["a"], L_B=lay["b"]), gluon=True, num_warps=warps)
        ptx = kernel.asm["ptx"]
        where = (block_n, block_k, warps, flags, rows, dt)
        assert kernel.metadata.shared == 0 and "ld.shared" not in ptx and "st.shared" not in ptx, where
        assert "mma.sync.aligned.m16n8k16" in ptx and f"fma.rn.{'bf16x2' if dt == 'bf16' else 'f16x2'}" in ptx, where
        assert "ld.local" not in ptx, where


def _weights(n: int, k: int, group: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / 32
    qweight, qzeros, scales = formats.quantize_int4(w, group)
    scales = scales.to(dtype)
    ref = formats.dequantize_int4(qweight, qzeros, scales, dtype).float()
    return [t.cuda() for t in (qweight, qzeros, scales)], ref.cuda()


@cuda
@needs_gluon
def test_tile_equals_the_dequantized_weights_cuda():
    """int4_linear at 2..64 rows through the Gluon tile at its default configs, bf16 (fp16 on one shape), groups of
    128 and 64, K split or not, N not a multiple of the tile: x @ dequantize(W)^T in float32 to accumulation order
    (the kernel rounds (q - z) s to the model dtype as the dequantization does), and close to the Triton tile.
    (Every swept config: test_quant_kernels.py::test_every_candidate_config_cuda.)"""
    cases = [(200, 4096, 128, torch.bfloat16), (72, 14336, 128, torch.bfloat16), (96, 1024, 64, torch.bfloat16),
             (200, 4096, 128, torch.float16)]
    for n, k, group, dtype in cases:
        (qweight, qzeros, scales), ref = _weights(n, k, group, dtype, seed=n)
        g = torch.Generator().manual_seed(k)
        for m in (2, 17, 33) if dtype == torch.float16 else (2, 3, 16, 17, 32, 33, 64):
            x = (torch.randn(m, k, generator=g)).to(dtype).cuda()
            expected = x.float() @ ref.t()
            for split, pairing in ((1, 0), (0, 0), (0, 2)):  # split 0: as the config says; pairing 2: by byte
                with _tables(TILE_GLUON={"int4": True}, CONFIGS={
                        key: tk.CONFIGS[key][:3] + (tk.CONFIGS[key][3] & 1 | pairing, split or tk.CONFIGS[key][4])
                        for key in (("int4", path) for path in PATHS)}):
                    assert gk.applies(x, scales, group)
                    got = tk.int4_linear(x, qweight, qzeros, scales, group)
                err = ((got.float() - expected).norm() / expected.norm()).item()
                assert got.dtype == dtype and err < 4e-3, (n, k, group, dtype, m, split, pairing, err)
            with _tables(TILE_GLUON={"int4": False}, TILE_A8={"int4": 0}):
                triton_tile = tk.int4_linear(x, qweight, qzeros, scales, group).float()
            assert ((got.float() - triton_tile).norm() / triton_tile.norm()).item() < 4e-3, (n, k, m)


@cuda
@needs_gluon
def test_tile_replays_from_a_cuda_graph_cuda():
    """Captured in a CUDA graph (as decode runs it), K split: each replay gives the eager output bit for bit."""
    (qweight, qzeros, scales), _ = _weights(4096, 4096, 128, torch.bfloat16, seed=3)
    x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    with _tables(TILE_GLUON={"int4": True}):
        eager = tk.int4_linear(x, qweight, qzeros, scales, 128)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tk.int4_linear(x, qweight, qzeros, scales, 128)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


def test_bad_tile_shapes_are_refused():
    """A block_k that does not divide the group, or rows past 64, get a clear error before any launch."""
    if gk.gluon is None:
        pytest.skip("this Triton has no Gluon")
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    qweight = torch.zeros(32, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_k"):
        gk.int4_mma2(x, qweight, qweight, x, x, 64, 8, 64, 96, 4, 1)
    assert not gk.applies(torch.zeros(65, 256, dtype=torch.bfloat16), x, 128)  # 65 rows: not this tile


class _tables:
    """Temporarily update triton_kernels' dicts by name."""

    def __init__(self, **tables):
        self.tables = tables

    def __enter__(self):
        self.saved = {name: dict(getattr(tk, name)) for name in self.tables}
        for name, values in self.tables.items():
            getattr(tk, name).update(values)

    def __exit__(self, *exc):
        for name, values in self.saved.items():
            getattr(tk, name).update(values)

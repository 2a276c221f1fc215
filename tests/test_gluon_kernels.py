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
PATHS = ("tile-gl1", "tile-gl", "tile-gl16", "tile-gl32", "tile-gl64")
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
    """Every swept config at 8 / 32 / 64 rows (fp16 at the defaults) for sm_90: mma.sync m16n8k16, the dequantization
    as packed FMAs, no register spills; the register kernels (activations a step ahead or in their step, paired by
    nibble or by byte) with operands that never touch shared memory (0 bytes of it, no ld/st.shared), the ring kernel
    (flags >> 2 stages) with exactly its ring there, filled by cp.async; at 32 rows as a gate / up pair (PAIR)."""
    defaults = {tk.CONFIGS[("int4", path)][:4] for path in PATHS}
    cases = [(c, rows, "bf16") for c in CONFIGS for rows in (8, 32, 64)] + [(c, 32, "fp16") for c in defaults]
    signature = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "out_ptr": "*fp32",
                 "M": "i32", "N": "i32", "stride_xm": "i32", "stride_om": "i32", "qw2_ptr": "*i32", "qz2_ptr": "*i32",
                 "s2_ptr": "*bf16", "out2_ptr": "*fp32"}
    for (block_n, block_k, warps, flags), rows, dt in cases:
        lay, stages = gk.layouts(block_n, block_k, rows, warps), flags >> 2
        common = dict(K=4096, BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=128, SPLIT_K=2,
                      L_WORDS=lay["words"], L_MMA=lay["mma"], L_A=lay["a"], L_B=lay["b"], PAIR=rows == 32)
        sig = signature | {"x_ptr": f"*{dt}", "s_ptr": f"*{dt}", "s2_ptr": f"*{dt}"}
        if stages:  # a 32-row pair under its register cap, as int4_mma2 launches it
            cap = gk.PAIR_MAXNREG.get((block_n, block_k, rows, warps)) if rows == 32 else None
            kernel = compile_for_hopper(gk._int4_ring_kernel, sig, common | dict(
                STAGES=stages, L_X=lay["x32"], L_WCOPY=lay["w_copy"], L_XCOPY=lay["x_copy"], L_WSMEM=lay["w_smem"],
                L_XSMEM=lay["x_smem"]), gluon=True, num_warps=warps, **({"maxnreg": cap} if cap else {}))
        else:
            kernel = compile_for_hopper(gk._int4_mma2_kernel, sig, common | dict(
                X_AHEAD=bool(flags & 1), BYTE_PAIRS=bool(flags & 2), L_X=lay["x32" if flags & 2 else "x"]),
                gluon=True, num_warps=warps)
        ptx = kernel.asm["ptx"]
        where = (block_n, block_k, warps, flags, rows, dt)
        if stages:
            assert kernel.metadata.shared == stages * 4 * (block_k // 8 * block_n + rows * block_k // 2), where
            assert "cp.async" in ptx, where
        else:
            assert kernel.metadata.shared == 0 and "ld.shared" not in ptx and "st.shared" not in ptx, where
        assert "mma.sync.aligned.m16n8k16" in ptx and f"fma.rn.{'bf16x2' if dt == 'bf16' else 'f16x2'}" in ptx, where
        assert "ld.local" not in ptx, where


def _swapped(layout):
    """A 2-D DistributedLinearLayout with its dimensions swapped (the ring reads its tiles through transposed views)."""
    def swap(bases):
        return [[b[1], b[0]] for b in bases]

    return gk.gl.DistributedLinearLayout(swap(layout.reg_bases), swap(layout.lane_bases), swap(layout.warp_bases), [],
                                         layout.shape[::-1])


def _no_bank_conflicts(reg, smem, shape: list[int], warps: int) -> bool:
    """Whether a tensor in layout `reg` is read from (or written to) a shared tile in layout `smem` with no bank
    conflict, by Triton's own count (gl.bank_conflicts, asserted at compile time for sm_90)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.errors import CompilationError
    from triton.experimental.gluon._runtime import GluonASTSource

    src = GluonASTSource(fn=_conflicts_probe, signature={"REG": "constexpr", "SMEM": "constexpr",
                                                         "SHAPE": "constexpr"},
                         constexprs={"REG": reg, "SMEM": smem, "SHAPE": shape})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except CompilationError as e:
        if "bank conflicts" not in str(e):
            raise
        return False
    return True


if gk.gluon is not None:
    @gk.gluon.jit
    def _conflicts_probe(REG: gk.gl.constexpr, SMEM: gk.gl.constexpr, SHAPE: gk.gl.constexpr):
        tile = gk.gl.allocate_shared_memory(gk.gl.int32, SHAPE, SMEM)
        gk.gl.static_assert(gk.gl.bank_conflicts(gk.gl.distributed_type(gk.gl.int32, SHAPE, REG), tile.type) == 0,
                            "bank conflicts")


@needs_gluon
def test_ring_tiles_have_no_bank_conflicts():
    """The cp.async rings' shared tiles at every swept ring config: the MMA layouts read them (the words through a
    transposed view for int4) and the copies write them with no bank conflict, by Triton's own count; the same reads
    from unswizzled tiles do conflict (so the count sees what the swizzles avoid)."""
    rings = {c[:3] for key, cs in tk.CANDIDATES.items() if key[1].startswith("tile-gl") for c in cs if c[3] >> 2}
    for (block_n, block_k, warps), rows in itertools.product(sorted(rings), (8, 32, 64)):
        lay, p = gk.layouts(block_n, block_k, rows, warps), block_k // 8
        checks = [(_swapped(lay["words"]), lay["w_smem"], [p, block_n]), (lay["w_copy"], lay["w_smem"], [p, block_n]),
                  (_swapped(lay["x32"]), lay["x_smem"], [rows, block_k // 2]),
                  (lay["x_copy"], lay["x_smem"], [rows, block_k // 2])]
        if block_k <= 64:  # fp4's absmax blocks bound its step
            checks += [(lay["words"], lay["fw_smem"], [block_n, p]), (lay["fw_copy"], lay["fw_smem"], [block_n, p])]
        for i, (reg, smem, shape) in enumerate(checks):
            assert _no_bank_conflicts(reg, smem, shape, warps), (block_n, block_k, warps, rows, i)
    lay, plain = gk.layouts(64, 128, 32, 2), gk.gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    assert not _no_bank_conflicts(_swapped(lay["words"]), plain, [16, 64], 2)
    assert not _no_bank_conflicts(_swapped(lay["x32"]), plain, [32, 64], 2)


def _run_ptx(asm: str, inputs: list[int], dtype: torch.dtype) -> list[int]:
    """A small interpreter of the PTX these kernels inline (mov, and, shr, shl, prmt, lop3, fma.rn on 16-bit float
    pairs) for one thread: the inputs are $4.., the four outputs $0..$3 are returned. It checks the bit
    manipulations' plan (PRMT selectors, LOP3 tables, which codes pair up) on the CPU; the GPU tests check the
    hardware."""
    regs = {f"${4 + i}": v & 0xFFFFFFFF for i, v in enumerate(inputs)}

    def val(op: str) -> int:
        return regs[op] if op in regs else int(op, 0) & 0xFFFFFFFF

    def halves(v: int) -> torch.Tensor:
        return torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(dtype).double()

    for ins in asm.strip(" {}").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, args = ins.split(None, 1)
        d, *a = [x.strip() for x in args.split(",")]
        if op == "mov.b32":
            r = val(a[0])
        elif op == "and.b32":
            r = val(a[0]) & val(a[1])
        elif op == "shr.u32":
            r = val(a[0]) >> int(a[1])
        elif op == "shl.b32":
            r = val(a[0]) << int(a[1])
        elif op == "prmt.b32":  # bytes 0-3 of a, 4-7 of b; selector nibble i picks byte i (its bit 3: sign-replicate)
            src, r = val(a[0]) | val(a[1]) << 32, 0
            for i in range(4):
                sel = val(a[2]) >> (4 * i) & 0xF
                byte = src >> (8 * (sel & 7)) & 0xFF
                r |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << (8 * i)
        elif op == "lop3.b32":  # bit i = lut[4 a_i + 2 b_i + c_i]
            x, y, z, lut = val(a[0]), val(a[1]), val(a[2]), int(a[3], 0)
            r = sum((lut >> ((x >> i & 1) << 2 | (y >> i & 1) << 1 | (z >> i & 1)) & 1) << i for i in range(32))
        elif op.startswith("fma.rn."):  # products and sums of 16-bit floats exact in float64, rounded once
            out = (halves(val(a[0])) * halves(val(a[1])) + halves(val(a[2]))).to(dtype)
            bits = out.view(torch.int16).to(torch.int64) & 0xFFFF
            r = int(bits[0]) | int(bits[1]) << 16
        else:
            raise AssertionError(f"instruction not modelled: {ins}")
        regs[d] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(4)]


def _bits(v, dtype: torch.dtype) -> int:
    return int(torch.as_tensor(v).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF)


@needs_gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_ptx_pairs_the_right_codes(dtype):
    """The int4 PTX (both pairings) and the fp4 PTX, run by _run_ptx on random words: each output pair holds the
    codes the kernel's K order says ((k, k + 4) or (k, k + 1); fp4: k even, k odd of byte j), dequantized as the
    reference does ((q - z) s; 192 v times absmax / 192), rounded once to the 16-bit type, bit for bit."""
    from cogvlm2.quant import formats

    g = torch.Generator().manual_seed(0)
    kind, one, magic = ("bf16x2", "0x3F803F80", "0x43004300") if dtype == torch.bfloat16 else \
        ("f16x2", "0x3C003C00", "0x64006400")
    lut = formats.code_table("fp4", "cpu").double()
    for trial in range(48):
        w = int(torch.randint(0, 2**32, (1,), generator=g, dtype=torch.int64))
        z = int(torch.randint(0, 16, (1,), generator=g))
        s = torch.tensor(torch.rand(1, generator=g).item() * 0.05 + 1e-3).to(dtype).double()
        nib = [w >> (4 * j) & 0xF for j in range(8)]
        zc = ((0x4300 if dtype == torch.bfloat16 else 0x6400) | z) * 0x10001 ^ 0x80008000  # -(c + z), a pair
        for byte_pairs in (False, True):
            got = _run_ptx(gk._dequant_ptx(magic, kind, one, byte_pairs), [w, zc, _bits(s, dtype) * 0x10001], dtype)
            for i, r in enumerate(got):
                pair = (2 * i, 2 * i + 1) if byte_pairs else (i, i + 4)
                assert [r & 0xFFFF, r >> 16] == [_bits((nib[j] - z) * s, dtype) for j in pair], \
                    (trial, byte_pairs, i, hex(w), z)
        scale = torch.tensor(torch.rand(1, generator=g).item() * 3 / 192).to(dtype).double()
        got = _run_ptx(gk._fp4_ptx(dtype, kind), [w, _bits(scale, dtype) * 0x10001], dtype)
        for j, r in enumerate(got):
            byte = w >> (8 * j) & 0xFF
            want = [_bits(lut[c] * 192 * scale, dtype) for c in (byte >> 4, byte & 0xF)]
            assert [r & 0xFFFF, r >> 16] == want, (trial, j, hex(byte))


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
    """int4_linear at 1..64 rows through the Gluon tile (1 row: ONE_ROW "tile-gl") at its default configs, bf16 (fp16
    on one shape), groups of 128 and 64, K split or not, N not a multiple of the tile: x @ dequantize(W)^T in float32
    to accumulation order (the kernel rounds (q - z) s to the model dtype as the dequantization does), and close to
    the Triton tile.
    (Every swept config: test_quant_kernels.py::test_every_candidate_config_cuda.)"""
    cases = [(200, 4096, 128, torch.bfloat16), (72, 14336, 128, torch.bfloat16), (96, 1024, 64, torch.bfloat16),
             (200, 4096, 128, torch.float16)]
    for n, k, group, dtype in cases:
        (qweight, qzeros, scales), ref = _weights(n, k, group, dtype, seed=n)
        g = torch.Generator().manual_seed(k)
        for m in (2, 17, 33) if dtype == torch.float16 else (1, 2, 3, 16, 17, 32, 33, 64):  # 1: ONE_ROW "tile-gl"
            x = (torch.randn(m, k, generator=g)).to(dtype).cuda()
            expected = x.float() @ ref.t()
            # split 0: as the config says; flags 2: byte pairs, 14 / 18: the cp.async ring (3 / 4 stages)
            for split, flags in ((1, None), (0, None), (0, 2), (0, 14), (0, 18)):  # 18: 4 stages, slices of 1 step
                with _tables(TILE_GLUON={"int4": True}, ONE_ROW={"int4": "tile-gl"}, CONFIGS={
                        key: tk.CONFIGS[key][:3] + (tk.CONFIGS[key][3] if flags is None else flags,
                                                    split or tk.CONFIGS[key][4])
                        for key in (("int4", path) for path in PATHS)}):
                    assert gk.applies(x, scales, group)
                    got = tk.int4_linear(x, qweight, qzeros, scales, group)
                err = ((got.float() - expected).norm() / expected.norm()).item()
                assert got.dtype == dtype and err < 4e-3, (n, k, group, dtype, m, split, flags, err)
            with _tables(TILE_GLUON={"int4": False}, TILE_A8={"int4": 0}, ONE_ROW={"int4": "tile"}):
                triton_tile = tk.int4_linear(x, qweight, qzeros, scales, group).float()
            assert ((got.float() - triton_tile).norm() / triton_tile.norm()).item() < 4e-3, (n, k, m)


@cuda
@needs_gluon
def test_tile_replays_from_a_cuda_graph_cuda():
    """Captured in a CUDA graph (as decode runs it), K split, the register kernel and the cp.async ring: each replay
    gives the eager output bit for bit."""
    (qweight, qzeros, scales), _ = _weights(4096, 4096, 128, torch.bfloat16, seed=3)
    x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    for config in (tk.CONFIGS[("int4", "tile-gl32")], (128, 128, 4, 14, -2)):
        with _tables(TILE_GLUON={"int4": True}, CONFIGS={("int4", "tile-gl32"): config}):
            eager = tk.int4_linear(x, qweight, qzeros, scales, 128)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = tk.int4_linear(x, qweight, qzeros, scales, 128)
        for _ in range(3):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager), config


@cuda
@needs_gluon
def test_pair_equals_two_launches_cuda():
    """PAIR (the MLP's gate and up in one launch, int4_linear_pair) at 2-64 rows through the register kernel and the
    ring (the defaults, and the 32-row pair's register cap): each output bit for bit the separate launch's at the
    pair's K split (launch_split), eagerly and replayed from a CUDA graph, also at the gate / up shapes (14,336 x
    4,096); the official fp4 layout's pair (fp4_linear_pair, its tile's ring) likewise."""
    for n, k in ((200, 4096), (14336, 4096)):
        first, _ = _weights(n, k, 128, torch.bfloat16, seed=n)
        second, _ = _weights(n, k, 128, torch.bfloat16, seed=n + 1)
        for m in (2, 8, 16, 17, 32, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            key = ("int4", "tile-gl" if m <= 8 else f"tile-gl{triton.next_power_of_2(m)}")
            config = tk.CONFIGS[key]
            alone = tk.launch_split(config[4], config[0], n, k, 128, x.device, 2)  # the pair's K split
            with _tables(TILE_GLUON={"int4": True}, CONFIGS={key: (*config[:4], alone)}):
                two = [tk.int4_linear(x, *w, 128) for w in (first, second)]
            with _tables(TILE_GLUON={"int4": True}):
                pair = tk.int4_linear_pair(x, first, second, 128)
                assert pair is not None and all(torch.equal(p, t) for p, t in zip(pair, two)), (n, m)
            with _tables(TILE_GLUON={"int4": True}):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = tk.int4_linear_pair(x, first, second, 128)
            for _ in range(2):
                for o in out:
                    o.zero_()
                graph.replay()
                torch.cuda.synchronize()
                assert all(torch.equal(p, t) for p, t in zip(out, two)), (n, m, "graph")
    # the official fp4 layout's pair through the fp4 tile's ring (fp4_linear_pair)
    lut = formats.code_table("fp4", "cuda")
    for n in (200, 14336):
        weights = [formats.quantize_4bit(torch.randn(n, 4096, device="cuda") / 16, "fp4") for _ in range(2)]
        for m in (2, 17, 32, 64):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            config = tk.CONFIGS[("fp4", "tile-gl")]
            alone = tk.launch_split(config[4], config[0], n, 4096, 64, x.device, 2)
            with _tables(TILE_GLUON={"fp4": True}, CONFIGS={("fp4", "tile-gl"): (*config[:4], alone)}):
                two = [tk.fp4_linear(x, *w, lut, n, is_fp4=True) for w in weights]
            with _tables(TILE_GLUON={"fp4": True}):
                pair = tk.fp4_linear_pair(x, *weights, n)
            assert pair is not None and all(torch.equal(p, t) for p, t in zip(pair, two)), ("fp4", n, m)


FP4_CONFIGS = sorted({c[:4] for c in tk.CANDIDATES[("fp4", "tile-gl")]})


@needs_gluon
def test_fp4_tile_compiles_for_hopper_without_shared_memory():
    """The fp4 tile at every swept config at 8 / 32 / 64 rows, and at its default in bf16 and fp16 with plain and
    nested absmax, for sm_90: mma.sync, the codes decoded by PRMT, no register spills; the register kernel with
    nothing in shared memory, the ring kernel (flags >> 2 stages) with exactly its ring there."""
    default = tk.CONFIGS[("fp4", "tile-gl")][:4]
    cases = [(c, rows, "bf16", False) for c in FP4_CONFIGS for rows in (8, 32, 64)]
    cases += [(default, 32, dt, nested) for dt in ("bf16", "fp16") for nested in (False, True)]
    for (block_n, block_k, warps, flags), rows, dt, nested in cases:
        lay, stages = gk.layouts(block_n, block_k, rows, warps), flags >> 2
        sig = {"x_ptr": f"*{dt}", "w_ptr": "*i32", "absmax_ptr": "*u8" if nested else "*fp32", "nabs_ptr": "*fp32",
               "nmap_ptr": "*fp32", "offset": "fp32", "out_ptr": "*fp32", "M": "i32", "N": "i32", "stride_xm": "i32",
               "stride_om": "i32"}
        common = dict(K=4096, BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k, BLOCKSIZE=64, NESTED=nested, SPLIT_K=2,
                      L_WORDS=lay["words"], L_X=lay["x32"], L_MMA=lay["mma"], L_A=lay["a"], L_B=lay["b"])
        if stages:  # at 32 rows with plain absmax as a gate / up pair (PAIR)
            pair = {"w2_ptr": "*i32", "absmax2_ptr": "*fp32", "out2_ptr": "*fp32"}
            kernel = compile_for_hopper(gk._fp4_ring_kernel, sig | pair, common | dict(
                STAGES=stages, L_WCOPY=lay["fw_copy"], L_XCOPY=lay["x_copy"], L_WSMEM=lay["fw_smem"],
                L_XSMEM=lay["x_smem"], PAIR=rows == 32 and not nested), gluon=True, num_warps=warps)
        else:
            kernel = compile_for_hopper(gk._fp4_mma2_kernel, sig, common | dict(X_AHEAD=bool(flags & 1)), gluon=True,
                                        num_warps=warps)
        ptx, where = kernel.asm["ptx"], (block_n, block_k, warps, flags, rows, dt, nested)
        if stages:
            assert kernel.metadata.shared == stages * 4 * (block_k // 8 * block_n + rows * block_k // 2), where
            assert "cp.async" in ptx, where
        else:
            assert kernel.metadata.shared == 0 and "ld.shared" not in ptx and "st.shared" not in ptx, where
        assert "mma.sync.aligned.m16n8k16" in ptx and "prmt.b32" in ptx and "ld.local" not in ptx, where


@cuda
@needs_gluon
def test_fp4_tile_equals_the_dequantized_weights_cuda():
    """fp4_linear at 2..64 rows through the Gluon fp4 tile (TILE_GLUON["fp4"]), every swept config, bf16 and fp16,
    plain and nested (8-bit) absmax, K split or not, N not a multiple of the tile: x @ dequantize(W)^T in float32 to
    the rounding of each weight ((192 v) (absmax / 192) in the 16-bit type) and accumulation order."""
    from cogvlm2.quant import formats

    g = torch.Generator().manual_seed(5)
    for (n, k), dtype in itertools.product(((200, 4096), (72, 14336)), (torch.bfloat16, torch.float16)):
        w = torch.randn(n, k, generator=g).cuda() / 16
        packed, absmax = formats.quantize_4bit(w, "fp4")
        lut = formats.code_table("fp4", "cuda")
        a8, nabs, nmap, offset = formats.quantize_absmax(absmax)
        nested = (nabs, nmap.cuda(), offset)
        refs = {None: formats.dequantize_4bit(packed, absmax, lut, (n, k), dtype).float(),
                "nested": formats.dequantize_4bit(packed, formats.dequantize_absmax(a8, *nested), lut, (n, k),
                                                  dtype).float()}
        for m in (2, 17, 32, 64) if dtype == torch.bfloat16 else (3, 33):
            x = torch.randn(m, k, generator=g).to(dtype).cuda()
            assert gk.fp4_applies(x, packed, 64, True)
            for config in tk.CANDIDATES[("fp4", "tile-gl")] if n == 200 and dtype == torch.bfloat16 else \
                    [tk.CONFIGS[("fp4", "tile-gl")]]:
                for kind in (None, "nested"):
                    with _tables(TILE_GLUON={"fp4": True}, CONFIGS={("fp4", "tile-gl"): config}):
                        got = tk.fp4_linear(x, packed, a8 if kind else absmax, lut, n, is_fp4=True,
                                            nested=nested if kind else None)
                    expected = x.float() @ refs[kind].t()
                    err = ((got.float() - expected).norm() / expected.norm()).item()
                    assert got.dtype == dtype and err < 6e-3, (n, k, dtype, m, config, kind, err)


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


def test_run_gluon_switches_a_tile_off_only_on_a_compile_error(caplog):
    """triton_kernels._run_gluon, which both Gluon tiles launch through: a launch that fails to compile answers None
    and switches that format's tile off with a warning; one that fails while running raises; one that runs hands
    back its outputs (one slice here: nothing to add)."""
    from triton.compiler.errors import CompilationError

    out = torch.zeros(2, 3)

    def fail(err):
        raise err

    with _tables(TILE_GLUON={"int4": True, "fp4": True}):
        assert tk._run_gluon("fp4", lambda: out.fill_(1.0), [(out, out)], 1)[0] is out and bool((out == 1).all())
        with pytest.raises(RuntimeError, match="illegal memory access"):
            tk._run_gluon("int4", lambda: fail(RuntimeError("CUDA error: an illegal memory access")), [(out, out)], 1)
        assert tk.TILE_GLUON["int4"] and tk.TILE_GLUON["fp4"]
        assert tk._run_gluon("int4", lambda: fail(CompilationError("", None, "no such builtin")), [(out, out)], 1) \
            is None
        assert not tk.TILE_GLUON["int4"] and tk.TILE_GLUON["fp4"] and "does not compile" in caplog.text


@cuda
@needs_gluon
def test_a_tile_that_does_not_compile_falls_back_cuda(caplog):
    """A Gluon tile that fails to compile under the installed Triton (its API moves between versions) is switched
    off with a warning and the Triton tile gives the product; a failure while running is not hidden."""
    from unittest import mock

    from triton.compiler.errors import CompilationError

    (qweight, qzeros, scales), ref = _weights(200, 1024, 128, torch.bfloat16, seed=4)
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    with _tables(TILE_GLUON={"int4": True}):
        with mock.patch.object(gk, "int4_mma2", side_effect=CompilationError("", None, "no such builtin")):
            got = tk.int4_linear(x, qweight, qzeros, scales, 128)
        assert not tk.TILE_GLUON["int4"] and "does not compile" in caplog.text
    expected = x.float() @ ref.t()
    assert ((got.float() - expected).norm() / expected.norm()).item() < 4e-3
    with _tables(TILE_GLUON={"int4": True}):
        with mock.patch.object(gk, "int4_mma2", side_effect=RuntimeError("CUDA error: an illegal memory access")):
            with pytest.raises(RuntimeError, match="illegal memory access"):
                tk.int4_linear(x, qweight, qzeros, scales, 128)

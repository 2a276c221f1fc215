"""The 4-bit tiles for 1..64 rows written in Gluon (Triton's layout-explicit dialect): every operand of the tensor-core
MMA (mma.sync m16n8k16) is built in registers, with no trip through shared memory. Four kernels: group-wise int4
(_int4_mma2_kernel) and bitsandbytes fp4, the official int4 checkpoints' layout (_fp4_mma2_kernel), each also with
its loads in flight through a cp.async ring in shared memory instead of registers (_int4_ring_kernel,
_fp4_ring_kernel: the words and activations are copied there, then read once into the same MMA layouts).

Why: the Triton tile (_int4_mma_kernel) stores each dequantized weight tile to shared memory and reads it back for
the MMA, and stages the activations there too, ~13 bytes of shared-memory traffic per byte of codes. Nsight Compute
on the H200 (BENCHMARKS.md, fifteenth session): at 32 rows it streams 12-15% of DRAM bandwidth with 40% of its
stalls on shared memory. Here each thread loads exactly the packed words its MMA fragments need (the layout of the
load is given, DistributedLinearLayout), dequantizes them in registers and hands them to the MMA unchanged.

How, without repacking the checkpoint (the W4A8 GEMV reads the same words): a word holds codes k = 8p .. 8p + 7 of
one column; OR-ing nibbles i and i + 4 into the mantissas of a 16-bit float pair (1 shift + 1 LOP3) gives the pair
(k = 8p + i, 8p + i + 4), so the MMA's K order is permuted inside each 32-wide chunk: logical k' = 16b + 8h + 2t + e
is physical k = 8t + 2b + h + 4e. Then thread t of a quad holds word p = 4 chunk + t whole (8 codes, 4 registers of
pairs), and for the activations (the MMA's other operand) it needs physical k = 8t .. 8t + 7: 16 contiguous bytes
of a row of x, one vector load, paired by byte permutes (or, BYTE_PAIRS, a byte's two codes form the pair by one PRMT
and the activations are used as loaded; fp4 always pairs so). The zero point and scale go in before the MMA ((c + q)
- (c + z), exact; times s rounded to the model dtype, as the dequantized weights are), so the accumulator needs no
per-group correction; fp4's codes are looked up by PRMT as 192 x their value (exact), times absmax / 192.

Gluon is experimental: this file is written against Triton 3.6 (the GPU machine's) and checked to compile with 3.9;
names that moved are resolved at import, a kernel is used only where applies() / fp4_applies() say, and one that
fails to compile switches its tile off (triton_kernels._gluon_off); otherwise the Triton tiles run.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton without Gluon (older) or without a GPU build: the Triton tile is used instead
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
    # names that moved: the CTA-wide barrier (thread_barrier in Triton 3.6, barrier later), cp.async
    # (async_copy_global_to_shared in 3.6, async_load later, the old name raising)
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None


def _log2(v: int) -> int:
    return v.bit_length() - 1


@functools.lru_cache(maxsize=None)
def layouts(block_n: int, block_k: int, block_m: int, warps: int) -> dict:
    """The kernel's layouts for a [block_n, block_k] weight tile (block_k // 8 packed words a column) times a
    [block_k, block_m] activation tile: `words` (one word of a column for thread t of a quad, rows g and g + 8 for
    lane group g, a warp's 16 rows, then chunk and row repeats in registers), `x` (8 contiguous k a thread),
    the MMA's accumulator and its two operands."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])
    p = block_k // 8
    words = gl.DistributedLinearLayout(
        reg_bases=[[8, 0]] + [[0, 4 << i] for i in range(_log2(p // 4))]
        + [[16 * warps << i, 0] for i in range(_log2(block_n // (16 * warps)))],
        lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(_log2(warps))], block_bases=[], shape=[block_n, p])
    x = gl.DistributedLinearLayout(
        reg_bases=[[1, 0], [2, 0], [4, 0]] + [[32 << i, 0] for i in range(_log2(block_k // 32))]
        + [[0, 8 << i] for i in range(_log2(block_m // 8))],
        lane_bases=[[8, 0], [16, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 0]] * _log2(warps), block_bases=[], shape=[block_k, block_m])
    # byte pairs: the activations as int32 pairs [block_k / 2, block_m], a thread's 4 (16 bytes) its MMA pairs
    x32 = gl.DistributedLinearLayout(
        reg_bases=[[1, 0], [2, 0]] + [[16 << i, 0] for i in range(_log2(block_k // 32))]
        + [[0, 8 << i] for i in range(_log2(block_m // 8))],
        lane_bases=[[4, 0], [8, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 0]] * _log2(warps), block_bases=[], shape=[block_k // 2, block_m])
    return {"mma": mma, "a": gl.DotOperandLayout(0, mma, 2), "b": gl.DotOperandLayout(1, mma, 2), "words": words,
            "x": x, "x32": x32, **_ring_layouts(block_n, block_k, block_m, warps)}


def _ring_layouts(block_n: int, block_k: int, block_m: int, warps: int) -> dict:
    """The cp.async ring's layouts (_int4_ring_kernel): the copies of a step's words [block_k / 8, block_n] (K-major as
    stored) and activation pairs [block_m, block_k / 2], 16 bytes a thread along the contiguous dimension, and their
    shared-memory tiles swizzled so the MMA layouts read them without bank conflicts (the words: 8-word chunks XOR
    the row, the 4 rows a quad reads land in 4 bank octets; x: 16-word chunks XOR the row, a 16-byte read's 8 lanes
    span 2 rows)."""
    tn = min(32, block_n // 4)
    tk = min(32, block_k // 8)
    return {
        "w_copy": gl.BlockedLayout([1, 4], [32 // tn, tn], [warps, 1], [1, 0]),
        "x_copy": gl.BlockedLayout([1, 4], [32 // tk, tk], [warps, 1], [1, 0]),
        "w_smem": gl.SwizzledSharedLayout(8, 1, 4, [1, 0]),
        "x_smem": gl.SwizzledSharedLayout(16, 1, max(2, block_k // 32), [1, 0]),
        # fp4 (_fp4_ring_kernel): its words row-major [block_n, block_k / 8], rows of 4 or 8 words; at 8, rows 4-7 of
        # a quad's 8 land on rows 0-3's banks unless their 16-byte halves swap
        "fw_copy": gl.BlockedLayout([1, 4], [32 // (block_k // 32), block_k // 32], [warps, 1], [1, 0]),
        "fw_smem": gl.SwizzledSharedLayout(4, 4, 2 if block_k >= 64 else 1, [1, 0])}


def _dequant_ptx(magic: str, kind: str, one: str, byte_pairs: bool) -> str:
    """(c + q) for a pair of nibbles of $4 in the low mantissa bits of c = 128 (bf16) / 1024 (fp16) (x & 0x000F000F |
    magic, one LOP3): nibbles i and i + 4 by a shift first, or (byte_pairs) nibbles 2i and 2i + 1 (byte i of the word
    and of the word >> 4 moved to bytes 0 and 2 by one PRMT); minus (c + z) ($5 holds -(c + z)), times s ($6), into
    $0..$3; both as FMAs (sm_80's bf16x2 arithmetic; x 1 + -(c + z) is exact, x s + -0 is the rounded product)."""
    if byte_pairs:
        lines = ["shr.u32 w4, $4, 4;"] + [f"prmt.b32 t{i}, $4, w4, {0x0400 + 0x0101 * i:#06x}; lop3.b32 t{i}, t{i}, "
                                         f"0x000F000F, {magic}, 0xea;" for i in range(4)]
    else:
        lines = [f"lop3.b32 t0, $4, 0x000F000F, {magic}, 0xea;"]
        lines += [f"shr.u32 t{i}, $4, {4 * i}; lop3.b32 t{i}, t{i}, 0x000F000F, {magic}, 0xea;" for i in (1, 2, 3)]
    lines += [f"fma.rn.{kind} t{i}, t{i}, one, $5; fma.rn.{kind} ${i}, t{i}, $6, nz;" for i in range(4)]
    head = f"{{ .reg .b32 t0, t1, t2, t3, w4, one, nz; mov.b32 one, {one}; mov.b32 nz, 0x80008000; "
    return head + " ".join(lines) + " }"


def _fp4_ptx(dtype: torch.dtype, kind: str) -> str:
    """bitsandbytes fp4: the 8 codes of $4 (byte j: code k = 2j in its high nibble, 2j + 1 in its low) -> $0..$3, the
    pairs (k = 2j, 2j + 1) as 16-bit floats 192 v (exact: 0, 1, 128, 192, 64, 96, 32, 48, the table x 192) times
    $5 (the block's absmax / 192, a pair): the magnitudes' low and high bytes looked up by PRMT in two 8-byte tables
    (the codes' low 3 bits select), interleaved by PRMT into pairs, the sign bits (the codes' bit 3) OR-ed into bits
    15 and 31 (byte j of the word and of the word << 4 moved by PRMT), then one FMA (x s + -0)."""
    from . import formats

    table = formats.code_table("fp4", "cpu")
    values = table[:8] * 192
    bits = values.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    if not torch.equal(values.to(dtype).float(), values) or not torch.equal(table[8:], -table[:8]):
        raise RuntimeError("the fp4 code table is not 192 x an exact 16-bit value, sign-symmetric")
    lo = [int(b) & 0xFF for b in bits]
    hi = [int(b) >> 8 for b in bits]
    word = lambda b: sum(v << (8 * i) for i, v in enumerate(b))  # noqa: E731
    lines = [f"mov.b32 la, {word(lo[:4]):#010x}; mov.b32 lb, {word(lo[4:]):#010x}; mov.b32 ha, {word(hi[:4]):#010x};",
             f"mov.b32 hb, {word(hi[4:]):#010x}; mov.b32 nz, 0x80008000;",
             "and.b32 sel, $4, 0x77777777; shr.u32 sel2, sel, 16; shl.b32 w4, $4, 4;",
             "prmt.b32 lw, la, lb, sel; prmt.b32 hw, ha, hb, sel; prmt.b32 t0, lw, hw, 0x4051; "
             "prmt.b32 t1, lw, hw, 0x6273;",
             "prmt.b32 lw, la, lb, sel2; prmt.b32 hw, ha, hb, sel2; prmt.b32 t2, lw, hw, 0x4051; "
             "prmt.b32 t3, lw, hw, 0x6273;"]
    lines += [f"prmt.b32 v, $4, w4, {0x4000 + 0x1010 * j:#06x}; lop3.b32 t{j}, t{j}, v, nz, 0xf8; "
              f"fma.rn.{kind} ${j}, t{j}, $5, nz;" for j in range(4)]
    return "{ .reg .b32 la, lb, ha, hb, nz, sel, sel2, w4, lw, hw, v, t0, t1, t2, t3; " + " ".join(lines) + " }"


if gluon is not None:
    DEQUANT_PTX_BF16 = gl.constexpr(_dequant_ptx("0x43004300", "bf16x2", "0x3F803F80", False))
    DEQUANT_PTX_F16 = gl.constexpr(_dequant_ptx("0x64006400", "f16x2", "0x3C003C00", False))
    DEQUANT_PTX_BF16_BYTES = gl.constexpr(_dequant_ptx("0x43004300", "bf16x2", "0x3F803F80", True))
    DEQUANT_PTX_F16_BYTES = gl.constexpr(_dequant_ptx("0x64006400", "f16x2", "0x3C003C00", True))
    FP4_PTX_BF16 = gl.constexpr(_fp4_ptx(torch.bfloat16, "bf16x2"))
    FP4_PTX_F16 = gl.constexpr(_fp4_ptx(torch.float16, "f16x2"))

    @gluon.jit
    def _dequant_pairs(words, zc, s, ASM: gl.constexpr):
        """Four int32 per word, each a pair of 16-bit floats ((c + q) - (c + z)) * s = (q - z) * s of two of its codes
        (i and i + 4, or with the _BYTES PTX 2i and 2i + 1; i = 0..3); zc = -(c + z) and s as pairs in int32."""
        return gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r", [words, zc, s],
                                         dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)

    @gluon.jit
    def _pair(u, DT: gl.constexpr):
        """int32 holding two 16-bit floats -> [.., 2] (low half first)."""
        lo = u.to(gl.int16).to(DT, bitcast=True)
        hi = (u >> 16).to(gl.int16).to(DT, bitcast=True)
        return gl.join(lo, hi)

    @gluon.jit
    def _group_stats(qz_ptr, s_ptr, g, rows, n_ok, N, MAGIC_HI: gl.constexpr):
        """Group g's -(c + z) and scale of columns `rows`, each as a pair in one int32."""
        zp = gl.load(qz_ptr + g * (N // 8) + rows // 8, mask=n_ok, other=0)
        z = (zp >> ((rows % 8) * 4)) & 0xF
        zc = ((z | MAGIC_HI) * 0x10001) ^ -0x7FFF8000  # -(c + z), both halves' sign bits set
        sb = gl.load(s_ptr + g * N + rows, mask=n_ok, other=0.0).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return zc, sb * 0x10001

    @gluon.jit
    def _x_pointers(x_ptr, stride_xm, k_first, M, BYTE_PAIRS: gl.constexpr, BLOCK_K: gl.constexpr,
                    BLOCK_M: gl.constexpr, L_X: gl.constexpr):
        """The activation tile's pointers at K offset k_first and its row mask, in L_X: 16-bit values, or (BYTE_PAIRS)
        int32 pairs of them (rows 4-byte aligned, checked by the caller)."""
        mx = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, L_X))
        if BYTE_PAIRS:
            kx = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(1, L_X))
            ptrs = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + mx[None, :] * (stride_xm // 2) \
                + (k_first // 2 + kx)[:, None]
        else:
            kx = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, L_X))
            ptrs = x_ptr + mx[None, :] * stride_xm + (k_first + kx)[:, None]
        return ptrs, (mx < M)[None, :]

    @gluon.jit
    def _mma_step(d0, d1, d2, d3, x, acc, DT: gl.constexpr, BYTE_PAIRS: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_K: gl.constexpr, BLOCK_M: gl.constexpr, L_A: gl.constexpr, L_B: gl.constexpr):
        """acc + W x^T for one step: d_i the dequantized pairs of each word (pair i of word p: physical k = 8p + i, 8p +
        i + 4, or with BYTE_PAIRS 8p + 2i, 8p + 2i + 1), x the step's activations as loaded; both put in the MMA's
        logical K order k' = 16b + 8h + 2t + e (i = 2b + h, t: the word's place in its 32-wide chunk, e: the pair's
        half), a relabelling of registers that moves no data."""
        P: gl.constexpr = BLOCK_K // 8
        t = gl.join(gl.join(_pair(d0, DT), _pair(d1, DT)), gl.join(_pair(d2, DT), _pair(d3, DT)))  # [N, P, e, h, b]
        t = gl.reshape(t, [BLOCK_N, P // 4, 4, 2, 2, 2])  # [n, chunk, t, e, h, b]
        a = gl.reshape(gl.permute(t, [0, 1, 5, 4, 2, 3]), [BLOCK_N, BLOCK_K])
        if BYTE_PAIRS:  # [chunk, t, b, h, m, e]: k = 8t + 4b + 2h + e, a thread's registers already the pairs
            b = gl.reshape(_pair(x, DT), [BLOCK_K // 32, 4, 2, 2, BLOCK_M, 2])
            b = gl.reshape(gl.permute(b, [0, 2, 3, 1, 5, 4]), [BLOCK_K, BLOCK_M])
        else:  # [chunk, t, e, b, h, m]: k = 8t + 4e + 2b + h, paired (h + 2b, h + 2b + 4) by byte permutes
            b = gl.reshape(x, [BLOCK_K // 32, 4, 2, 2, 2, BLOCK_M])
            b = gl.reshape(gl.permute(b, [0, 3, 4, 1, 2, 5]), [BLOCK_K, BLOCK_M])
        return mma_v2(gl.convert_layout(a, L_A), gl.convert_layout(b, L_B), acc)

    @gluon.jit
    def _program_rows(N, KS: gl.constexpr, BLOCK_N: gl.constexpr, L_WORDS: gl.constexpr, pid_n):
        """Column block pid_n's first output column n0, this program's K slice's start, and its columns (with their
        mask) as the words' layout holds them."""
        n0 = pid_n * BLOCK_N
        rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L_WORDS))
        return n0, gl.program_id(1) * KS, rows, rows < N

    @gluon.jit
    def _fp4_pairs(words, s, DT: gl.constexpr):
        """FP4_PTX on each word: four int32 pairs of 16-bit floats (k = 2j, 2j + 1 of the word) times s (a pair)."""
        ASM: gl.constexpr = FP4_PTX_BF16 if DT == gl.bfloat16 else FP4_PTX_F16
        return gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r", [words, s], dtype=(gl.int32, gl.int32, gl.int32,
                                                                                       gl.int32), is_pure=True, pack=1)

    @gluon.jit
    def _store_tile(acc, out_ptr, n0, M, N, stride_om, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, L_MMA: gl.constexpr):
        """acc [BLOCK_N, BLOCK_M] -> out [M, N] in its dtype, or (K split) float32 partials [SPLIT_K, M, N]."""
        om = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, L_MMA))
        on = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L_MMA))
        ok = (om < M)[None, :] & (on < N)[:, None]
        if SPLIT_K == 1:
            gl.store(out_ptr + om[None, :] * stride_om + on[:, None], acc.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            base = out_ptr + gl.program_id(1).to(gl.int64) * M * N
            gl.store(base + om[None, :] * N + on[:, None], acc, mask=ok)

    @gluon.jit
    def _int4_mma2_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K: gl.constexpr, stride_xm, stride_om,
                          qw2_ptr, qz2_ptr, s2_ptr, out2_ptr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          BLOCK_K: gl.constexpr, GROUP: gl.constexpr, SPLIT_K: gl.constexpr, X_AHEAD: gl.constexpr,
                          BYTE_PAIRS: gl.constexpr, L_WORDS: gl.constexpr, L_X: gl.constexpr, L_MMA: gl.constexpr,
                          L_A: gl.constexpr, L_B: gl.constexpr, PAIR: gl.constexpr):
        """The register tile (_int4_mma2_tile) of column block program_id(0); PAIR: a second linear of the same shape
        (the *2 pointers) in the same launch, its column blocks after the first's (a branch, as _int4_ring_kernel)."""
        pid_n = gl.program_id(0)
        blocks = (N + BLOCK_N - 1) // BLOCK_N
        if PAIR:
            if pid_n >= blocks:
                _int4_mma2_tile(x_ptr, qw2_ptr, qz2_ptr, s2_ptr, out2_ptr, M, N, K, stride_xm, stride_om,
                                pid_n - blocks, BLOCK_M, BLOCK_N, BLOCK_K, GROUP, SPLIT_K, X_AHEAD, BYTE_PAIRS, L_WORDS,
                                L_X, L_MMA, L_A, L_B)
            else:
                _int4_mma2_tile(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_om, pid_n, BLOCK_M,
                                BLOCK_N, BLOCK_K, GROUP, SPLIT_K, X_AHEAD, BYTE_PAIRS, L_WORDS, L_X, L_MMA, L_A, L_B)
        else:
            _int4_mma2_tile(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_om, pid_n, BLOCK_M,
                            BLOCK_N, BLOCK_K, GROUP, SPLIT_K, X_AHEAD, BYTE_PAIRS, L_WORDS, L_X, L_MMA, L_A, L_B)

    @gluon.jit
    def _int4_mma2_tile(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K: gl.constexpr, stride_xm, stride_om, pid_n,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP: gl.constexpr,
                        SPLIT_K: gl.constexpr, X_AHEAD: gl.constexpr, BYTE_PAIRS: gl.constexpr,
                        L_WORDS: gl.constexpr, L_X: gl.constexpr, L_MMA: gl.constexpr, L_A: gl.constexpr,
                        L_B: gl.constexpr):
        """The Gluon int4 tile for column block pid_n (module docstring)."""
        DT: gl.constexpr = x_ptr.dtype.element_ty
        BF16: gl.constexpr = DT == gl.bfloat16
        if BYTE_PAIRS:
            ASM: gl.constexpr = DEQUANT_PTX_BF16_BYTES if BF16 else DEQUANT_PTX_F16_BYTES
        else:
            ASM: gl.constexpr = DEQUANT_PTX_BF16 if BF16 else DEQUANT_PTX_F16
        MAGIC_HI: gl.constexpr = 0x4300 if BF16 else 0x6400
        P: gl.constexpr = BLOCK_K // 8
        KS: gl.constexpr = K // SPLIT_K
        STEPS: gl.constexpr = KS // BLOCK_K
        XSTEP: gl.constexpr = 2 if BYTE_PAIRS else 1  # activations a pointer step
        n0, k_first, rows, n_ok = _program_rows(N, KS, BLOCK_N, L_WORDS, pid_n)
        p = gl.arange(0, P, layout=gl.SliceLayout(0, L_WORDS))
        w_ptrs = qw_ptr + (k_first // 8 + p)[None, :].to(gl.int64) * N + rows[:, None]
        x_ptrs, x_ok = _x_pointers(x_ptr, stride_xm, k_first, M, BYTE_PAIRS, BLOCK_K, BLOCK_M, L_X)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, L_MMA)
        # a step ahead: the loads of step i + 1 are issued before step i's arithmetic
        words = gl.load(w_ptrs, mask=n_ok[:, None], other=0)
        if X_AHEAD:  # the activations a step ahead too (their registers twice over), else at the top of their step
            x = gl.load(x_ptrs, mask=x_ok, other=0)
        zc, s = _group_stats(qz_ptr, s_ptr, k_first // GROUP, rows, n_ok, N, MAGIC_HI)
        for i in range(STEPS):
            nxt = gl.minimum(i + 1, STEPS - 1) * BLOCK_K
            words_next = gl.load(w_ptrs + (nxt // 8) * N, mask=n_ok[:, None], other=0)
            if X_AHEAD:
                x_next = gl.load(x_ptrs + nxt // XSTEP, mask=x_ok, other=0)
            else:
                x = gl.load(x_ptrs + i * BLOCK_K // XSTEP, mask=x_ok, other=0)
            zc_next, s_next = _group_stats(qz_ptr, s_ptr, (k_first + nxt) // GROUP, rows, n_ok, N, MAGIC_HI)
            d0, d1, d2, d3 = _dequant_pairs(words, zc[:, None], s[:, None], ASM)
            acc = _mma_step(d0, d1, d2, d3, x, acc, DT, BYTE_PAIRS, BLOCK_N, BLOCK_K, BLOCK_M, L_A, L_B)
            if X_AHEAD:
                x = x_next
            words, zc, s = words_next, zc_next, s_next
        _store_tile(acc, out_ptr, n0, M, N, stride_om, SPLIT_K, BLOCK_M, BLOCK_N, L_MMA)

    @gluon.jit
    def _ring_issue(ws, xs, slot, w_src, x_src, w_ok, x_ok):
        """Start the copies of one step's words and activation pairs into the ring's slot, as one cp.async group."""
        _cp_async(ws.index(slot), w_src, mask=w_ok)
        _cp_async(xs.index(slot), x_src, mask=x_ok)
        async_copy.commit_group()

    @gluon.jit
    def _ring_prologue(ws, xs, w_src, x_src, w_ok, x_ok, w_step, X_STEP: gl.constexpr, STAGES: gl.constexpr,
                       STEPS: gl.constexpr):
        """Fill slots 0 .. STAGES - 2 with steps 0 .. STAGES - 2 of the slice; a slice shorter than that gets copies
        of its last step (never a read past the slice: past K on the last one)."""
        for j in gl.static_range(STAGES - 1):
            _ring_issue(ws, xs, j, w_src + min(j, STEPS - 1) * w_step, x_src + min(j, STEPS - 1) * X_STEP, w_ok, x_ok)

    @gluon.jit
    def _ring_x_sources(x_ptr, stride_xm, k_first, M, BLOCK_K: gl.constexpr, BLOCK_M: gl.constexpr,
                        L_XCOPY: gl.constexpr):
        """The first step's activation pairs [BLOCK_M, BLOCK_K / 2] (int32) for cp.async, and the row mask."""
        mc = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, L_XCOPY))
        kc = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(0, L_XCOPY))
        src = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + mc[:, None] * (stride_xm // 2) \
            + (k_first // 2 + kc)[None, :]
        return src, (mc < M)[:, None]

    @gluon.jit
    def _int4_ring_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K: gl.constexpr, stride_xm, stride_om,
                          qw2_ptr, qz2_ptr, s2_ptr, out2_ptr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          BLOCK_K: gl.constexpr, GROUP: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                          L_WORDS: gl.constexpr, L_X: gl.constexpr, L_MMA: gl.constexpr, L_A: gl.constexpr,
                          L_B: gl.constexpr, L_WCOPY: gl.constexpr, L_XCOPY: gl.constexpr, L_WSMEM: gl.constexpr,
                          L_XSMEM: gl.constexpr, PAIR: gl.constexpr):
        """_int4_mma2_kernel (byte pairs) with its loads in flight through shared memory instead of registers: a ring
        of STAGES steps of words and activation pairs filled by cp.async, STAGES - 1 steps ahead, each read once into
        the MMA layouts (the words 1x, the activations once per warp). The registers that held the next step's words
        and activations are free: more programs an SM and more bytes in flight (the register tile at 32 rows: 210
        registers, 8 warps an SM). PAIR: a second linear of the same shape (the *2 pointers) in the same launch, its
        column blocks after the first's; each program runs the tile on its own linear's pointers as given (a branch,
        not selected pointers: those took 18 more registers at 32 rows)."""
        ws = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_K // 8, BLOCK_N], L_WSMEM)
        xs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_M, BLOCK_K // 2], L_XSMEM)
        pid_n = gl.program_id(0)
        blocks = (N + BLOCK_N - 1) // BLOCK_N
        if PAIR:
            if pid_n >= blocks:
                _int4_ring_tile(x_ptr, qw2_ptr, qz2_ptr, s2_ptr, out2_ptr, M, N, K, stride_xm, stride_om,
                                pid_n - blocks, ws, xs, BLOCK_M, BLOCK_N, BLOCK_K, GROUP, SPLIT_K, STAGES, L_WORDS,
                                L_X, L_MMA, L_A, L_B, L_WCOPY, L_XCOPY)
            else:
                _int4_ring_tile(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_om, pid_n, ws, xs,
                                BLOCK_M, BLOCK_N, BLOCK_K, GROUP, SPLIT_K, STAGES, L_WORDS, L_X, L_MMA, L_A, L_B,
                                L_WCOPY, L_XCOPY)
        else:
            _int4_ring_tile(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_om, pid_n, ws, xs,
                            BLOCK_M, BLOCK_N, BLOCK_K, GROUP, SPLIT_K, STAGES, L_WORDS, L_X, L_MMA, L_A, L_B,
                            L_WCOPY, L_XCOPY)

    @gluon.jit
    def _int4_ring_tile(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K: gl.constexpr, stride_xm, stride_om, pid_n,
                        ws, xs, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                        GROUP: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr, L_WORDS: gl.constexpr,
                        L_X: gl.constexpr, L_MMA: gl.constexpr, L_A: gl.constexpr, L_B: gl.constexpr,
                        L_WCOPY: gl.constexpr, L_XCOPY: gl.constexpr):
        """_int4_ring_kernel's work for column block pid_n of one linear, its ring in ws / xs."""
        DT: gl.constexpr = x_ptr.dtype.element_ty
        BF16: gl.constexpr = DT == gl.bfloat16
        ASM: gl.constexpr = DEQUANT_PTX_BF16_BYTES if BF16 else DEQUANT_PTX_F16_BYTES
        MAGIC_HI: gl.constexpr = 0x4300 if BF16 else 0x6400
        P: gl.constexpr = BLOCK_K // 8
        KS: gl.constexpr = K // SPLIT_K
        STEPS: gl.constexpr = KS // BLOCK_K
        n0, k_first, rows, n_ok = _program_rows(N, KS, BLOCK_N, L_WORDS, pid_n)
        # the copies' sources: a step's words [P, BLOCK_N] and activation pairs [BLOCK_M, BLOCK_K / 2]
        pc = gl.arange(0, P, layout=gl.SliceLayout(1, L_WCOPY))
        nc = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, L_WCOPY))
        w_src = qw_ptr + (k_first // 8 + pc)[:, None].to(gl.int64) * N + nc[None, :]
        w_ok = (nc < N)[None, :]
        x_src, x_ok = _ring_x_sources(x_ptr, stride_xm, k_first, M, BLOCK_K, BLOCK_M, L_XCOPY)
        _ring_prologue(ws, xs, w_src, x_src, w_ok, x_ok, (BLOCK_K // 8) * N, BLOCK_K // 2, STAGES, STEPS)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, L_MMA)
        zc, s = _group_stats(qz_ptr, s_ptr, k_first // GROUP, rows, n_ok, N, MAGIC_HI)
        for i in range(STEPS):
            async_copy.wait_group(STAGES - 2)  # this thread's copies of step i have landed
            _cta_barrier()  # everyone's have; and everyone has read step i - 1's slot, refilled below
            ahead = gl.minimum(i + STAGES - 1, STEPS - 1)  # past the end: a harmless copy of the last step
            _ring_issue(ws, xs, (i + STAGES - 1) % STAGES, w_src + ahead * (BLOCK_K // 8) * N,
                        x_src + ahead * (BLOCK_K // 2), w_ok, x_ok)
            words = ws.index(i % STAGES).permute((1, 0)).load(L_WORDS)
            x = xs.index(i % STAGES).permute((1, 0)).load(L_X)
            nxt = gl.minimum(i + 1, STEPS - 1) * BLOCK_K
            zc_next, s_next = _group_stats(qz_ptr, s_ptr, (k_first + nxt) // GROUP, rows, n_ok, N, MAGIC_HI)
            d0, d1, d2, d3 = _dequant_pairs(words, zc[:, None], s[:, None], ASM)
            acc = _mma_step(d0, d1, d2, d3, x, acc, DT, True, BLOCK_N, BLOCK_K, BLOCK_M, L_A, L_B)
            zc, s = zc_next, s_next
        async_copy.wait_group(0)
        _store_tile(acc, out_ptr, n0, M, N, stride_om, SPLIT_K, BLOCK_M, BLOCK_N, L_MMA)

    @gluon.jit
    def _fp4_block_scale(absmax_ptr, nabs_ptr, nmap_ptr, offset, blk, n_ok, NESTED: gl.constexpr, DT: gl.constexpr):
        """The absmax of flat blocks blk (NESTED: nmap[a8] * nabs[blk // 256] + offset) / 192, as a pair of DT in an
        int32 (the codes decode to 192 x their table value)."""
        if NESTED:
            a8 = gl.load(absmax_ptr + blk, mask=n_ok, other=0)
            scale = gl.load(nmap_ptr + a8.to(gl.int32)) * gl.load(nabs_ptr + blk // 256, mask=n_ok, other=0.0) + offset
        else:
            scale = gl.load(absmax_ptr + blk, mask=n_ok, other=0.0)
        bits = (scale * (1.0 / 192.0)).to(DT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return bits * 0x10001

    @gluon.jit
    def _fp4_mma2_kernel(x_ptr, w_ptr, absmax_ptr, nabs_ptr, nmap_ptr, offset, out_ptr, M, N, K: gl.constexpr,
                         stride_xm, stride_om, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                         BLOCKSIZE: gl.constexpr, NESTED: gl.constexpr, SPLIT_K: gl.constexpr, X_AHEAD: gl.constexpr,
                         L_WORDS: gl.constexpr, L_X: gl.constexpr, L_MMA: gl.constexpr, L_A: gl.constexpr,
                         L_B: gl.constexpr):
        """The same tile for bitsandbytes' fp4 layout (the official int4 checkpoints): codes row-major, [N, K / 2]
        bytes read as int32 words [N, K / 8] (word p of a row: codes k = 8p .. 8p + 7, a byte's two codes k even in
        its high nibble), decoded by FP4_PTX into MMA pairs (k, k + 1) times the block's absmax; BLOCK_K divides the
        absmax block, so a step has one scale per row."""
        DT: gl.constexpr = x_ptr.dtype.element_ty
        P: gl.constexpr = BLOCK_K // 8
        KS: gl.constexpr = K // SPLIT_K
        STEPS: gl.constexpr = KS // BLOCK_K
        n0, k_first, rows, n_ok = _program_rows(N, KS, BLOCK_N, L_WORDS, gl.program_id(0))
        p = gl.arange(0, P, layout=gl.SliceLayout(0, L_WORDS))
        w_ptrs = w_ptr + rows[:, None].to(gl.int64) * (K // 8) + (k_first // 8 + p)[None, :]
        blk0 = rows * (K // BLOCKSIZE) + k_first // BLOCKSIZE  # each row's first absmax block of this K slice
        x_ptrs, x_ok = _x_pointers(x_ptr, stride_xm, k_first, M, True, BLOCK_K, BLOCK_M, L_X)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, L_MMA)
        words = gl.load(w_ptrs, mask=n_ok[:, None], other=0)
        if X_AHEAD:
            x = gl.load(x_ptrs, mask=x_ok, other=0)
        s = _fp4_block_scale(absmax_ptr, nabs_ptr, nmap_ptr, offset, blk0, n_ok, NESTED, DT)
        for i in range(STEPS):
            nxt = gl.minimum(i + 1, STEPS - 1) * BLOCK_K
            words_next = gl.load(w_ptrs + nxt // 8, mask=n_ok[:, None], other=0)
            if X_AHEAD:
                x_next = gl.load(x_ptrs + nxt // 2, mask=x_ok, other=0)
            else:
                x = gl.load(x_ptrs + i * BLOCK_K // 2, mask=x_ok, other=0)
            s_next = _fp4_block_scale(absmax_ptr, nabs_ptr, nmap_ptr, offset, blk0 + nxt // BLOCKSIZE, n_ok, NESTED,
                                      DT)
            d0, d1, d2, d3 = _fp4_pairs(words, s[:, None], DT)
            acc = _mma_step(d0, d1, d2, d3, x, acc, DT, True, BLOCK_N, BLOCK_K, BLOCK_M, L_A, L_B)
            if X_AHEAD:
                x = x_next
            words, s = words_next, s_next
        _store_tile(acc, out_ptr, n0, M, N, stride_om, SPLIT_K, BLOCK_M, BLOCK_N, L_MMA)

    @gluon.jit
    def _fp4_ring_kernel(x_ptr, w_ptr, absmax_ptr, nabs_ptr, nmap_ptr, offset, out_ptr, M, N, K: gl.constexpr,
                         stride_xm, stride_om, w2_ptr, absmax2_ptr, out2_ptr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, BLOCKSIZE: gl.constexpr, NESTED: gl.constexpr,
                         SPLIT_K: gl.constexpr, STAGES: gl.constexpr, L_WORDS: gl.constexpr, L_X: gl.constexpr,
                         L_MMA: gl.constexpr, L_A: gl.constexpr, L_B: gl.constexpr, L_WCOPY: gl.constexpr,
                         L_XCOPY: gl.constexpr, L_WSMEM: gl.constexpr, L_XSMEM: gl.constexpr, PAIR: gl.constexpr):
        """_fp4_mma2_kernel with its loads through a cp.async ring in shared memory (as _int4_ring_kernel): the
        words of a step [BLOCK_N, BLOCK_K / 8] row-major as stored. PAIR (float32 absmax only): a second weight of
        the same shape (the *2 pointers) in the same launch, its column blocks after the first's (a branch, as
        _int4_ring_kernel's)."""
        ws = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BLOCK_K // 8], L_WSMEM)
        xs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_M, BLOCK_K // 2], L_XSMEM)
        pid_n = gl.program_id(0)
        blocks = (N + BLOCK_N - 1) // BLOCK_N
        if PAIR:
            if pid_n >= blocks:
                _fp4_ring_tile(x_ptr, w2_ptr, absmax2_ptr, nabs_ptr, nmap_ptr, offset, out2_ptr, M, N, K, stride_xm,
                               stride_om, pid_n - blocks, ws, xs, BLOCK_M, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED,
                               SPLIT_K, STAGES, L_WORDS, L_X, L_MMA, L_A, L_B, L_WCOPY, L_XCOPY)
            else:
                _fp4_ring_tile(x_ptr, w_ptr, absmax_ptr, nabs_ptr, nmap_ptr, offset, out_ptr, M, N, K, stride_xm,
                               stride_om, pid_n, ws, xs, BLOCK_M, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, SPLIT_K,
                               STAGES, L_WORDS, L_X, L_MMA, L_A, L_B, L_WCOPY, L_XCOPY)
        else:
            _fp4_ring_tile(x_ptr, w_ptr, absmax_ptr, nabs_ptr, nmap_ptr, offset, out_ptr, M, N, K, stride_xm,
                           stride_om, pid_n, ws, xs, BLOCK_M, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, SPLIT_K, STAGES,
                           L_WORDS, L_X, L_MMA, L_A, L_B, L_WCOPY, L_XCOPY)

    @gluon.jit
    def _fp4_ring_tile(x_ptr, w_ptr, absmax_ptr, nabs_ptr, nmap_ptr, offset, out_ptr, M, N, K: gl.constexpr,
                       stride_xm, stride_om, pid_n, ws, xs, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       BLOCK_K: gl.constexpr, BLOCKSIZE: gl.constexpr, NESTED: gl.constexpr, SPLIT_K: gl.constexpr,
                       STAGES: gl.constexpr, L_WORDS: gl.constexpr, L_X: gl.constexpr, L_MMA: gl.constexpr,
                       L_A: gl.constexpr, L_B: gl.constexpr, L_WCOPY: gl.constexpr, L_XCOPY: gl.constexpr):
        """_fp4_ring_kernel's work for column block pid_n of one weight, its ring in ws / xs."""
        DT: gl.constexpr = x_ptr.dtype.element_ty
        P: gl.constexpr = BLOCK_K // 8
        KS: gl.constexpr = K // SPLIT_K
        STEPS: gl.constexpr = KS // BLOCK_K
        n0, k_first, rows, n_ok = _program_rows(N, KS, BLOCK_N, L_WORDS, pid_n)
        blk0 = rows * (K // BLOCKSIZE) + k_first // BLOCKSIZE
        nc = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L_WCOPY))
        pc = gl.arange(0, P, layout=gl.SliceLayout(0, L_WCOPY))
        w_src = w_ptr + nc[:, None].to(gl.int64) * (K // 8) + (k_first // 8 + pc)[None, :]
        w_ok = (nc < N)[:, None]
        x_src, x_ok = _ring_x_sources(x_ptr, stride_xm, k_first, M, BLOCK_K, BLOCK_M, L_XCOPY)
        _ring_prologue(ws, xs, w_src, x_src, w_ok, x_ok, BLOCK_K // 8, BLOCK_K // 2, STAGES, STEPS)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, L_MMA)
        s = _fp4_block_scale(absmax_ptr, nabs_ptr, nmap_ptr, offset, blk0, n_ok, NESTED, DT)
        for i in range(STEPS):
            async_copy.wait_group(STAGES - 2)
            _cta_barrier()
            ahead = gl.minimum(i + STAGES - 1, STEPS - 1)
            _ring_issue(ws, xs, (i + STAGES - 1) % STAGES, w_src + ahead * (BLOCK_K // 8),
                        x_src + ahead * (BLOCK_K // 2), w_ok, x_ok)
            words = ws.index(i % STAGES).load(L_WORDS)
            x = xs.index(i % STAGES).permute((1, 0)).load(L_X)
            nxt = gl.minimum(i + 1, STEPS - 1) * BLOCK_K
            s_next = _fp4_block_scale(absmax_ptr, nabs_ptr, nmap_ptr, offset, blk0 + nxt // BLOCKSIZE, n_ok, NESTED,
                                      DT)
            d0, d1, d2, d3 = _fp4_pairs(words, s[:, None], DT)
            acc = _mma_step(d0, d1, d2, d3, x, acc, DT, True, BLOCK_N, BLOCK_K, BLOCK_M, L_A, L_B)
            s = s_next
        async_copy.wait_group(0)
        _store_tile(acc, out_ptr, n0, M, N, stride_om, SPLIT_K, BLOCK_M, BLOCK_N, L_MMA)


@functools.lru_cache(maxsize=None)
def _capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)  # mma.sync m16n8k16, bf16x2 FMA


def applies(x2: torch.Tensor, scales: torch.Tensor, group: int) -> bool:
    """Whether the Gluon tile can run x2 [m, K] (1..64 rows) times these weights: Gluon imported, an sm_80+ GPU,
    16-bit activations with scales of the same dtype, contiguous rows, groups of a multiple of 32."""
    return (gluon is not None and x2.is_cuda and 1 <= x2.shape[0] <= 64 and x2.dtype in (torch.bfloat16, torch.float16)
            and scales.dtype == x2.dtype and x2.stride(-1) == 1 and group % 32 == 0 and x2.shape[1] % 32 == 0
            and _capable(x2.device))


def fp4_applies(x2: torch.Tensor, packed: torch.Tensor, blocksize: int, is_fp4: bool) -> bool:
    """Whether the Gluon fp4 tile runs x2 [m, K] (2..64 rows) times these bitsandbytes fp4 codes: as applies(), plus
    the fp4 code table, absmax blocks of a multiple of 32, the codes and the rows of x 4-byte aligned (int32 words
    and pairs)."""
    return (gluon is not None and is_fp4 and x2.is_cuda and 2 <= x2.shape[0] <= 64
            and x2.dtype in (torch.bfloat16, torch.float16) and x2.stride(-1) == 1 and x2.stride(0) % 2 == 0
            and x2.data_ptr() % 4 == 0 and packed.data_ptr() % 4 == 0 and blocksize % 32 == 0
            and x2.shape[1] % blocksize == 0 and _capable(x2.device))


def fp4_mma2(x2: torch.Tensor, packed: torch.Tensor, stats: tuple, part: torch.Tensor, blocksize: int, block_m: int,
             block_n: int, block_k: int, warps: int, split: int, x_ahead: bool = True, stages: int = 0,
             second: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """x2 [m, K] @ W^T with W bitsandbytes fp4 codes (packed [N K / 2] bytes, row-major) into part (as int4_mma2);
    stats: (absmax, nested absmax, nested map, offset, NESTED) as triton_kernels._stats gives them; block_k a
    multiple of 32 dividing the absmax block; stages (2+): the cp.async ring kernel (x rows 16-byte aligned).
    second: (packed, float32 absmax, part) of a second weight of the same shape reading x2, computed in the same
    launch (the ring only, float32 absmax only)."""
    m, k = x2.shape
    n = packed.numel() * 2 // k
    if block_k % 32 or blocksize % block_k or (k // split) % blocksize or block_n % (16 * warps) \
            or not 8 <= block_m <= 64 or stages == 1:
        raise ValueError(f"Gluon fp4 tile: block_k {block_k} (absmax block {blocksize}, K {k} / {split}), "
                         f"block_n {block_n}, {warps} warps, block_m {block_m}, {stages} stages")
    absmax, nabs, nmap, offset, nested = stats
    if second is not None and (not stages or nested or tuple(t.shape for t in second) != (packed.shape, absmax.shape,
                                                                                         part.shape)):
        raise ValueError("Gluon fp4 tile: a pair runs on the ring with float32 absmax, both weights of one shape")
    lay = layouts(block_n, block_k, block_m, warps)
    grid = (-(-n // block_n) * (1 if second is None else 2), split)
    args = (x2, packed.view(-1).view(torch.int32), absmax, nabs, nmap, offset, part, m, n, k, x2.stride(0),
            part.stride(-2))
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCKSIZE=blocksize, NESTED=nested,
                  SPLIT_K=split, L_WORDS=lay["words"], L_X=lay["x32"], L_MMA=lay["mma"], L_A=lay["a"], L_B=lay["b"],
                  num_warps=warps)
    if stages:
        w2, a2, part2 = second if second is not None else (packed, absmax, part)
        _fp4_ring_kernel[grid](*args, w2.view(-1).view(torch.int32), a2, part2, STAGES=stages,
                               L_WCOPY=lay["fw_copy"], L_XCOPY=lay["x_copy"], L_WSMEM=lay["fw_smem"],
                               L_XSMEM=lay["x_smem"], PAIR=second is not None, **common)
    else:
        _fp4_mma2_kernel[grid](*args, X_AHEAD=x_ahead, **common)


# The ring kernel's pair (PAIR) at (BLOCK_N, BLOCK_K, BLOCK_M, warps) -> a register cap: its two branches compile to
# 134 registers a thread at the 32-row default against 128 alone (3 programs an SM instead of 4); capped at 128 it
# does not spill (sm_90, Triton 3.6: 495 SASS instructions a step against 490)
PAIR_MAXNREG = {(128, 128, 32, 4): 128}


def int4_mma2(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, part: torch.Tensor,
              group: int, block_m: int, block_n: int, block_k: int, warps: int, split: int,
              x_ahead: bool = True, byte_pairs: bool = False, stages: int = 0,
              second: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """x2 [m, K] @ W^T into part (out [m, N] in x's dtype, or float32 partials [split, m, N]), as applies() allows;
    block_k a multiple of 32 that divides the group and K // split, block_n 16 x warps x a power of two, block_m a
    power of two from 8 to 64 (at least m). x_ahead: the activations are loaded a step ahead with the words (else at
    the top of their step: half their registers). byte_pairs: the two codes of a byte form an MMA pair (k, k + 1),
    so the activations are used as loaded; else nibbles j and j + 4 (k, k + 4) and the activations are paired by
    byte permutes. stages (2+): the cp.async ring kernel with that many steps in shared memory (byte pairs; x_ahead
    does not apply). second: (qweight, qzeros, scales, part) of a second linear of the same shape reading x2 (the MLP's
    up beside its gate), computed in the same launch (PAIR: its column blocks after the first's)."""
    m, k = x2.shape
    n = qweight.shape[1]
    if block_k % 32 or group % block_k or (k // split) % block_k or block_n % (16 * warps) or not 8 <= block_m <= 64 \
            or stages == 1:
        raise ValueError(f"Gluon int4 tile: block_k {block_k} (group {group}, K {k} / {split}), block_n {block_n}, "
                         f"{warps} warps, block_m {block_m}, {stages} stages")
    if second is not None and (tuple(t.shape for t in second) != (qweight.shape, qzeros.shape, scales.shape,
                                                                  part.shape) or second[3].stride() != part.stride()):
        raise ValueError("Gluon int4 tile: a pair's second weight and output must be shaped as the first's")
    lay = layouts(block_n, block_k, block_m, warps)
    grid = (-(-n // block_n) * (1 if second is None else 2), split)
    args = (x2, qweight, qzeros, scales, part, m, n, k, x2.stride(0), part.stride(-2),
            *(second or (qweight, qzeros, scales, part)))
    if stages:
        cap = PAIR_MAXNREG.get((block_n, block_k, block_m, warps)) if second is not None else None
        _int4_ring_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group, SPLIT_K=split,
                                STAGES=stages, L_WORDS=lay["words"], L_X=lay["x32"], L_MMA=lay["mma"], L_A=lay["a"],
                                L_B=lay["b"], L_WCOPY=lay["w_copy"], L_XCOPY=lay["x_copy"], L_WSMEM=lay["w_smem"],
                                L_XSMEM=lay["x_smem"], PAIR=second is not None, num_warps=warps,
                                **({"maxnreg": cap} if cap else {}))
    else:
        _int4_mma2_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group, SPLIT_K=split,
                                X_AHEAD=x_ahead, BYTE_PAIRS=byte_pairs, L_WORDS=lay["words"],
                                L_X=lay["x32" if byte_pairs else "x"], L_MMA=lay["mma"], L_A=lay["a"], L_B=lay["b"],
                                PAIR=second is not None, num_warps=warps)

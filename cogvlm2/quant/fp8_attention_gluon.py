"""The vision tower's fp8 attention on Hopper in Gluon, with the two products as asynchronous wgmma overlapped with
the softmax (`COGVLM2_FP8_ATTENTION_GLUON=1`; off until measured on a GPU).

Why: the Triton kernel (fp8_attention.py) runs the ViT's attention at ~680 TFLOP/s on the H200, half of what fp8
tensor cores allow; 57 ms of fp8's ~199 ms one-image TTFT (BENCHMARKS.md, sixteenth session's profile). Compiled for
sm_90 its loop is serial: q.k's wgmma, wait for it, the softmax's exp2s, p.v's wgmma, wait for it (checked offline:
each `wgmma.wait_group 0` right after its product); Triton 3.6's automatic warp specialization does not partition
the loop on sm_90, and restructuring the Triton source does not move the waits. Gluon states the waits: here the
scores of tile j and the output's update by tile j - 1 are issued together, the wait lets the latter run on while
the softmax of tile j computes its exponentials (FlashAttention-3's intra-warpgroup overlap, without its producer
warps), and the output is rescaled once that update has landed:

    S_j = q k_j^T (async);  O += P_{j-1} v_{j-1} (async);  wait for S_j;  P_j, alpha_j = softmax step(S_j);
    wait for O;  O *= alpha_j

K and v^T tiles come through a ring of STAGES slots in shared memory (cp.async, a tile ahead), q once. The inputs
are what fp8_attention.quantize_heads makes (e4m3 per (image, head), head dim padded to a power of two, tokens to
the blocks, v transposed: fp8 wgmma takes both operands K-major), P is rounded to e4m3 relative to the running row
maximum as there; so the numbers are the Triton kernel's up to the order of float32 sums. The kernel is Hopper's
only (wgmma); `applies` says where it runs, and a compile failure turns it off for the process (the Triton kernel
then runs).
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton without Gluon, or without its Hopper ops: the Triton kernel runs
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

ENABLED = os.environ.get("COGVLM2_FP8_ATTENTION_GLUON", "0") == "1"
# (BLOCK_M query rows: 64 a warpgroup, BLOCK_N keys a tile, warps, STAGES ring slots); not yet measured
CONFIG = (64, 128, 4, 3)
CANDIDATES = [CONFIG, (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 8, 4), (64, 128, 4, 2)]
_FAILED: set = set()


def applies(q: torch.Tensor, qdtype: torch.dtype) -> bool:
    """Whether the Gluon kernel takes this attention: switched on, Gluon present, e4m3 on a Hopper GPU (sm_90: wgmma),
    not failed to compile before."""
    return (ENABLED and gluon is not None and q.is_cuda and qdtype == torch.float8_e4m3fn and not _FAILED
            and torch.cuda.get_device_capability(q.device) == (9, 0))


@functools.lru_cache(maxsize=None)
def layouts(block_m: int, block_n: int, dp: int, warps: int) -> dict:
    """The scores' and the output's wgmma accumulators (m64 a warpgroup, n the whole tile, k 32 for one-byte
    operands), P as the second product's register operand, the shared tiles (128-byte swizzle, what wgmma reads) and
    the copies' layout (16 bytes a thread along the contiguous dim)."""
    s = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_n, 32])
    o = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, dp, 32])
    def smem(inner: int):  # the swizzle as wide as a row's bytes allow
        return gl.NVMMASharedLayout(swizzle_byte_width=min(128, inner), element_bitwidth=8, rank=2)

    return {"s": s, "o": o, "p": gl.DotOperandLayout(operand_index=0, parent=o, k_width=4), "smem_qk": smem(dp),
            "smem_v": smem(block_n), "copy": gl.BlockedLayout([1, 16], [4, 8], [warps, 1], [1, 0])}


if gluon is not None:
    @gluon.jit
    def _issue(ks, vs, slot, k_src, v_src):
        """Start the copies of one tile's K [BLOCK_N, DP] and v^T [DP, BLOCK_N] into the ring's slot (one group)."""
        _cp_async(ks.index(slot), k_src)
        _cp_async(vs.index(slot), v_src)
        async_copy.commit_group()

    @gluon.jit
    def _softmax_step(s, m_i, l_i, s_scale, j, N: gl.constexpr, BLOCK_N: gl.constexpr, TILES: gl.constexpr,
                      L_S: gl.constexpr):
        """The online softmax's step on tile j's raw scores (log2 units after s_scale): P, the new row maximum and sum,
        and the factor alpha the output must be rescaled by. The last tile masks its padded keys."""
        s = s * s_scale
        if N % BLOCK_N != 0:
            if j == TILES - 1:
                cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, L_S))
                s = gl.where((cols < N)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha

    @gluon.jit
    def _attention_kernel(q_ptr, k_ptr, vt_ptr, o_ptr, sq_ptr, sk_ptr, sv_ptr, H, softmax_scale, sob, soh, son,
                          N: gl.constexpr, NP: gl.constexpr, D: gl.constexpr, DP: gl.constexpr,
                          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, L_S: gl.constexpr,
                          L_O: gl.constexpr, L_P: gl.constexpr, L_QK: gl.constexpr, L_V: gl.constexpr,
                          L_COPY: gl.constexpr):
        """One (image, head) and BLOCK_M query rows (fp8_attention._attention_kernel's contract): q, k [B, H, NP, DP]
        and vt [B, H, DP, NP] in e4m3 with scales sq, sk, sv per (image, head); out [B, H, N, D] at strides
        (sob, soh, son, 1)."""
        FP8: gl.constexpr = q_ptr.dtype.element_ty
        TILES: gl.constexpr = (N + BLOCK_N - 1) // BLOCK_N  # the tiles holding keys (NP may pad past them)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        base = bh.to(gl.int64) * NP * DP
        m0 = gl.program_id(0) * BLOCK_M
        rq = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, L_COPY))
        rk = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L_COPY))
        rv = gl.arange(0, DP, layout=gl.SliceLayout(1, L_COPY))
        cd = gl.arange(0, DP, layout=gl.SliceLayout(0, L_COPY))
        cn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, L_COPY))
        k_src = k_ptr + base + rk[:, None] * DP + cd[None, :]  # tile t: + t * BLOCK_N * DP
        v_src = vt_ptr + base + rv[:, None] * NP + cn[None, :]  # tile t: + t * BLOCK_N
        ks = gl.allocate_shared_memory(FP8, [STAGES, BLOCK_N, DP], L_QK)
        vs = gl.allocate_shared_memory(FP8, [STAGES, DP, BLOCK_N], L_V)
        for t in gl.static_range(STAGES):  # a ring shorter than its tiles gets copies of the last one
            _issue(ks, vs, t, k_src + min(t, TILES - 1) * BLOCK_N * DP, v_src + min(t, TILES - 1) * BLOCK_N)
        q = gl.load(q_ptr + base + (m0 + rq)[:, None] * DP + cd[None, :])
        q_smem = gl.allocate_shared_memory(FP8, [BLOCK_M, DP], L_QK, q)
        # scores in log2 units: exp2 in the softmax
        s_scale = gl.load(sq_ptr + bh) * gl.load(sk_ptr + bh) * softmax_scale * 1.4426950408889634
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, L_S))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, L_S))
        s0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, L_S)
        acc = gl.zeros([BLOCK_M, DP], gl.float32, L_O)
        # tile 0 has landed: this thread's copies (and q's store) made visible to the tensor cores' async proxy
        # by the writer, then everyone's by the barrier
        async_copy.wait_group(STAGES - 1)
        fence_async_shared()
        _cta_barrier()
        s = warpgroup_mma(q_smem, ks.index(0).permute((1, 0)), s0, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, s_scale, 0, N, BLOCK_N, TILES, L_S)
        for j in range(1, TILES):
            async_copy.wait_group(STAGES - 2)  # tile j has landed
            fence_async_shared()
            _cta_barrier()
            s = warpgroup_mma(q_smem, ks.index(j % STAGES).permute((1, 0)), s0, use_acc=False, is_async=True)
            pv = warpgroup_mma(gl.convert_layout(p.to(FP8), L_P), vs.index((j - 1) % STAGES).permute((1, 0)), acc,
                               is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))  # the scores; the update may still run
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, s_scale, j, N, BLOCK_N, TILES, L_S)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv,))
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, L_O))[:, None]
            _cta_barrier()  # every warpgroup is done with tile j - 1's slot: refill it, STAGES tiles on
            nxt = gl.minimum(j - 1 + STAGES, TILES - 1)
            _issue(ks, vs, (j - 1) % STAGES, k_src + nxt * BLOCK_N * DP, v_src + nxt * BLOCK_N)
        pv = warpgroup_mma(gl.convert_layout(p.to(FP8), L_P), vs.index((TILES - 1) % STAGES).permute((1, 0)), acc,
                           is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv,))
        async_copy.wait_group(0)
        scale = gl.load(sv_ptr + bh) / gl.convert_layout(l_i, gl.SliceLayout(1, L_O))
        out = acc * scale[:, None]
        ro = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, L_O))
        co = gl.arange(0, DP, layout=gl.SliceLayout(0, L_O))
        gl.store(o_ptr + b.to(gl.int64) * sob + h * soh + ro[:, None].to(gl.int64) * son + co[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=(ro[:, None] < N) & (co[None, :] < D))


def attention(qq: torch.Tensor, sq: torch.Tensor, kq: torch.Tensor, sk: torch.Tensor, vq: torch.Tensor,
              sv: torch.Tensor, out: torch.Tensor, n: int, d: int, softmax_scale: float,
              config: tuple[int, int, int, int] = CONFIG) -> bool:
    """Run the kernel on quantize_heads' outputs (q, k [B, H, NP, DP]; v^T [B, H, DP, NP]; NP a multiple of both
    blocks) into out [B, N, H, D]; False (nothing written) where it cannot compile here, after which `applies` says
    no for the rest of the process."""
    import triton

    from .triton_kernels import _gluon_compile_error

    block_m, block_n, warps, stages = config
    b, h, np_, dp = qq.shape
    if np_ % block_n or np_ % block_m or block_m != 16 * warps:
        raise ValueError(f"fp8 attention (Gluon): {np_} tokens padded for blocks {block_m} x {block_n} with {warps} "
                         "warps (a warpgroup takes 64 query rows)")
    lay = layouts(block_m, block_n, dp, warps)
    try:
        _attention_kernel[(triton.cdiv(n, block_m), b * h)](
            qq, kq, vq, out, sq, sk, sv, h, softmax_scale, out.stride(0), out.stride(2), out.stride(1), N=n, NP=np_,
            D=d, DP=dp, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, L_S=lay["s"], L_O=lay["o"], L_P=lay["p"],
            L_QK=lay["smem_qk"], L_V=lay["smem_v"], L_COPY=lay["copy"], num_warps=warps)
    except Exception as e:
        if not _gluon_compile_error(e):  # a failure to run is an error; one to build: the Triton kernel instead
            raise
        import logging

        logging.getLogger(__name__).warning("fp8 attention in Gluon does not compile here (%s): Triton's instead",
                                            str(e).splitlines()[0] if str(e) else type(e).__name__)
        _FAILED.add(config)
        return False
    return True

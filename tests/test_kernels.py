"""The Triton paged decode kernel and the CUDA attend against the torch reference attention.

On CPU the Triton kernel runs in Triton's interpreter (a subprocess with TRITON_INTERPRET=1); on a
GPU it runs compiled, and the whole CUDA attend (flash prefill + paged decode, mixed batches) is
compared with `attend_reference`.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from cogvlm2.engine.attention import AttentionMetadata, attend_reference  # noqa: E402
from tests.interpreted import run_interpreted  # noqa: E402


def _random_paged(batch: int, lens: list[int], q_lens: list[int], hq=8, hkv=2, d=64, bs=16, device="cpu",
                  dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // bs) for n in lens)
    num_blocks = batch * width + 3
    k = torch.randn(num_blocks, bs, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, bs, hkv, d, generator=g).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=g)[:batch * width].view(batch, width).to(device)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(device, dtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), device=device)
    meta = AttentionMetadata(torch.zeros(sum(q_lens), dtype=torch.long, device=device), perm,
                             torch.tensor(lens, device=device), qsl, q_lens, lens)
    return q, k, v, meta


def _runtime_trip_counts() -> bool:
    """Whether this Triton runs a loop with a run-time trip count (the context-bound tiles): compiled always; its
    interpreter only from 3.7 on (3.6 casts the bound with int() on a 1-element array, which NumPy 2 refuses)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return True
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7)


def check_decode_kernel(device: str) -> None:
    from cogvlm2.engine.kernels.decode_attention import TILES, paged_decode_attention, tuned_tiles

    # every tuned tile set (the batches here are small: the larger batches' sets are passed), and the tuning sweep's
    # other shapes: short splits, wide tiles, the context-bound loop
    assert [tuned_tiles(b) for b in (1, 7, 8, 15, 16, 23, 24, 64)] == [TILES[i][1] for i in (0, 0, 1, 1, 2, 2, 3, 3)]
    assert tuned_tiles(32, kv_heads=4) == tuned_tiles(16) and tuned_tiles(1, kv_heads=2) == TILES[0][1]  # TP ranks
    tuned = [dict(zip(("split", "block_n", "num_stages", "context_bound"), tiles)) for _, tiles in TILES]
    shapes = [dict(), *tuned, dict(split=128, block_n=32, context_bound=True), dict(split=256, block_n=64,
              heads_first=True), dict(split=512, block_n=128, context_bound=True, heads_first=True)]
    if not _runtime_trip_counts():
        shapes = [t for t in shapes if not t.get("context_bound")]
        print(f"Triton {triton.__version__}'s interpreter: the context-bound tiles are checked compiled only")

    # d=24: the tiny model's head dim, no power of 2 (the kernel pads it)
    for hq, hkv, lens, d in [(8, 2, [1, 17, 300, 517], 64), (4, 4, [5, 256, 257], 64), (12, 4, [1000], 64),
                             (4, 2, [1, 40, 130], 24)]:
        q, k, v, meta = _random_paged(len(lens), lens, [1] * len(lens), hq=hq, hkv=hkv, d=d, device=device)
        ref = attend_reference(q, k, v, meta)
        for tiles in shapes:
            out = paged_decode_attention(q, k, v, meta.block_tables, meta.context_lens, q.shape[-1] ** -0.5, 1024,
                                         prefetch=False, **tiles)
            err = (out - ref).abs().max().item()
            assert err < 1e-4, (hq, hkv, lens, tiles, err)
            # the first tile loaded before the PDL wait, the step's own token (the last) after it: the same result
            prefetched = paged_decode_attention(q, k, v, meta.block_tables, meta.context_lens, q.shape[-1] ** -0.5,
                                                1024, prefetch=True, **tiles)
            assert torch.equal(prefetched, out), (hq, hkv, lens, tiles)


def check_store_kv(device: str) -> None:
    """The one-launch K/V write equals the two index_copy_ it replaces, K / V being views of a fused QKV."""
    from cogvlm2.engine.kernels import kv_store

    g = torch.Generator().manual_seed(3)
    for hq, hkv, d, dtype in [(8, 2, 64, torch.float32), (4, 2, 24, torch.float32), (32, 8, 128, torch.bfloat16)]:
        n, blocks, bs = 5, 6, 4
        qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(device, dtype)
        _, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        k, v = k.view(n, hkv, d), v.view(n, hkv, d)
        slots = torch.randperm(blocks * bs, generator=g)[:n].to(device)
        caches = [torch.randn(blocks, bs, hkv, d, generator=g).to(device, dtype) for _ in range(2)]
        caches += [c.clone() for c in caches]
        assert kv_store.fits(k, v, caches[0])
        kv_store.store_kv(caches[0], caches[1], slots, k, v)
        caches[2].view(-1, hkv, d).index_copy_(0, slots, k)
        caches[3].view(-1, hkv, d).index_copy_(0, slots, v)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert not kv_store.fits(k.transpose(1, 2), v, caches[0])  # rows that are not contiguous: index_copy_


def test_decode_attention_compiles_for_hopper():
    """The chunks' launch compiles for sm_90 at batch 1's and batch 32's tiles without spills; with PREFETCH the first
    tile's K / V loads come before the PDL wait, without it none."""
    from cogvlm2.engine.kernels import decode_attention as da
    from tests.hopper_compile import compile_for_hopper

    signature = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr")} | {"bt_ptr": "*i32", "lens_ptr": "*i32",
                                                                      "out_ptr": "*fp32", "lse_ptr": "*fp32",
                                                                      "scale": "fp32"}
    signature |= {n: "i32" for n in ("sq_b", "sq_h", "sk_blk", "sk_tok", "sk_h", "sv_blk", "sv_tok", "sv_h", "sbt_b",
                                     "so_b", "so_h", "so_s", "sl_b", "sl_h")}
    for split, block_n, stages, bound in (da.TILES[0][1], da.TILES[-1][1]):
        for prefetch in (False, True):
            kernel = compile_for_hopper(da._stage1, signature, dict(
                GROUP=4, GROUP_PAD=16, HEAD_DIM=128, HEAD_PAD=128, BLOCK_SIZE=16, BLOCK_N=block_n, SPLIT_TOKENS=split,
                PRECISION="tf32", CONTEXT_BOUND=bound, HEADS_FIRST=False, PREFETCH=prefetch, PDL=True),
                num_warps=da.NUM_WARPS, num_stages=stages)
            ptx = kernel.asm["ptx"]
            assert "ld.local" not in ptx, (split, prefetch)
            # PREFETCH: K / V loads (16-byte vectors) are issued before the wait for the previous kernel; else none
            before_wait = ptx[:ptx.index("griddepcontrol.wait")]
            assert ("ld.global.v4" in before_wait) == prefetch, (split, prefetch)


def test_decode_kernel_interpreted():
    run_interpreted(__file__, "decode kernel ok")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_decode_kernel_cuda():
    check_decode_kernel("cuda")


@cuda
def test_prefetched_decode_attention_reads_the_new_token_after_the_wait():
    """Under PDL in a CUDA graph, as in a decode step: a PDL kernel writes each sequence's new K / V (its last
    token, the context's end falling in a chunk's first tile or not) and the attention that prefetches its first
    tiles follows it. Replay after replay with new K / V values, the output is the reference's on the updated
    cache: the new token is never read before it is written."""
    from cogvlm2 import pdl
    from cogvlm2.engine.kernels import kv_store
    from cogvlm2.engine.kernels.decode_attention import paged_decode_attention

    if not pdl.options(torch.zeros(1, device="cuda")).get("PDL"):
        pytest.skip("no PDL on this GPU (sm_90+)")
    for batch, lens in ((1, [2355]), (4, [1, 64, 129, 2300]), (32, [2300 + 7 * i for i in range(32)])):
        q, k, v, meta = _random_paged(batch, lens, [1] * batch, hq=32, hkv=8, d=128, device="cuda",
                                      dtype=torch.bfloat16, seed=batch)
        bs = k.shape[1]
        last = torch.tensor(lens, device="cuda") - 1
        slots = meta.block_tables.gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs
        new_k, new_v = torch.empty(batch, 8, 128, device="cuda", dtype=torch.bfloat16), torch.empty_like(q[:, :8])
        args = (q, k, v, meta.block_tables, meta.context_lens, 128 ** -0.5, 8192)

        def step():
            kv_store.store_kv(k, v, slots, new_k, new_v)
            return paged_decode_attention(*args, prefetch=True)

        new_k.normal_(), new_v.normal_()
        step()  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for i in range(5):
            new_k.normal_(), new_v.normal_()
            graph.replay()
            torch.cuda.synchronize()
            ref = paged_decode_attention(*args, prefetch=False)
            assert torch.equal(out, ref), (batch, i)
            assert (ref.float() - attend_reference(q.float(), k.float(), v.float(), meta)).abs().max() < 2e-2


@cuda
def test_store_kv_cuda():
    check_store_kv("cuda")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_attend_mixed_batch(dtype):
    from cogvlm2.engine.kernels.cuda_attend import CudaAttend

    torch.backends.cuda.matmul.allow_tf32 = False
    # prefill without cache, decode, prefill after a cached prefix, decode
    lens, q_lens = [70, 300, 260, 33], [70, 1, 37, 1]
    q, k, v, meta = _random_paged(4, lens, q_lens, hq=8, hkv=2, d=128, device="cuda", dtype=dtype)
    ref = attend_reference(q.float(), k.float(), v.float(), meta)
    out = CudaAttend(max_model_len=1024)(q, k, v, meta).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (out - ref).abs().max().item() < tol
    graph_meta = AttentionMetadata(meta.slot_mapping[:2], meta.block_tables[[1, 3]], meta.context_lens[[1, 3]],
                                   torch.arange(3, device="cuda"))  # no host lists: the CUDA-graph path
    rows = q[[70, 70 + 1 + 37]]
    out = CudaAttend(max_model_len=1024)(rows, k, v, graph_meta).float()
    assert (out - ref[[70, 108]]).abs().max().item() < tol


if __name__ == "__main__":
    check_decode_kernel("cpu")
    check_store_kv("cpu")
    print("decode kernel ok")

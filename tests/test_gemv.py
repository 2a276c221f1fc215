"""The one-row GEMV (`cogvlm2.model.gemv`) against torch: in Triton's interpreter on the CPU (float32, exact up to
summation order), compiled for sm_90 without a GPU (the K steps prefetched through shared memory), and on CUDA in
bf16 against cuBLAS."""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

from tests.interpreted import run_interpreted  # noqa: E402

# (N, K, config): rows and columns that are not multiples of the blocks, K shorter than one block, the decode
# shapes' aspect (K = 4,096) at a small N
SHAPES = [(37, 200, (8, 64, 4, 2)), (16, 40, (8, 64, 4, 1)), (50, 4096, (16, 512, 4, 3)), (3, 129, (4, 32, 4, 3))]
# (M, N, K, config) for the skinny GEMM: rows padded to 16 / 32 / 64, N and K off the blocks, K shorter than a block
SKINNY_SHAPES = [(2, 37, 200, (16, 64, 4, 2)), (5, 50, 300, (32, 128, 4, 3)), (17, 33, 64, (16, 32, 4, 1)),
                 (64, 16, 40, (16, 64, 4, 2)), (32, 70, 1000, (64, 128, 4, 3))]
# and K split (the 5th entry): into slices of several steps, of one step, more slices than steps (cut to the steps),
# automatic (0: on the CPU no split), N off the blocks
SKINNY_SPLIT_SHAPES = [(3, 70, 1000, (32, 64, 4, 2, 4)), (20, 33, 256, (16, 64, 4, 2, 4)),
                       (2, 16, 100, (16, 64, 4, 2, 8)), (9, 40, 300, (32, 32, 4, 3, 0)),
                       (33, 50, 520, (16, 128, 4, 2, 3))]


def check_rotary(device: str, dtype: torch.dtype, g: torch.Generator) -> None:
    """gemv_rotary equals gemv then triton_ops.rotary_ bit for bit: heads of 16 and 128 rows, some not rotated (the
    v heads), K off the block; and says what it cannot take."""
    from cogvlm2.model.gemv import gemv, gemv_rotary
    from cogvlm2.model.triton_ops import rotary_

    for heads, rotated, head_dim, k, config in ((6, 4, 16, 200, (4, 64, 4, 2)), (3, 2, 128, 300, (8, 128, 4, 3))):
        w = torch.randn(heads * head_dim, k, generator=g).to(device, dtype)
        x = torch.randn(1, k, generator=g).to(device, dtype)
        angle = torch.rand(1, head_dim // 2, generator=g) * 6
        cos, sin = angle.cos().to(device), angle.sin().to(device)
        two = gemv(x, w, config)
        rotary_(two, cos, sin, rotated, head_dim)
        assert torch.equal(gemv_rotary(x, w, cos, sin, rotated, head_dim, config), two), (heads, head_dim)
        # and with the K/V store: q heads, then as many k heads (rotated) as v heads (not) written into the paged
        # cache at slot 5 exactly as engine.kernels.kv_store writes them; nothing else of the cache changes
        kv_heads = heads - rotated
        k_cache, v_cache = (torch.randn(4, 3, kv_heads, head_dim, generator=g).to(device, dtype) for _ in range(2))
        k_want, v_want = k_cache.clone(), v_cache.clone()
        k_new, v_new = two.view(heads, head_dim)[rotated - kv_heads:].split(kv_heads)
        k_want.view(-1, kv_heads, head_dim)[5], v_want.view(-1, kv_heads, head_dim)[5] = k_new, v_new
        slots = torch.tensor([5], device=device)
        out = gemv_rotary(x, w, cos, sin, rotated, head_dim, config, store=(k_cache, v_cache, slots))
        assert torch.equal(out, two) and torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want), heads
    with pytest.raises(ValueError, match="store into caches"):  # a cache of another head size
        gemv_rotary(x, w, cos, sin, rotated, head_dim, config, store=(k_cache[..., :-1], v_cache, slots))
    with pytest.raises(ValueError, match="heads of"):
        gemv_rotary(x, w[:-1], cos, sin, 1, head_dim, config)
    with pytest.raises(ValueError, match="float32"):
        gemv_rotary(x, w, cos.to(dtype) if dtype != torch.float32 else cos[:, :-1], sin, 1, head_dim, config)


def check(device: str, dtype: torch.dtype, tol: float) -> None:
    from cogvlm2.model.gemv import gemv, gemv_silu_mul, skinny, skinny_silu_mul

    g = torch.Generator().manual_seed(0)
    for n, k, config in SHAPES:
        w = torch.randn(n, k, generator=g).to(device, dtype)
        x = torch.randn(1, 1, k, generator=g).to(device, dtype)
        out = gemv(x, w, config)
        ref = x.float() @ w.float().t()
        assert out.shape == (1, 1, n) and out.dtype == dtype
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < tol, (n, k, config, err)
    for n, k, config in SHAPES:  # the MLP's gate and up in one kernel
        gate, up = (torch.randn(n, k, generator=g).to(device, dtype) for _ in range(2))
        x = torch.randn(1, k, generator=g).to(device, dtype)
        out = gemv_silu_mul(x, gate, up, config)
        ref = torch.nn.functional.silu(x.float() @ gate.float().t()) * (x.float() @ up.float().t())
        assert out.shape == (1, n) and out.dtype == dtype
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < tol, (n, k, config, err)
    with pytest.raises(ValueError, match="against gate"):
        gemv_silu_mul(torch.zeros(1, 64, dtype=dtype, device=device), gate[:, :1], up[:, :1])
    check_rotary(device, dtype, g)
    # a few rows on the tensor cores; then K split (the block's last program adds the slices' partials)
    for m, n, k, config in SKINNY_SHAPES + SKINNY_SPLIT_SHAPES:
        w = torch.randn(n, k, generator=g).to(device, dtype)
        x = torch.randn(m, k, generator=g).to(device, dtype)
        out = skinny(x, w, config)
        ref = x.float() @ w.float().t()
        assert out.shape == (m, n) and out.dtype == dtype
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < tol, (m, n, k, config, err)
        if len(config) == 5:  # split: the counters were put back, the same sum again
            assert torch.equal(skinny(x, w, config), out), config
            continue
        up = torch.randn(n, k, generator=g).to(device, dtype)  # the MLP's gate and up in one kernel
        ref = torch.nn.functional.silu(ref) * (x.float() @ up.float().t())
        err = ((skinny_silu_mul(x, w, up, config).float() - ref).norm() / ref.norm()).item()
        assert err < tol, (m, n, k, config, err)
    x = torch.randn(64, k, generator=g).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    assert skinny(x.view(64, 1, k), w).shape == (64, 1, n)  # leading dims kept; the default config of 64 rows
    with pytest.raises(ValueError, match="split of K"):
        skinny(x, w, (16, 64, 4, 2, -1))
    with pytest.raises(ValueError, match="1 to 64 rows"):
        skinny(torch.zeros(65, 8, dtype=dtype, device=device), w)
    with pytest.raises(ValueError, match="against gate"):
        skinny_silu_mul(x, w, up[:, :1])
    w = torch.randn(8, 64, generator=g).to(device, dtype)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.zeros(2, 64, dtype=dtype, device=device), w)
    with pytest.raises(ValueError, match="against a weight"):
        gemv(torch.zeros(1, 32, dtype=dtype, device=device), w)


def test_gemv_interpreted():
    run_interpreted(__file__, "gemv ok")


def test_gemv_compiles_for_hopper():
    """Every swept config compiles for sm_90: stages > 1 pipelines the weight tiles (cp.async), no spills, shared
    memory within the 227 KB a block may use."""
    from cogvlm2.model import gemv as gm
    from tests.hopper_compile import compile_for_hopper

    rotary = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
              "kc_ptr": "*bf16", "vc_ptr": "*bf16", "slot_ptr": "*i64", "stride_wn": "i32", "ROTATED": "i32",
              "KV_HEADS": "i32"}
    for block_n, block_k, warps, stages in gm.CANDIDATES:  # the QKV projection with rotary: the same checks
        for store in (False, True):  # with the K/V store: two more stores a program, nothing else
            kernel = compile_for_hopper(gm._gemv_rotary_kernel, rotary,
                                        dict(K=4096, HALF=64, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                                             STORE=store, PDL=True), num_warps=warps, num_stages=stages)
            ptx = kernel.asm["ptx"]
            assert ("cp.async" in ptx) == (stages > 1) and "ld.local" not in ptx, (block_n, block_k, stages)
            launch, wait = ptx.index("griddepcontrol.launch_dependents"), ptx.index("griddepcontrol.wait")
            assert launch < ptx.index("ld.global") < wait, (block_n, block_k, stages)
    signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "stride_wn": "i32"}
    fused = {"x_ptr": "*bf16", "g_ptr": "*bf16", "u_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "stride_gn": "i32",
             "stride_un": "i32"}
    for block_n, block_k, warps, stages in gm.CANDIDATES:
        for fn, sig in ((gm._gemv_kernel, signature), (gm._gemv_silu_mul_kernel, fused)):
            kernel = compile_for_hopper(fn, sig, dict(K=4096, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                                                      PDL=True), num_warps=warps, num_stages=stages)
            ptx, where = kernel.asm["ptx"], (fn, block_n, block_k, stages)
            assert ("cp.async" in ptx) == (stages > 1) and "ld.local" not in ptx, where
            # PDL: dependents released first; the first weight tile is loaded before waiting for the previous
            # kernel, x (its output) only after
            launch, wait = ptx.index("griddepcontrol.launch_dependents"), ptx.index("griddepcontrol.wait")
            assert launch < ptx.index("ld.global") < wait, where
            assert kernel.metadata.shared <= 232448, (where, kernel.metadata.shared)
    skinny = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32",
              "M": "i32", "N": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32"}
    skinny_fused = {"x_ptr": "*bf16", "g_ptr": "*bf16", "u_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32",
                    "stride_xm": "i32", "stride_gn": "i32", "stride_un": "i32", "stride_om": "i32"}
    for block_m in (16, 32, 64):  # every candidate at every padded row count: tensor cores, prefetch, no spills
        for block_n, block_k, warps, stages, *split in gm.SKINNY_CANDIDATES:
            split = (split or [1])[0] or 4  # automatic (0): 4 on a 132-SM card at N = 4,096, BLOCK_N 64
            runs = [(gm._skinny_kernel, skinny, dict(SPLIT_K=split))]
            if split == 1:  # the gate / up kernel takes no split
                runs.append((gm._skinny_silu_mul_kernel, skinny_fused, {}))
            for fn, sig, extra in runs:
                kernel = compile_for_hopper(fn, sig, dict(K=4096, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
                                                          STAGES=stages, PRECISION="tf32", **extra),
                                            num_warps=warps, num_stages=stages)
                ptx, where = kernel.asm["ptx"], (fn, block_m, block_n, block_k, warps, stages, split)
                assert "mma" in ptx and ("cp.async" in ptx) == (stages > 1) and "ld.local" not in ptx, where
                assert ("atom.global" in ptx) == (split > 1), where  # the last-to-arrive count
                assert kernel.metadata.shared <= 232448, (where, kernel.metadata.shared)
    assert set(gm.SKINNY_CONFIGS) == {16, 32, 64}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gemv_cuda():
    check("cuda", torch.bfloat16, 1e-2)
    from cogvlm2.model.gemv import CANDIDATES, gemv

    w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) / 120
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    ref = (x @ w.t()).float()
    for config in CANDIDATES:
        assert ((gemv(x, w, config).float() - ref).norm() / ref.norm()).item() < 1e-2, config
    # the fused gate / up / SiLU-and-multiply equals the three kernels it replaces bit for bit
    from cogvlm2.model.gemv import gemv_silu_mul
    from cogvlm2.model.triton_ops import silu_mul

    gate, up = (torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(2))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    for config in CANDIDATES:
        assert torch.equal(gemv_silu_mul(x, gate, up, config), silu_mul(gemv(x, gate, config), gemv(x, up, config)))
    # the QKV projection with rotary (40 of 48 heads rotated, as TP=1's q and k) equals gemv then rotary_
    from cogvlm2.model.gemv import gemv_rotary
    from cogvlm2.model.triton_ops import rotary_

    qkv = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16) / 64
    angle = torch.rand(1, 64, device="cuda") * 6
    for config in CANDIDATES:
        two = gemv(x, qkv, config)
        rotary_(two, angle.cos(), angle.sin(), 40, 128)
        assert torch.equal(gemv_rotary(x, qkv, angle.cos(), angle.sin(), 40, 128, config), two), config
        # with the K/V store into an engine-shaped paged cache (blocks of 16 slots, 8 k / v heads), slot 1,234
        k_cache, v_cache = (torch.randn(100, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k_want, v_want = k_cache.clone(), v_cache.clone()
        k_want.view(-1, 1024)[1234], v_want.view(-1, 1024)[1234] = two[0, 4096:5120], two[0, 5120:]
        out = gemv_rotary(x, qkv, angle.cos(), angle.sin(), 40, 128, config,
                          store=(k_cache, v_cache, torch.tensor([1234], device="cuda")))
        assert torch.equal(out, two) and torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want), config
    # the skinny GEMM at batched decode's row counts, every candidate, against cuBLAS
    from cogvlm2.model.gemv import SKINNY_CANDIDATES, skinny, skinny_silu_mul

    for m in (2, 8, 24, 32, 64):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        ref = (x @ gate.t()).float()
        for config in SKINNY_CANDIDATES + [None]:
            err = ((skinny(x, gate, config).float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (m, config, err)
            if config is None or len(config) == 4:  # without a split of K
                three = silu_mul(skinny(x, gate, config), skinny(x, up, config))
                assert torch.equal(skinny_silu_mul(x, gate, up, config), three), (m, config)
        # K split over the SMs (automatic, 4 slices of the attention's dense): the sum of its slices, the same each
        # launch and in a CUDA graph replay
        dense = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
        ref = (x @ dense.t()).float()
        out = skinny(x, dense, (64, 128, 4, 4, 0))
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, m
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            again = skinny(x, dense, (64, 128, 4, 4, 0))
        graph.replay()
        assert torch.equal(again, out) and torch.equal(skinny(x, dense, (64, 128, 4, 4, 0)), out), m


def test_linear_dispatch_falls_back_off_the_gpu_and_for_other_layers():
    """ops.linear is the layer's own call wherever the GEMV or the skinny GEMM does not apply (CPU, a bias); so is
    ops.qkv_rotary the projection then rotary_qkv."""
    from unittest import mock

    from cogvlm2.model import ops

    g = torch.Generator().manual_seed(1)
    plain, biased = torch.nn.Linear(64, 8, bias=False), torch.nn.Linear(64, 8)
    x = torch.randn(1, 64, generator=g)
    with mock.patch.object(ops, "DECODE_GEMV", True), mock.patch.object(ops, "DECODE_SKINNY", True), \
            torch.inference_mode():
        for layer in (plain, biased):
            for rows in (x, torch.randn(3, 64, generator=g)):
                assert torch.equal(ops.linear(layer, rows), layer(rows))
                gated = ops.gate_up_silu_mul(layer, plain, rows)
                assert torch.equal(gated, torch.nn.functional.silu(layer(rows)) * plain(rows))
        angle = torch.rand(1, 1, generator=g)  # 8 rows: 2 q heads, 1 k and 1 v head of 2
        with mock.patch.object(ops, "DECODE_QKV_ROTARY", True):
            *got, stored = ops.qkv_rotary(plain, x, angle.cos(), angle.sin(), 2, 1, 2, store=(x, x, x))
        want = ops.rotary_qkv(plain(x), angle.cos(), angle.sin(), 2, 1, 2)
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and not stored  # nothing stored on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qkv_rotary", [False, True])
def test_engine_with_decode_gemv_equals_reference_cuda(qkv_rotary):
    """The engine with batch-1 decode's linears (the MLP's gate / up fused; with qkv_rotary the QKV projection, its
    rotary and the K/V store in one kernel) through the GEMV (CUDA graphs captured with it) gives the reference
    loop's greedy tokens in float32 (only the summation order differs from cuBLAS)."""
    from unittest import mock

    from PIL import Image

    from cogvlm2.generation import generate_ids
    from cogvlm2.llm import LLM
    from cogvlm2.model import ops
    from cogvlm2.sampling_params import SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    calls, fused, rotated = [], [], []
    real, real_fused, real_rotary = ops.gemv_kernel.gemv, ops.gemv_kernel.gemv_silu_mul, ops.gemv_kernel.gemv_rotary
    with mock.patch.object(ops, "DECODE_GEMV", True), mock.patch.object(ops, "DECODE_QKV_ROTARY", qkv_rotary), \
            mock.patch.object(ops.gemv_kernel, "gemv", lambda x, w: calls.append(w.shape) or real(x, w)), \
            mock.patch.object(ops.gemv_kernel, "gemv_rotary", lambda x, w, *a, store: rotated.append(store is not None)
                              or real_rotary(x, w, *a, store=store)), \
            mock.patch.object(ops.gemv_kernel, "gemv_silu_mul",
                              lambda x, g, u: fused.append(g.shape) or real_fused(x, g, u)):
        llm = LLM("tiny-random", dtype="float32", device="cuda", max_num_seqs=4)
        params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
        prompts = [llm.processor("Count with me"), llm.processor("Describe.", image=Image.new("RGB", (64, 48)))]
        outs = [llm.generate([x], params, use_tqdm=False)[0].token_ids for x in prompts]
    # decode linears, lm_head, gate / up (QKV + rotary, which also stored K / V into the paged cache each time)
    assert calls and fused and bool(rotated) == qkv_rotary and all(rotated)
    with mock.patch.object(ops, "DECODE_GEMV", False):  # the reference loop with cuBLAS (the GEMV off)
        assert outs == [[t[0] for t in generate_ids(llm.engine.model, [x], params)] for x in prompts]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_with_decode_skinny_equals_reference_cuda():
    """Batched decode (and the short prefills) through the skinny GEMM (the MLP's gate / up / SiLU fused), CUDA
    graphs captured with it: three prompts decoded together give the reference loop's greedy tokens (each prompt
    alone, cuBLAS) in float32."""
    from unittest import mock

    from PIL import Image

    from cogvlm2.generation import generate_ids
    from cogvlm2.llm import LLM
    from cogvlm2.model import ops
    from cogvlm2.sampling_params import SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    rows, fused = [], []
    real, real_fused = ops.gemv_kernel.skinny, ops.gemv_kernel.skinny_silu_mul
    with mock.patch.object(ops, "DECODE_SKINNY", True), \
            mock.patch.object(ops.gemv_kernel, "skinny", lambda x, w: rows.append(x.numel() // x.shape[-1])
                              or real(x, w)), \
            mock.patch.object(ops.gemv_kernel, "skinny_silu_mul",
                              lambda x, g, u: fused.append(x.numel() // x.shape[-1]) or real_fused(x, g, u)):
        llm = LLM("tiny-random", dtype="float32", device="cuda", max_num_seqs=4)
        params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
        prompts = [llm.processor("Count with me"), llm.processor("Describe.", image=Image.new("RGB", (64, 48))),
                   llm.processor("A longer question about nothing in particular")]
        outs = [out.token_ids for out in llm.generate(prompts, params, use_tqdm=False)]
    assert max(rows) > 1 and max(fused) > 1  # batched decode went through them (the MLP's gate / up fused)
    with mock.patch.object(ops, "DECODE_GEMV", False):  # the reference loop with cuBLAS, one prompt at a time
        assert outs == [[t[0] for t in generate_ids(llm.engine.model, [x], params)] for x in prompts]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_with_skinny_for_small_weights_equals_reference_cuda():
    """DECODE_SKINNY with SKINNY_MAX_WEIGHT: only weights up to that size take the skinny GEMM, here with K split
    (the block's last program adding the slices, CUDA graphs captured with it): on the tiny model (hidden 64) the
    attention's dense [64, 64] does, the QKV, the MLP and the lm_head stay on cuBLAS; batched greedy tokens equal
    the reference loop's (each prompt alone, cuBLAS) in float32."""
    from unittest import mock

    from PIL import Image

    from cogvlm2.generation import generate_ids
    from cogvlm2.llm import LLM
    from cogvlm2.model import ops
    from cogvlm2.sampling_params import SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    shapes, real = [], ops.gemv_kernel.skinny
    split = {m: (16, 32, 4, 2, 2) for m in (16, 32, 64)}  # K = 64: two slices of one step
    with mock.patch.object(ops, "DECODE_SKINNY", True), mock.patch.object(ops, "SKINNY_MAX_WEIGHT", 64 * 64), \
            mock.patch.dict(ops.gemv_kernel.SKINNY_CONFIGS, split), \
            mock.patch.object(ops.gemv_kernel, "skinny", lambda x, w: shapes.append((x.numel() // x.shape[-1],
                                                                                    tuple(w.shape))) or real(x, w)):
        llm = LLM("tiny-random", dtype="float32", device="cuda", max_num_seqs=4)
        params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
        prompts = [llm.processor("Count with me"), llm.processor("Describe.", image=Image.new("RGB", (64, 48))),
                   llm.processor("A longer question about nothing in particular")]
        outs = [out.token_ids for out in llm.generate(prompts, params, use_tqdm=False)]
    assert max(m for m, _ in shapes) > 1 and {w for _, w in shapes} == {(64, 64)}
    with mock.patch.object(ops, "DECODE_GEMV", False):
        assert outs == [[t[0] for t in generate_ids(llm.engine.model, [x], params)] for x in prompts]


@pytest.mark.parametrize("name", ["DECODE_GEMV", "DECODE_QKV_ROTARY"])
def test_decode_gemv_default_and_opt_out(name):
    """On by default; COGVLM2_<name>=0 in the environment (read at import) turns it off (cuBLAS, or the QKV
    projection, rotary and K/V store as three launches)."""
    import os
    import subprocess
    import sys

    code = f"from cogvlm2.model import ops; print(ops.{name})"
    for value, expected in ((None, "True"), ("0", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != f"COGVLM2_{name}"}
        if value is not None:
            env[f"COGVLM2_{name}"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr)


if __name__ == "__main__":  # run by test_gemv_interpreted under TRITON_INTERPRET=1
    check("cpu", torch.float32, 1e-5)
    print("gemv ok")

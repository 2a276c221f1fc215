"""Tuning sweep: the paged decode kernel's launch parameters, and SDPA backends for the ViT attention.

    PYTHONPATH=. python benchmarks/kernels_gpu.py [--only vit,decode,gemm] [--max-context 10495] [--batches 1,32,64]
                                                  [--quick]
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import copy_bandwidth, cuda_time


def graph_time(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return cuda_time(g.replay, warmup=3, iters=iters)


QUICK = [(128, 64, 4, 2, False, False), (256, 64, 4, 2, True, False), (512, 64, 4, 2, True, False),
         (1024, 64, 4, 2, True, False)]  # --quick: the tuned tile sets (decode_attention.TILES)


def decode_sweep(max_context: int = 10495, batches: tuple[int, ...] = (1, 32, 64), quick: bool = False) -> None:
    """The paged decode kernel's tiles at engine_gpu.py's shapes: 2,355 tokens of context per sequence (its decode
    figures' mid-run length), blocks of 16 laid out as the block manager hands them to a fresh batch (each
    sequence's run of blocks consecutive), a grid bounded by max_context (the engine's max_model_len: its CUDA graphs
    size the grid for it). Prints the five best (split, block_n, warps, stages, context-bound loop, kv heads as the
    fastest grid axis) per batch (quick: the four QUICK ones), each with its share of copy bandwidth for the KV it
    must read, and where the tuned default ranks."""
    from cogvlm2.engine.kernels import decode_attention as da

    hq, hkv, d, bs, ctx = 32, 8, 128, 16, 2355
    bw = copy_bandwidth()
    for b in batches:
        width = ctx // bs + 1
        kc = torch.randn(b * width + 1, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        bt = torch.arange(b * width, device="cuda").view(b, width)  # long, as the engine's tables
        lens = torch.full((b,), ctx, device="cuda")
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        floor = 2 * b * ctx * hkv * d * 2 / bw * 1e6
        default = graph_time(lambda: da.paged_decode_attention(q, kc, vc, bt, lens, d**-0.5, max_context)) * 1e6
        results = []
        configs = QUICK if quick else itertools.product((128, 256, 512, 1024), (32, 64), (4, 8), (2, 3),
                                                        (False, True), (False, True))
        for split, block_n, warps, stages, bound, heads in configs:
            if block_n > split:
                continue
            try:
                t = graph_time(lambda: da.paged_decode_attention(q, kc, vc, bt, lens, d**-0.5, max_context, split=split,
                                                                 block_n=block_n, num_warps=warps, num_stages=stages,
                                                                 context_bound=bound, heads_first=heads))
            except Exception as e:  # noqa: BLE001 - a config that does not compile is just skipped
                print("skip", split, block_n, warps, stages, bound, heads, type(e).__name__)
                continue
            results.append((t * 1e6, split, block_n, warps, stages, bound, heads))
        results.sort()
        rank = sum(r[0] < default for r in results) + 1
        print(f"decode b={b:<3} default {default:8.1f} us = {floor / default:.0%} of copy bandwidth "
              f"(floor {floor:.1f} us, rank {rank} of {len(results)})")
        for r in results if quick else results[:5]:
            print(f"decode b={b:<3} {r[0]:8.1f} us ({floor / r[0]:.0%}) split={r[1]} block_n={r[2]} warps={r[3]} "
                  f"stages={r[4]} context_bound={r[5]} heads_first={r[6]}")


def vit_attention_backends() -> None:
    q, k, v = (torch.randn(1, 16, 9217, 112, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * 16 * 9217**2 * 112
    for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel([backend]):
                t = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), iters=10)
            print(f"ViT attention one layer {name:<10} {t * 1e3:7.2f} ms  {flops / t / 1e12:6.0f} TFLOP/s "
                  f"(x63 layers = {63 * t * 1e3:.0f} ms)")
        except RuntimeError as e:
            print(f"ViT attention {name}: unavailable ({str(e)[:80]})")
    t = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), iters=10)
    print(f"ViT attention default backend {t * 1e3:.2f} ms")
    # head dim padded with zeros to 128 (exact: zero columns add nothing to q.k or to the output's real columns;
    # the scale stays 1/sqrt(112)): the kernels' best-tuned head dim, at 14% more FLOPs than the useful ones.
    # Useful TFLOP/s are printed, so the two read side by side. Also 4 images a pass (the engine's tower pass).
    for images in (1, 4):
        qp, kp, vp = (F.pad(t_.expand(images, -1, -1, -1), (0, 16)).contiguous() for t_ in (q, k, v))
        qs, ks, vs = (t_.expand(images, -1, -1, -1).contiguous() for t_ in (q, k, v))
        for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
            try:
                with sdpa_kernel([backend]):
                    t112 = cuda_time(lambda: F.scaled_dot_product_attention(qs, ks, vs), iters=10)
                    t128 = cuda_time(lambda: F.scaled_dot_product_attention(qp, kp, vp, scale=112 ** -0.5), iters=10)
                print(f"ViT attention {images} image(s) {name:<6} head dim 112: {t112 / images * 1e3:6.3f} ms an image "
                      f"({images * flops / t112 / 1e12:4.0f} TFLOP/s); padded to 128: {t128 / images * 1e3:6.3f} ms "
                      f"({images * flops / t128 / 1e12:4.0f} useful TFLOP/s)")
            except RuntimeError as e:
                print(f"ViT attention {images} image(s) {name}: unavailable ({str(e)[:80]})")
    vit_fp8_attention(q, k, v)
    lm_prefill_attention()


def vit_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """--quant fp8's ViT attention: both products on the fp8 tensor cores (cogvlm2.quant.fp8_attention), quantizing
    pass included; its error against cuDNN's bf16 output, a few Triton tile shapes. Timed inside CUDA graphs, cuDNN
    too: an eager call with a sync per call would time the host's launches (four Triton launches here), which the
    tower's 63 layers in a row hide."""
    from cogvlm2.quant.fp8_attention import CONFIG, fp8_attention, quantize_heads

    flops = 4 * 16 * 9217**2 * 112
    configs = [CONFIG, (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2)]
    for images in (1, 4):
        qs, ks, vs = (t_.expand(images, -1, -1, -1).contiguous() for t_ in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = F.scaled_dot_product_attention(qs, ks, vs).float()
            tc = graph_time(lambda: F.scaled_dot_product_attention(qs, ks, vs), iters=10)
        tq = graph_time(lambda: (quantize_heads(qs, pad_to=128), quantize_heads(ks, pad_to=128),
                                 quantize_heads(vs, transpose=True, pad_to=128)), iters=10)
        print(f"ViT attention {images} image(s) in CUDA graphs: cuDNN bf16 {tc / images * 1e3:6.3f} ms an image; "
              f"fp8's quantizing of q, k, v alone {tq / images * 1e3:6.3f} ms an image")
        for config in configs:
            try:
                out = fp8_attention(qs, ks, vs, config=config)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                t8 = graph_time(lambda: fp8_attention(qs, ks, vs, config=config), iters=10)
                print(f"ViT attention {images} image(s) fp8 {config}: {t8 / images * 1e3:6.3f} ms an image "
                      f"({images * flops / t8 / 1e12:4.0f} useful TFLOP/s, quantizing included), rel. error vs "
                      f"bf16 {err:.4f}", flush=True)
            except Exception as e:  # noqa: BLE001 - a tile shape this GPU cannot run (shared memory)
                print(f"ViT attention fp8 {config}: failed ({type(e).__name__}: {str(e)[:100]})")


def lm_prefill_attention() -> None:
    # LM prefill attention: 2331 tokens, 32 heads of 128, causal
    q, k, v = (torch.randn(1, 32, 2331, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
        try:
            with sdpa_kernel([backend]):
                t = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), iters=10)
            print(f"LM prefill attention one layer {name:<8} {t * 1e3:6.3f} ms (x32 = {32 * t * 1e3:.1f} ms)")
        except RuntimeError as e:
            print(f"LM attention {name}: unavailable ({str(e)[:80]})")


# [M, K] x [K, N] of a one-image prefill: the ViT's qkv, dense, fc1, fc2 (9,217 tokens) and the language model's
# qkv, gate+up, down (2,328 tokens), with how many of each a one-image prefill runs
PREFILL_GEMMS = [("vit qkv", 9217, 1792, 5376, 63), ("vit dense", 9217, 1792, 1792, 63),
                 ("vit fc1", 9217, 1792, 15360, 63), ("vit fc2", 9217, 15360, 1792, 63),
                 ("lm qkv", 2328, 4096, 6144, 32), ("lm gate+up", 2328, 4096, 28672, 32),
                 ("lm down", 2328, 14336, 4096, 32)]


def fp8_gemms() -> None:
    """The prefill's GEMMs in bf16 (cuBLAS) against fp8 `torch._scaled_mm`: row-wise scales (per token x per
    output channel, what --quant fp8 runs) and tensor-wise scales, each with and without fast accumulation,
    plus the activation-quantizing pass --quant fp8 adds per linear. TFLOP/s of each, and the one-image total."""
    from unittest import mock

    from cogvlm2.quant import triton_kernels as tk
    from cogvlm2.quant.triton_kernels import fp8_quantize_rows

    totals: dict[str, float] = {}
    for name, m, k, n, count in PREFILL_GEMMS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        qx, sx = fp8_quantize_rows(x)
        qw = w.to(torch.float8_e4m3fn)
        sw = torch.ones(1, n, device="cuda")
        one = torch.ones((), device="cuda")
        flops = 2 * m * k * n
        runs = {"bf16": lambda: x @ w.t()}
        # the quantizing pass in a CUDA graph (eager, Triton's launch on the host would be timed), with the
        # vision MLP's GELU where --quant fp8 applies it (fc2's input), at several row counts a program
        gelu, qlines = name == "vit fc2", []
        for elems in dict.fromkeys((tk.FP8_ROW_ELEMENTS, 1, 4096, 8192, 16384)):
            with mock.patch.object(tk, "FP8_ROW_ELEMENTS", elems):
                t = graph_time(lambda: fp8_quantize_rows(x, gelu=gelu), iters=50)
            label = "quantize x" + ("" if elems == tk.FP8_ROW_ELEMENTS else f" ({elems} a program)")
            qlines.append(f"{label} {t * 1e3:.3f} ms ({x.numel() * 3 / t / 1e9:.0f} GB/s)")
            totals[label] = totals.get(label, 0.0) + t * count
        for fast in (False, True):
            runs[f"fp8 rowwise{' fast' if fast else ''}"] = lambda fast=fast: torch._scaled_mm(
                qx, qw.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=fast)
            runs[f"fp8 tensorwise{' fast' if fast else ''}"] = lambda fast=fast: torch._scaled_mm(
                qx, qw.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=fast)
        line = []
        for label, fn in runs.items():
            try:
                t = cuda_time(fn, iters=20)
            except RuntimeError as e:
                line.append(f"{label}: unavailable ({str(e)[:60]})")
                continue
            totals[label] = totals.get(label, 0.0) + t * count
            line.append(f"{label} {t * 1e3:.3f} ms ({flops / t / 1e12:.0f})")
        print(f"{name:<11} [{m} x {k}] x [{k} x {n}]: " + ", ".join(line + qlines))
    print("one-image prefill, all of these GEMMs: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in totals.items()))


def decode_layers(tp: int) -> tuple[list, list, int]:
    """The language model's decode linears at a TP rank's shapes (qkv, dense, gate, up, down as [N, K]), 32 layers
    of distinct random bf16 weights (more than the L2 holds), and their bytes."""
    shapes = [(6144 // tp, 4096), (4096, 4096 // tp), (14336 // tp, 4096), (14336 // tp, 4096), (4096, 14336 // tp)]
    layers = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for n, k in shapes]
              for _ in range(32)]
    return shapes, layers, sum(w.numel() * 2 for layer in layers for w in layer)


def decode_gemvs() -> None:
    """Batch-1 decode's language linears (32 layers x qkv, dense, gate, up, down, distinct weights: more than the
    L2 holds) in one CUDA graph at TP=1 and at TP=2's per-rank shapes: cuBLAS (F.linear) against the one-row Triton
    GEMV (cogvlm2.model.gemv) at each of its candidate configs, then at CONFIG with the MLP's gate / up / SiLU in one
    kernel (gemv_silu_mul, as the model runs it); ms and GB/s of weights beside copy bandwidth."""
    from cogvlm2.model.gemv import CANDIDATES, CONFIG, gemv, gemv_silu_mul

    copy = copy_bandwidth()
    for tp in (1, 2):
        shapes, layers, nbytes = decode_layers(tp)
        xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes}
        ref = [F.linear(xs[w.shape[1]], w).float() for w in layers[0]]
        runs = {"cuBLAS": lambda x, w: F.linear(x, w)}
        runs |= {f"gemv {c}": (lambda x, w, c=c: gemv(x, w, c)) for c in CANDIDATES}
        line = []
        for label, fn in runs.items():
            err = max(((fn(xs[w.shape[1]], w).float() - r).norm() / r.norm()).item() for w, r in zip(layers[0], ref))
            t = graph_time(lambda: [fn(xs[w.shape[1]], w) for layer in layers for w in layer], iters=10)
            line.append(f"{label} {t * 1e3:.3f} ms ({nbytes / t / 1e9:.0f} GB/s = {nbytes / t / copy:.0%} of copy, "
                        f"err {err:.1e})")
        fused = lambda: [(gemv(xs[4096], qkv), gemv(xs[dense.shape[1]], dense), gemv_silu_mul(xs[4096], g, u),
                          gemv(xs[down.shape[1]], down)) for qkv, dense, g, u, down in layers]
        t = graph_time(fused, iters=10)
        line.append(f"gemv {CONFIG} with gate / up / SiLU fused {t * 1e3:.3f} ms ({nbytes / t / 1e9:.0f} GB/s = "
                    f"{nbytes / t / copy:.0%} of copy)")
        print(f"decode linears, batch 1, TP={tp} shapes ({nbytes / 1e9:.1f} GB): " + "; ".join(line), flush=True)
        layers = xs = None
        torch.cuda.empty_cache()


def decode_skinny(batches: tuple[int, ...]) -> None:
    """Batched decode's language linears (32 layers, distinct weights) in one CUDA graph at TP=1 and TP=2 shapes, at
    each batch size: cuBLAS (F.linear) against the skinny tensor-core GEMM (cogvlm2.model.gemv.skinny) at each
    candidate config, then the default configs with the MLP's gate / up / SiLU in one kernel (as the model runs it);
    ms and the share of copy bandwidth (KV not included: the linears alone)."""
    from cogvlm2.model.gemv import SKINNY_CANDIDATES, SKINNY_CONFIGS, SKINNY_MAX_ROWS, skinny, skinny_silu_mul

    copy = copy_bandwidth()
    for tp in (1, 2):
        shapes, layers, nbytes = decode_layers(tp)
        for m in (b for b in batches if 1 < b <= SKINNY_MAX_ROWS):
            xs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes}
            ref = [F.linear(xs[w.shape[1]], w).float() for w in layers[0]]
            runs = {"cuBLAS": lambda x, w: F.linear(x, w)}
            runs |= {f"skinny {c}": (lambda x, w, c=c: skinny(x, w, c)) for c in SKINNY_CANDIDATES}
            line = []
            for label, fn in runs.items():
                err = max(((fn(xs[w.shape[1]], w).float() - r).norm() / r.norm()).item()
                          for w, r in zip(layers[0], ref))
                t = graph_time(lambda: [fn(xs[w.shape[1]], w) for layer in layers for w in layer], iters=10)
                line.append(f"{label} {t * 1e3:.3f} ms ({nbytes / t / copy:.0%} of copy, err {err:.1e})")
            fused = lambda: [(skinny(xs[4096], qkv), skinny(xs[dense.shape[1]], dense),  # noqa: E731
                              skinny_silu_mul(xs[4096], g, u), skinny(xs[down.shape[1]], down))
                             for qkv, dense, g, u, down in layers]
            t = graph_time(fused, iters=10)
            line.append(f"default with gate / up / SiLU fused {t * 1e3:.3f} ms ({nbytes / t / copy:.0%} of copy)")
            block_m = max(16, 1 << (m - 1).bit_length())
            print(f"decode linears, batch {m}, TP={tp} shapes ({nbytes / 1e9:.1f} GB; default for {block_m} rows "
                  f"{SKINNY_CONFIGS[block_m]}): " + "; ".join(line), flush=True)
        layers = xs = None
        torch.cuda.empty_cache()


def decode_shapes(batches: tuple[int, ...]) -> None:
    """Batched decode's language linears shape by shape (TP=1; 32 distinct weights each, one CUDA graph): cuBLAS
    against the skinny GEMM's best candidate, and the MLP's gate and up as one [28,672, 4,096] weight (one cuBLAS call
    instead of two): where batch-32 decode's GEMMs (4.2 ms a step, 85% of copy) lose their time, shape by shape."""
    from cogvlm2.model.gemv import SKINNY_CANDIDATES, SKINNY_MAX_ROWS, skinny

    copy = copy_bandwidth()
    shapes = {"qkv": (6144, 4096), "dense": (4096, 4096), "gate or up": (14336, 4096), "down": (4096, 14336),
              "gate + up as one": (28672, 4096)}
    for name, (n, k) in shapes.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(32)]
        nbytes = 32 * n * k * 2
        for m in (b for b in batches if 1 < b <= SKINNY_MAX_ROWS):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_blas = graph_time(lambda: [F.linear(x, w) for w in weights], iters=10)
            best = min((graph_time(lambda c=c: [skinny(x, w, c) for w in weights], iters=10), c)
                       for c in SKINNY_CANDIDATES)
            print(f"{name} [{n}, {k}] x {m} rows (32 weights, {nbytes / 1e9:.2f} GB): cuBLAS {t_blas * 1e3:.3f} ms "
                  f"({nbytes / t_blas / copy:.0%} of copy), skinny {best[1]} {best[0] * 1e3:.3f} ms "
                  f"({nbytes / best[0] / copy:.0%})", flush=True)
        weights = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="vit,decode", help="vit, vitfp8, decode, gemm, gemv, skinny, shapes (comma-"
                    "separated; vitfp8: the ViT's fp8 attention alone at several tiles; "
                    "gemm: the prefill's GEMMs in bf16 and fp8; gemv: batch-1 decode's linears, cuBLAS against the "
                    "Triton GEMV; skinny: batched decode's linears at --batches, cuBLAS against the skinny GEMM; "
                    "shapes: the same shape by shape, and the MLP's gate + up as one weight)")
    ap.add_argument("--max-context", type=int, default=10495,
                    help="the engine's max_model_len: its CUDA graphs size the decode grid for it")
    ap.add_argument("--batches", default="1,32,64", help="decode batch sizes to sweep (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="decode: only the tuned tile sets, all printed (where each "
                    "batch size's tiles start: --batches 8,16,24)")
    args = ap.parse_args()
    if "vitfp8" in args.only:
        vit_fp8_attention(*(torch.randn(1, 16, 9217, 112, device="cuda", dtype=torch.bfloat16) for _ in range(3)))
    elif "vit" in args.only:
        vit_attention_backends()
    if "gemm" in args.only:
        fp8_gemms()
    if "gemv" in args.only:
        decode_gemvs()
    if "skinny" in args.only:
        decode_skinny(tuple(int(b) for b in args.batches.split(",")))
    if "shapes" in args.only:
        decode_shapes(tuple(int(b) for b in args.batches.split(",")))
    if "decode" in args.only:
        decode_sweep(args.max_context, tuple(int(b) for b in args.batches.split(",")), args.quick)

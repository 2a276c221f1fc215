"""Where the engine's time goes on the full-size model: kernel table of a prefill, steady decode steps at
batch 1 and 32 (the step against the CUDA-graph replay alone, then a dozen steps under the profiler: GPU-busy
share, kernels inside and outside the graph, host ops), and a
captioning run (16 images x 32 new tokens, the engine benchmark's workload scaled down): its kernel table and
how much of its wall time the GPU was busy.

    PYTHONPATH=. python benchmarks/profile_gpu.py [--only prefill,decode,caption] [--trace-dir DIR] [--quant fp8]
"""

from __future__ import annotations

import argparse
import bisect
import time
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import cuda_time, full_size_config, random_model
from benchmarks.engine_gpu import QUESTION, image, run_until_done
from cogvlm2.engine.config import EngineConfig
from cogvlm2.llm import LLMEngine
from cogvlm2.processing import Processor
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path
from cogvlm2.sampling_params import SamplingParams


def busy_fraction(prof, wall_s: float) -> float:
    """Share of wall_s during which some GPU kernel ran (union of the kernels' intervals)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e6 / wall_s


def idle_gaps(prof, min_ms: float = 0.2, top: int = 8) -> str:
    """The GPU's idle gaps of at least min_ms, summed by what the host was doing: the innermost CPU op running
    when the GPU went idle, and the one that launched the work ending the gap (the host code running late)."""
    gpu = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    cpu = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CPU), key=lambda t: t[0])
    starts = [c[0] for c in cpu]

    def innermost(t: float) -> str:
        best = None
        for j in range(bisect.bisect_right(starts, t) - 1, max(-1, bisect.bisect_right(starts, t) - 4000), -1):
            a, b, name = cpu[j]
            if a <= t <= b and (best is None or b - a < best[0]):
                best = (b - a, name)
        return best[1] if best else "(no CPU op)"

    at_start, at_end, end, total = defaultdict(float), defaultdict(float), None, 0.0
    for a, b in gpu:
        if end is not None and a - end >= min_ms * 1e3:
            ms = (a - end) / 1e3
            total += ms
            at_start[innermost(end)] += ms
            at_end[innermost(a - 1)] += ms
        end = b if end is None else max(end, b)
    fmt = lambda d: ", ".join(f"{n[:50]} {v:.1f}" for n, v in sorted(d.items(), key=lambda kv: -kv[1])[:top])  # noqa
    return f"{total:.1f} ms idle in gaps >= {min_ms} ms; by the op running when it began: {fmt(at_start)}; " \
           f"by the op running just before it ended: {fmt(at_end)}"


KERNEL_KINDS = (("all-reduce", ("nccl", "all_reduce", "allreduce", "AllReduce")),
                ("fp8 quantize", ("_fp8_rows", "_quantize_heads")),
                ("attention", ("_stage1", "_stage2", "flash", "fmha", "sdpa", "attention")),
                ("GEMM", ("nvjet", "gemm", "gemv", "splitKreduce", "cutlass", "sm90_xmma")),  # gemv: the Triton GEMVs
                ("norms+activations", ("layer_norm", "rms_norm", "gelu", "GeluCUDA", "silu")))


def kernel_seconds(prof) -> dict[str, float]:
    """GPU kernel time by kind (attention, GEMM, norms and activations, other) over the profiled events, in seconds."""
    out = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.time_range.end <= e.time_range.start:
            continue
        kind = next((k for k, keys in KERNEL_KINDS if any(key in e.name for key in keys)), "other")
        out[kind] += (e.time_range.end - e.time_range.start) / 1e6
    return out


def all_reduce_spread(prof, per_step: int) -> str:
    """How the all-reduce kernels' time is spread: each all-reduce's duration by its index within a step (the
    kernels in launch order, `per_step` a step). Waiting for a late peer shows as one long all-reduce a step (the
    first after the ranks drift apart) over short others; a slow transfer as uniformly long ones."""
    keys = next(keys for kind, keys in KERNEL_KINDS if kind == "all-reduce")
    times = [(e.time_range.start, e.time_range.end - e.time_range.start) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA and any(key in e.name for key in keys)
             and "AllGather" not in e.name and e.time_range.end > e.time_range.start]
    durs = [d for _, d in sorted(times)]
    steps = len(durs) // per_step
    if steps == 0:
        return "no all-reduce kernels"
    by_index = [sorted(durs[i * per_step + j] for i in range(steps)) for j in range(per_step)]
    medians = [col[len(col) // 2] for col in by_index]
    order = sorted(range(per_step), key=lambda j: -medians[j])
    all_sorted = sorted(durs[:steps * per_step])
    return (f"{steps} steps x {per_step}: median {all_sorted[len(all_sorted) // 2]:.1f} us, min {all_sorted[0]:.1f}, "
            f"p90 {all_sorted[int(len(all_sorted) * 0.9)]:.1f}, max {all_sorted[-1]:.1f}; median by index within a "
            f"step, longest: " + ", ".join(f"#{j} {medians[j]:.1f}" for j in order[:4]) +
            f"; shortest: #{order[-1]} {medians[order[-1]]:.1f}")


def kinds_line(prof, per: float = 1.0, unit: str = "ms") -> str:
    """'total X: kind a, kind b, ...' in ms (per: divide by this many steps / images)."""
    k = kernel_seconds(prof)
    items = sorted(k.items(), key=lambda kv: -kv[1])
    return f"{sum(k.values()) / per * 1e3:.2f} {unit}: " + ", ".join(f"{n} {v / per * 1e3:.2f}" for n, v in items)


def profile_caption(engine: LLMEngine, proc: Processor, trace_dir: str | None) -> None:
    prompts = [proc("Describe this image.", image=image(300 + i)) for i in range(16)]
    params = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"cap{i}", p, params)
        run_until_done(engine, {f"cap{i}" for i in range(16)})
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    print(f"captioning 16 images x 32 tokens under the profiler: {wall:.2f} s ({16 / wall:.2f} img/s), GPU busy "
          f"{busy_fraction(prof, wall):.0%} of it; kernel time per image {kinds_line(prof, 16)}")
    print(f"captioning: {idle_gaps(prof)}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    if trace_dir:
        prof.export_chrome_trace(f"{trace_dir}/caption_trace.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="prefill,decode,caption")
    ap.add_argument("--trace-dir", help="write the captioning run's and the decode steps' chrome traces here")
    ap.add_argument("--quant", help="profile the model quantized to this mode (cogvlm2.quant.quantize_model)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    cfg = full_size_config()
    model = random_model(cfg)
    if args.quant:
        from cogvlm2.quant import quantize_model

        quantize_model(model, args.quant, "cuda", use_bitsandbytes=False if args.quant != "int8" else None)
        torch.cuda.empty_cache()
    proc = Processor(cfg, Tokenizer(bundled_tokenizer_path()))
    engine = LLMEngine(model, EngineConfig(max_num_seqs=32, gpu_memory_utilization=0.9), proc)
    greedy = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request("warm", proc(QUESTION, image=image(1)), greedy)
    run_until_done(engine, {"warm"})

    x = proc(QUESTION, image=image(2))
    if "prefill" in only:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            engine.add_request("p", x, greedy)
            run_until_done(engine, {"p"})
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        print(f"prefill (TTFT) of one image + question under the profiler: {wall * 1e3:.1f} ms, GPU busy "
              f"{busy_fraction(prof, wall):.0%} of it; kernel time {kinds_line(prof)}")
        print(f"prefill: {idle_gaps(prof, min_ms=0.05)}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    if "caption" in only:
        profile_caption(engine, proc, args.trace_dir)

    for b in ((1, 32) if "decode" in only else ()):
        profile_decode(engine, proc, b, args.trace_dir)


def profile_decode(engine: LLMEngine, proc: Processor, b: int, trace_dir: str | None, steps: int = 12) -> None:
    """b requests of 2.3K context decoding together: the step (the interval between step returns, no sync in
    between: with async scheduling a step launches the next one and returns the previous one's tokens, so in
    steady decode the returns are paced by the GPU), the decode graph's replay alone, and `steps` steady steps
    under the profiler: how busy the GPU was and which kernels ran outside the graph."""
    ids = [f"d{b}-{i}" for i in range(b)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, proc(QUESTION, image=image(10 + i)),
                           SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True))
    intervals, remaining, prof, wall = [], set(ids), None, 0.0
    torch.cuda.synchronize()
    last = time.perf_counter()
    while remaining:
        outs = engine.step()
        now = time.perf_counter()
        steady = len(outs) == b and all(len(o.token_ids) > 1 for o in outs)
        if steady:
            intervals.append(now - last)
        if steady and prof is None and len(intervals) == 20:  # profile steps 21.. of steady decode
            # the graph's replay alone, mid-run: it re-runs the step in flight on its own inputs (the same K/V
            # into the same slots, the same hidden states), so the run goes on unchanged. Timed after the
            # run instead, it read 6.5 ms at batch 32 where the steady steps' kernels took 8.0 ms (trace)
            graphs = engine.runner.graphs
            torch.cuda.synchronize()
            replay = cuda_time(graphs.replay[next(s for s in graphs.sizes if s >= b)], iters=10)
            torch.cuda.synchronize()
            now = time.perf_counter()  # the replays' time is no step's
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.start()
            t_prof, n_prof = now, 0
        elif prof is not None and wall == 0.0:  # profiling
            n_prof += 1
            if n_prof == steps:
                wall = now - t_prof
                prof.stop()
        last = now
        remaining -= {o.request_id for o in outs if o.finished}
    step = float(np.median(intervals[:20]))
    if prof is None or wall == 0.0:
        print(f"batch {b}: step {step * 1e3:.2f} ms; too few steady steps to profile")
        return
    print(f"batch {b}: step {step * 1e3:.2f} ms (median of 20 steady steps), of which the decode graph's replay "
          f"alone (mid-run) {replay * 1e3:.2f} ms; the rest {(step - replay) * 1e3:.2f} ms (logits, sampling, "
          "staging, GPU idle)")
    print(f"batch {b}: {steps} steady steps under the profiler: {wall / steps * 1e3:.2f} ms per step, GPU busy "
          f"{busy_fraction(prof, wall):.0%} of it; kernel time per step {kinds_line(prof, steps)}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
    if trace_dir:
        prof.export_chrome_trace(f"{trace_dir}/decode{b}_trace.json")

if __name__ == "__main__":
    main()

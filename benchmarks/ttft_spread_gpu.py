"""Why one-image TTFT moves from engine to engine (fp8: 192-290 ms medians in one process, the card at 1,980 MHz
throughout): several engines built in turn over one model, a few one-image prefills each under the profiler, and
for every prefill its wall time against what the GPU did in it — kernel time by kind, busy time (union of the
kernels), the idle gaps and what the host was running in them — and the caching allocator's counters (device
allocations, frees, retries). A slow engine whose kernels sum the same as a fast one's waits on the host or the
allocator; one whose kernels are slower is the GPU's.

    PYTHONPATH=. python benchmarks/ttft_spread_gpu.py [--quant fp8] [--engines 6] [--prefills 3] [--gc-off]
        [--out spread.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import full_size_config, random_model
from benchmarks.engine_gpu import QUESTION, first_token_time, image
from benchmarks.profile_gpu import busy_fraction, idle_gaps, kernel_seconds
from cogvlm2.engine.config import EngineConfig
from cogvlm2.llm import LLMEngine
from cogvlm2.processing import Processor
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path

ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def allocator_counters() -> dict[str, int]:
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTERS}


def profiled_prefill(engine: LLMEngine, rid: str, inputs) -> dict:
    """Wall time of one first token, and what the host, the GPU and the allocator did in it."""
    before = allocator_counters()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = first_token_time(engine, rid, inputs)
    after = allocator_counters()
    kinds = kernel_seconds(prof)
    events = [e for e in prof.events() if e.time_range.end > e.time_range.start]
    gpu = [e.time_range for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    cpu = [e.time_range for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    ops = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:6]  # the host's costliest ops
    return {"lead_ms": (min(r.start for r in gpu) - min(r.start for r in cpu)) / 1e3,  # the host before kernel 1
            "tail_ms": (max(r.end for r in cpu) - max(r.end for r in gpu)) / 1e3,  # after the last kernel
            "top_self_cpu_ms": {a.key: a.self_cpu_time_total / 1e3 for a in ops},
            "wall_ms": wall * 1e3, "kernels_ms": sum(kinds.values()) * 1e3,
            "busy_ms": busy_fraction(prof, wall) * wall * 1e3,
            "by_kind_ms": {k: v * 1e3 for k, v in kinds.items()},
            "allocator": {k: after[k] - before[k] for k in ALLOCATOR_COUNTERS},
            "gaps": idle_gaps(prof, min_ms=0.5, top=4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="fp8", help="quantize the model first (cogvlm2.quant.quantize_model); '' bf16")
    ap.add_argument("--engines", type=int, default=6)
    ap.add_argument("--prefills", type=int, default=3, help="timed prefills an engine, each a new image")
    ap.add_argument("--plain", type=int, default=3, help="prefills an engine without the profiler, before it")
    ap.add_argument("--gc-off", action="store_true", help="no automatic garbage collection (gc.disable) at all")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.gc_off:
        gc.disable()
    cfg = full_size_config()
    model = random_model(cfg)
    if args.quant:
        from cogvlm2.quant import quantize_model

        quantize_model(model, args.quant, model.device, use_bitsandbytes=False)
        torch.cuda.empty_cache()
    proc = Processor(cfg, Tokenizer(bundled_tokenizer_path()))
    engines = []
    for e in range(args.engines):
        t = time.perf_counter()
        engine = LLMEngine(model, EngineConfig(max_num_seqs=64, max_num_batched_tokens=8192,
                                               gpu_memory_utilization=0.9), proc)
        build_s = time.perf_counter() - t
        first_token_time(engine, f"warm{e}", proc(QUESTION, image=image(99)))  # compile, plans
        plain = [first_token_time(engine, f"p{e}-{i}", proc(QUESTION, image=image(100 + i))) * 1e3
                 for i in range(args.plain)]
        profiled = [profiled_prefill(engine, f"q{e}-{i}", proc(QUESTION, image=image(1000 + 100 * e + i)))
                    for i in range(args.prefills)]  # images not seen before: the prefix cache would answer
        engines.append({"build_s": build_s, "plain_wall_ms": plain, "profiled": profiled})
        print(f"engine {e}: built in {build_s:.1f} s; plain " + " ".join(f"{w:.1f}" for w in plain) + " ms; profiled "
              + " | ".join(f"wall {p['wall_ms']:.1f} kernels {p['kernels_ms']:.1f} busy {p['busy_ms']:.1f} "
                           f"lead {p['lead_ms']:.1f} tail {p['tail_ms']:.1f}" for p in profiled), flush=True)
        for p in profiled:
            print("   " + ", ".join(f"{k} {v:.1f}" for k, v in p["by_kind_ms"].items()) + "; " + p["gaps"] +
                  f"; allocator {p['allocator']}; top self CPU ms " +
                  ", ".join(f"{k} {v:.1f}" for k, v in p["top_self_cpu_ms"].items()), flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "quant": args.quant, "gc_off": args.gc_off,
                       "engines": engines}, f, indent=1)


if __name__ == "__main__":
    main()

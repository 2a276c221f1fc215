"""Where the engine's time goes on the full-size model: kernel table of a prefill, decode steps split
into the CUDA-graph replay (GPU) versus everything else in a step (sampling, scheduling, host work), and a
captioning run (16 images x 32 new tokens, the engine benchmark's workload scaled down): its kernel table and
how much of its wall time the GPU was busy.

    PYTHONPATH=. python benchmarks/profile_gpu.py [--only prefill,decode,caption] [--trace-dir DIR]
"""

from __future__ import annotations

import argparse
import time

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
          f"{busy_fraction(prof, wall):.0%} of it")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    if trace_dir:
        prof.export_chrome_trace(f"{trace_dir}/caption_trace.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="prefill,decode,caption")
    ap.add_argument("--trace-dir", help="write the captioning run's chrome trace here")
    args = ap.parse_args()
    only = set(args.only.split(","))
    cfg = full_size_config()
    model = random_model(cfg)
    proc = Processor(cfg, Tokenizer(bundled_tokenizer_path()))
    engine = LLMEngine(model, EngineConfig(max_num_seqs=32, gpu_memory_utilization=0.9), proc)
    greedy = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request("warm", proc(QUESTION, image=image(1)), greedy)
    run_until_done(engine, {"warm"})

    x = proc(QUESTION, image=image(2))
    if "prefill" in only:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            engine.add_request("p", x, greedy)
            run_until_done(engine, {"p"})
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    if "caption" in only:
        profile_caption(engine, proc, args.trace_dir)

    for b in ((1, 32) if "decode" in only else ()):
        ids = [f"d{b}-{i}" for i in range(b)]
        for i, rid in enumerate(ids):
            engine.add_request(rid, proc(QUESTION, image=image(10 + i)),
                               SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))
        # the interval between consecutive step returns, with no sync in between: with async scheduling a
        # step launches the next one and returns the previous one's tokens, so in steady decode the returns
        # are paced by the GPU (timing one step between two syncs would time only its host part)
        steps = []
        remaining = set(ids)
        torch.cuda.synchronize()
        last = time.perf_counter()
        while remaining:
            outs = engine.step()
            now = time.perf_counter()
            steps.append((now - last, len(outs)))
            last = now
            remaining -= {o.request_id for o in outs if o.finished}
        decode = [t for t, n in steps[-20:-1] if n == b]
        replay_fn = engine.runner.graphs.replay[next(s for s in engine.runner.graphs.sizes if s >= b)]
        replay = cuda_time(replay_fn, iters=10)
        print(f"batch {b}: step {np.median(decode) * 1e3:.2f} ms, of which graph replay (model forward) "
              f"{replay * 1e3:.2f} ms; rest (logits, sampling, scheduling, host) "
              f"{(np.median(decode) - replay) * 1e3:.2f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.add_request(f"prof{b}", x, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
            run_until_done(engine, {f"prof{b}"})
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()

"""Where captioning's wall time goes, step by step: engine_gpu.py's captioning workload (64 images x 128 new
tokens, full-size model, random bf16 weights) with every step's launch bracketed by CUDA events.

Per step it records what the step holds (images encoded, prefill tokens, decoding rows, whether it was launched
ahead of the previous step's ids), the host's time to schedule and launch it, and on the GPU when it started and
ended. The GPU's idle time is what lies between one step's end and the next one's start: reported in total, by
the kind of step that followed, and the largest gaps one by one, so the captioning figure splits into kernels
(which only faster kernels shorten) and waiting (which scheduling can remove). --budgets runs the workload once
per max_num_batched_tokens, to compare how many images a step should hold.

    PYTHONPATH=. python benchmarks/step_timeline_gpu.py [--budgets 8192,2560] [--out timeline.json]
    PYTHONPATH=. python benchmarks/step_timeline_gpu.py --dry-run   (the tiny model on the CPU: the mechanics)
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from benchmarks.engine_gpu import image, run_until_done
from cogvlm2.engine.config import EngineConfig
from cogvlm2.llm import LLMEngine
from cogvlm2.sampling_params import SamplingParams


@dataclass
class Step:
    kind: str  # "prefill" (some sequence computes more than one token) or "decode"; "+ahead" when launched early
    images: int  # images the step's ViT encodes
    prefill_tokens: int
    decode_rows: int
    host_ms: float  # schedule + launch on the host
    mallocs: int = 0  # cudaMalloc calls of the caching allocator during the launch
    alloc_retries: int = 0  # ... and times it freed its whole cache to retry an allocation (a device sync)
    compiles: str = ""  # Triton kernels compiled (a new specialization) during the launch
    sm_clock_mhz: int = 0  # the SM clock nvidia-smi reports at the launch (0: no NVML here)
    gpu_start_ms: float = 0.0
    gpu_end_ms: float = 0.0
    idle_before_ms: float = 0.0


def _sm_clock() -> int:
    """The SM clock in MHz (NVML's last sample), 0 without NVML: sustained load runs below the clock of a burst."""
    try:
        return int(torch.cuda.clock_rate())
    except Exception:  # noqa: BLE001 - no pynvml / NVML on this machine
        return 0


def _allocator() -> tuple[int, int]:
    stats = torch.cuda.memory_stats()
    return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)


class Timeline:
    """Wraps an engine's scheduler and worker to record a Step per launch (CUDA events on the GPU; on the CPU
    the host's clock, where launch == compute)."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.steps, self.events = engine, [], []
        self.cuda = torch.cuda.is_available()
        worker, sched = engine.worker, engine.scheduler
        launch, schedule, lookahead = worker.launch, sched.schedule, sched.schedule_lookahead
        self._t_sched = 0.0

        ahead: set[int] = set()  # ids of the batches schedule_lookahead built (launched before the previous collect)

        def timed_schedule(*a, **k):
            t0 = time.perf_counter()
            try:
                batch = (lookahead if a else schedule)(*a, **k)
                if a and batch is not None:
                    ahead.add(id(batch))
                return batch
            finally:
                self._t_sched = time.perf_counter() - t0

        def timed_launch(batch, source=None):
            t0 = time.perf_counter()
            cache = getattr(getattr(worker, "runner", None), "vision_cache", {})
            missing = {(s.vision_hash, s.adapter_id) for s, st, n in zip(batch.seqs, batch.starts, batch.num_new_tokens)
                       if s.vision_range(st, st + n)[1] > s.vision_range(st, st + n)[0]} - set(cache)
            start = end = None
            before = _allocator() if self.cuda else (0, 0)
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            out = launch(batch, source)
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
            prefill = sum(n for n in batch.num_new_tokens if n > 1)
            kind = ("prefill" if prefill else "decode") + ("+ahead" if id(batch) in ahead else "")
            ahead.discard(id(batch))
            host = (time.perf_counter() - t0 + self._t_sched) * 1e3
            after = _allocator() if self.cuda else (0, 0)
            self.steps.append(Step(kind, len(missing), prefill, sum(1 for n in batch.num_new_tokens if n == 1), host,
                                   after[0] - before[0], after[1] - before[1], ",".join(compiled),
                                   _sm_clock() if self.cuda and prefill else 0))
            compiled.clear()
            self.events.append((start, end, t0, time.perf_counter()))
            self._t_sched = 0.0
            return out

        compiled: list[str] = []
        try:
            import triton

            triton.knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(kw["fn"].name)
        except (ImportError, AttributeError):  # no Triton (CPU) or one without knobs
            pass
        sched.schedule = lambda: timed_schedule()
        sched.schedule_lookahead = lambda prev, done: timed_schedule(prev, done)
        worker.launch = timed_launch

    def finish(self, t0: float) -> None:
        """Fill in the GPU times (ms from t0's first event / perf_counter t0)."""
        if self.cuda:
            torch.cuda.synchronize()
            first = self.events[0][0]
            for step, (a, b, _, _) in zip(self.steps, self.events):
                step.gpu_start_ms, step.gpu_end_ms = first.elapsed_time(a), first.elapsed_time(b)
        else:
            for step, (_, _, h0, h1) in zip(self.steps, self.events):
                step.gpu_start_ms, step.gpu_end_ms = (h0 - t0) * 1e3, (h1 - t0) * 1e3
        for prev, step in zip(self.steps, self.steps[1:]):
            step.idle_before_ms = max(0.0, step.gpu_start_ms - prev.gpu_end_ms)


def summarize(steps: list[Step], wall_s: float, n_images: int) -> dict:
    busy = sum(s.gpu_end_ms - s.gpu_start_ms for s in steps) / 1e3
    idle = defaultdict(float)
    count = defaultdict(int)
    gpu = defaultdict(float)
    for s in steps:
        idle[s.kind] += s.idle_before_ms / 1e3
        count[s.kind] += 1
        gpu[s.kind] += (s.gpu_end_ms - s.gpu_start_ms) / 1e3
    prefill = [s for s in steps if s.images]
    last_image = max((i for i, s in enumerate(steps) if s.prefill_tokens), default=0)
    tail = steps[last_image + 1:]
    return dict(
        wall_s=wall_s, img_per_s=n_images / wall_s, steps=len(steps), gpu_in_steps_s=busy,
        idle_between_steps_s=sum(idle.values()),
        by_kind={k: dict(steps=count[k], gpu_s=round(gpu[k], 3), idle_before_s=round(idle[k], 3)) for k in count},
        images_per_encoding_step=(sum(s.images for s in prefill) / len(prefill)) if prefill else 0,
        gpu_ms_per_image_in_prefill_steps=(sum(s.gpu_end_ms - s.gpu_start_ms for s in steps[:last_image + 1])
                                          / n_images),
        tail=dict(steps=len(tail), gpu_s=sum(s.gpu_end_ms - s.gpu_start_ms for s in tail) / 1e3,
                  wall_s=((tail[-1].gpu_end_ms - steps[last_image].gpu_end_ms) / 1e3) if tail else 0.0),
        largest_gaps=[dict(i=i, ms=round(s.idle_before_ms, 2), **{k: v for k, v in asdict(s).items()
                                                                     if k not in ("idle_before_ms",)})
                      for i, s in sorted(enumerate(steps), key=lambda t: -t[1].idle_before_ms)[:12]],
    )


def caption_run(engine: LLMEngine, prompts, tag: str, new_tokens: int = 128) -> tuple[list[Step], float]:
    timeline = Timeline(engine)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    if timeline.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
    run_until_done(engine, set(ids))
    if timeline.cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    timeline.finish(t0)
    del engine.worker.launch, engine.scheduler.schedule, engine.scheduler.schedule_lookahead  # the originals again
    return timeline.steps, wall



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="8192", help="max_num_batched_tokens values, one run each")
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--out", help="every step of every run, and the summaries, as JSON")
    ap.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU, 8 images x 8 tokens")
    ap.add_argument("--sync-debug", action="store_true",
                    help="warn at every operation that makes the host wait for the GPU (once per code location)")
    args = ap.parse_args()
    if args.dry_run:
        engine = LLMEngine.from_pretrained("tiny")
        n, new_tokens = min(args.num_images, 8), 8
    else:
        from benchmarks.common import full_size_config, random_model
        from cogvlm2.processing import Processor
        from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path

        cfg = full_size_config()
        engine = LLMEngine(random_model(cfg), EngineConfig(max_num_seqs=64, max_num_batched_tokens=8192,
                                                           gpu_memory_utilization=0.9),
                           Processor(cfg, Tokenizer(bundled_tokenizer_path())))
        n, new_tokens = args.num_images, 128
    proc = engine.processor
    size = proc.config.vision.image_size
    warm = [proc("Describe this image.", image=image(900 + i).resize((size, size))) for i in range(4)]
    caption_run(engine, warm, "warm", new_tokens)  # cuDNN plans, the Triton kernels, the allocator
    results = {}
    if args.sync_debug and torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    for run, budget in enumerate(int(b) for b in args.budgets.split(",")):
        engine.config.max_num_batched_tokens = engine.scheduler.config.max_num_batched_tokens = budget
        prompts = [proc("Describe this image.", image=image(1000 * run + i).resize((size, size)))
                   for i in range(n)]  # new images each run: no prefix-cache hits
        steps, wall = caption_run(engine, prompts, f"b{budget}", new_tokens)
        summary = summarize(steps, wall, n)
        results[budget] = dict(summary=summary, steps=[asdict(s) for s in steps])
        kinds = ", ".join(f"{k}: {v['steps']} steps, GPU {v['gpu_s']:.2f} s, idle before {v['idle_before_s']:.2f} s"
                          for k, v in summary["by_kind"].items())
        print(f"budget {budget}: {n} images in {wall:.2f} s = {summary['img_per_s']:.2f} img/s; GPU inside steps "
              f"{summary['gpu_in_steps_s']:.2f} s, idle between steps {summary['idle_between_steps_s']:.2f} s; "
              f"{summary['images_per_encoding_step']:.1f} images per encoding step, "
              f"{summary['gpu_ms_per_image_in_prefill_steps']:.1f} GPU ms per image until the last prefill; "
              f"tail after it: {summary['tail']['steps']} steps, {summary['tail']['wall_s']:.2f} s")
        print(f"  {kinds}")
        for g in summary["largest_gaps"][:6]:
            print(f"  gap {g['ms']:.1f} ms before step {g['i']} ({g['kind']}, {g['images']} images, "
                  f"{g['prefill_tokens']} prefill tokens, {g['decode_rows']} decoding, host {g['host_ms']:.1f} ms)")
        slow = sorted(steps, key=lambda st: -(st.gpu_end_ms - st.gpu_start_ms) / max(st.images, 1))[:4]
        print("  slowest steps per image: " + "; ".join(
            f"{st.gpu_end_ms - st.gpu_start_ms:.0f} ms for {st.images} images ({st.kind}, {st.prefill_tokens} tokens, "
            f"{st.mallocs} cudaMalloc, {st.alloc_retries} allocator retries)" for st in slow))
        print("  Triton compiles: " + ("; ".join(f"step {i} ({st.gpu_end_ms - st.gpu_start_ms:.0f} ms): {st.compiles}"
                                                 for i, st in enumerate(steps) if st.compiles) or "none"))
        clocks = sorted(st.sm_clock_mhz for st in steps if st.sm_clock_mhz)
        if clocks:
            print(f"  SM clock at prefill launches: {clocks[0]}-{clocks[-1]} MHz, median {clocks[len(clocks) // 2]}")
        print(f"  cudaMalloc calls during launches: {sum(st.mallocs for st in steps)}, "
              f"allocator retries: {sum(st.alloc_retries for st in steps)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()

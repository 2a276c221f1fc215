"""The engine on one GPU, full-size cogvlm2-llama3-chat-19B architecture with random bf16 weights.

Prints the issue's table: decode tok/s at batch 1 (2.3K context), decode step at batch 32 (2.3K
context each), time to first token for one 1344² image + a 20-token question, TTFT of the second
turn (prefix cache), TTFT of a new question over the same image, captioning throughput (64 images,
128 new tokens each), peak GPU memory — each next to its floor and how that floor is computed.

    PYTHONPATH=. python benchmarks/engine_gpu.py [--out engine.json] [--only ttft,decode1,...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import copy_bandwidth, matmul_flops, full_size_config, random_model, report
from cogvlm2.llm import LLMEngine
from cogvlm2.engine.config import EngineConfig
from cogvlm2.processing import Processor
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path
from cogvlm2.sampling_params import SamplingParams

QUESTION = "Describe this image in detail, listing every object you can see and where it is."  # ~20 tokens


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((1344, 1344))


def run_until_done(engine: LLMEngine, ids: set[str], on_output=None) -> None:
    remaining = set(ids)
    while remaining:
        for out in engine.step():
            if on_output:
                on_output(out)
            if out.finished:
                remaining.discard(out.request_id)


def first_token_time(engine: LLMEngine, rid: str, inputs, max_new_tokens: int = 1) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.add_request(rid, inputs, SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True))
    while not any(out.request_id == rid for out in engine.step()):
        pass
    first = time.perf_counter() - t0
    run_until_done(engine, {rid} if max_new_tokens > 1 else set())
    return first


def steady_step_time(engine: LLMEngine, prompts, new_tokens: int) -> float:
    """Median wall time between consecutive step() returns that carry one decode token for
    every request (no device syncs: with async scheduling, host work overlaps the GPU)."""
    ids = [f"dec{len(prompts)}-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
    stamps, remaining = [], set(ids)
    while remaining:
        outs = engine.step()
        if len(outs) == len(ids) and all(len(o.token_ids) > 1 for o in outs):
            stamps.append(time.perf_counter())
        remaining -= {o.request_id for o in outs if o.finished}
    return float(np.median(np.diff(stamps)))


def profile_first_token(engine: LLMEngine, inputs, path: str, what: str, warm: bool = True) -> None:
    """Where one request's time to first token goes: host ops (self CPU time) and GPU kernels of one profiled
    call (after a warm-up call with the same inputs when `warm`), tables to `path`, a trace to path.json."""
    from torch.profiler import ProfilerActivity, profile

    if warm:
        first_token_time(engine, f"{what}-prewarm", inputs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=False) as prof:
        t = first_token_time(engine, f"{what}-profiled", inputs)
    table = prof.key_averages()
    with open(path, "w") as f:
        f.write(f"{what} under the profiler: {t * 1e3:.1f} ms\n\n")
        f.write(table.table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n")
        f.write(table.table(sort_by="self_cuda_time_total", row_limit=25) + "\n")
    prof.export_chrome_trace(path + ".json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only", default="ttft,decode1,decode32,caption")
    ap.add_argument("--profile-turn2", metavar="FILE",
                    help="also profile one second turn (torch.profiler): a kernel/op table to FILE and a trace to FILE.json")
    ap.add_argument("--profile-ask", metavar="FILE",
                    help="also profile one new question over the cached image (its first call: a new question each "
                         "time, as the row times), tables and trace as --profile-turn2")
    args = ap.parse_args()
    only = set(args.only.split(","))
    cfg = full_size_config()
    model = random_model(cfg)
    weights = torch.cuda.memory_allocated()
    proc = Processor(cfg, Tokenizer(bundled_tokenizer_path()))
    engine = LLMEngine(model, EngineConfig(max_num_seqs=64, max_num_batched_tokens=8192, gpu_memory_utilization=0.9),
                       proc)
    print(f"weights {weights / 2**30:.1f} GiB; KV pool {engine.block_manager.num_blocks} blocks of "
          f"{engine.config.block_size}; graphs {engine.runner.graphs.sizes if engine.runner.graphs else None}")
    lang_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if "vision" not in n and "embed_tokens" not in n)
    vit_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.vision."))
    lang_params = lang_bytes / 2
    v = cfg.vision
    n_patch = v.grid_size ** 2 + 1
    image_flops = (2 * vit_params * n_patch + 4 * v.num_hidden_layers * n_patch ** 2 * v.hidden_size
                   + 2 * lang_params * (v.tokens_per_image + 20))
    rows = []
    x = proc(QUESTION, image=image(0))
    print(f"prompt: {len(x)} tokens ({x.num_vision_tokens} vision)")

    if "ttft" in only:
        first_token_time(engine, "warm", proc(QUESTION, image=image(99)))  # compile / cuDNN plans
        ttft = [first_token_time(engine, f"ttft{i}", proc(QUESTION, image=image(100 + i))) for i in range(3)]
        rows.append(dict(name="TTFT, one 1344² image + 20-token question", value=float(np.median(ttft)) * 1e3,
                         unit="ms", lower_is_better=True, floor=image_flops / matmul_flops() * 1e3,
                         floor_how=f"{image_flops / 1e12:.0f} TFLOP / {matmul_flops() / 1e12:.0f} TFLOP/s"))
        # Second turn: same image, history = first turn -> only the new tokens are computed.
        first = proc(QUESTION, image=image(100))
        second = proc("What colour is the largest object?", history=[(QUESTION, "A noisy pattern of coloured squares.")],
                      image=image(100))
        new_tokens = len(second) - len(first)
        t2 = [first_token_time(engine, f"turn2-{i}", second) for i in range(3)]
        if args.profile_turn2:
            profile_first_token(engine, second, args.profile_turn2, "second turn")
        rows.append(dict(name=f"TTFT second turn, same image (prefix cache, ~{new_tokens} new tokens)",
                         value=float(np.median(t2)) * 1e3, unit="ms", lower_is_better=True,
                         floor=lang_bytes / copy_bandwidth() * 1e3, floor_how="one pass over the language weights"))
        # A new conversation over the same image: full blocks, then the image's last rows by their tail hash
        asks = ["What colour is the largest object?", "How many squares are there?", "Is there any text?"]
        t3 = [first_token_time(engine, f"ask-{i}", proc(q, image=image(100))) for i, q in enumerate(asks)]
        print("second turn each: " + " ".join(f"{t * 1e3:.1f}" for t in t2) + " ms; new question each: "
              + " ".join(f"{t * 1e3:.1f}" for t in t3) + " ms", flush=True)
        if args.profile_ask:
            profile_first_token(engine, proc("Which corner is the brightest?", image=image(100)), args.profile_ask,
                                "new question", warm=False)
        rows.append(dict(name="TTFT new question, same image (prefix cache to the image's end)",
                         value=float(np.median(t3)) * 1e3, unit="ms", lower_is_better=True,
                         floor=lang_bytes / copy_bandwidth() * 1e3, floor_how="one pass over the language weights"))

    decode_prompts = {1: [x], 32: [proc(QUESTION, image=image(200 + i)) for i in range(32)]}
    for mode in (False, True):
        engine.config.async_scheduling = mode
        tag = "async scheduling" if mode else "synchronous"
        if "decode1" in only:
            t = steady_step_time(engine, decode_prompts[1], 129)
            rows.append(dict(name=f"decode tokens/s, batch 1, 2.3K context ({tag})", value=1.0 / t, unit="tok/s",
                             floor=copy_bandwidth() / lang_bytes,
                             floor_how=f"{lang_bytes / 1e9:.1f} GB of language weights per token at {copy_bandwidth() / 1e9:,.0f} GB/s"))
        if "decode32" in only:
            t = steady_step_time(engine, decode_prompts[32], 65)
            ctx = len(x) + 32
            kv_bytes = 32 * ctx * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
            rows.append(dict(name=f"decode step, batch 32, 2.3K context each ({tag})", value=t * 1e3, unit="ms",
                             lower_is_better=True, floor=(lang_bytes + kv_bytes) / copy_bandwidth() * 1e3,
                             floor_how=f"({lang_bytes / 1e9:.1f} GB weights + {kv_bytes / 1e9:.1f} GB KV) / {copy_bandwidth() / 1e9:,.0f} GB/s"))

    if "caption" in only:
        prompts = [proc("Describe this image.", image=image(300 + i)) for i in range(64)]
        ids = [f"cap{i}" for i in range(64)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for rid, p in zip(ids, prompts):
            engine.add_request(rid, p, SamplingParams(max_new_tokens=128, temperature=0, ignore_eos=True))
        run_until_done(engine, set(ids))
        dt = time.perf_counter() - t0
        rows.append(dict(name="captioning, 64 images x 128 new tokens", value=64 / dt, unit="img/s",
                         floor=matmul_flops() / image_flops, floor_how=f"{image_flops / 1e12:.0f} TFLOP per image"))

    peak = torch.cuda.max_memory_allocated()
    rows.append(dict(name="peak GPU memory (weights + KV pool at 0.9 utilization)", value=peak / 2**30, unit="GiB",
                     lower_is_better=True, floor=weights / 2**30, floor_how="the bf16 weights"))
    report(rows, args.out)


if __name__ == "__main__":
    main()

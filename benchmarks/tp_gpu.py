"""The engine on several GPUs: CogVLM2-19B (random bf16 weights) at TP=1 and TP=2 in one run, plus PP=2 on two
simulated 24 GB cards.

    python benchmarks/tp_gpu.py [--out tp.json] [--vision replicated,sharded] [--only ttft,decode1,decode32,caption]
                                [--all-reduce nccl,peer]
                                [--no-pp] [--card-gib 23.5]
    python benchmarks/tp_gpu.py --tiny          # the same code path on the CPU (gloo, the tiny architecture)
    python benchmarks/tp_gpu.py --enforce-eager --only decode1,decode32 --vision replicated --no-pp   # no graphs

Each configuration is a real engine (`LLMEngine` over a `ModelSpec`): TP=1 on GPU 0; TP=2 as the engine's
process (rank 0, GPU 0) plus one spawned rank (GPU 1), each building the same seed-0 random model and keeping
its shard (`benchmarks.common.RandomModel`), vision tower replicated or sharded (`--vision`). For each:

- TTFT, one 1344² image + a 20-token question (median of 3, after a warm-up),
- decode tokens/s at batch 1 over the image prompt's 2.3K context, and the decode step at batch 32
  (steady state, async scheduling, CUDA graphs with the NCCL all-reduces captured),
- captioning: 64 images x 128 new tokens, images per second,
- bf16 agreement: the greedy tokens of one image prompt against TP=1's (same weights),

each next to its floor (per-rank weight + KV bytes at the copy bandwidth, or FLOPs at the matmul rate).
Then PP=2: both GPUs capped at a 24 GB card's share (`set_per_process_memory_fraction`), the model split by
`plan_stages` and built stage by stage, the engine (eager; each layer's KV cache on its stage's GPU) answers a
one-image chat: TTFT, decode tokens/s at batch 1, peak memory per card.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RandomModel, copy_bandwidth, matmul_flops, report  # noqa: E402
from benchmarks.engine_gpu import (QUESTION, image, profile_first_token, run_until_done,  # noqa: E402
                                   steady_step_time)
from cogvlm2.engine.config import EngineConfig  # noqa: E402
from cogvlm2.engine.worker import ModelSpec  # noqa: E402
from cogvlm2.llm import LLMEngine  # noqa: E402
from cogvlm2.model.cogvlm import CogVLM2ForCausalLM  # noqa: E402
from cogvlm2.processing import Processor  # noqa: E402
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path  # noqa: E402
from cogvlm2.sampling_params import SamplingParams  # noqa: E402

GREEDY = dict(temperature=0, ignore_eos=True)


class Sizes:
    """How much each figure runs: full on the GPU, a smoke test with --tiny."""

    def __init__(self, tiny: bool):
        self.decode1, self.decode32, self.batch = (17, 9, 8) if tiny else (129, 65, 32)
        self.captions, self.caption_tokens = (8, 16) if tiny else (64, 128)
        self.agree_tokens = 8 if tiny else 16


def first_token_time(engine: LLMEngine, rid: str, inputs) -> float:
    """Seconds from add_request to the step that returns the request's first token (then run to the end)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.add_request(rid, inputs, SamplingParams(max_new_tokens=1, **GREEDY))
    while not any(out.request_id == rid for out in engine.step()):
        pass
    return time.perf_counter() - t0


def greedy_tokens(engine: LLMEngine, inputs, n: int) -> list[int]:
    engine.add_request("agree", inputs, SamplingParams(max_new_tokens=n, **GREEDY))
    done = {}
    run_until_done(engine, {"agree"}, lambda out: done.update({out.request_id: out.token_ids}))
    return done["agree"]


class Floors:
    """Per-rank floors: FLOPs at the matmul rate, bytes at the copy bandwidth (None on the CPU)."""

    def __init__(self, cfg, model_bytes: dict, gpu: bool):
        self.gpu, self.cfg = gpu, cfg
        self.lang_bytes, self.vit_params = model_bytes["lang"], model_bytes["vit_params"]
        v = cfg.vision
        n_patch = v.grid_size ** 2 + 1
        self.vit_flops = 2 * self.vit_params * n_patch + 4 * v.num_hidden_layers * n_patch ** 2 * v.hidden_size
        self.lm_flops = 2 * self.lang_bytes / 2 * (v.tokens_per_image + 20)

    def row(self, name: str, value: float, unit: str, floor_s: float | None, how: str, lower: bool = True) -> dict:
        if floor_s is None or not self.gpu:
            return dict(name=name, value=value, unit=unit, lower_is_better=lower, floor=float("nan"), floor_how="CPU")
        floor = floor_s * 1e3 if unit == "ms" else 1 / floor_s
        return dict(name=name, value=value, unit=unit, lower_is_better=lower, floor=floor, floor_how=how)

    def ttft(self, n: int, sharded_vision: bool) -> tuple[float | None, str]:
        if not self.gpu:
            return None, ""
        flops = self.vit_flops / (n if sharded_vision else 1) + self.lm_flops / n
        return flops / matmul_flops(), f"{flops / 1e12:.0f} TFLOP per rank / {matmul_flops() / 1e12:.0f} TFLOP/s"

    def decode(self, n: int, kv_bytes: float) -> tuple[float | None, str]:
        if not self.gpu:
            return None, ""
        b = (self.lang_bytes + kv_bytes) / n
        return b / copy_bandwidth(), f"{b / 1e9:.1f} GB per rank at {copy_bandwidth() / 1e9:,.0f} GB/s"


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def profile_decode(engine: LLMEngine, x, path: Path, what: str, steps: int = 32) -> None:
    """GPU time per decode step by kernel kind (all-reduces apart) and the kernel table, on the driver (rank 0):
    one request whose prompt the prefix cache holds, `steps` tokens under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.profile_gpu import all_reduce_spread, busy_fraction, kinds_line

    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        t0 = time.perf_counter()
        step = steady_step_time(engine, [x], steps)
        sync()
        wall = time.perf_counter() - t0
    line = (f"{what} under the profiler: step {step * 1e3:.2f} ms, GPU busy {busy_fraction(prof, wall):.0%}; kernel "
            f"time per step {kinds_line(prof, steps)}")
    if getattr(engine.worker, "size", 1) > 1:  # a step's all-reduces: the vocab-parallel embedding's, 2 a layer
        per_step = 2 * engine.worker.model_config.num_hidden_layers + 1
        line += f"\nall-reduce durations ({per_step} a step): {all_reduce_spread(prof, per_step)}"
    print(f"  {line}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(line + "\n\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30) + "\n")


def measure(engine: LLMEngine, proc: Processor, label: str, n: int, sharded: bool, only: set[str], sizes: Sizes,
            floors: Floors, profile_dir: str | None = None) -> list[dict]:
    rows, cfg = [], floors.cfg
    x = proc(QUESTION, image=image(0))
    vision = "sharded" if sharded else "replicated"
    if "ttft" in only:
        first_token_time(engine, f"{label}-warm", proc(QUESTION, image=image(99)))
        ttft = float(np.median([first_token_time(engine, f"{label}-ttft{i}", proc(QUESTION, image=image(100 + i)))
                                for i in range(3)]))
        rows.append(floors.row(f"{label} TTFT, one image (vision {vision})", ttft * 1e3, "ms",
                               *floors.ttft(n, sharded)))
        print(f"  {rows[-1]['name']}: {ttft * 1e3:.1f} ms", flush=True)
        if profile_dir:  # the driver's (rank 0's) host ops and GPU kernels of one more new image
            path = Path(profile_dir) / f"ttft_{_slug(label)}.txt"
            profile_first_token(engine, proc(QUESTION, image=image(150)), str(path), f"{label} TTFT", warm=False)
    if "decode1" in only:
        t = steady_step_time(engine, [x], sizes.decode1)
        kv = len(x) * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
        s, how = floors.decode(n, kv)
        rows.append(floors.row(f"{label} decode tokens/s, batch 1, {len(x)} ctx", 1 / t, "tok/s", s, how, lower=False))
        print(f"  {rows[-1]['name']}: {1 / t:.1f} tok/s", flush=True)
        if profile_dir:  # the driver's kernels (inside the CUDA graphs too) over 32 more batch-1 steps
            profile_decode(engine, x, Path(profile_dir) / f"decode1_{_slug(label)}.txt", f"{label} decode, batch 1")
    if "decode32" in only:
        prompts = [proc(QUESTION, image=image(200 + i)) for i in range(sizes.batch)]
        t = steady_step_time(engine, prompts, sizes.decode32)
        kv = sizes.batch * (len(x) + 32) * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
        rows.append(floors.row(f"{label} decode step, batch {sizes.batch}, {len(x)} ctx each", t * 1e3, "ms",
                               *floors.decode(n, kv)))
        print(f"  {rows[-1]['name']}: {t * 1e3:.2f} ms", flush=True)
    if "caption" in only:
        prompts = [proc("Describe this image.", image=image(300 + i)) for i in range(sizes.captions)]
        ids = [f"{label}-cap{i}" for i in range(sizes.captions)]
        t0 = time.perf_counter()
        for rid, p in zip(ids, prompts):
            engine.add_request(rid, p, SamplingParams(max_new_tokens=sizes.caption_tokens, **GREEDY))
        run_until_done(engine, set(ids))
        rate = sizes.captions / (time.perf_counter() - t0)
        s, how = floors.ttft(n, sharded)
        rows.append(floors.row(f"{label} captioning, {sizes.captions} images x {sizes.caption_tokens} tokens "
                               f"(vision {vision})", rate, "img/s", s, how and f"prefill FLOPs: {how}", lower=False))
        print(f"  {rows[-1]['name']}: {rate:.2f} img/s", flush=True)
    return rows


def release_memory() -> None:
    """After the caller dropped its last reference to an engine: collect it (cycles included), hand its
    blocks back to CUDA and say what is left (the next engine sizes its KV pool from free memory)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        print(f"  memory still allocated on GPU 0: {torch.cuda.memory_allocated(0) / 2**30:.2f} GiB", flush=True)


def run_pp(factory: RandomModel, proc: Processor, devices: list[str], card_gib: float, sizes: Sizes) -> dict:
    """PP=2 on two GPUs capped at card_gib each: TTFT and decode tokens/s of a one-image chat, peak memory."""
    from benchmarks.pp_gpu import staged_random_model

    gpu = devices[0].startswith("cuda")
    if gpu:
        for i in range(2):
            total = torch.cuda.get_device_properties(i).total_memory
            torch.cuda.set_per_process_memory_fraction(card_gib * 2**30 / total, i)
            torch.cuda.reset_peak_memory_stats(i)
    model = staged_random_model(factory.config(), devices, torch.bfloat16 if gpu else torch.float32)
    print(model.stages.plan.describe(), flush=True)
    cfg = EngineConfig(max_num_seqs=4, num_kv_blocks=1024 if gpu else 96, max_model_len=None if gpu else 512)
    engine = LLMEngine(model, cfg, proc)
    x = proc(QUESTION, image=image(0))
    first_token_time(engine, "pp-warm", proc(QUESTION, image=image(1)))
    ttft = first_token_time(engine, "pp-ttft", x)
    t = steady_step_time(engine, [x], sizes.decode1)
    out = {"ttft_ms": ttft * 1e3, "decode_tok_s": 1 / t, "plan": model.stages.plan.describe(),
           "graphs": engine.runner.graphs is not None}
    if gpu:
        out["peak_gib"] = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(2)]
    where = f"{card_gib} GiB per card" if gpu else "CPU"
    peak = f", peak {out['peak_gib'][0]:.1f} / {out['peak_gib'][1]:.1f} GiB" if gpu else ""
    print(f"PP=2 ({where}): TTFT {out['ttft_ms']:.0f} ms, decode {out['decode_tok_s']:.1f} tok/s "
          f"(engine, eager, batch 1){peak}")
    engine.shutdown()
    del engine, model
    release_memory()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--tiny", action="store_true", help="the tiny architecture on the CPU (gloo): a smoke test")
    ap.add_argument("--tp", type=int, default=2, help="the tensor-parallel size compared with TP=1")
    ap.add_argument("--vision", default="replicated,sharded",
                    help="TP runs by vision tower: replicated, sharded, both, or none (TP=1 and PP only)")
    ap.add_argument("--only", default="ttft,decode1,decode32,caption")
    ap.add_argument("--no-pp", action="store_true", help="skip the PP=2 run on simulated 24 GB cards")
    ap.add_argument("--card-gib", type=float, default=23.5, help="PP: memory each GPU may use (a 24 GB card's share)")
    ap.add_argument("--all-reduce", default="nccl", help="TP runs by all-reduce of small messages: nccl (the engine's "
                    "default), peer (the one-shot peer-to-peer kernel, ModelSpec.peer_all_reduce), or both (nccl,peer)")
    ap.add_argument("--profile-ttft", metavar="DIR",
                    help="also profile one TTFT and 32 batch-1 decode steps per configuration (torch.profiler on the "
                    "driver, rank 0): kernel / op tables (TTFT: traces) into DIR")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (the cost of eager TP decode)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    gpu = not args.tiny
    if gpu and torch.cuda.device_count() < args.tp:
        sys.exit(f"needs {args.tp} GPUs (or --tiny)")
    t_start = time.perf_counter()
    factory = RandomModel(tiny=args.tiny)
    mcfg = factory.config()
    proc = Processor(mcfg, Tokenizer(bundled_tokenizer_path()))
    with torch.device("meta"):  # the byte counts of the floors: no weights needed
        shape = CogVLM2ForCausalLM(mcfg)
    elem = 2 if gpu else 4
    model_bytes = {"lang": sum(p.numel() * elem for k, p in shape.named_parameters()
                               if "vision" not in k and "embed_tokens" not in k),
                   "vit_params": sum(p.numel() for k, p in shape.named_parameters() if k.startswith("model.vision."))}
    floors = Floors(mcfg, model_bytes, gpu)
    sizes = Sizes(args.tiny)
    engine_cfg = dict(max_num_seqs=64, max_num_batched_tokens=8192, gpu_memory_utilization=0.9) if gpu else \
        dict(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512, num_kv_blocks=256)
    engine_cfg["enforce_eager"] = args.enforce_eager
    device, dtype = ("cuda", "bfloat16") if gpu else ("cpu", "float32")
    runs = [("TP=1", 1, False, True)] + [
        (f"TP={args.tp} {v} vision" + ("" if ar == "nccl" else f" {ar} all-reduce"), args.tp, v == "sharded",
         ar == "peer")
        for v in args.vision.split(",") if v in ("replicated", "sharded") for ar in args.all_reduce.split(",")]
    rows, agree, reference = [], {}, None
    for label, n, sharded, peer in runs:
        t0 = time.perf_counter()
        spec = ModelSpec(factory, dtype, device, tensor_parallel_size=n, shard_vision=sharded, peer_all_reduce=peer)
        engine = LLMEngine(spec, EngineConfig(**engine_cfg), proc)
        print(f"{label}: engine up in {time.perf_counter() - t0:.0f} s; KV pool {engine.block_manager.num_blocks} "
              f"blocks; graphs {engine.runner.graphs.sizes if engine.runner.graphs else None}", flush=True)
        tokens = greedy_tokens(engine, proc(QUESTION, image=image(0)), sizes.agree_tokens)
        reference = reference or tokens
        agree[label] = sum(a == b for a, b in zip(tokens, reference))
        print(f"  greedy tokens equal to TP=1's: {agree[label]}/{len(reference)}", flush=True)
        rows += measure(engine, proc, label, n, sharded, only - ({"decode1", "decode32"} if sharded else set()),
                        sizes, floors, args.profile_ttft)
        engine.shutdown()  # a tensor-parallel group's ranks
        del engine  # the loop's own reference: the next engine must not be built beside this one
        release_memory()
    pp = None
    if not args.no_pp:
        pp = run_pp(factory, proc, ["cuda:0", "cuda:1"] if gpu else ["cpu", "cpu"], args.card_gib, sizes)
    report(rows, args.out)
    one = {r["name"][5:].split(" (")[0]: r for r in rows if r["name"].startswith("TP=1 ")}
    for label, *_ in runs[1:]:
        for r in rows:
            what = r["name"][len(label) + 1:].split(" (")[0]
            if r["name"].startswith(label + " ") and what in one:
                a, b = one[what]["value"], r["value"]
                print(f"speed-up {label} / TP=1, {what}: {a / b if r['lower_is_better'] else b / a:.2f}x "
                      f"({a:.2f} -> {b:.2f} {r['unit']})")
    print(f"greedy agreement with TP=1: {agree}; total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        import json

        data = json.loads(Path(args.out).read_text())
        data.update(agreement=agree, pp=pp)
        Path(args.out).write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()

"""A / B of decode switches in one process: the full-size model with random bf16 weights built once, then for each
setting a new engine (its CUDA graphs captured under that setting) and decode steps at batch 1 and / or batch 32,
the settings taken in turn several rounds (A B A B ...) so drift of the card shows as spread, not as a difference.

A setting is `module.ATTR=value[;module.ATTR=value...]` over cogvlm2's modules (values: 0 / 1 for switches, or a
Python literal; `--quant int4` with e.g. `--set "quant.triton_kernels.A8_FUSED={'sum': True, 'quant': False,
'pdl': True}"` for the 4-bit kernels), e.g. the QKV projection + rotary + K/V store kernel off and on:

    PYTHONPATH=. python benchmarks/decode_ab.py --set "model.ops.DECODE_QKV_ROTARY=0" \
        --set "model.ops.DECODE_QKV_ROTARY=1" --rounds 2 --batches 1 --out ab.json

`--ttft N` also times N one-image prefills (the median, and each in `ttft_each_ms`; engine_gpu.py's TTFT, a new
image each) per setting and round, e.g. the vision tower's fused residual under fp8 (`--batches ''` for TTFT alone):

    PYTHONPATH=. python benchmarks/decode_ab.py --quant fp8 --set "model.ops.VISION_ADD_NORM=0" \
        --set "model.ops.VISION_ADD_NORM=1" --batches '' --ttft 3

`--busy N` keeps N processes spinning on the host's cores while timing (a slower host, as in the lent machine's slow
rounds), e.g. whether the vision tower's CUDA graph keeps fp8's prefill fed from a slow host:

    PYTHONPATH=. python benchmarks/decode_ab.py --quant fp8 --set "engine.vision_graph.VISION_GRAPH=0" \
        --set "engine.vision_graph.VISION_GRAPH=1" --batches '' --ttft 5 --busy 16

Every setting's engine also records its KV cache's blocks (`kv_blocks`: what a setting's graph pools cost).

`blas=NAME` picks torch's BLAS library for a setting's matmuls (`default`, `cublas`, `cublaslt`;
torch.backends.cuda.preferred_blas_library), e.g. whether cuBLASLt's kernels read batch 32's small weights (the
attention's QKV and dense, 78% / 63% of copy bandwidth under cuBLAS) faster:

    PYTHONPATH=. python benchmarks/decode_ab.py --set "blas=default" --set "blas=cublaslt" --batches 32 --ttft 3
"""

from __future__ import annotations

import argparse
import ast
import gc
import importlib
import json
import multiprocessing
from contextlib import ExitStack, contextmanager
from unittest import mock

import numpy as np
import torch

from benchmarks.common import copy_bandwidth, full_size_config, random_model
from benchmarks.engine_gpu import QUESTION, first_token_time, image, steady_step_time
from cogvlm2.engine.config import EngineConfig
from cogvlm2.llm import LLMEngine
from cogvlm2.processing import Processor
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path


BLAS_LIBRARIES = ("default", "cublas", "cublaslt")


@contextmanager
def blas_library(name: str):
    """torch's BLAS library for CUDA matmuls (torch.backends.cuda.preferred_blas_library) while the setting's engine
    is built and timed (its CUDA graphs capture the GEMM kernels that library picks), the previous one after."""
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def parse_setting(text: str) -> list[tuple[object, str, object]]:
    """'model.ops.DECODE_GEMV=0;pdl.ENABLED=1' -> [(module, attr, value), ...]; unknown names are an error.
    `blas=cublaslt` (or cublas, default) is torch's BLAS library for the setting: (None, "blas", name)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, raw = part.partition("=")
        if name == "blas":
            if raw not in BLAS_LIBRARIES:
                raise SystemExit(f"--set {part!r}: blas is one of {', '.join(BLAS_LIBRARIES)}")
            out.append((None, "blas", raw))
            continue
        mod_name, _, attr = name.rpartition(".")
        if not raw or not mod_name:
            raise SystemExit(f"--set {part!r}: expected module.ATTR=value")
        module = importlib.import_module(f"cogvlm2.{mod_name}")
        if not hasattr(module, attr):
            raise SystemExit(f"--set {part!r}: cogvlm2.{mod_name} has no {attr}")
        value = ast.literal_eval(raw)
        if isinstance(getattr(module, attr), bool):
            value = bool(value)
        out.append((module, attr, value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", required=True, dest="settings", help="one setting (see above)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", default="1", help="comma-separated decode batches (1, 32)")
    ap.add_argument("--ttft", type=int, default=0, help="also time this many one-image prefills a setting and round")
    ap.add_argument("--quant", help="the model quantized to this mode first (cogvlm2.quant.quantize_model), e.g. int4")
    ap.add_argument("--busy", type=int, default=0,
                    help="this many busy-looping host processes while timing: a slower host, as the lent machine's "
                         "slow rounds (does a setting keep the GPU fed when the launching thread runs slower?)")
    ap.add_argument("--out")
    args = ap.parse_args()
    settings = [(s, parse_setting(s)) for s in args.settings]
    batches = [int(b) for b in args.batches.split(",") if b]
    cfg = full_size_config()
    model = random_model(cfg)
    if args.quant:
        from cogvlm2.quant import quantize_model

        quantize_model(model, args.quant, model.device, use_bitsandbytes=False if args.quant != "int8" else None)
        torch.cuda.empty_cache()
    lang_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if "vision" not in n and "embed_tokens" not in n)
    proc = Processor(cfg, Tokenizer(bundled_tokenizer_path()))
    prompts = {1: [proc(QUESTION, image=image(0))], 32: [proc(QUESTION, image=image(200 + i)) for i in range(32)]}
    results: dict[str, dict[str, list[float]]] = {s: {} for s, _ in settings}
    print(f"copy {copy_bandwidth() / 1e9:,.0f} GB/s; language weights {lang_bytes / 1e9:.1f} GB", flush=True)
    with busy_host(args.busy):
        run_rounds(args, settings, batches, model, proc, prompts, results)
    summary = {s: {k: {"median": float(np.median(v)), "all": v} for k, v in d.items()} for s, d in results.items()}
    for s, d in summary.items():
        print(f"{s}: " + ", ".join(f"{k} {v['median']:.2f}" for k, v in d.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": copy_bandwidth() / 1e9,
                       "busy_host_processes": args.busy, "settings": summary}, f, indent=1)


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy_host(n: int):
    """n processes spinning on the host's cores while the block runs (none when n is 0), stopped after."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join()


def run_rounds(args, settings, batches, model, proc, prompts, results) -> None:
    """Every setting in turn, args.rounds times: a new engine each, timed into results[setting][figure]."""
    for r in range(args.rounds):
        for text, patches in settings:
            with ExitStack() as stack:
                for module, attr, value in patches:
                    stack.enter_context(blas_library(value) if module is None else
                                        mock.patch.object(module, attr, value))
                engine = LLMEngine(model, EngineConfig(max_num_seqs=64, max_num_batched_tokens=8192,
                                                       gpu_memory_utilization=0.9), proc)
                results[text].setdefault("kv_blocks", []).append(engine.block_manager.num_blocks)  # graph pools cost
                if args.ttft:
                    first_token_time(engine, f"warm{r}", proc(QUESTION, image=image(99)))  # compile, plans
                    each = [first_token_time(engine, f"ttft{r}-{i}", proc(QUESTION, image=image(100 + i))) * 1e3
                            for i in range(args.ttft)]
                    results[text].setdefault("ttft_ms", []).append(float(np.median(each)))
                    results[text].setdefault("ttft_each_ms", []).extend(each)  # every prefill: a slow one shows
                    print(f"round {r} [{text}] ttft_ms {np.median(each):.2f} (each: "
                          + " ".join(f"{t:.1f}" for t in each) + ")", flush=True)
                for b in batches:
                    t = steady_step_time(engine, prompts[b], 129 if b == 1 else 65)
                    key = "decode1_tok_s" if b == 1 else f"decode{b}_step_ms"
                    results[text].setdefault(key, []).append(1.0 / t if b == 1 else t * 1e3)
                    print(f"round {r} [{text}] {key} {results[text][key][-1]:.2f}", flush=True)
                del engine
                gc.collect()
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

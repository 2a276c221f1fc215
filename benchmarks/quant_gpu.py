"""Quantization on one GPU: full-size cogvlm2-llama3-chat-19B architecture, random weights, every mode beside
bf16 from the same run (same seed, so the same weights before quantization).

Measures the issue's goal table — weights in GPU memory and the peak of a 2.3K-token chat with one image
(4K context) for int4 in the official fp4 layout; decode tok/s at batch 1 and the batch-32 step for the
4-bit formats (fp4-dq: the official layout with 8-bit absmax); TTFT and captioning (64 images x 128 tokens)
for fp8 — and the error of each mode against
bf16 on the same weights: relative error of every decoder layer's output and of the vision embeddings,
relative error of sampled linears on their real inputs, top-1 agreement of the prefill logits over all
positions of a 2.6K-token prompt (image + text). Also a small sweep of the 4-bit kernels' launch configs
(achieved GB/s on the real shapes). Built to finish in one call of < 8 minutes on an H200: each section is
guarded (a failure is recorded, the rest runs), a time budget skips what no longer fits, and the JSON +
markdown summary is rewritten after every section.

    PYTHONPATH=. python benchmarks/quant_gpu.py [--out-dir $OUT] [--budget-s 450] [--modes fp4,int4,fp8,int8]
    PYTHONPATH=. python benchmarks/quant_gpu.py --modes bf16,fp4,int4 --sections sweep,decode   # ~4 min
    PYTHONPATH=. python benchmarks/quant_gpu.py --modes '' --sections sweep,lmstep   # kernels only, ~90 s

lmstep: the LM's linears of one decode step (32 layers x 5 shapes, distinct random codes) in one CUDA graph at
batch 1, 16, 32 and 64 for int4, fp4 and bf16 (cuBLAS): ms and GB/s of weights.

The sweep times each candidate launch config of the 4-bit kernels (triton_kernels.CANDIDATES) inside a CUDA
graph, as decode runs them, and installs the best for the rest of the run; the report lists every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from benchmarks.common import ceilings, cuda_time, full_size_config, provenance, random_model
from benchmarks.engine_gpu import QUESTION, first_token_time, image, run_until_done, steady_step_time
from cogvlm2.engine.config import EngineConfig
from cogvlm2.engine.vision_graph import VisionGraph, graph_frames
from cogvlm2.llm import LLMEngine
from cogvlm2.model.attention import PaddedKVCache
from cogvlm2.model.batch import ForwardBatch
from cogvlm2.processing import Processor
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path
from cogvlm2.quant import formats, quantize_model, weight_bytes
from cogvlm2.quant import linear as quant_linear
from cogvlm2.sampling_params import SamplingParams

T0 = time.perf_counter()
DEVICE = "cuda"
SECTIONS = ("sweep", "lmstep", "errors", "peak", "ttft", "decode", "caption")
SAMPLED_LINEARS = [f"model.layers.{i}.{m}" for i in (0, 15, 31) for m in (
    "self_attn.language_expert_query_key_value", "self_attn.vision_expert_query_key_value",
    "mlp.language_mlp.down_proj", "mlp.vision_mlp.gate_proj")] + [
    f"model.vision.transformer.layers.{i}.{m}" for i in (0, 31, 62) for m in ("attention.query_key_value", "mlp.fc2")
] + ["model.vision.linear_proj.dense_h_to_4h"]


class Run:
    """Results, the time budget, and the summary files (rewritten after every section)."""

    def __init__(self, out_dir: Path, budget_s: float):
        self.out_dir, self.budget_s = out_dir, budget_s
        self.base_bytes = 0  # allocated before the current model was built (not part of its figures)
        self.data = {"provenance": provenance(), "budget_s": budget_s, "modes": {}, "errors": {}, "failures": [],
                     "skipped": [], "fp8_knobs_flipped": [f"{k}={v}" for k, v in flipped_knobs()]}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - T0)

    def section(self, name: str, fn, need_s: float = 0.0):
        if self.left() < need_s:
            print(f"[{time.perf_counter() - T0:6.1f}s] skip {name}: {self.left():.0f}s left, needs ~{need_s:.0f}s",
                  flush=True)
            self.data["skipped"].append(name)
            return None
        print(f"[{time.perf_counter() - T0:6.1f}s] {name} ...", flush=True)
        try:
            return fn()
        except Exception as e:  # keep going: one broken section must not lose the others
            traceback.print_exc()
            self.data["failures"].append(f"{name}: {type(e).__name__}: {e}"[:500])
            return None
        finally:
            self.save()

    def put(self, mode: str, key: str, value) -> None:
        self.data["modes"].setdefault(mode, {})[key] = value
        print(f"    {mode:<5} {key:<36} {value if not isinstance(value, float) else round(value, 3)}", flush=True)

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "quant.json").write_text(json.dumps(self.data, indent=2))
        (self.out_dir / "quant.md").write_text(markdown(self.data))


def markdown(d: dict) -> str:
    m, e = d["modes"], d["errors"]
    p = d["provenance"]

    def cell(mode, key, fmt="{:.1f}"):
        v = m.get(mode, {}).get(key)
        return "—" if v is None else fmt.format(v)

    lines = [f"# Quantization benchmark ({p.get('card')}, {p.get('date')}, commit {p.get('commit')})", ""]
    if "ceilings" in d:
        c = d["ceilings"]
        lines += [f"Measured ceilings: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['bf16_TFLOPs']:.0f} TFLOP/s.", ""]
    if d.get("embeddings_on_host"):
        lines += ["Token embedding tables in host memory (--embeddings-on-host): not in the GPU figures.", ""]
    modes = ("bf16", "fp4", "fp4-dq", "int4", "fp8", "int8")
    knobs = [tuple(kv.split("=")) for kv in d.get("fp8_knobs_flipped", [])]
    lines += ["| figure | bf16 | fp4 (official int4 layout) | fp4-dq (8-bit absmax) | int4 (group 128) | fp8 | "
              "int8 (LLM.int8) |", "|---|---|---|---|---|---|---|"]
    for title, key, fmt in [("weights in GPU memory (GiB)", "weights_GiB", "{:.2f}"),
                            ("peak, 2.3K-token chat + 1 image, 4K context (GiB)", "peak_chat_GiB", "{:.2f}"),
                            ("decode tok/s, batch 1, 2.3K context", "decode1_tok_s", "{:.0f}"),
                            ("decode step, batch 32 (ms)", "decode32_step_ms", "{:.2f}"),
                            ("TTFT, one 1344² image + question (ms)", "ttft_ms", "{:.0f}"),
                            *[(f"TTFT, fp8 with {k}={v} (ms)", f"ttft_ms_{k}={v}", "{:.0f}") for k, v in knobs],
                            ("captioning img/s (64 x 128 tokens)", "caption_img_s", "{:.2f}"),
                            *[(f"captioning img/s, fp8 with {k}={v}", f"caption_img_s_{k}={v}", "{:.2f}")
                              for k, v in knobs if k == "FP8_ATTENTION"]]:
        lines.append(f"| {title} | " + " | ".join(cell(k, key, fmt) for k in modes) + " |")
    if e:
        lines += ["", "Error against bf16 on the same random weights:", "",
                  "| mode | top-1 prefill agreement | logits rel. err | decoder layers rel. err (first / mean / last) "
                  "| vision embeddings rel. err | sampled linears rel. err (mean / max) |", "|---|---|---|---|---|---|"]
        for mode, r in e.items():
            layers = r.get("layer_rel_err") or [float("nan")]
            lin = list(r.get("linear_rel_err", {}).values()) or [float("nan")]
            lines.append(f"| {mode} | {r.get('top1_agreement', float('nan')):.4f} over {r.get('positions')} positions "
                         f"| {r.get('logits_rel_err', float('nan')):.4f} | {layers[0]:.4f} / {np.mean(layers):.4f} / "
                         f"{layers[-1]:.4f} | {r.get('vision_rel_err', float('nan')):.4f} | "
                         f"{np.mean(lin):.4f} / {np.max(lin):.4f} |")
    if d.get("kernel_sweep"):
        lines += ["", "4-bit kernel launch configs (BLOCK_N, BLOCK_K, warps, stages, SPLIT_K): achieved GB/s of "
                  "packed weights (the five LM shapes in one CUDA graph):", ""]
        for key, rows in d["kernel_sweep"].items():
            best = max(rows, key=lambda r: r["GBps"])
            lines.append(f"- {key}: " + ", ".join(f"{tuple(r['config'])} {r['GBps']:.0f}" for r in rows)
                         + f" -> best {tuple(best['config'])}")
        lines.append(f"- used for the rest of the run: {d.get('kernel_configs')}, one row: {d.get('one_row')}, "
                     f"fp4 GEMV decoded from bits (else the table): {d.get('fp4_arith')}")
    if d.get("lm_step"):
        lines += ["", "LM linears of one decode step (32 layers x 5 shapes, one CUDA graph): ms (GB/s of weights):", ""]
        for fmt, r in d["lm_step"].items():
            lines.append(f"- {fmt}: " + ", ".join(f"{b} {v['ms']:.3f} ms ({v['GBps']:.0f} GB/s)" for b, v in r.items()))
    if d["failures"] or d["skipped"]:
        lines += ["", "Failures: " + ("; ".join(d["failures"]) or "none"),
                  "Skipped (time budget): " + (", ".join(d["skipped"]) or "none")]
    return "\n".join(lines) + "\n"


FP8_KNOBS = ("FP8_FUSE", "FP8_FAST_ACCUM", "FP8_ATTENTION")


def flipped_knobs() -> list[tuple[str, bool]]:
    """Each fp8 knob of cogvlm2.quant.linear set the other way from its default: the TTFT and error variants."""
    return [(k, not getattr(quant_linear, k)) for k in FP8_KNOBS]


def free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


EMBEDDINGS_ON_HOST = False  # --embeddings-on-host: every model's token embedding table in host memory


def build(cfg, mode: str):
    """The random bf16 model (seed 0) quantized to `mode` in place, one layer at a time on the GPU (with
    EMBEDDINGS_ON_HOST, its token embedding table then moved to page-locked host memory)."""
    model = random_model(cfg, DEVICE)
    if mode != "bf16":
        quantize_model(model, mode, DEVICE, use_bitsandbytes=False if mode != "int8" else None)
    if EMBEDDINGS_ON_HOST:
        from cogvlm2.model.host_embedding import move_embeddings_to_host

        move_embeddings_to_host(model)
    free()
    return model


# ---------------------------------------------------------------------------------------------- errors
@torch.inference_mode()
def prefill_outputs(model, x, capture: dict | None = None):
    """Prefill the whole prompt once: (top-1 ids [N], logits [N, V] bf16 of 256 text rows, per-layer hidden
    [L][N, D], vision embeddings); with `capture`, the inputs / outputs of SAMPLED_LINEARS (first 512 rows)."""
    cfg, dev = model.config, DEVICE
    n = len(x)
    cache = PaddedKVCache(1, cfg.num_hidden_layers)
    cache.begin_step(torch.ones(1, n, dtype=torch.bool, device=dev))
    embeds = model.encode_images(x.pixel_values.to(dev))
    idx = torch.tensor([i for i, t in enumerate(x.token_type_ids) if t], device=dev)
    hooks = []
    if capture is not None:
        names = {n for n, _ in model.named_modules()}
        for name in [n for n in SAMPLED_LINEARS if n in names]:
            def hook(mod, args, out, name=name):
                capture.setdefault(name, (args[0].reshape(-1, args[0].shape[-1])[:512].clone(),
                                          out.reshape(-1, out.shape[-1])[:512].clone()))
            hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        h, hidden = model(ForwardBatch(torch.tensor(x.input_ids, device=dev), torch.tensor(x.position_ids, device=dev),
                                       cache, embeds.reshape(-1, embeds.shape[-1]), idx, x.expert_segments),
                          output_hidden_states=True)
    finally:
        for hk in hooks:
            hk.remove()
    top1 = torch.cat([model.compute_logits(h[i:i + 512]).argmax(-1) for i in range(0, n, 512)])
    logits = model.compute_logits(h[-256:]).to(torch.bfloat16)
    return top1, logits, [t.to(torch.bfloat16) for t in hidden[1:]], embeds.to(torch.bfloat16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def errors(run: Run, mode: str, model, ref: dict, x, knob: tuple[str, object] | None = None) -> None:
    """mode's error against bf16; knob (name, value): with that setting of cogvlm2.quant.linear (an fp8 variant),
    recorded as 'mode +name'."""
    if knob is not None:
        with mock.patch.object(quant_linear, *knob):
            return errors(run, f"{mode} {knob[0]}={knob[1]}", model, ref, x)
    top1, logits, hidden, embeds = prefill_outputs(model, x)
    r = {"positions": int(top1.numel()), "top1_agreement": (top1 == ref["top1"]).float().mean().item(),
         "logits_rel_err": rel(logits, ref["logits"]), "vision_rel_err": rel(embeds, ref["embeds"]),
         "layer_rel_err": [rel(a, b) for a, b in zip(hidden, ref["hidden"])]}
    with torch.inference_mode():
        r["linear_rel_err"] = {name: rel(model.get_submodule(name)(xin), yout)
                               for name, (xin, yout) in ref["linears"].items()}
    run.data["errors"][mode] = r
    print(f"    {mode}: top-1 agreement {r['top1_agreement']:.4f}, logits {r['logits_rel_err']:.4f}, last layer "
          f"{r['layer_rel_err'][-1]:.4f}, vision {r['vision_rel_err']:.4f}", flush=True)


# ---------------------------------------------------------------------------------------------- engine
def engine_for(model, proc, **kw) -> LLMEngine:
    cfg = dict(max_num_seqs=64, max_num_batched_tokens=8192, gpu_memory_utilization=0.9)
    return LLMEngine(model, EngineConfig(**{**cfg, **kw}), proc)


def peak_chat(run: Run, mode: str, model, proc, x) -> None:
    """Peak allocated for one chat (2.3K-token prompt with an image, 128 new tokens) with a 4K-context pool."""
    free()
    torch.cuda.reset_peak_memory_stats()
    engine = engine_for(model, proc, max_num_seqs=1, max_model_len=4096, num_kv_blocks=4096 // 16,
                        max_num_batched_tokens=4096)
    engine.add_request("chat", x, SamplingParams(max_new_tokens=128, temperature=0, ignore_eos=True))
    run_until_done(engine, {"chat"})
    torch.cuda.synchronize()
    run.put(mode, "peak_chat_GiB", (torch.cuda.max_memory_allocated() - run.base_bytes) / 2**30)
    del engine
    free()


@contextmanager
def fp8_knob(engine: LLMEngine, knob: str, value):
    """cogvlm2.quant.linear's knob set to value for the block, with the engine's vision-tower CUDA graph (when it
    has one) captured again under it: the graph captured at engine build replays the kernels of the default
    settings (the language model's prefill runs eagerly and follows the knob by itself)."""
    runner = engine.runner
    saved = runner.vision_graph
    with mock.patch.object(quant_linear, knob, value):
        if saved is not None:
            runner.vision_graph = VisionGraph(runner.model, graph_frames(runner.model))
        try:
            yield
        finally:
            runner.vision_graph = saved


def engine_figures(run: Run, mode: str, model, proc, x, want: set[str]) -> None:
    engine = engine_for(model, proc)
    if "ttft" in want:
        def ttft(key="ttft_ms", seed=100):
            first_token_time(engine, f"warm{seed}", proc(QUESTION, image=image(seed - 1)))
            t = [first_token_time(engine, f"ttft{seed + i}", proc(QUESTION, image=image(seed + i))) for i in range(3)]
            run.put(mode, key, float(np.median(t)) * 1e3)
        run.section(f"{mode}: TTFT", ttft, 10)
        if mode == "fp8":  # the fp8 knobs, one at a time, on the same engine (its tower graph captured again)
            def variant(knob, value, key, seed):
                with fp8_knob(engine, knob, value):
                    ttft(key, seed)
            for i, (knob, value) in enumerate(flipped_knobs()):
                run.section(f"fp8: TTFT with {knob}={value}",
                            lambda knob=knob, value=value, i=i: variant(knob, value, f"ttft_ms_{knob}={value}",
                                                                        110 + 10 * i), 10)
    if "decode1" in want:
        run.section(f"{mode}: decode batch 1",
                    lambda: run.put(mode, "decode1_tok_s", 1.0 / steady_step_time(engine, [x], 129)), 10)
    if "decode32" in want:
        prompts = [proc(QUESTION, image=image(200 + i)) for i in range(32)]
        run.section(f"{mode}: decode batch 32",
                    lambda: run.put(mode, "decode32_step_ms", steady_step_time(engine, prompts, 65) * 1e3), 25)
    if "caption" in want:
        def caption(key="caption_img_s", seed=300):  # new images each run: the prefix cache would serve repeats
            prompts = [proc("Describe this image.", image=image(seed + i)) for i in range(64)]
            ids = [f"cap{i}" for i in range(64)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for rid, p in zip(ids, prompts):
                engine.add_request(rid, p, SamplingParams(max_new_tokens=128, temperature=0, ignore_eos=True))
            run_until_done(engine, set(ids))
            run.put(mode, key, 64 / (time.perf_counter() - t0))
        run.section(f"{mode}: captioning", caption, 45)
        if mode == "fp8":  # the fp8 attention gains most on the several images of a captioning step
            knob, value = next(kv for kv in flipped_knobs() if kv[0] == "FP8_ATTENTION")
            with fp8_knob(engine, knob, value):
                run.section(f"fp8: captioning with {knob}={value}",
                            lambda: caption(f"caption_img_s_{knob}={value}", seed=400), 45)
    engine = None  # the closures above are done with it: free its KV pool and graphs before the next mode
    free()


def a8_decode(run: Run, model, proc, x, variant: str) -> None:
    """int4 decode batch 1 with triton_kernels.A8_FUSED set to `variant` ('off' or e.g. 'sum+quant+pdl') in a new
    engine (its CUDA graphs capture the kernels as set), recorded as 'decode1_tok_s A8 variant'; A8_FUSED restored."""
    from cogvlm2.quant import triton_kernels as tk

    saved = dict(tk.A8_FUSED)
    parts = set() if variant == "off" else set(variant.split("+"))
    tk.A8_FUSED.update({k: k in parts for k in tk.A8_FUSED})
    try:
        engine = engine_for(model, proc)
        run.put("int4", f"decode1_tok_s A8 {variant}", 1.0 / steady_step_time(engine, [x], 129))
    finally:
        tk.A8_FUSED.update(saved)
        engine = None
        free()


# ---------------------------------------------------------------------------------------------- kernels
# [N, K] of the LM's linears: qkv, dense, gate, up, down
LM_SHAPES = [(6144, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def _packed(fmt: str, n: int, k: int, seed: int = 0) -> tuple:
    """Random codes and statistics of one [n, k] layer in `fmt` (timing does not depend on the values)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if fmt == "fp4":
        p = torch.randint(0, 256, (n * k // 2, 1), dtype=torch.uint8, device="cuda", generator=g)
        return p, torch.rand(n * k // 64, device="cuda", generator=g) + 0.5
    qw = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda", generator=g)
    qz = torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), dtype=torch.int32, device="cuda", generator=g)
    return qw, qz, (torch.rand(k // 128, n, device="cuda", generator=g) * 0.01).bfloat16()


def _nbytes(t: tuple) -> int:
    return sum(x.numel() * x.element_size() for x in t)


def _call(fmt: str, x: torch.Tensor, w: tuple, n: int, lut: torch.Tensor, table):
    from cogvlm2.quant import triton_kernels as tk

    if fmt == "fp4":
        return tk.fp4_linear(x, w[0], w[1], lut, n, is_fp4=True, table=table)
    return tk.int4_linear(x, *w, 128)


def _graph_time(calls: list, repeat: int = 1) -> float:
    """Seconds per pass over `calls`, replayed from one CUDA graph (as decode runs them)."""
    for c in calls:  # compile outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            for c in calls:
                c()
    t = cuda_time(graph.replay, warmup=2, iters=7) / repeat
    del graph
    return t


def kernel_sweep(run: Run) -> None:
    """Achieved GB/s (packed weight + statistics read once) of the 4-bit kernels on the LM's five decode shapes in
    one CUDA graph (~110 MB of codes, more than the L2), for the launch configs of triton_kernels.CANDIDATES:
    the GEMV at 1 row (fp4 also with codes from the table), the tensor-core tile at 32 rows, and the best two
    tiles at 1 row (ONE_ROW). Each config is first checked against the reference dequantization. The best per
    path is installed for the rest of the run (and reported)."""
    from cogvlm2.quant import triton_kernels as tk

    lut = formats.code_table("fp4", "cuda")
    table = tk.pair_table(lut, torch.bfloat16, True)
    weights = {fmt: [_packed(fmt, n, k, i) for i, (n, k) in enumerate(LM_SHAPES)] for fmt in ("fp4", "int4")}
    w = torch.randn(200, 4096, device="cuda") / 64  # correctness probe: N not a multiple of the tiles
    probe = {"fp4": formats.quantize_4bit(w, "fp4"), "int4": formats.quantize_int4(w)}
    probe["int4"] = (*probe["int4"][:2], probe["int4"][2].bfloat16())
    ref = {"fp4": formats.dequantize_4bit(*probe["fp4"], lut, (200, 4096), torch.bfloat16).float(),
           "int4": formats.dequantize_int4(*probe["int4"], torch.bfloat16).float()}
    run.data["kernel_sweep"] = {}

    def speed(fmt: str, m: int) -> tuple[float, float]:
        xp = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        err = rel(_call(fmt, xp, probe[fmt], 200, lut, table), xp.float() @ ref[fmt].t())
        calls, nbytes = [], 0
        for (n, k), wt in zip(LM_SHAPES, weights[fmt]):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nbytes += _nbytes(wt)
            calls.append(lambda x=x, wt=wt, n=n: _call(fmt, x, wt, n, lut, table))
        return nbytes / _graph_time(calls, repeat=3) / 1e9, err

    def sweep(fmt: str, path: str, m: int, configs, label: str, **settings) -> dict:
        rows = []
        for config in configs:
            tk.CONFIGS[(fmt, path)] = tuple(config)
            for name, values in settings.items():
                getattr(tk, name).update(values)
            try:
                gbps, err = speed(fmt, m)
                rows.append({"config": list(config), "GBps": gbps, "rel_err": err})
            except Exception as e:  # a config that does not compile (shared memory) is just left out
                print(f"    {fmt} {path} {config}: {type(e).__name__}: {str(e)[:160]}", flush=True)
        ok = [r for r in rows if r["rel_err"] < 2e-2] or rows
        best = max(ok, key=lambda r: r["GBps"])
        run.data["kernel_sweep"][label] = rows
        print(f"    {label}: " + ", ".join(f"{tuple(r['config'])} {r['GBps']:.0f} GB/s (err {r['rel_err']:.1e})"
                                           for r in rows), flush=True)
        return best

    tile_a8 = tk.TILE_A8["int4"]
    for fmt in ("int4", "fp4"):
        if run.left() < 40:
            run.data["skipped"].append(f"sweep {fmt}")
            continue
        tile = sweep(fmt, "tile", 32, tk.CANDIDATES[(fmt, "tile")], f"{fmt} tile (batch 32)", ONE_ROW={fmt: "tile"},
                     TILE_A8={"int4": 0}, TILE_GLUON={"int4": False})  # the Triton bf16-activation tile
        tk.CONFIGS[(fmt, "tile")] = tuple(tile["config"])
        ranked = sorted(run.data["kernel_sweep"][f"{fmt} tile (batch 32)"], key=lambda r: -r["GBps"])[:2]
        one_tile = sweep(fmt, "tile", 1, [r["config"] for r in ranked], f"{fmt} tile (batch 1)", ONE_ROW={fmt: "tile"})
        if fmt == "int4":  # the W4A8 tile (rows quantized to int8, integer tensor cores) at 64 rows, where it
            # serves (TILE_A8: from 33 rows on, set from the lmstep section's rows 2-64; kept as it is here)
            ta8 = sweep(fmt, "tile-a8", 64, tk.CANDIDATES[(fmt, "tile-a8")], "int4 tile-a8 (batch 64)",
                        TILE_A8={fmt: 2})
            tk.CONFIGS[(fmt, "tile-a8")] = tuple(ta8["config"])
            # the Gluon tile (TILE_GLUON, back on for the rest of the run) at each of its BLOCK_M
            for path, m in (("tile-gl", 8), ("tile-gl16", 16), ("tile-gl32", 32), ("tile-gl64", 64)):
                gl = sweep(fmt, path, m, tk.CANDIDATES[(fmt, path)], f"int4 {path} (batch {m})",
                           TILE_GLUON={fmt: True}, TILE_A8={fmt: tile_a8})
                tk.CONFIGS[(fmt, path)] = tuple(gl["config"])
        gemv = sweep(fmt, "gemv", 1, tk.CANDIDATES[(fmt, "gemv")], f"{fmt} gemv (batch 1)", ONE_ROW={fmt: "gemv"},
                     FP4_ARITH={"gemv": True}, FP4_SUM_ONCE={"gemv": False})
        tk.CONFIGS[(fmt, "gemv")] = tuple(gemv["config"])
        if fmt == "fp4":  # the best GEMV again with the codes looked up in the 16-entry table
            table_gemv = sweep(fmt, "gemv", 1, [gemv["config"]], "fp4 gemv table (batch 1)", FP4_ARITH={"gemv": False},
                               FP4_SUM_ONCE={"gemv": False})
            tk.FP4_ARITH["gemv"] = table_gemv["GBps"] < gemv["GBps"]
            gemv = max(gemv, table_gemv, key=lambda r: r["GBps"])
            # and summed across the tile once at the end instead of every step (FP4_SUM_ONCE)
            once = sweep(fmt, "gemv", 1, [gemv["config"]], "fp4 gemv sum once (batch 1)", FP4_SUM_ONCE={"gemv": True})
            tk.FP4_SUM_ONCE["gemv"] = once["GBps"] > gemv["GBps"]
            gemv = max(gemv, once, key=lambda r: r["GBps"])
        best_one = {"tile": one_tile, "gemv": gemv}
        if fmt == "fp4":  # W4A8 on the official layout: int8 activations per absmax block, exact integer dots
            fa8 = sweep(fmt, "gemv-a8", 1, tk.CANDIDATES[(fmt, "gemv-a8")], "fp4 gemv-a8 (batch 1)",
                        ONE_ROW={fmt: "gemv-a8"})
            tk.CONFIGS[(fmt, "gemv-a8")] = tuple(fa8["config"])
            best_one["gemv-a8"] = fa8
        if fmt == "int4":  # W4A8: int8 activations per group, integer dot products (its error is printed beside)
            a8 = sweep(fmt, "gemv-a8", 1, tk.CANDIDATES[(fmt, "gemv-a8")], "int4 gemv-a8 (batch 1)",
                       ONE_ROW={fmt: "gemv-a8"})
            tk.CONFIGS[(fmt, "gemv-a8")] = tuple(a8["config"])
            # the best config again with its launches folded in or not (A8_FUSED: the split-K sum, the quantizing of
            # x; and PDL), reported only: in one graph of independent linears they differ by noise (sum: 1,668 vs
            # 1,619 GB/s in one run, 1,685 vs 1,720 in the next) while the engine's decode shows the chain's gain
            # (--a8-fused times that), so the module's default A8_FUSED stays installed
            default = dict(tk.A8_FUSED)
            variants = {}
            for fuse in ((False, False, False), (True, False, False), (False, True, False), (True, True, False),
                         (True, True, True)):
                variants[fuse] = sweep(fmt, "gemv-a8", 1, [a8["config"]],
                                       f"int4 gemv-a8 fused sum {fuse[0]} quant {fuse[1]} pdl {fuse[2]} (batch 1)",
                                       ONE_ROW={fmt: "gemv-a8"}, A8_FUSED=dict(zip(("sum", "quant", "pdl"), fuse)))
            tk.A8_FUSED.update(default)
            best_one["gemv-a8"] = variants[tuple(default[k] for k in ("sum", "quant", "pdl"))]
            # the float GEMV without reductions inside its loop (one group a step, the tile summed at the end)
            g2 = sweep(fmt, "gemv2", 1, tk.CANDIDATES[(fmt, "gemv2")], "int4 gemv2 (batch 1)", ONE_ROW={fmt: "gemv2"})
            tk.CONFIGS[(fmt, "gemv2")] = tuple(g2["config"])
            best_one["gemv2"] = g2
        tk.ONE_ROW[fmt] = max(best_one, key=lambda path: best_one[path]["GBps"])
        tk.CONFIGS[(fmt, "tile")] = tuple(tile["config"])  # chosen at 32 rows
    run.data["kernel_configs"] = {f"{f} {p}": list(c) for (f, p), c in tk.CONFIGS.items()}
    run.data["one_row"], run.data["fp4_arith"] = dict(tk.ONE_ROW), dict(tk.FP4_ARITH)
    run.data["fp4_sum_once"] = dict(tk.FP4_SUM_ONCE)
    run.data["a8_fused"], run.data["tile_a8"] = dict(tk.A8_FUSED), dict(tk.TILE_A8)
    print(f"    installed: {run.data['kernel_configs']}, one row: {tk.ONE_ROW}, fp4 arith: {tk.FP4_ARITH}, "
          f"W4A8 fused: {tk.A8_FUSED}, W4A8 tile: {tk.TILE_A8}", flush=True)


LM_FORMATS = ("int4", "int4-a8", "int4-a8f", "int4-g2", "int4-ta8", "fp4", "bf16", "tinygemm")


def lm_step(run: Run, batches=(1, 16, 32, 64), fmts=LM_FORMATS) -> None:
    """The language model's linears of one decode step (32 layers x 5 shapes, distinct weights: 3.7 GB of int4,
    4.1 GB of fp4, 14 GB of bf16) in one CUDA graph, at each batch: ms and GB/s of weights, beside bf16 cuBLAS
    and the same int4 weights through torch's own int4 kernel ("tinygemm", `aten._weight_int4pack_mm`: a
    candidate for the int4 decode path, not used by the engine until it measures faster)."""
    from cogvlm2.quant import triton_kernels as tk

    lut = formats.code_table("fp4", "cuda")
    table = tk.pair_table(lut, torch.bfloat16, True)
    res = run.data.setdefault("lm_step", {})
    for fmt in fmts:
        if run.left() < 25:
            run.data["skipped"].append(f"lm_step {fmt}")
            continue
        one_row, a8_fused, tile_a8 = dict(tk.ONE_ROW), dict(tk.A8_FUSED), dict(tk.TILE_A8)
        if fmt in ("int4-a8", "int4-a8f", "int4-g2", "int4-ta8"):  # the int4 weights through W4A8 (f: sum and
            # quant folded in; ta8: the W4A8 tile, at several rows) or gemv2
            tk.ONE_ROW["int4"] = "gemv2" if fmt == "int4-g2" else "gemv-a8"
            tk.A8_FUSED.update(sum=fmt == "int4-a8f", quant=fmt == "int4-a8f", pdl=False)
            tk.TILE_A8["int4"] = 2 if fmt == "int4-ta8" else 0
            layers = [[_packed("int4", n, k, 5 * i + j) for j, (n, k) in enumerate(LM_SHAPES)] for i in range(32)]
            nbytes = sum(_nbytes(t) for layer in layers for t in layer)
        elif fmt == "bf16":
            layers = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n, k in LM_SHAPES] for _ in range(32)]
            nbytes = sum(t.numel() * 2 for layer in layers for t in layer)
        elif fmt == "tinygemm":  # the int4 weights in torch's own int4 kernel's layout (formats.int4_to_tinygemm)
            layers = []
            for i in range(32):
                layer = []
                for j, (n, k) in enumerate(LM_SHAPES):
                    codes, sz = formats.int4_to_tinygemm(*_packed("int4", n, k, 5 * i + j))
                    layer.append((formats.tinygemm_pack(codes), sz))
                layers.append(layer)
            nbytes = sum(_nbytes(t) for layer in layers for t in layer)
        else:  # int4 (and fp4): int4's bf16-activation tile at 2+ rows (TILE_A8 off), whatever the module's default
            tk.TILE_A8["int4"] = 0
            layers = [[_packed(fmt, n, k, 5 * i + j) for j, (n, k) in enumerate(LM_SHAPES)] for i in range(32)]
            nbytes = sum(_nbytes(t) for layer in layers for t in layer)
        rows = [m for m in batches if m == 1] if fmt in ("int4-a8", "int4-a8f", "int4-g2") else [
            m for m in batches if m > 1] if fmt == "int4-ta8" else batches
        for m in rows:
            xs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 14336)}
            calls = []
            for layer in layers:
                for (n, k), wt in zip(LM_SHAPES, layer):
                    if fmt == "bf16":
                        calls.append(lambda x=xs[k], wt=wt: torch.nn.functional.linear(x, wt))
                    elif fmt == "tinygemm":
                        calls.append(lambda x=xs[k], wt=wt: formats.tinygemm_linear(x, *wt, 128))
                    else:
                        calls.append(lambda x=xs[k], wt=wt, n=n: _call(fmt[:4], x, wt, n, lut, table))
            t = _graph_time(calls)
            res.setdefault(fmt, {})[f"batch {m}"] = {"ms": t * 1e3, "GBps": nbytes / t / 1e9, "GB": nbytes / 1e9}
            print(f"    LM linears {fmt:<5} batch {m:<3} {t * 1e3:7.3f} ms  {nbytes / t / 1e9:6.0f} GB/s "
                  f"({nbytes / 1e9:.2f} GB)", flush=True)
        tk.ONE_ROW.update(one_row)
        tk.A8_FUSED.update(a8_fused)
        tk.TILE_A8.update(tile_a8)
        layers = calls = xs = None
        free()


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after this many seconds")
    ap.add_argument("--modes", default="fp4,int4,fp8,fp4-dq,int8",
                    help="quantized modes, after bf16 (bf16 runs when listed or when 'errors' is a section)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"what to measure, of {','.join(SECTIONS)} (decode: batch 1 and the batch-32 step); "
                         "e.g. --modes fp4,int4 --sections decode,sweep for the 4-bit decode figures alone")
    ap.add_argument("--lmstep-batches", default="1,16,32,64", help="rows of x in the lmstep section")
    ap.add_argument("--lmstep-formats", default=",".join(LM_FORMATS), help=f"of {','.join(LM_FORMATS)}")
    ap.add_argument("--no-sweep", action="store_true", help="same as leaving 'sweep' out of --sections")
    ap.add_argument("--a8-fused", default="",
                    help="int4 decode batch 1 again, a new engine each, with these settings of triton_kernels.A8_FUSED "
                         "(comma-separated; each 'off' or parts joined by '+', e.g. off,sum+quant,sum+quant+pdl)")
    ap.add_argument("--embeddings-on-host", action="store_true",
                    help="every model's token embedding table in page-locked host memory (EngineConfig."
                         "embeddings_on_host): the weights and peaks without its 1.05 GB")
    args = ap.parse_args()
    global EMBEDDINGS_ON_HOST
    EMBEDDINGS_ON_HOST = args.embeddings_on_host
    a8_variants = [v for v in args.a8_fused.split(",") if v]
    for v in a8_variants:
        if v != "off" and set(v.split("+")) - {"sum", "quant", "pdl"}:
            ap.error(f"--a8-fused {v!r}: parts are sum, quant, pdl (or 'off')")
    sections = {x for x in args.sections.split(",") if x}
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    if args.no_sweep:
        sections.discard("sweep")
    modes = [m for m in args.modes.split(",") if m and m != "bf16"]
    if "bf16" in args.modes.split(",") or "errors" in sections:
        modes.insert(0, "bf16")
    lm_batches = tuple(int(b) for b in args.lmstep_batches.split(","))
    lm_formats = tuple(f for f in args.lmstep_formats.split(",") if f)
    if set(lm_formats) - set(LM_FORMATS):
        ap.error(f"--lmstep-formats: unknown {sorted(set(lm_formats) - set(LM_FORMATS))}")
    run = Run(Path(args.out_dir), args.budget_s)
    run.data["embeddings_on_host"] = args.embeddings_on_host

    def record_ceilings():
        bw, flops = ceilings()
        run.data["ceilings"] = {"copy_GBps": bw / 1e9, "bf16_TFLOPs": flops / 1e12}
        print(f"    copy {bw / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    run.section("ceilings", record_ceilings)
    free()
    if "sweep" in sections:
        run.section("4-bit kernel config sweep", lambda: kernel_sweep(run), 60)
        free()
    if "lmstep" in sections:
        run.section("LM linears of one decode step", lambda: lm_step(run, lm_batches, lm_formats), 30)
        free()

    if not modes:  # kernel sections only: no model, no tokenizer
        run.save()
        print((run.out_dir / "quant.md").read_text())
        return
    cfg = full_size_config()
    proc = Processor(cfg, Tokenizer(bundled_tokenizer_path()))
    chat = proc(QUESTION, image=image(0))  # ~2.3K tokens: the decode context and the peak-memory chat
    long_text = " ".join([QUESTION] * 14)  # ~300 text tokens after the image for the logit agreement
    probe = proc(long_text, image=image(7))
    print(f"chat prompt {len(chat)} tokens; error probe {len(probe)} tokens", flush=True)
    ref: dict = {}
    plan = {"bf16": {"peak", "ttft", "decode1", "decode32", "caption"},
            "fp4": {"peak", "decode1", "decode32"}, "int4": {"peak", "decode1", "decode32"},
            "fp8": {"ttft", "caption", "decode1"}, "fp4-dq": {"peak", "decode1", "decode32"}, "int8": set()}
    need = {"bf16": 120, "fp4": 60, "int4": 50, "fp8": 60, "fp4-dq": 50, "int8": 40}
    wanted = {"peak": {"peak"}, "ttft": {"ttft"}, "decode": {"decode1", "decode32"}, "caption": {"caption"}}
    plan = {mode: {f for sec in sections for f in wanted.get(sec, ())} & figures for mode, figures in plan.items()}
    for mode in modes:
        holder = {}

        def load(mode=mode, holder=holder):
            free()
            run.base_bytes = torch.cuda.memory_allocated()  # the bf16 reference outputs kept for the error rows
            holder["model"] = build(cfg, mode)
            run.put(mode, "weights_GiB", (torch.cuda.memory_allocated() - run.base_bytes) / 2**30)
            run.put(mode, "weight_bytes_GiB", weight_bytes(holder["model"]) / 2**30)
        run.section(f"{mode}: build + quantize", load, need[mode])
        model = holder.get("model")
        if model is None:
            continue
        if mode == "bf16" and "errors" in sections:
            def reference():
                linears: dict = {}
                top1, logits, hidden, embeds = prefill_outputs(model, probe, linears)
                ref.update(top1=top1, logits=logits, hidden=hidden, embeds=embeds, linears=linears)
            run.section("bf16: reference outputs", reference)
        elif ref and "errors" in sections:
            run.section(f"{mode}: error vs bf16", lambda: errors(run, mode, model, ref, probe))
            if mode == "fp8":  # each knob the other way from its default
                for knob in flipped_knobs():
                    run.section(f"fp8 {knob[0]}={knob[1]}: error vs bf16",
                                lambda knob=knob: errors(run, mode, model, ref, probe, knob))
        free()
        if "peak" in plan[mode]:
            run.section(f"{mode}: peak memory of a 2.3K-token chat",
                        lambda: peak_chat(run, mode, model, proc, chat), 15)
        if plan[mode]:
            run.section(f"{mode}: engine", lambda: engine_figures(run, mode, model, proc, chat, plan[mode]), 20)
        if mode == "int4" and a8_variants:
            for v in a8_variants:
                run.section(f"int4: decode batch 1, A8_FUSED {v}", lambda v=v: a8_decode(run, model, proc, chat, v), 20)
        model = holder = None  # the sections above are done with it
        free()
    run.save()
    print(f"[{time.perf_counter() - T0:6.1f}s] done; wrote {run.out_dir / 'quant.json'} and quant.md", flush=True)
    print((run.out_dir / "quant.md").read_text())


if __name__ == "__main__":
    main()

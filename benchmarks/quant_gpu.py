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
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import ceilings, cuda_time, full_size_config, provenance, random_model
from benchmarks.engine_gpu import QUESTION, first_token_time, image, run_until_done, steady_step_time
from cogvlm2.engine.config import EngineConfig
from cogvlm2.llm import LLMEngine
from cogvlm2.model.attention import PaddedKVCache
from cogvlm2.model.batch import ForwardBatch, expert_indices
from cogvlm2.processing import Processor
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path
from cogvlm2.quant import formats, quantize_model, weight_bytes
from cogvlm2.sampling_params import SamplingParams

T0 = time.perf_counter()
DEVICE = "cuda"
SECTIONS = ("sweep", "errors", "peak", "ttft", "decode", "caption")
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
                     "skipped": []}

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
    modes = ("bf16", "fp4", "fp4-dq", "int4", "fp8", "int8")
    lines += ["| figure | bf16 | fp4 (official int4 layout) | fp4-dq (8-bit absmax) | int4 (group 128) | fp8 | "
              "int8 (LLM.int8) |", "|---|---|---|---|---|---|---|"]
    for title, key, fmt in [("weights in GPU memory (GiB)", "weights_GiB", "{:.2f}"),
                            ("peak, 2.3K-token chat + 1 image, 4K context (GiB)", "peak_chat_GiB", "{:.2f}"),
                            ("decode tok/s, batch 1, 2.3K context", "decode1_tok_s", "{:.0f}"),
                            ("decode step, batch 32 (ms)", "decode32_step_ms", "{:.2f}"),
                            ("TTFT, one 1344² image + question (ms)", "ttft_ms", "{:.0f}"),
                            ("captioning img/s (64 x 128 tokens)", "caption_img_s", "{:.2f}")]:
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
                  "packed weights (the four LM shapes in one CUDA graph):", ""]
        for key, rows in d["kernel_sweep"].items():
            best = max(rows, key=lambda r: r["GBps"])
            lines.append(f"- {key}: " + ", ".join(f"{tuple(r['config'])} {r['GBps']:.0f}" for r in rows)
                         + f" -> best {tuple(best['config'])}")
        lines.append(f"- used for the rest of the run: {d.get('kernel_configs')}, fp4 decoded from bits (else the "
                     f"table): {d.get('fp4_arith')}")
    if d["failures"] or d["skipped"]:
        lines += ["", "Failures: " + ("; ".join(d["failures"]) or "none"),
                  "Skipped (time budget): " + (", ".join(d["skipped"]) or "none")]
    return "\n".join(lines) + "\n"


def free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def build(cfg, mode: str):
    """The random bf16 model (seed 0) quantized to `mode` in place, one layer at a time on the GPU."""
    model = random_model(cfg, DEVICE)
    if mode != "bf16":
        quantize_model(model, mode, DEVICE, use_bitsandbytes=False if mode != "int8" else None)
    free()
    return model


# ---------------------------------------------------------------------------------------------- errors
@torch.inference_mode()
def prefill_outputs(model, x, capture: dict | None = None):
    """Prefill the whole prompt once: (top-1 ids [N], logits [N, V] bf16 of 256 text rows, per-layer hidden
    [L][N, D], vision embeddings); with `capture`, the inputs / outputs of SAMPLED_LINEARS (first 512 rows)."""
    cfg, dev = model.config, DEVICE
    n = len(x)
    mask = torch.tensor(x.vision_expert_mask, device=dev)
    vis, lang = expert_indices(mask)
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
                                       cache, vis, lang, embeds.reshape(-1, embeds.shape[-1]), idx),
                          output_hidden_states=True)
    finally:
        for hk in hooks:
            hk.remove()
    top1 = torch.cat([model.compute_logits(h[i:i + 512]).argmax(-1) for i in range(0, n, 512)])
    logits = model.compute_logits(h[-256:]).to(torch.bfloat16)
    return top1, logits, [t.to(torch.bfloat16) for t in hidden[1:]], embeds.to(torch.bfloat16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def errors(run: Run, mode: str, model, ref: dict, x) -> None:
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


def engine_figures(run: Run, mode: str, model, proc, x, want: set[str]) -> None:
    engine = engine_for(model, proc)
    if "ttft" in want:
        def ttft():
            first_token_time(engine, "warm", proc(QUESTION, image=image(99)))
            t = [first_token_time(engine, f"ttft{i}", proc(QUESTION, image=image(100 + i))) for i in range(3)]
            run.put(mode, "ttft_ms", float(np.median(t)) * 1e3)
        run.section(f"{mode}: TTFT", ttft, 10)
    if "decode1" in want:
        run.section(f"{mode}: decode batch 1",
                    lambda: run.put(mode, "decode1_tok_s", 1.0 / steady_step_time(engine, [x], 129)), 10)
    if "decode32" in want:
        prompts = [proc(QUESTION, image=image(200 + i)) for i in range(32)]
        run.section(f"{mode}: decode batch 32",
                    lambda: run.put(mode, "decode32_step_ms", steady_step_time(engine, prompts, 65) * 1e3), 25)
    if "caption" in want:
        def caption():
            prompts = [proc("Describe this image.", image=image(300 + i)) for i in range(64)]
            ids = [f"cap{i}" for i in range(64)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for rid, p in zip(ids, prompts):
                engine.add_request(rid, p, SamplingParams(max_new_tokens=128, temperature=0, ignore_eos=True))
            run_until_done(engine, set(ids))
            run.put(mode, "caption_img_s", 64 / (time.perf_counter() - t0))
        run.section(f"{mode}: captioning", caption, 45)
    engine = None  # the closures above are done with it: free its KV pool and graphs before the next mode
    free()


# ---------------------------------------------------------------------------------------------- kernels
def kernel_sweep(run: Run) -> None:
    """Achieved GB/s (packed weight + scales read once) of the 4-bit kernels on the LM's decode shapes, for the
    launch configs of triton_kernels.CANDIDATES (fp4: codes decoded from their bits; the best config again with
    the 16-entry table); the best per path is installed for the rest of the run (and reported). Timed as the decode step
    runs them: one CUDA graph calls the four shapes in turn (~80 MB of packed weights, more than the L2), so
    neither Python's launch overhead nor L2 hits enter the figure."""
    from cogvlm2.quant import triton_kernels as tk

    shapes = [(6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336)]  # [N, K]: qkv, dense, gate/up, down
    weights = {}
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        p, a = formats.quantize_4bit(w, "fp4")
        qw, qz, s = formats.quantize_int4(w)
        weights[(n, k)] = ((p, a), (qw, qz, s.to(torch.bfloat16)))
        del w
    lut = formats.code_table("fp4", "cuda")
    run.data["kernel_sweep"] = {}

    def speed(fmt: str, m: int) -> float:
        calls, nbytes = [], 0
        for (n, k), ((p, a), (qw, qz, s)) in weights.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            if fmt == "fp4":
                nbytes += p.numel() + a.numel() * 4
                calls.append(lambda x=x, p=p, a=a, n=n: tk.fp4_linear(x, p, a, lut, n, is_fp4=True))
            else:
                nbytes += qw.numel() * 4 + qz.numel() * 4 + s.numel() * 2
                calls.append(lambda x=x, qw=qw, qz=qz, s=s: tk.int4_linear(x, qw, qz, s, 128))
        for c in calls:  # compile outside the capture
            c()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(4):
                for c in calls:
                    c()
        t = cuda_time(graph.replay, warmup=2, iters=10) / 4
        del graph
        return nbytes / t / 1e9

    for (fmt, path), configs in tk.CANDIDATES.items():
        m = 1 if path == "gemv" else 32
        rows = []
        if fmt == "fp4":
            tk.FP4_ARITH[path] = True
        for config in configs:
            tk.CONFIGS[(fmt, path)] = config
            try:
                rows.append({"config": list(config), "GBps": speed(fmt, m)})
            except Exception as e:  # a config that does not compile (shared memory) is just left out
                print(f"    {fmt} {path} {config}: {type(e).__name__}: {str(e)[:120]}")
        best = max(rows, key=lambda r: r["GBps"])
        tk.CONFIGS[(fmt, path)] = tuple(best["config"])
        if fmt == "fp4":  # the best config again, fp4 codes looked up in the table instead of decoded
            tk.FP4_ARITH[path] = False
            try:
                table = speed(fmt, m)
                rows.append({"config": list(best["config"]) + ["table"], "GBps": table})
                tk.FP4_ARITH[path] = table <= best["GBps"]
            except Exception as e:
                tk.FP4_ARITH[path] = True
                print(f"    {fmt} {path} table: {type(e).__name__}: {str(e)[:120]}")
        run.data["kernel_sweep"][f"{fmt} {path} (batch {m})"] = rows
        run.data["kernel_configs"] = {f"{f} {p}": list(c) for (f, p), c in tk.CONFIGS.items()}
        run.data["fp4_arith"] = dict(tk.FP4_ARITH)
        print(f"    {fmt} {path}: " + ", ".join(f"{tuple(r['config'])} {r['GBps']:.0f} GB/s" for r in rows), flush=True)


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
    ap.add_argument("--no-sweep", action="store_true", help="same as leaving 'sweep' out of --sections")
    args = ap.parse_args()
    sections = {x for x in args.sections.split(",") if x}
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    if args.no_sweep:
        sections.discard("sweep")
    modes = [m for m in args.modes.split(",") if m and m != "bf16"]
    if "bf16" in args.modes.split(",") or "errors" in sections:
        modes.insert(0, "bf16")
    run = Run(Path(args.out_dir), args.budget_s)

    def record_ceilings():
        bw, flops = ceilings()
        run.data["ceilings"] = {"copy_GBps": bw / 1e9, "bf16_TFLOPs": flops / 1e12}
        print(f"    copy {bw / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    run.section("ceilings", record_ceilings)
    free()
    if "sweep" in sections:
        run.section("4-bit kernel config sweep", lambda: kernel_sweep(run), 60)
        free()

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
        free()
        if "peak" in plan[mode]:
            run.section(f"{mode}: peak memory of a 2.3K-token chat",
                        lambda: peak_chat(run, mode, model, proc, chat), 15)
        if plan[mode]:
            run.section(f"{mode}: engine", lambda: engine_figures(run, mode, model, proc, chat, plan[mode]), 20)
        model = holder = None  # the sections above are done with it
        free()
    run.save()
    print(f"[{time.perf_counter() - T0:6.1f}s] done; wrote {run.out_dir / 'quant.json'} and quant.md", flush=True)
    print((run.out_dir / "quant.md").read_text())


if __name__ == "__main__":
    main()

"""Tensor parallelism at the model level (no engine): CogVLM2-19B (random bf16) at TP=1 and TP=2 on 2 GPUs.

    torchrun --nproc-per-node 2 benchmarks/tp_model_gpu.py [--out tp.json]

Every rank builds the full random model on its GPU and takes its shard in memory (`shard_model`, the slices
`load_model(..., tensor_parallel=)` would read), so TP=2 and TP=1 share weights and their outputs are compared
(bf16 greedy tokens, logits within tolerance). Then, TP=2 on both GPUs and TP=1 on GPU 0:

- vision encoder, one 1344² image (replicated under TP: every rank encodes it),
- LM prefill of that image's prompt (2,330 tokens, visual expert routed, reference SDPA attention),
- TTFT = vision + prefill + first logits, i.e. what replicating the vision tower costs at TP=2,
- decode step at batch 1 and 32 over a 2,330-token context with the engine's Triton paged attention kernel,
  eager and as one CUDA graph (the NCCL all-reduces and the logits all-gather captured in it),

each next to its floor: per-rank weights (+ KV) read once at the card's copy bandwidth, or FLOPs at its
matmul rate.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copy_bandwidth, cuda_time, full_size_config, matmul_flops, random_model, report  # noqa: E402
from cogvlm2.engine.kernels.decode_attention import paged_decode_attention  # noqa: E402
from cogvlm2.model import ParallelContext, shard_model  # noqa: E402
from cogvlm2.model.attention import PaddedKVCache  # noqa: E402
from cogvlm2.engine.inputs import mask_to_segments  # noqa: E402
from cogvlm2.model.batch import ForwardBatch  # noqa: E402
from cogvlm2.model.parallel import tp_size  # noqa: E402
from cogvlm2.processing.prompt import position_ids, vision_expert_mask  # noqa: E402

CONTEXT, BLOCK = 2330, 16


class PagedDecode:
    """The engine's decode attention over a random CONTEXT-token paged cache of this rank's KV heads. Each step
    writes its K/V at slot CONTEXT of every row and attends to CONTEXT + 1 tokens; no host work, so the whole
    step can be one CUDA graph."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
        per_row = CONTEXT // BLOCK + 1
        shape = (batch * per_row, BLOCK, kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device="cuda").normal_() for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device="cuda").normal_() for _ in range(layers)]
        self.tables = torch.arange(batch * per_row, device="cuda", dtype=torch.int32).view(batch, per_row)
        self.lens = torch.full((batch,), CONTEXT + 1, device="cuda", dtype=torch.int32)
        self.slots = self.tables[:, CONTEXT // BLOCK].long() * BLOCK + CONTEXT % BLOCK
        self.scale = head_dim ** -0.5
        self.bytes = 2 * layers * batch * (CONTEXT + 1) * kv_heads * head_dim * self.k[0].element_size()

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        hkv, d = k.shape[1:]
        self.k[layer].view(-1, hkv, d).index_copy_(0, self.slots, k)
        self.v[layer].view(-1, hkv, d).index_copy_(0, self.slots, v)
        return paged_decode_attention(q, self.k[layer], self.v[layer], self.tables, self.lens, self.scale, CONTEXT + 1)


def image_prompt(cfg):
    """One image + 24 text tokens: ids, positions, vision slots (on the GPU), expert segments (host)."""
    types = [0] + [1] * cfg.vision.tokens_per_image + [0] * 24
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128000, (len(types),), generator=g).cuda()
    pos = torch.tensor(position_ids(types), device="cuda")
    segments = mask_to_segments(vision_expert_mask(types))
    slots = torch.tensor(types, device="cuda").nonzero().squeeze(1)
    return ids, pos, slots, segments


def prefill(model, prompt, embeds=None):
    ids, pos, slots, segments = prompt
    cache = PaddedKVCache(1, model.config.num_hidden_layers)
    cache.begin_step(torch.ones(1, len(ids), dtype=torch.bool, device="cuda"))
    batch = ForwardBatch(ids, pos, cache, embeds, None if embeds is None else slots, segments)
    return cache, model.compute_logits(model(batch)[-1:])


def greedy(model, prompt, pixels, steps: int = 8) -> tuple[list[int], torch.Tensor]:
    """Reference greedy decode of the image prompt: tokens and the first logits."""
    feats = model.encode_images(pixels).reshape(-1, model.config.hidden_size)
    cache, logits = prefill(model, prompt, feats)
    first, tokens = logits[0].clone(), []
    pos = prompt[1].max() + 1
    for _ in range(steps):
        tokens.append(int(logits[0].argmax()))
        cache.begin_step(torch.ones(1, 1, dtype=torch.bool, device="cuda"))
        logits = model.compute_logits(model(ForwardBatch(torch.tensor(tokens[-1:], device="cuda"), pos[None], cache)))
        pos = pos + 1
    return tokens, first


def decode_step(model, batch: int):
    """A decode step function over a fresh random paged context, and the KV bytes it reads."""
    cfg, attn = model.config, model.model.layers[0].self_attn
    kv = PagedDecode(cfg.num_hidden_layers, batch, attn.num_kv_heads, cfg.head_dim, model.dtype)
    ids = torch.randint(0, 128000, (batch,), device="cuda")
    pos = torch.full((batch,), 1000, device="cuda")
    return (lambda: model.compute_logits(model(ForwardBatch(ids, pos, kv)))), kv.bytes


def graphed(fn):
    """fn captured as one CUDA graph (warmed up on a side stream first, as torch.cuda.graph requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class Rows(list):
    """Rows that rank 0 also prints as they come, so a later failure keeps the figures already measured."""

    def append(self, row: dict) -> None:
        super().append(row)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"  {row['name']}: {row['value']:.2f} {row['unit']}", flush=True)


def measure(model, label: str, lm_bytes: float) -> list[dict]:
    """lm_bytes: the unsharded weights one text token reads (language path + lm_head); prefill FLOPs are
    2 per weight of one expert path per token, plus causal attention."""
    cfg, n_tp = model.config, tp_size(model.tp)
    prompt = image_prompt(cfg)
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, device="cuda", dtype=model.dtype)
    n = len(prompt[0])
    rows = Rows()
    with torch.inference_mode():
        t_vit = cuda_time(lambda: model.encode_images(pixels))
        feats = model.encode_images(pixels).reshape(-1, cfg.hidden_size)
        t_pre = cuda_time(lambda: prefill(model, prompt, feats))
        t_ttft = cuda_time(lambda: prefill(model, prompt, model.encode_images(pixels).reshape(-1, cfg.hidden_size)))
    lm_flops = (2 * lm_bytes / model.dtype.itemsize * n + 2 * cfg.num_hidden_layers * n * n * cfg.hidden_size) / n_tp
    v = cfg.vision
    n_patch = v.grid_size ** 2 + 1
    vit_params = sum(p.numel() for k, p in model.named_parameters() if k.startswith("model.vision."))
    vit_flops = 2 * vit_params * n_patch + 4 * v.num_hidden_layers * n_patch ** 2 * v.hidden_size
    rows.append(dict(name=f"{label} vision encoder, one 1344² image (replicated)", value=t_vit * 1e3, unit="ms",
                     lower_is_better=True, floor=vit_flops / matmul_flops() * 1e3,
                     floor_how=f"{vit_flops / 1e12:.0f} TFLOP on every rank / {matmul_flops() / 1e12:.0f} TFLOP/s"))
    rows.append(dict(name=f"{label} LM prefill, {n} tokens", value=t_pre * 1e3, unit="ms", lower_is_better=True,
                     floor=lm_flops / matmul_flops() * 1e3,
                     floor_how=f"{lm_flops / 1e12:.0f} TFLOP per rank / {matmul_flops() / 1e12:.0f} TFLOP/s"))
    rows.append(dict(name=f"{label} TTFT, one image (vision + prefill + logits)", value=t_ttft * 1e3, unit="ms",
                     lower_is_better=True, floor=(vit_flops + lm_flops) / matmul_flops() * 1e3,
                     floor_how="vision + prefill FLOP floors"))
    for batch in (1, 32):
        with torch.inference_mode():
            step, kv_bytes = decode_step(model, batch)
            t_eager = cuda_time(step, warmup=2, iters=9)
            t_graph = cuda_time(graphed(step), warmup=3, iters=20)
        floor = (lm_bytes / n_tp + kv_bytes) / copy_bandwidth()
        how = f"{(lm_bytes / n_tp + kv_bytes) / 1e9:.1f} GB per rank at {copy_bandwidth() / 1e9:,.0f} GB/s"
        for mode, t in (("eager", t_eager), ("CUDA graph", t_graph)):
            rows.append(dict(name=f"{label} decode step, batch {batch}, {CONTEXT} ctx, {mode}", value=t * 1e3,
                             unit="ms", lower_is_better=True, floor=floor * 1e3, floor_how=how))
        del step
        gc.collect()
        torch.cuda.empty_cache()
    return list(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    ctx = ParallelContext.from_env()
    rank0 = ctx.rank == 0
    cfg = full_size_config()
    full = random_model(cfg)  # the same seed on every rank: equal weights
    lm_bytes = sum(p.numel() * p.element_size() for k, p in full.named_parameters()
                   if "vision" not in k and "embed_tokens" not in k)
    tp = shard_model(full, ctx)
    if rank0:
        size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters()) / 2**30  # noqa: E731
        print(f"TP={ctx.world_size}: per-rank weights {size(tp):.1f} GiB (full {size(full):.1f} GiB)")
    prompt = image_prompt(cfg)
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, device="cuda",
                         generator=torch.Generator("cuda").manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        tp_tokens, tp_first = greedy(tp, prompt, pixels)
    if not rank0:
        del full
        gc.collect()
        torch.cuda.empty_cache()
    rows = measure(tp, f"TP={ctx.world_size}", lm_bytes)
    del tp
    gc.collect()
    torch.cuda.empty_cache()
    dist.barrier()
    if rank0:
        with torch.inference_mode():
            one_tokens, one_first = greedy(full, prompt, pixels)
        err = (tp_first - one_first).abs().max().item()
        scale = one_first.abs().max().item()
        same = sum(a == b for a, b in zip(tp_tokens, one_tokens))
        print(f"bf16 TP={ctx.world_size} vs TP=1: first logits max |diff| {err:.3g} (max |logit| {scale:.3g}), "
              f"greedy tokens equal {same}/{len(one_tokens)} ({tp_tokens} vs {one_tokens})")
        rows = measure(full, "TP=1", lm_bytes) + rows
        report(rows, args.out)
        by = {r["name"]: r["value"] for r in rows}
        for what in ("TTFT, one image (vision + prefill + logits)", "decode step, batch 1, 2330 ctx, CUDA graph",
                     "decode step, batch 32, 2330 ctx, CUDA graph", f"LM prefill, {len(prompt[0])} tokens"):
            one, two = by[f"TP=1 {what}"], by[f"TP={ctx.world_size} {what}"]
            print(f"speed-up TP={ctx.world_size} / TP=1, {what}: {one / two:.2f}x ({one:.2f} -> {two:.2f} ms)")
        vit = by[f"TP={ctx.world_size} vision encoder, one 1344² image (replicated)"]
        print(f"replicated vision tower: {vit:.1f} ms of the TP={ctx.world_size} TTFT "
              f"({vit / by[f'TP={ctx.world_size} TTFT, one image (vision + prefill + logits)']:.0%})")
        print(f"peak GPU memory rank 0 {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

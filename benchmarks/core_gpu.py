"""Full-size CogVLM2-19B (random bf16 weights on the GPU): where the time goes in the plain model.

Times the vision encoder on one 1344² image, the LM prefill of 2,330 tokens (visual expert routed),
a reference decode step, and the Triton paged decode-attention kernel, each next to its floor.

    PYTHONPATH=. python benchmarks/core_gpu.py [--out results.json]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import ceilings, copy_bandwidth, matmul_flops, cuda_time, full_size_config, random_model, report
from cogvlm2.model.attention import PaddedKVCache
from cogvlm2.engine.inputs import mask_to_segments
from cogvlm2.model.batch import ForwardBatch
from cogvlm2.processing.prompt import position_ids, vision_expert_mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    ceilings()
    cfg = full_size_config()
    model = random_model(cfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lm_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if "vision" not in n and "embed_tokens" not in n)
    print(f"weights {weights / 2**30:.1f} GiB, language weights read per decode token {lm_bytes / 1e9:.1f} GB")
    rows = []

    pixels = torch.randn(1, 3, 1344, 1344, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        t_vit = cuda_time(lambda: model.encode_images(pixels))
    v = cfg.vision
    n_patch = v.grid_size**2 + 1
    vit_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.vision."))
    vit_flops = 2 * vit_params * n_patch + 4 * v.num_hidden_layers * n_patch**2 * v.hidden_size
    rows.append(dict(name="vision encoder, one 1344² image", value=t_vit * 1e3, unit="ms", lower_is_better=True,
                     floor=vit_flops / matmul_flops() * 1e3, floor_how=f"{vit_flops / 1e12:.0f} TFLOP / {matmul_flops() / 1e12:.0f} TFLOP/s"))

    n_text = 24
    types = [0] + [1] * v.tokens_per_image + [0] * n_text
    n = len(types)
    segments = mask_to_segments(vision_expert_mask(types))
    ids = torch.randint(0, 128000, (n,), device="cuda")
    pos = torch.tensor(position_ids(types), device="cuda")

    def prefill():
        cache = PaddedKVCache(1, cfg.num_hidden_layers)
        cache.begin_step(torch.ones(1, n, dtype=torch.bool, device="cuda"))
        h = model(ForwardBatch(ids, pos, cache, expert_segments=segments))
        return cache, model.compute_logits(h[-1:])

    with torch.inference_mode():
        t_pre = cuda_time(prefill)
        cache, _ = prefill()
    lm_params = sum(p.numel() for n_, p in model.named_parameters() if "vision" not in n_ and "embed" not in n_)
    lm_flops = 2 * lm_params * n + 4 * cfg.num_hidden_layers * n * n * cfg.hidden_size / 2
    rows.append(dict(name=f"LM prefill, {n} tokens (reference attention)", value=t_pre * 1e3, unit="ms",
                     lower_is_better=True, floor=lm_flops / matmul_flops() * 1e3,
                     floor_how=f"{lm_flops / 1e12:.0f} TFLOP / {matmul_flops() / 1e12:.0f} TFLOP/s"))

    next_pos = torch.tensor([max(position_ids(types)) + 1], device="cuda")
    tok = torch.tensor([1], device="cuda")

    def decode():
        cache.begin_step(torch.ones(1, 1, dtype=torch.bool, device="cuda"))
        return model.compute_logits(model(ForwardBatch(tok, next_pos, cache)))

    with torch.inference_mode():
        t_dec = cuda_time(decode, warmup=2, iters=9)
    rows.append(dict(name="reference decode step, batch 1, 2.3K context", value=t_dec * 1e3, unit="ms",
                     lower_is_better=True, floor=lm_bytes / copy_bandwidth() * 1e3,
                     floor_how=f"language weights read once at {copy_bandwidth() / 1e9:,.0f} GB/s"))

    from cogvlm2.engine.kernels.decode_attention import paged_decode_attention

    hq, hkv, d, bs, ctx = 32, 8, 128, 16, 2330
    for b in (1, 32):
        nblk = b * (ctx // bs + 1)
        kc = torch.randn(nblk, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nblk, device="cuda").view(b, -1).to(torch.int32)
        lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        out = paged_decode_attention(q, kc, vc, bt, lens, d**-0.5, 8192)
        tok_idx = torch.arange(ctx, device="cuda")
        kk = kc[bt[0, tok_idx // bs].long(), tok_idx % bs].float().repeat_interleave(4, 1)
        vv = vc[bt[0, tok_idx // bs].long(), tok_idx % bs].float().repeat_interleave(4, 1)
        ref = torch.einsum("hn,nhd->hd", (torch.einsum("hd,nhd->hn", q[0].float(), kk) * d**-0.5).softmax(-1), vv)
        err = (out[0].float() - ref).abs().max().item()
        t_k = cuda_time(lambda: paged_decode_attention(q, kc, vc, bt, lens, d**-0.5, 8192), iters=20)
        kv_bytes = 2 * b * ctx * hkv * d * 2
        rows.append(dict(name=f"paged decode attention, 1 layer, batch {b}, ctx {ctx} (err {err:.1e})",
                         value=t_k * 1e6, unit="us", lower_is_better=True, floor=kv_bytes / copy_bandwidth() * 1e6,
                         floor_how="KV bytes read once"))
    report(rows, args.out)
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()

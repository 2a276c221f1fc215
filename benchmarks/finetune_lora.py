"""LoRA / QLoRA training step of the full-size CogVLM2-19B on ONE GPU (random bf16 weights made on the GPU).

One example per step: one 1344x1344 image (2,306 vision tokens) + 2,048 text tokens, of which the last
--answer-tokens are labelled; LoRA r=8 on the vision-expert and language-expert QKV; gradient
checkpointing on; AdamW on the LoRA weights; bf16 autocast, exactly the path `cogvlm2 finetune` takes
(packing.pack -> objective.CausalLMLoss). Prints step time, tokens/s, model TFLOP/s and MFU against the
card's bf16 matmul rate measured in the same run (model FLOPs: no credit for the recomputation of
gradient checkpointing; HFU, which counts it, next to it), the vision tower's and the forward's share
and the peak memory, for LoRA, LoRA with --compiled-ops (same model, right after) and (if bitsandbytes
imports) QLoRA.

    PYTHONPATH=. COGVLM2_EXTRA_PATH=/path/to/carried/wheels python benchmarks/finetune_lora.py [--out r.json]

COGVLM2_EXTRA_PATH: colon-separated folders or .whl files put first on sys.path before peft /
bitsandbytes are imported. A folder counts itself and every *.whl inside it. Pure-Python wheels (peft,
transformers, accelerate, huggingface_hub) import straight from the .whl; packages with compiled code
(bitsandbytes, psutil, regex, ...) need `pip install --no-deps --target DIR` and DIR on the path.
Without peft the LoRA variant falls back to a built-in LoRA layer with the same math (it says so).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

for entry in reversed([e for e in os.environ.get("COGVLM2_EXTRA_PATH", "").split(":") if e]):
    sys.path[:0] = [entry] + (sorted(glob.glob(os.path.join(entry, "*.whl"))) if os.path.isdir(entry) else [])

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import ceilings  # noqa: E402
from cogvlm2.config import ModelConfig  # noqa: E402
from cogvlm2.finetune.objective import CausalLMLoss  # noqa: E402
from cogvlm2.finetune.packing import pack  # noqa: E402
from cogvlm2.model.cogvlm import CogVLM2ForCausalLM  # noqa: E402
from cogvlm2.model.random_init import scale_random_  # noqa: E402
from cogvlm2.processing.prompt import LANGUAGE, VISION, ModelInputs, position_ids  # noqa: E402
from cogvlm2.tiny import tiny_config  # noqa: E402


# The official THUDM/cogvlm2-llama3-chat-19B config.json (architecture fields only).
CONFIG_19B = {
    "architectures": ["CogVLMForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_multi_query_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "template_version": "chat", "bos_token_id": 128000,
    "eos_token_id": [128001, 128009], "pad_token_id": 128002,
    "vision_config": {"hidden_size": 1792, "intermediate_size": 15360, "num_hidden_layers": 63, "num_heads": 16,
                      "image_size": 1344, "patch_size": 14, "num_positions": 9217, "in_channels": 3,
                      "layer_norm_eps": 1e-6},
}
TARGETS = r"model\.layers\.\d+\.self_attn\.(vision|language)_expert_query_key_value"


def build_model(cfg: ModelConfig, device: str) -> CogVLM2ForCausalLM:
    """Meta-built bf16 model, materialised on the GPU and filled with small random values in place
    (each tensor drawn in fp32 on the device, then copied in: no host copy, no fp32 model)."""
    with torch.device("meta"):
        model = CogVLM2ForCausalLM(cfg).to(torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(scale_random_(name, torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)))
    return model.requires_grad_(False)


class BuiltinLoRA(nn.Module):
    """Fallback when peft is not importable: y = base(x) + (alpha / r) * B(A(x)), A, B in fp32."""

    def __init__(self, base: nn.Module, r: int, alpha: int):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).to(x.dtype) * self.scale


def add_lora(model: nn.Module, r: int, alpha: int) -> str:
    try:
        from cogvlm2.finetune.lora import apply_lora

        apply_lora(model, [TARGETS], r=r, alpha=alpha, dropout=0.05)
        import peft

        how = f"peft {peft.__version__}"
    except ImportError as e:
        import re

        for name, module in list(model.named_modules()):
            if re.fullmatch(TARGETS, name):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, BuiltinLoRA(module, r, alpha))
        how = f"built-in LoRA layer (peft not importable: {e})"
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights, as the trainer keeps them
    return how


def example(cfg: ModelConfig, text_tokens: int, answer_tokens: int) -> ModelInputs:
    """BOS + one image's placeholders + text; the last `answer_tokens` are labels (as an answer + EOS)."""
    n_vis = cfg.vision.tokens_per_image
    types = [LANGUAGE] + [VISION] * n_vis + [LANGUAGE] * text_tokens
    g = torch.Generator().manual_seed(0)
    ids = [cfg.bos_token_id] + [128002] * n_vis + torch.randint(0, 128000, (text_tokens,), generator=g).tolist()
    labels = [-100] * (len(ids) - answer_tokens) + ids[-answer_tokens:]
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ModelInputs(ids, types, position_ids(types), pixels, None, labels)


def step_flops(cfg: ModelConfig, n_tokens: int, n_labels: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step; the LoRA matmuls themselves (<0.1%) are left out.

    Model FLOPs (what MFU counts; no credit for recomputation): the frozen base needs no weight
    gradients, so each decoder linear costs its forward (2PN) plus the input-gradient backward (2PN);
    causal attention 2N^2 D forward + 4N^2 D backward per layer; the frozen vision tower its forward
    only; lm_head on the labelled rows forward + input gradient. Hardware FLOPs add the recomputation
    of gradient checkpointing: every decoder layer's forward once more (linears and attention; an
    upper bound, since the recomputation stops after the last saved activation, before down_proj)."""
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    per_token_layer = d * (d + 2 * kv) + d * d + 3 * d * f  # one expert's QKV + dense + MLP
    linear_fwd = 2 * per_token_layer * cfg.num_hidden_layers * n_tokens
    attn_fwd = 2 * cfg.num_hidden_layers * n_tokens**2 * d  # QK^T and PV, causal half
    v = cfg.vision
    n_patch = v.grid_size**2 + 1
    vit = v.num_hidden_layers * (2 * n_patch * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
                                 + 4 * n_patch**2 * v.hidden_size)
    head = 2 * 2 * d * cfg.vocab_size * n_labels
    model = 2 * linear_fwd + 3 * attn_fwd + vit + head
    return model, model + linear_fwd + attn_fwd


def run(variant: str, modes: list[str], args) -> list[dict]:
    """Build the model once for `variant` (lora / qlora) and time a step in each mode: "eager" (plain torch
    ops) and / or "compiled" (ops.compile_training_ops: RMSNorm, rotary, SiLU-mul fused by torch.compile)."""
    from cogvlm2.model import ops

    dev = args.device
    cfg = tiny_config() if args.tiny else ModelConfig.from_dict(CONFIG_19B)
    if variant == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            print(f"qlora: skipped, bitsandbytes not importable ({e})")
            return []
    cuda = dev.startswith("cuda")
    t0 = time.perf_counter()
    model = build_model(cfg, dev)
    if variant == "qlora":
        from cogvlm2.finetune.quant import quantize_4bit

        quantize_4bit(model, dev, compute_dtype=torch.bfloat16)
    how = add_lora(model, args.lora_r, args.lora_alpha)
    model.gradient_checkpointing = not args.no_gradient_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    loss_fn = CausalLMLoss(model)
    batch = pack([example(cfg, args.text_tokens, args.answer_tokens)]).to(dev)
    resident = torch.cuda.memory_allocated() if cuda else 0
    print(f"{variant}: model ready in {time.perf_counter() - t0:.0f} s; {how}; trainable "
          f"{sum(p.numel() for p in params) / 1e6:.1f} M params; resident {resident / 2**30:.1f} GiB")
    autocast = lambda: torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)  # noqa: E731

    def step() -> torch.Tensor:
        with autocast():
            loss = loss_fn(batch) / batch.num_targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, n: int) -> tuple[float, object]:
        times, out = [], None
        for _ in range(n):
            t1 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t1)
        return sorted(times)[len(times) // 2], out

    def forward_loss(seed: int | None = None) -> torch.Tensor:  # the step's forward with autograd recording, no backward
        if seed is not None:
            torch.manual_seed(seed)  # the same LoRA dropout masks
        with autocast():
            return (loss_fn(batch) / batch.num_targets).detach()

    model_flops, hw_flops = step_flops(cfg, batch.num_tokens, batch.num_targets)
    rows = []
    for mode in modes:
        if mode == "compiled":  # same weights, same batch: the fused ops' loss against eager's
            ops.compile_training_ops(False)
            eager_loss = float(forward_loss(seed=0))
            ops.compile_training_ops(True, (dev.split(":")[0],), args.compile_backend)
            t1 = time.perf_counter()
            same = float(forward_loss(seed=0))
            step()  # compiles the backward
            sync()
            print(f"{variant} compiled: first forward + step (compiling) {time.perf_counter() - t1:.0f} s")
        else:
            ops.compile_training_ops(False)
        for _ in range(args.warmup):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t, loss = timed(step, args.steps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        with torch.no_grad():  # the frozen tower runs without autograd in the step too
            t_vision, _ = timed(lambda: model.encode_images(batch.pixel_values), 3)
        t_forward, _ = timed(forward_loss, 3)
        row = {"variant": variant + ("-compiled" if mode == "compiled" else ""), "lora": how,
               "tokens": batch.num_tokens, "labelled": batch.num_targets, "step_s": t,
               "tokens_per_s": batch.num_tokens / t, "model_tflop_per_step": model_flops / 1e12,
               "hardware_tflop_per_step": hw_flops / 1e12, "tflops": model_flops / t / 1e12,
               "mfu": model_flops / t / args.matmul_ceiling, "hfu": hw_flops / t / args.matmul_ceiling,
               "vision_forward_s": t_vision, "forward_s": t_forward, "peak_gib": peak,
               "resident_gib": resident / 2**30, "loss": float(loss), "gradient_checkpointing": model.gradient_checkpointing}
        if mode == "compiled":
            row["compiled_vs_eager_loss"] = {"eager": eager_loss, "compiled": same,
                                             "rel_diff": abs(same - eager_loss) / max(abs(eager_loss), 1e-12)}
        print(f"{row['variant']}: step {t * 1e3:.0f} ms (median of {args.steps}), {row['tokens_per_s']:.0f} tokens/s, "
              f"{row['tflops']:.0f} model TFLOP/s = MFU {row['mfu']:.0%} (HFU with recomputation {row['hfu']:.0%}) of "
              f"{args.matmul_ceiling / 1e12:.0f} TFLOP/s measured; model {model_flops / 1e12:.0f} / hardware "
              f"{hw_flops / 1e12:.0f} TFLOP per step; vision forward {t_vision * 1e3:.0f} ms, forward {t_forward * 1e3:.0f} ms, "
              f"backward + optimizer ~{(t - t_forward) * 1e3:.0f} ms; peak {peak:.1f} GiB, loss {row['loss']:.3f}"
              + ("" if math.isfinite(row["loss"]) else "  <-- NOT FINITE"))
        if mode == "compiled":
            c = row["compiled_vs_eager_loss"]
            print(f"{row['variant']}: same weights and batch, loss eager {c['eager']:.6f} vs compiled {c['compiled']:.6f} "
                  f"(relative difference {c['rel_diff']:.1e})")
        rows.append(row)
    ops.compile_training_ops(False)
    del model, optimizer, loss_fn, params
    if cuda:
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="lora,lora-compiled,qlora",
                    help="comma-separated: lora, lora-compiled, qlora, qlora-compiled (-compiled: --compiled-ops, "
                         "timed on the same model right after the eager variant)")
    ap.add_argument("--text-tokens", type=int, default=2048)
    ap.add_argument("--answer-tokens", type=int, default=1024)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--out", help="write the rows as JSON")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the -compiled variants "
                    "(aot_eager: a quick CPU smoke test)")
    ap.add_argument("--tiny", action="store_true", help="smoke-test the script with the tiny config (e.g. on CPU)")
    args = ap.parse_args()
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    size = (tiny_config() if args.tiny else ModelConfig.from_dict(CONFIG_19B)).vision.image_size
    print(f"{card} | torch {torch.__version__} | one {size}² image + {args.text_tokens} "
          f"text tokens ({args.answer_tokens} labelled) | LoRA r={args.lora_r} on vision + language expert QKV")
    # the card's own bf16 matmul rate, measured in this run (an H100's and an H200's differ)
    args.matmul_ceiling = ceilings()[1] if args.device.startswith("cuda") else float("nan")
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows = []
    for base in ("lora", "qlora"):
        modes = [m for m, name in (("eager", base), ("compiled", base + "-compiled")) if name in wanted]
        if modes:
            rows += run(base, modes, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "matmul_ceiling": args.matmul_ceiling, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

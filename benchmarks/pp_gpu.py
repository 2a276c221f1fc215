"""Pipeline stages on 2 GPUs limited to 24 GB each: the bf16 CogVLM2-19B (random weights) answers a one-image chat.

    python benchmarks/pp_gpu.py [--card-gib 23.5] [--new-tokens 64] [--out pp.json]

Each GPU is capped with `torch.cuda.set_per_process_memory_fraction` to what a 24 GB card leaves a process; the
model is split by `plan_stages` (vision tower counted) and every weight is created on its stage's GPU (no host
copy, no full copy anywhere). The prompt is built by the real processor from an image, and the reference loop
(`generate_ids`) decodes greedily: TTFT, decode tokens/s, and each card's peak memory are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import full_size_config, provenance  # noqa: E402
from cogvlm2.generation import generate_ids  # noqa: E402
from cogvlm2.model.cogvlm import CogVLM2ForCausalLM  # noqa: E402
from cogvlm2.model.pipeline import place, plan_stages  # noqa: E402
from cogvlm2.model.random_init import scale_random_  # noqa: E402
from cogvlm2.processing import Processor, Tokenizer  # noqa: E402
from cogvlm2.processing.tokenizer import bundled_tokenizer_path  # noqa: E402
from cogvlm2.sampling_params import SamplingParams  # noqa: E402

IMAGE = Path(__file__).resolve().parents[2] / "shared" / "media" / "demo.jpg"


@torch.no_grad()
def staged_random_model(cfg, devices, dtype=torch.bfloat16) -> CogVLM2ForCausalLM:
    """The model built on meta, then each parameter drawn directly on its stage's device."""
    with torch.device("meta"):
        model = CogVLM2ForCausalLM(cfg)
    plan = plan_stages(model, devices)
    gens = {d: torch.Generator(device=d).manual_seed(0) for d in plan.devices}
    for key, p in list(model.named_parameters()):
        dev = plan.device_of(key)
        x = scale_random_(key, torch.randn(p.shape, generator=gens[dev], device=dev, dtype=torch.float32)).to(dtype)
        *path, name = key.split(".")
        model.get_submodule(".".join(path))._parameters[name] = nn.Parameter(x, requires_grad=False)
    return place(model, plan).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--card-gib", type=float, default=23.5, help="memory each GPU may use (a 24 GB card's share)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("needs 2 GPUs")
    for i in range(2):
        total = torch.cuda.get_device_properties(i).total_memory
        torch.cuda.set_per_process_memory_fraction(args.card_gib * 2**30 / total, device=i)
    cfg = full_size_config()
    model = staged_random_model(cfg, ["cuda:0", "cuda:1"])
    print(model.stages.plan.describe())
    processor = Processor(cfg, Tokenizer(bundled_tokenizer_path()), "cogvlm2-llama3-chat-19B")
    from PIL import Image

    image = IMAGE if IMAGE.is_file() else Image.new("RGB", (1024, 768), (40, 120, 200))
    inputs = processor("Describe this image in detail.", image=image)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    with torch.inference_mode():
        list(generate_ids(model, [inputs], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)))  # warm-up
        for i in range(2):
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)
        stamps, tokens = [], []
        start = time.perf_counter()
        for (tok,) in generate_ids(model, [inputs], params):
            torch.cuda.synchronize(1)
            stamps.append(time.perf_counter())
            tokens.append(tok)
    ttft = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    peaks = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(2)]
    print(f"prompt {len(inputs)} tokens (one image), {len(tokens)} new tokens: {tokens[:16]} ...")
    print(f"TTFT {ttft * 1e3:.0f} ms, decode {decode:.1f} tok/s (reference loop, eager, batch 1)")
    print(f"peak memory per card: {', '.join(f'{p:.1f} GiB' for p in peaks)} of {args.card_gib} GiB allowed")
    if args.out:
        import json

        Path(args.out).write_text(json.dumps({"provenance": provenance(), "ttft_ms": ttft * 1e3,
                                              "decode_tok_s": decode, "peak_gib": peaks,
                                              "plan": model.stages.plan.describe()}, indent=2))


if __name__ == "__main__":
    main()

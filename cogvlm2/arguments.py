"""The command-line flags every sub-command shares (model, dtype, device, quantization, sampling, template,
LoRA) and their values for the library. Only argparse here: no model is loaded, no CLI module imported."""

from __future__ import annotations

import argparse
from typing import Callable

DEFAULT_MODEL = "tiny"
# What every sub-command's --model help says about the models embedded in the package (cogvlm2.tiny).
EMBEDDED_MODELS = ("'tiny' (image chat), 'tiny-video' (video) or 'tiny-random' (random weights, answers noise: "
                   "for tests)")

# Optional dependencies -> the extra that installs them (for "install X" messages).
EXTRAS = {"peft": "finetune", "accelerate": "finetune", "fastapi": "serve", "uvicorn": "serve", "multipart": "serve",
          "prometheus_client": "serve", "gradio": "web", "httpx": "serve", "openai": "test", "bitsandbytes": "finetune"}

DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def install_hint(extra: str) -> str:
    """How to install an extra, for an installed package and for a source checkout."""
    return f"pip install 'cogvlm2[{extra}]' (in a source checkout: pip install -e '.[{extra}]')"


def require_extra(extra: str, *modules: str) -> None:
    """Exit with the install command when a sub-command's extra is missing (checked before anything loads)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"cogvlm2: error: `cogvlm2 {extra}` needs {', '.join(missing)}: {install_hint(extra)}")


def dtype_type(*allowed: str) -> Callable[[str], str]:
    """An argparse `type`: one spelling of dtypes for every sub-command (float32 / bfloat16 / float16),
    the short aliases (fp32, bf16, fp16) accepted."""
    def parse(value: str) -> str:
        name = DTYPE_ALIASES.get(value.lower(), value.lower())
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"invalid dtype {value!r} (choose from {', '.join(allowed)}; "
                                             "fp32 / bf16 / fp16 also work)")
        return name

    return parse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint folder, Hugging Face repo id (e.g. THUDM/cogvlm2-llama3-chat-19B), or an "
                        f"embedded model: {EMBEDDED_MODELS} (default: %(default)s)")
    p.add_argument("--dtype", default="auto", type=dtype_type("auto", "float32", "bfloat16", "float16"),
                   help="auto, float32, bfloat16 or float16 (auto = bfloat16 on GPUs of compute capability >= 8, "
                        "float16 on older GPUs, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda if available)")
    p.add_argument("--quant", default=None, choices=["4", "8", "fp4", "nf4", "fp4-dq", "nf4-dq", "int4", "int8", "fp8"],
                   help="quantize the weights while loading: 4 = fp4 (bitsandbytes layout, as the official demos), "
                        "nf4, fp4-dq / nf4-dq (8-bit absmax), 8 = LLM.int8 (bitsandbytes), int4 = group-wise int4, "
                        "fp8 = e4m3 (fast prefill on cc >= 8.9); the official int4 checkpoints need no flag "
                        "(fp4-dq compresses their absmax)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split every layer over N GPUs, one process each (N divides the 8 KV heads: 2, 4, 8); "
                        "for speed; docs/parallel.md")
    p.add_argument("--vision-parallel", default=None, choices=["sharded", "replicated"],
                   help="under --tensor-parallel-size: shard the vision tower over the GPUs too (the default: "
                        "faster time to first token and captioning) or replicate it on every GPU (no "
                        "collectives in the tower; each GPU holds all of it); docs/parallel.md")
    p.add_argument("--embeddings-on-host", action="store_true",
                   help="keep the token embedding table (1.05 GB) in page-locked host memory, read by the GPU over the "
                        "bus: less GPU memory for a slightly slower prefill (one device only)")
    p.add_argument("--pipeline-parallel-size", type=int, default=1, metavar="N",
                   help="consecutive layers on N GPUs in this process (e.g. the bf16 19B model on 2 x 24 GB cards); "
                        "for fitting, not speed; docs/parallel.md")


def shard_vision(args) -> bool | None:
    """--vision-parallel as the engine's shard_vision: True (sharded), False (replicated) or None (the default:
    sharded under tensor parallelism)."""
    return {"sharded": True, "replicated": False, None: None}[getattr(args, "vision_parallel", None)]


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The model arguments plus the engine's limits and LoRA adapters (`serve`, `web`)."""
    add_model_arguments(p)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per request, the KV budget (default: max_position_embeddings + the tokens "
                        "that share positions in one image / 24 video frames); positions are checked too")
    p.add_argument("--max-num-seqs", type=int, default=None, help="requests decoded together in one step")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache pool size in blocks (default: sized automatically)")
    p.add_argument("--lora", action="append", default=None, metavar="NAME=PATH",
                   help="serve a LoRA adapter (peft format, e.g. from `cogvlm2 finetune`) unmerged next to the base "
                        "model; requests select it by NAME as their `model` (PATH alone: NAME is the folder's name); "
                        "repeatable")


def add_lora_argument(p: argparse.ArgumentParser) -> None:
    """--lora, unless the parser already defines it."""
    try:
        p.add_argument("--lora", help="LoRA adapter folder (peft format) applied without merging")
    except argparse.ArgumentError:
        pass


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 2048) -> None:
    """Greedy by default, as every official demo decodes (do_sample=False / top_k=1)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="cut to what the context leaves (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, as the official demos)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when temperature > 0")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def add_template_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", choices=["chat", "vqa", "base"],
                   help="prompt template (default: as the official demos for the checkpoint; see the README's table)")
    p.add_argument("--video-strategy", choices=["chat", "base"],
                   help="video frame sampling: 'chat' one frame per second, 'base' 24 frames spread over the first "
                        "60 s (default: follows the template)")


def sampling_params(args: argparse.Namespace):
    """SamplingParams from the flags of `add_sampling_arguments`."""
    from .sampling_params import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)

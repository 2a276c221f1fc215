"""The `cogvlm2` command: thin sub-commands over the library (chat here; serve, web, finetune add theirs)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, TextIO

from .devices import auto_device, auto_dtype

DEFAULT_MODEL = "tiny"

# Sub-commands that live with their concern and need extras; each module defines add_parser(subparsers).
_PLUGINS = ("cogvlm2.serving.cli", "cogvlm2.finetune.cli", "cogvlm2.batch.cli", "cogvlm2.eval.cli")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint folder, Hugging Face repo id (e.g. THUDM/cogvlm2-llama3-chat-19B), or an "
                        "embedded tiny model: 'tiny' (image chat) / 'tiny-video' (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on GPUs of compute capability >= 8, float16 on older GPUs, float32 on CPU")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda if available)")
    p.add_argument("--quant", default=None, choices=["4", "8", "fp4", "nf4", "fp4-dq", "nf4-dq", "int4", "int8", "fp8"],
                   help="quantize the weights while loading: 4 = fp4 (bitsandbytes layout, as the official demos), "
                        "nf4, fp4-dq / nf4-dq (8-bit absmax), 8 = LLM.int8 (bitsandbytes), int4 = group-wise int4, "
                        "fp8 = e4m3 (fast prefill on cc >= 8.9); the official int4 checkpoints need no flag "
                        "(fp4-dq compresses their absmax)")


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


def _chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (image, video or text)",
                       description="One-shot with --query, else an interactive multi-turn loop like the official "
                                   "CLI: give an image (or video) path, or press Enter for text-only chat; type "
                                   "'clear' to start over with a new image, Ctrl-D to quit.")
    add_model_arguments(p)
    p.add_argument("--image", help="image file for the first conversation (image models)")
    p.add_argument("--video", help="video file for the first conversation (video models)")
    p.add_argument("--query", help="ask once, print the answer and exit (the caption checkpoint with --video: "
                                   "its caption prompt when omitted)")
    add_template_arguments(p)
    p.add_argument("--lora", help="LoRA adapter folder (peft format) applied without merging")
    add_sampling_arguments(p)
    p.set_defaults(func=run_chat)


def load_for_chat(args):
    """(model, processor) from the shared model arguments; the tiny model says that it is one."""
    from .model import load_model
    from .processing import Processor
    from .tiny import TINY_NOTE, is_tiny

    device = auto_device(args.device)
    model = load_model(args.model, dtype=auto_dtype(args.dtype, device), device=device,
                       quant=getattr(args, "quant", None))
    if getattr(args, "lora", None):
        from .finetune.lora import load_with_adapter

        model = load_with_adapter(model, args.lora)[0]
    if is_tiny(model.checkpoint_path):
        print(f"note: {args.model} is the {TINY_NOTE}.", file=sys.stderr)
    return model, Processor.from_pretrained(model.checkpoint_path, model.config)


def run_chat(args, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    from .generation import stream_text

    params = sampling_params(args)
    model, processor = load_for_chat(args)
    kind = "video" if model.config.is_video else "image"

    def answer(query: str, history, media) -> str:
        inputs = processor(query, history, template=args.template, video_strategy=args.video_strategy, **media)
        parts = []
        for delta in stream_text(model, processor.tokenizer, inputs, params):
            parts.append(delta)
            stdout.write(delta)
            stdout.flush()
        stdout.write("\n")
        return "".join(parts)

    media = {k: v for k, v in (("image", args.image), ("video", args.video)) if v}
    query = args.query if args.query is not None else (processor.default_query if args.video else None)
    if query is not None:
        answer(query, [], media)
        return 0
    read = _reader(stdin, stdout)
    first = True
    while True:  # one conversation per pass: choose the media, then ask until 'clear'
        if not (first and media):
            path = read(f"{kind} path (Enter for text only) >>>>> ")
            if path is None:
                return 0
            media = {kind: path.strip()} if path.strip() else {}
        first = False
        try:
            processor("", video_strategy=args.video_strategy, **media)  # fail early on an unreadable file
        except (OSError, ValueError) as e:
            stdout.write(f"error: {e}\n")
            media = {}
            continue
        history: list[tuple[str, str]] = []
        while True:
            query = read("Human: ")
            if query is None:
                return 0
            if query.strip() == "clear":
                break
            if not query.strip():
                continue
            stdout.write("CogVLM2: ")
            history.append((query, answer(query, history, media)))


def _reader(stdin: TextIO, stdout: TextIO) -> Callable[[str], str | None]:
    def read(prompt: str) -> str | None:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        return None if not line else line.rstrip("\n")

    return read


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvlm2", description="CogVLM2 vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)
    _chat_parser(sub)
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:  # plugins import their extras lazily: only an absent plugin lands here
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, CheckpointError) as e:
        print(f"cogvlm2: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

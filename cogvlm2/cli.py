"""The `cogvlm2` command: thin sub-commands over the library (chat here; serve, web, finetune add theirs)."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, TextIO

from .devices import auto_device as _auto_device
from .devices import auto_dtype

DEFAULT_MODEL = "tiny"

# Sub-commands that live with their concern and need extras; each module defines add_parser(subparsers).
_PLUGINS = ("cogvlm2.serving.cli", "cogvlm2.finetune.cli", "cogvlm2.batch.cli", "cogvlm2.eval.cli")


# Optional dependencies -> the extra that installs them (for "install X" messages).
EXTRAS = {"peft": "finetune", "accelerate": "finetune", "fastapi": "serve", "uvicorn": "serve", "multipart": "serve",
          "prometheus_client": "serve", "gradio": "web", "httpx": "serve", "openai": "test", "bitsandbytes": "finetune"}


def install_hint(extra: str) -> str:
    """How to install an extra, for an installed package and for a source checkout."""
    return f"pip install 'cogvlm2[{extra}]' (in a source checkout: pip install -e '.[{extra}]')"


def auto_device(device: str) -> str:
    """'auto' -> cuda if available, else cpu; any other value is checked here, before a model loads."""
    import torch

    if device == "auto":
        return _auto_device(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {device}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: unsupported; use auto, cpu, cuda or cuda:N")
    return device


DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


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
                        "embedded tiny model: 'tiny' (image chat) / 'tiny-video' (default: %(default)s)")
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
    p.add_argument("--pipeline-parallel-size", type=int, default=1, metavar="N",
                   help="consecutive layers on N GPUs in this process (e.g. the bf16 19B model on 2 x 24 GB cards); "
                        "for fitting, not speed; docs/parallel.md")


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
    """(model, processor) from the shared model arguments. Everything that can be checked without the
    weights (device, config, tokenizer, --image / --video, --lora) is checked before they load."""
    from .config import ModelConfig
    from .engine.worker import ModelSpec
    from .model import checkpoint_folder, load_model
    from .processing import Processor
    from .tiny import note, tiny_name

    device = auto_device(args.device)
    for flag in ("image", "video", "lora"):
        path = getattr(args, flag, None)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"--{flag} {path}: no such file or folder")
    folder = checkpoint_folder(args.model)
    processor = Processor.from_pretrained(folder, ModelConfig.from_file(folder / "config.json"))
    if getattr(args, "lora", None):
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise ModuleNotFoundError("--lora needs peft", name="peft")
    if getattr(args, "tensor_parallel_size", 1) > 1:
        raise ValueError(f"`cogvlm2 {getattr(args, 'command', 'eval')}` runs one process: --tensor-parallel-size "
                         "needs the engine (chat, serve, web, generate, caption); use --pipeline-parallel-size to "
                         "spread the model")
    pipeline = getattr(args, "pipeline_parallel_size", 1)
    model = load_model(str(folder), dtype=auto_dtype(args.dtype, device), device=device,
                       quant=getattr(args, "quant", None),
                       pipeline_devices=ModelSpec(str(folder), device=device, pipeline_parallel_size=pipeline)
                       .pipeline_devices() if pipeline > 1 else None)
    if getattr(args, "lora", None):
        from .finetune.lora import load_with_adapter

        model = load_with_adapter(model, args.lora)[0]
    name = tiny_name(model.checkpoint_path)
    if name:
        print(f"note: {args.model} is the {note(name)}.", file=sys.stderr)
    return model, processor


def load_engine_for_chat(args):
    """(engine, processor) for `chat --tensor-parallel-size N`: the engine with one sequence at a time."""
    from .engine import LLMEngine

    if getattr(args, "lora", None):
        raise ValueError("--lora is not supported with --tensor-parallel-size")
    device = auto_device(args.device)
    engine = LLMEngine.from_pretrained(args.model, auto_dtype(args.dtype, device), device, quant=args.quant,
                                       tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=1)
    from .tiny import note, tiny_name

    name = tiny_name(engine.model.checkpoint_path)
    if name:
        print(f"note: {args.model} is the {note(name)}.", file=sys.stderr)
    return engine, engine.processor


def engine_stream(engine, inputs, params):
    """The text deltas of one answer from the engine. Ctrl-C ends the answer between two steps (a step
    interrupted half-way would leave the tensor-parallel ranks out of step) by raising KeyboardInterrupt."""
    import signal

    rid = f"chat-{id(inputs)}"
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    engine.add_request(rid, inputs, params)
    try:
        while engine.has_unfinished():
            if interrupted:
                engine.abort(rid)
                while engine.has_unfinished():
                    engine.step()
                raise KeyboardInterrupt
            for out in engine.step():
                if out.error:
                    raise RuntimeError(out.error)
                if out.delta_text:
                    yield out.delta_text
    finally:
        signal.signal(signal.SIGINT, previous)


def run_chat(args, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    from .generation import stream_text

    params = sampling_params(args)
    if getattr(args, "tensor_parallel_size", 1) > 1:
        engine, processor = load_engine_for_chat(args)
        config, stream = engine.model.config, lambda inputs: engine_stream(engine, inputs, params)
    else:
        model, processor = load_for_chat(args)
        config, stream = model.config, lambda inputs: stream_text(model, processor.tokenizer, inputs, params)
    kind = "video" if config.is_video else "image"

    def answer(query: str, history, media) -> str:
        """Stream one answer; Ctrl-C stops it (what was printed so far is the answer)."""
        inputs = processor(query, history, template=args.template, video_strategy=args.video_strategy, **media)
        parts = []
        try:
            for delta in stream(inputs):
                parts.append(delta)
                stdout.write(delta)
                stdout.flush()
        except KeyboardInterrupt:
            if args.query is not None:
                raise
            stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()
        return "".join(parts)

    media = {k: v for k, v in (("image", args.image), ("video", args.video)) if v}
    query = args.query if args.query is not None else (processor.default_query if args.video else None)
    if query is not None:
        answer(query, [], media)
        return 0
    read = _Reader(stdin, stdout)
    if read.interactive:
        stdout.write("Ctrl-C stops an answer (at the prompt: quits), Ctrl-D quits, 'clear' starts over.\n")
    first = True
    while True:  # one conversation per pass: choose the media, then ask until 'clear'
        if not (first and media):
            path = read(f"{kind} path (Enter for text only) >>>>> ")
            if path is None:
                return 0
            media = {kind: media_path(path)} if path.strip() else {}
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
            stdout.flush()
            history.append((query, answer(query, history, media)))


def media_path(text: str) -> str:
    """A path as typed or dropped into a terminal: quoted ('a b.png', "a b.png"), shell-escaped
    (a\\ b.png), ~/..., or a file:// URI -> the plain path. A path that exists as typed is kept as is."""
    s = text.strip()
    if os.path.exists(os.path.expanduser(s)):
        return os.path.expanduser(s)
    if s.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(s).path)
    try:
        parts = shlex.split(s)
    except ValueError:  # an unbalanced quote: take the text as it is
        parts = [s]
    return os.path.expanduser(parts[0] if len(parts) == 1 else s)


class _Reader:
    """Prompt and read one line; None at the end of input (Ctrl-D) or on Ctrl-C at the prompt.

    On a terminal it uses `input()` with readline (line editing, history with the arrow keys);
    otherwise (pipes, tests) it reads `stdin` directly."""

    def __init__(self, stdin: TextIO, stdout: TextIO):
        self.stdin, self.stdout = stdin, stdout
        self.interactive = stdin is sys.stdin and stdout is sys.stdout and stdin.isatty()
        if self.interactive:
            try:
                import readline  # noqa: F401 - importing it gives input() line editing and history
            except ImportError:  # Windows without pyreadline: plain input()
                pass

    def __call__(self, prompt: str) -> str | None:
        try:
            if self.interactive:
                return input(prompt)
            self.stdout.write(prompt)
            self.stdout.flush()
            line = self.stdin.readline()
            if line:
                return line.rstrip("\n")
        except (EOFError, KeyboardInterrupt):
            pass
        self.stdout.write("\n")  # the shell prompt starts on its own line
        self.stdout.flush()
        return None


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless it has no meaningful default or says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings or isinstance(action.default, bool)):
            return text
        return f"{text} (default: %(default)s)".strip()


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
    for p in sub.choices.values():  # every sub-command's --help shows the defaults
        p.formatter_class = _DefaultsFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(f"cogvlm2: error: `cogvlm2 {args.command}` needs {top}: {install_hint(EXTRAS[top])}", file=sys.stderr)
        return 1
    except (OSError, ValueError, CheckpointError) as e:
        print(f"cogvlm2: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The `cogvlm2` command: thin sub-commands over the library (chat here; serve, web, finetune add theirs)."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from typing import TextIO

from .arguments import (EXTRAS, add_lora_argument, add_model_arguments, add_sampling_arguments,
                        add_template_arguments, install_hint, sampling_params)

# Sub-commands that live with their concern and need extras; each module defines add_parser(subparsers).
_PLUGINS = ("cogvlm2.serving.cli", "cogvlm2.web.cli", "cogvlm2.finetune.cli", "cogvlm2.batch.cli", "cogvlm2.eval.cli")


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
    add_lora_argument(p)
    add_sampling_arguments(p)
    p.set_defaults(func=run_chat)


def engine_stream(engine, inputs, params, adapter: str | None = None):
    """The text deltas of one answer from the engine (`chat --tensor-parallel-size N`). Ctrl-C ends the
    answer between two steps (a step interrupted half-way would leave the tensor-parallel ranks out of
    step) by raising KeyboardInterrupt."""
    import signal

    rid = f"chat-{id(inputs)}"
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    engine.add_request(rid, inputs, params, adapter=adapter)
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
    from .launch import CHAT_ADAPTER, load_engine_for_chat, load_from_args

    params = sampling_params(args)
    engine = None
    if getattr(args, "tensor_parallel_size", 1) > 1:
        engine, processor = load_engine_for_chat(args)
        adapter = CHAT_ADAPTER if getattr(args, "lora", None) else None
        stream = lambda inputs: engine_stream(engine, inputs, params, adapter)  # noqa: E731
    else:
        model, processor = load_from_args(args)
        stream = lambda inputs: stream_text(model, processor.tokenizer, inputs, params)  # noqa: E731
    try:
        kind = processor.media_kinds[0]

        def answer(query: str, history, media) -> str:
            """Stream one answer; Ctrl-C stops it, also while the prompt is prepared (what was printed so far
            is the answer)."""
            parts = []
            try:
                inputs = processor(query, history, template=args.template, video_strategy=args.video_strategy, **media)
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
    finally:
        if engine is not None:
            engine.shutdown()  # a tensor-parallel group's ranks


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

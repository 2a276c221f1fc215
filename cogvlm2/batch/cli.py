"""`cogvlm2 generate` (JSONL prompts -> answers) and `cogvlm2 caption` (a dataset -> captions), streamed and resumable.

Both write each row as it finishes, skip ids already in the output when rerun, turn unreadable input into
error rows, and end with a summary; the library behind them is `cogvlm2.batch`.
"""

from __future__ import annotations

import argparse
import sys

from .items import adapter_for
from .writers import DEFAULT_CHUNK_ROWS, DEFAULT_CHUNK_SECONDS

GENERATE_DESCRIPTION = """\
Each input line is a JSON object {"id", "query", "image" | "video", "history", "template", "adapter"}
(only "query" is required; media paths are relative to the input file; "adapter": a --lora adapter's
name, null for the base model, absent for --adapter's choice) or a JSON string (a text-only query). Each
output row, written as soon as its answer finishes: {"id" (the prompt's, else its line number), "line",
"image" | "video" (as given), "adapter" (null: the base model), "text", "finish_reason", "token_ids",
"prompt_tokens", "cached_tokens", "seconds", "error"}. Rerunning with the same output skips the ids already there; a bad line or a missing
image gives a row with its error instead of stopping the batch."""

CAPTION_DESCRIPTION = """\
INPUT: a folder (recursive; the images and/or videos the checkpoint reads), a manifest (.txt one path a
line, .jsonl / .csv / .parquet with a path|image|video|url column and optional id and prompt columns), or
WebDataset shards (shard-{0000..0099}.tar, a glob, or a .txt list of .tar files). OUTPUT: .jsonl (one
file) or .parquet (a folder of parts), one row per item: id, path, caption, model, prompt, template,
tokens, prompt_tokens, finish_reason, seconds, error (model: MODEL+ADAPTER when a LoRA adapter captions). Rerunning the same command skips the ids already
in OUTPUT; a kill loses at most the chunk being written."""


def add_parser(subparsers) -> None:
    from ..arguments import add_model_arguments, add_sampling_arguments

    p = subparsers.add_parser("generate", help="batch generation over a JSONL file of prompts (streamed, resumable)",
                              description=GENERATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("input", help="JSONL file of prompts ('-' = stdin)")
    p.add_argument("-o", "--output", help="output .jsonl (or .parquet folder); default: stdout, no resume")
    _add_run_arguments(p)
    add_sampling_arguments(p, max_new_tokens=256)
    p.set_defaults(func=run_generate)

    from .caption import DEFAULT_MAX_NEW_TOKENS

    p = subparsers.add_parser("caption", help="caption a folder / manifest / WebDataset (one GPU or a Ray cluster)",
                              description=CAPTION_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("input", help="folder, manifest file, or WebDataset .tar shards")
    p.add_argument("-o", "--output", required=True, help="output .jsonl file or .parquet folder")
    p.add_argument("--prompt", help="default: 'Please describe this video in detail.' for video checkpoints "
                                    "(the official caption prompt), 'Please describe this image in detail.' otherwise")
    p.add_argument("--template", choices=["chat", "vqa", "base"], help="prompt template (default: the checkpoint's)")
    p.add_argument("--video-strategy", choices=["chat", "base"], help="frame sampling (default: the checkpoint's)")
    p.add_argument("--media", choices=["image", "video", "all"],
                   help="what a folder scan takes (default: what the checkpoint reads; video checkpoints "
                        "caption stills as one-frame clips)")
    _add_run_arguments(p)
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per durable chunk (%(default)s)")
    p.add_argument("--chunk-seconds", type=float, default=DEFAULT_CHUNK_SECONDS,
                   help="seconds between durable chunks at most (%(default)s)")
    ray = p.add_argument_group("Ray (pip install -e '.[ray]')")
    ray.add_argument("--ray", action="store_true", help="run on Ray: a local instance, or the cluster of RAY_ADDRESS")
    ray.add_argument("--ray-address", help="Ray cluster address (implies --ray), e.g. ray://head:10001 or auto")
    ray.add_argument("--ray-actors", default="1", help="engines: N, or MIN:MAX to autoscale (default %(default)s)")
    ray.add_argument("--ray-gpus-per-actor", type=float, default=None, help="default: 1 if the cluster has GPUs, "
                                                                             "else 0 (CPU actors)")
    ray.add_argument("--ray-batch-size", type=int, default=8,
                     help="items per engine call (the run ends with each actor's last calls: smaller calls even out "
                          "when the actors finish)")
    add_sampling_arguments(p, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    p.set_defaults(func=run_caption, temperature=0.0)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming an existing output")
    p.add_argument("--allow-urls", action="store_true", help="fetch http(s) media named in the input")
    p.add_argument("--workers", type=int, default=None, help="preprocessing threads (default: cores - 1, at most 16)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together in one step")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--lora", action="append", default=None, metavar="NAME=PATH",
                   help="load a LoRA adapter (peft format, e.g. from `cogvlm2 finetune`) unmerged next to the base "
                        "model (PATH alone: NAME is the folder's name); repeatable")
    p.add_argument("--adapter", metavar="NAME", default=None,
                   help="the --lora adapter of items that name none (default: the adapter when exactly one --lora "
                        "is given, else the base model)")


def _engine_kwargs(args) -> dict:
    from ..arguments import shard_vision
    from ..launch import parse_lora

    return {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
            "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": args.enforce_eager,
            "quant": args.quant, "tensor_parallel_size": args.tensor_parallel_size,
            "pipeline_parallel_size": args.pipeline_parallel_size, "shard_vision": shard_vision(args),
            "embeddings_on_host": args.embeddings_on_host,
            "adapters": parse_lora(args.lora)}


def default_adapter(args, adapters: dict) -> str | None:
    """--adapter, checked against the --lora names before anything loads; else the one --lora adapter, if one."""
    if args.adapter is not None:
        if args.adapter not in adapters:
            known = ", ".join(adapters) or "none (pass --lora NAME=PATH)"
            raise ValueError(f"--adapter {args.adapter}: no such --lora adapter; given: {known}")
        return args.adapter
    return next(iter(adapters)) if len(adapters) == 1 else None


def _follow(job, command: str, unit: str, disable: bool) -> None:
    """Consume the job's rows with a progress bar (throughput, ETA, failures), then print the summary.
    Ctrl-C or SIGTERM stops it cleanly: what finished is written, and a rerun resumes."""
    import signal
    import threading

    from tqdm.auto import tqdm

    def terminate(signum, frame):
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        with tqdm(total=job.remaining, unit=unit[:-1], disable=disable, dynamic_ncols=True, smoothing=0.1) as bar:
            try:
                for row in job:
                    bar.update(1)
                    if row.get("error") is not None:
                        bar.set_postfix(failed=job.failed, refresh=False)
            finally:
                job.close()
    except KeyboardInterrupt:
        print(f"cogvlm2 {command}: interrupted: {job.summary(unit)}; rerun the command to resume", file=sys.stderr)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"cogvlm2 {command}: {job.summary(unit)}", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    from ..arguments import sampling_params
    from ..devices import auto_device, auto_dtype
    from ..llm import LLMEngine
    from .driver import drive
    from .job import Job
    from .preprocess import Preprocessor
    from .prompts import count_prompts, read_prompts
    from .writers import open_writer

    params = sampling_params(args)
    total = count_prompts(args.input)  # also: a missing input fails before anything is created
    kwargs = _engine_kwargs(args)
    adapter = default_adapter(args, kwargs["adapters"])
    writer = open_writer(args.output, GENERATE_SCHEMA, args.overwrite)
    device = auto_device(args.device)
    try:
        engine = LLMEngine.from_pretrained(args.model, auto_dtype(args.dtype, device), device, **kwargs)
    except BaseException:
        writer.close()
        raise
    prep = Preprocessor(engine.processor)

    def rows(items):
        for r in drive(engine, items, prep, params, args.workers, adapter=adapter):
            yield generate_row(r, adapter)

    job = Job(read_prompts(args.input, args.allow_urls), rows, writer, total)
    try:
        _follow(job, "generate", "prompts", args.no_progress)
    finally:
        engine.shutdown()  # a tensor-parallel group's ranks
    return 0


GENERATE_SCHEMA = {"id": "string", "line": "int64", "image": "string", "video": "string", "adapter": "string",
                   "text": "string",
                   "finish_reason": "string", "token_ids": "list<int64>", "prompt_tokens": "int64",
                   "cached_tokens": "int64", "seconds": "float64", "error": "string"}


def generate_row(r, default_adapter: str | None = None) -> dict:
    item, out = r.item, r.output
    row = {"id": item.id, "line": item.line}
    if item.image is not None or item.video is not None:
        row["video" if item.video is not None else "image"] = item.path
    row.update({"adapter": adapter_for(item, default_adapter), "text": out.text if out else None,
                "finish_reason": out.finish_reason if out else None,
                "token_ids": list(out.token_ids) if out else [], "prompt_tokens": out.prompt_len if out else 0,
                "cached_tokens": out.num_cached_tokens if out else 0, "seconds": round(r.seconds, 4),
                "error": r.error})
    return row


def run_caption(args: argparse.Namespace) -> int:
    from ..arguments import sampling_params
    from ..devices import auto_device, auto_dtype
    from .caption import caption

    use_ray = args.ray or args.ray_address is not None
    device = dtype = None
    if not use_ray:
        device = auto_device(args.device)
        dtype = auto_dtype(args.dtype, device)
    elif args.device != "auto" or args.dtype != "auto":
        device = None if args.device == "auto" else args.device
        dtype = None if args.dtype == "auto" else args.dtype
    media = None if args.media is None else ("image", "video") if args.media == "all" else (args.media,)
    kwargs = _engine_kwargs(args)
    job = caption(args.input, args.model, args.output, prompt=args.prompt, template=args.template,
                  video_strategy=args.video_strategy, media=media, allow_urls=args.allow_urls,
                  sampling_params=sampling_params(args), dtype=dtype, device=device, workers=args.workers,
                  overwrite=args.overwrite, chunk_rows=args.chunk_rows, chunk_seconds=args.chunk_seconds,
                  ray=use_ray, ray_address=args.ray_address, ray_actors=_actors(args.ray_actors),
                  ray_gpus_per_actor=args.ray_gpus_per_actor, ray_batch_size=args.ray_batch_size,
                  adapter=default_adapter(args, kwargs["adapters"]), **kwargs)
    print(f"cogvlm2 caption: {job.items.describe} -> {args.output}"
          + (f" ({len(job.done)} ids already there: skipped)" if job.done else ""), file=sys.stderr)
    _follow(job, "caption", "items", args.no_progress)
    return 0


def _actors(spec: str) -> int | tuple[int, int]:
    """--ray-actors: "N" -> N; "MIN:MAX" -> (MIN, MAX), 1 <= MIN <= MAX."""
    try:
        low, _, high = spec.partition(":")
        low, high = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"--ray-actors: expected N or MIN:MAX, got {spec!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"--ray-actors: need 1 <= MIN <= MAX, got {spec!r}")
    return (low, high) if ":" in spec else low

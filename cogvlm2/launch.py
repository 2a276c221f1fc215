"""Load a model from the shared command-line arguments (`cogvlm2.arguments`): a model and processor for
`chat` and `eval`, an engine for `serve` and `web`. The one place the front-ends and the servers share, so
that neither imports the other nor a CLI module."""

from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from .arguments import shard_vision
from .processing import Processor

logger = logging.getLogger(__name__)


def parse_lora(values: list[str] | None) -> dict[str, Path]:
    """--lora NAME=PATH or PATH (NAME: the folder's name), repeatable -> {name: folder}; clear errors for a
    missing folder or a name given twice."""
    adapters: dict[str, Path] = {}
    for value in values or ():
        name, sep, path = value.partition("=")
        folder = Path(path if sep else value)
        name = name if sep else folder.resolve().name
        if not folder.is_dir():
            raise FileNotFoundError(f"--lora {value}: no such folder")
        if not name or name in adapters:
            raise ValueError(f"--lora {value}: the adapter name {name!r} is empty or given twice")
        adapters[name] = folder
    return adapters


def engine_kwargs(args) -> dict:
    """EngineConfig fields given on the command line (the others keep their defaults)."""
    names = ("max_model_len", "max_num_seqs", "num_kv_blocks")
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "embeddings_on_host", False):
        kwargs["embeddings_on_host"] = True
    return kwargs


@asynccontextmanager
async def open_engine(args) -> AsyncIterator[tuple["AsyncLLM", Processor, Path]]:  # noqa: F821
    """(engine, processor, checkpoint folder): the model is loaded off the event loop, the engine
    thread started, and shut down (in-flight requests failed) on exit."""
    from .async_llm import AsyncLLM
    from .devices import auto_dtype, resolve_device
    from .tiny import note, tiny_name

    device = resolve_device(args.device)
    adapters = parse_lora(getattr(args, "lora", None))
    parallel = {"tensor_parallel_size": getattr(args, "tensor_parallel_size", 1),  # the worker loads each rank's
                "pipeline_parallel_size": getattr(args, "pipeline_parallel_size", 1),  # shard / stage
                "shard_vision": shard_vision(args)}
    engine = await asyncio.to_thread(AsyncLLM.from_pretrained, args.model, auto_dtype(args.dtype, device), device,
                                     quant=getattr(args, "quant", None), adapters=adapters, **parallel,
                                     **engine_kwargs(args))
    folder = Path(engine.engine.model.checkpoint_path)
    name = tiny_name(folder)
    if name:  # each embedded model's own note (tiny-video's is about moving shapes)
        logger.warning("%s is the %s", args.model, note(name))
    try:
        async with engine:
            yield engine, engine.processor, folder
    finally:
        engine.engine.shutdown()  # a tensor-parallel group's ranks


def load_from_args(args):
    """(model, processor) from the shared model arguments. Everything that can be checked without the
    weights (device, config, tokenizer, --image / --video, --lora) is checked before they load."""
    from .config import ModelConfig
    from .devices import auto_dtype, resolve_device
    from .engine.worker import ModelSpec
    from .model import load_model
    from .tiny import checkpoint_folder, note, tiny_name

    device = resolve_device(args.device)
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
    if shard_vision(args):
        raise ValueError("--vision-parallel sharded needs --tensor-parallel-size > 1")
    pipeline = getattr(args, "pipeline_parallel_size", 1)
    model = load_model(str(folder), dtype=auto_dtype(args.dtype, device), device=device,
                       quant=getattr(args, "quant", None),
                       pipeline_devices=ModelSpec(str(folder), device=device, pipeline_parallel_size=pipeline)
                       .pipeline_devices() if pipeline > 1 else None)
    if getattr(args, "embeddings_on_host", False):
        from .model.host_embedding import move_embeddings_to_host

        move_embeddings_to_host(model)
    if getattr(args, "lora", None):
        from .finetune.lora import load_with_adapter

        model = load_with_adapter(model, args.lora)[0]
    name = tiny_name(model.checkpoint_path)
    if name:
        print(f"note: {args.model} is the {note(name)}.", file=sys.stderr)
    return model, processor


CHAT_ADAPTER = "lora"  # the name `chat --lora PATH` gives its adapter in the engine


def load_engine_for_chat(args):
    """(engine, processor) for `chat --tensor-parallel-size N`: the engine with one sequence at a time
    (with --lora, its adapter loaded on every rank: requests name CHAT_ADAPTER)."""
    from .devices import auto_dtype, resolve_device
    from .llm import LLMEngine
    from .tiny import note, tiny_name

    device = resolve_device(args.device)
    lora = getattr(args, "lora", None)  # chat's --lora: one adapter folder, served unmerged as CHAT_ADAPTER
    engine = LLMEngine.from_pretrained(args.model, auto_dtype(args.dtype, device), device, quant=args.quant,
                                       adapters={CHAT_ADAPTER: lora} if lora else None,
                                       tensor_parallel_size=args.tensor_parallel_size,
                                       shard_vision=shard_vision(args), max_num_seqs=1,
                                       embeddings_on_host=getattr(args, "embeddings_on_host", False))
    name = tiny_name(engine.model.checkpoint_path)
    if name:
        print(f"note: {args.model} is the {note(name)}.", file=sys.stderr)
    return engine, engine.processor

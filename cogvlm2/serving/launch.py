"""Start the engine for a server process from its command-line arguments, and stop it afterwards."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from ..processing import Processor

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
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


@asynccontextmanager
async def open_engine(args) -> AsyncIterator[tuple["AsyncLLM", Processor, Path]]:  # noqa: F821
    """(engine, processor, checkpoint folder): the model is loaded off the event loop, the engine
    thread started, and shut down (in-flight requests failed) on exit."""
    from ..cli import auto_device  # checks the value: a clear error for --device cuda without a GPU
    from ..devices import auto_dtype
    from ..async_llm import AsyncLLM
    from ..tiny import TINY_NOTE, is_tiny

    device = auto_device(args.device)
    adapters = parse_lora(getattr(args, "lora", None))
    parallel = {"tensor_parallel_size": getattr(args, "tensor_parallel_size", 1),  # the worker loads each rank's
                "pipeline_parallel_size": getattr(args, "pipeline_parallel_size", 1)}  # shard / stage
    engine = await asyncio.to_thread(AsyncLLM.from_pretrained, args.model, auto_dtype(args.dtype, device), device,
                                     quant=getattr(args, "quant", None), adapters=adapters, **parallel,
                                     **engine_kwargs(args))
    folder = Path(engine.engine.model.checkpoint_path)
    if is_tiny(folder):
        logger.warning("%s is the %s", args.model, TINY_NOTE)
    try:
        async with engine:
            yield engine, engine.processor, folder
    finally:
        engine.engine.shutdown()  # a tensor-parallel group's ranks

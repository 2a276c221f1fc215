"""Start the engine for a server process from its command-line arguments, and stop it afterwards."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from ..processing import Processor

logger = logging.getLogger(__name__)


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
    from ..model import load_model
    from ..tiny import TINY_NOTE, is_tiny

    device = auto_device(args.device)
    parallel = {"tensor_parallel_size": getattr(args, "tensor_parallel_size", 1),
                "pipeline_parallel_size": getattr(args, "pipeline_parallel_size", 1)}
    if max(parallel.values()) > 1:  # the worker loads the model on each device (each rank: its shard)
        engine = await asyncio.to_thread(AsyncLLM.from_pretrained, args.model, auto_dtype(args.dtype, device), device,
                                         quant=getattr(args, "quant", None), **parallel, **engine_kwargs(args))
        folder = Path(engine.engine.model.checkpoint_path)
    else:
        model = await asyncio.to_thread(load_model, args.model, auto_dtype(args.dtype, device), device,
                                        quant=getattr(args, "quant", None))
        folder = Path(model.checkpoint_path)
        engine = await asyncio.to_thread(AsyncLLM.from_pretrained, model, **engine_kwargs(args))
    if is_tiny(folder):
        logger.warning("%s is the %s", args.model, TINY_NOTE)
    try:
        async with engine:
            yield engine, engine.processor, folder
    finally:
        engine.engine.shutdown()  # a tensor-parallel group's ranks

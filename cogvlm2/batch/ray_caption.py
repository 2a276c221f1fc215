"""Captioning on a Ray cluster (`pip install -e '.[ray]'`): a Ray Data pipeline with one engine per GPU.

    items still to do (the driver applied the resume rule)
      -> CPU tasks: read + decode + preprocess each item (autoscaled by Ray Data)
      -> actor pool, `actors` = n or (min, max) engines, one GPU each (CPU actors without GPUs): each
         actor runs an AsyncLLM, and takes several batches at once (an async UDF), so its engine batches
         across them continuously instead of draining one batch before the next
      -> rows streamed back to the driver, which writes them (same writer and resume rule as one process)

Ray Data's streaming executor bounds the preprocessed items in flight (back-pressure): a slow engine pool
slows the reading, never fills memory. The driver writes the output so the run needs no shared
filesystem; rows are small next to the media they describe.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from typing import Callable, Iterable, Iterator

import torch

from ..checkpoint import parse_dtype
from ..engine.config import EngineConfig
from ..llm import LLMEngine
from ..sampling_params import SamplingParams
from .items import Item, MissingExtraError
from .preprocess import Preprocessor
from .rows import model_label, result_row


# items per preprocessing task (before a very long list reaches MAX_BLOCKS: then more per task)
PREP_ITEMS, MAX_BLOCKS = 2, 4096


def _prepare(batch: dict, prep: Preprocessor, pixel_dtype: torch.dtype | None = None) -> dict:
    """CPU task: items -> pickled ModelInputs (or the error), with the time spent. pixel_dtype: the 16-bit
    dtype the engines compute in, when known (`transfer_dtype`): the pixels travel in it."""
    out = {"item": [], "inputs": [], "error": [], "seconds": []}
    for blob in batch["item"]:
        item = pickle.loads(blob)
        start = time.perf_counter()
        try:
            inputs = prep(item)
            if pixel_dtype is not None and inputs.pixel_values is not None:
                inputs = inputs.with_pixels_in(pixel_dtype)  # keeps the Processor's finiteness mark
            inputs, error = pickle.dumps(inputs), ""
        except Exception as e:  # noqa: BLE001 - an unreadable item fails alone
            from .driver import _message

            inputs, error = b"", _message(e)
        out["item"].append(blob)
        out["inputs"].append(inputs)
        out["error"].append(error)
        out["seconds"].append(time.perf_counter() - start)
    return out


class _EngineActor:
    """One engine (one GPU, or the CPU) serving many batches concurrently."""

    def __init__(self, model: str, factory: Callable[[], LLMEngine] | None, dtype: str | None, device: str | None,
                 engine_kwargs: dict, params: SamplingParams, prep: Preprocessor, adapter: str | None = None):
        from ..async_llm import AsyncLLM

        engine = factory() if factory is not None else LLMEngine.from_pretrained(model, dtype, device, **engine_kwargs)
        sent = transfer_dtype(dtype)
        if sent is not None and engine.model.dtype != sent:  # the pixels would have lost precision on the way
            raise ValueError(f"dtype={dtype!r} was given, so pixels are sent in {sent}, but the engine computes in "
                             f"{engine.model.dtype}: pass the engine's dtype (or none)")
        self.llm = AsyncLLM(engine).start()
        self.params, self.prep, self.model_name, self.adapter = params, prep, model_label(model, adapter), adapter
        self._n = 0

    async def __call__(self, batch: dict) -> dict:
        rows = await asyncio.gather(*(self._one(pickle.loads(b), i, e, s) for b, i, e, s in
                                      zip(batch["item"], batch["inputs"], batch["error"], batch["seconds"])))
        return {"row": [json.dumps(r, ensure_ascii=False) for r in rows]}

    async def _one(self, item: Item, inputs: bytes, error: str, seconds: float) -> dict:
        start = time.perf_counter()
        out = None
        if not error:
            self._n += 1
            try:
                async for out in self.llm.generate(f"ray-{self._n}", pickle.loads(inputs), self.params,
                                                  adapter=self.adapter, final_only=True):
                    pass
            except (ValueError, RuntimeError) as e:
                error, out = str(e), None
        return result_row(item, self.prep, self.model_name, out, error or None,
                          seconds + time.perf_counter() - start)


def transfer_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype pixels travel in from the preprocessing tasks to the engine actors: the engines' own compute
    dtype when the caller named a 16-bit one (half the bytes of float32 through Ray's object store, ~11 MB
    instead of 22 MB per 1344² image; the engine casts pixels to its dtype before the vision tower, so
    casting earlier rounds identically). None (float32 as preprocessed) when the dtype is not known: an
    "auto" or absent dtype resolves on the actor's GPU, and a factory builds whatever it builds."""
    if dtype is None or dtype == "auto":
        return None
    dtype = parse_dtype(dtype)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _actor_cpus(on_gpu: bool, max_actors: int, cluster_cpus: float) -> float:
    """CPUs an engine actor asks for. An engine on the CPU computes with several threads: 2; one on a GPU
    needs 1. Distinct resources also keep Ray Data from fusing the preprocessing tasks into the actors
    (it does when both ask for the same), so a laptop runs the same topology as a GPU cluster. Always
    leaves one CPU for preprocessing: actors holding every CPU would wait forever for their input."""
    want = 1.0 if on_gpu else 2.0
    return min(want, max((cluster_cpus - 1) / max_actors, 0.1))


def ray_rows(items: Iterable[Item], *, model: str, factory: Callable[[], LLMEngine] | None, prep: Preprocessor,
             params: SamplingParams, adapter: str | None, dtype: str | None, device: str | None, address: str | None,
             actors: int | tuple[int, int], gpus_per_actor: float | None, batch_size: int,
             engine_kwargs: dict) -> Iterator[dict]:
    """Rows of `items` computed on Ray (connects to `address`, a running cluster, or starts a local one)."""
    try:
        import ray
        import ray.data
    except ModuleNotFoundError:
        raise MissingExtraError("the Ray path needs Ray Data: pip install -e '.[ray]' (from a checkout) or "
                                "pip install 'cogvlm2[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the caller draws one bar over the rows
    ctx.print_on_execution_start = False
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_per_actor is None:
        gpus_per_actor = 1 if gpus else 0
    if device is None:
        device = "cuda" if gpus_per_actor else "cpu"
    todo = []
    for item in items:
        if item.error is not None:  # known bad before any work: reported here
            yield result_row(item, prep, model_label(model, adapter), None, item.error, 0.0)
        else:
            todo.append({"item": pickle.dumps(item)})
    if not todo:
        return
    low, high = (actors, actors) if isinstance(actors, int) else actors
    # Calls in flight per actor: enough batches that its engine always holds ~2 x max_num_seqs requests,
    # so continuous batching never drains between batches.
    seqs = engine_kwargs.get("max_num_seqs") or EngineConfig.max_num_seqs
    calls = max(2, -(-2 * seqs // batch_size))
    # Preprocessing runs in small tasks (PREP_ITEMS items each), not in the engine calls' batches, so many
    # CPUs decode the images of one call at once. (On 2 H200s the first request still reached the actors
    # ~1.5 s after they were ready, as with tasks of 16 items: that wait is Ray Data's dispatch.)
    blocks = max(1, min(-(-len(todo) // PREP_ITEMS), MAX_BLOCKS))
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    ds = ds.map_batches(_prepare, fn_kwargs={"prep": prep, "pixel_dtype": transfer_dtype(dtype)},
                        batch_size=PREP_ITEMS, num_cpus=1)
    actor_cpus = _actor_cpus(bool(gpus_per_actor), high, ray.cluster_resources().get("CPU", 1))
    ds = ds.map_batches(
        _EngineActor, batch_size=batch_size, num_gpus=gpus_per_actor, num_cpus=actor_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=calls,
                                           max_concurrent_calls_per_actor=calls),
        fn_constructor_kwargs={"model": model, "factory": factory, "dtype": dtype, "device": device,
                               "engine_kwargs": engine_kwargs, "params": params, "prep": prep,
                               "adapter": adapter})
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for row in batch["row"]:
            yield json.loads(row)

"""Drive an engine over a stream of Items: a worker pool preprocesses ahead, the engine batches, results stream out.

    items --(at most `lookahead` in the pool)--> preprocessing threads --> engine queue (at most
    max_num_seqs + lookahead requests) --> engine.step() --> Result per finished item, in finish order

Both bounds keep host memory flat however long the input is (a preprocessed 1344² image is 21 MB): the
pool holds `lookahead` items, the engine's waiting queue is topped up so that the scheduler always has a
request to admit when a sequence finishes. The engine is never made to wait for a decode that is not
yet needed, and the loop blocks on preprocessing only when the engine has nothing to do. An item whose
preprocessing or validation fails yields an error Result; only an engine failure propagates.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ..llm import LLMEngine
from ..engine.protocol import RequestOutput
from ..processing.prompt import ModelInputs
from ..sampling_params import SamplingParams
from .items import Item, adapter_for


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 1))


@dataclass
class Result:
    """One finished item: its output, or why it failed; seconds from leaving the queue to finishing."""

    item: Item
    output: RequestOutput | None
    error: str | None
    seconds: float


def drive(engine: LLMEngine, items: Iterable[Item], prepare: Callable[[Item], ModelInputs],
          params: SamplingParams, workers: int | None = None, lookahead: int | None = None,
          adapter: str | None = None) -> Iterator[Result]:
    """Results of all items (finish order). Closing the iterator early aborts what is still running.
    adapter: the LoRA adapter of items that name none (None: the base model); an unknown name fails its item."""
    workers = workers or default_workers()
    lookahead = lookahead or 2 * workers
    max_queued = engine.config.max_num_seqs + lookahead
    source = iter(items)
    preparing: deque[tuple[Item, Future, float]] = deque()
    running: dict[str, tuple[Item, float]] = {}
    exhausted = False
    with ThreadPoolExecutor(workers, thread_name_prefix="cogvlm2-preprocess") as pool:
        try:
            while True:
                while not exhausted and len(preparing) < lookahead:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                    elif item.error is not None:
                        yield Result(item, None, item.error, 0.0)
                    else:
                        preparing.append((item, pool.submit(prepare, item), time.perf_counter()))
                for entry in [e for e in preparing if e[1].done()]:
                    if len(running) >= max_queued:
                        break
                    preparing.remove(entry)
                    item, future, start = entry
                    try:
                        request_id = f"item-{id(item)}-{start}"
                        engine.add_request(request_id, future.result(), params, adapter=adapter_for(item, adapter))
                        running[request_id] = (item, start)
                    except Exception as e:  # noqa: BLE001 - an unreadable or invalid item fails alone
                        yield Result(item, None, _message(e), time.perf_counter() - start)
                if engine.has_unfinished():
                    for out in engine.step():
                        if out.finished and out.request_id in running:
                            item, start = running.pop(out.request_id)
                            yield Result(item, out, None, time.perf_counter() - start)
                elif preparing:
                    wait([f for _, f, _ in preparing], return_when=FIRST_COMPLETED)
                elif exhausted:
                    return
        finally:
            for _, future, _ in preparing:
                future.cancel()
            if running:
                engine.abort_all()


def _message(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {text}"

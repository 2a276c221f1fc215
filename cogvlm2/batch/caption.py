"""`cogvlm2.caption(...)`: caption a folder, a manifest or WebDataset shards; rows stream out, resumably.

One row per item: id, path, caption, model, prompt, template, tokens (generated), prompt_tokens,
finish_reason, seconds, error (None, or why the item has no caption). With an output path, rows are
written as they finish and items whose id is already there are skipped (the resume rule). Runs the
engine in this process (a worker pool preprocesses ahead of it) or, with ray=True, on a Ray cluster.
"""

from __future__ import annotations

import os
from typing import Iterable

from ..processing import CAPTION_PROMPT, Processor
from ..sampling_params import SamplingParams
from .items import Item, media_kind
from .job import Job
from .preprocess import Preprocessor
from .rows import CAPTION_SCHEMA, model_label, result_row
from .sources import Source, open_source
from .writers import DEFAULT_CHUNK_ROWS, DEFAULT_CHUNK_SECONDS, open_writer

# The official prompts: cogvlm2-llama3-caption's demo asks this of every video (processing.CAPTION_PROMPT);
# image checkpoints get the equivalent question. The template and frame strategy are the checkpoint's
# (Processor defaults, as the official demos choose them).
VIDEO_PROMPT = CAPTION_PROMPT
IMAGE_PROMPT = "Please describe this image in detail."
DEFAULT_MAX_NEW_TOKENS = 2048  # the official caption demo's budget; captions end at EOS well before


def default_prompt(media_kinds: tuple[str, ...]) -> str:
    """The caption prompt of a checkpoint that takes `media_kinds` (`Processor.media_kinds`)."""
    return VIDEO_PROMPT if "video" in media_kinds else IMAGE_PROMPT


def native_media(media_kinds: tuple[str, ...]) -> tuple[str, ...]:
    """What a folder scan picks up: video checkpoints read videos and stills (as one-frame clips)."""
    return ("image", "video") if "video" in media_kinds else media_kinds


def caption(inputs: str | os.PathLike | Iterable[str | Item], model: str = "tiny",
            output: str | os.PathLike | None = None, *, prompt: str | None = None, template: str | None = None, video_strategy: str | None = None,
            media: Iterable[str] | None = None, allow_urls: bool = False,
            sampling_params: SamplingParams | None = None, dtype: str | None = None, device: str | None = None,
            engine=None, processor: Processor | None = None, workers: int | None = None,
            lookahead: int | None = None, overwrite: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS,
            chunk_seconds: float = DEFAULT_CHUNK_SECONDS, ray: bool = False, ray_address: str | None = None,
            ray_actors: tuple[int, int] | int = 1, ray_gpus_per_actor: float | None = None,
            ray_batch_size: int = 8, adapter: str | None = None, **engine_kwargs) -> Job:
    """Caption `inputs`: a folder, manifest (.txt/.jsonl/.csv/.parquet), `.tar` shards, or a list of paths
    / Items. Returns a Job: iterate it for the rows (it runs as you iterate); it also counts them.

    model: a name for the engine ("tiny", a folder, a hub id), written in every row. engine: an
    LLMEngine already loaded, or a picklable zero-argument function that builds one (called once here, or
    once per Ray actor); then `model` only names it and `processor` (default: the engine's, else loaded
    from `model`) preprocesses. prompt: default per checkpoint (`default_prompt`); template and
    video_strategy: the checkpoint's. sampling_params: default greedy, 2,048 new tokens at most (the
    official caption demo). media: the kinds a folder scan takes (default: what the checkpoint reads).
    adapter: the LoRA adapter every item is captioned with, by name: one of engine_kwargs' `adapters`
    ({name: folder}) or of the given engine's (None: the base model); rows name the model MODEL+ADAPTER.
    engine_kwargs: EngineConfig fields (max_num_seqs, gpu_memory_utilization, ...) and `adapters`.
    Ray: ray_actors = n or (min, max) engines (autoscaling between), ray_gpus_per_actor (default 1 when
    the cluster has GPUs, else CPU actors), ray_address (default: a running cluster or a local one). A 16-bit
    dtype ("bfloat16", "float16") also sends the pixels to the actors in it (half the bytes; with an engine
    factory, name the dtype it builds in to get this).
    """
    from ..llm import LLMEngine

    params = sampling_params or SamplingParams(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0)
    if processor is None:
        if isinstance(engine, LLMEngine):
            processor = engine.processor
        else:
            from ..tiny import checkpoint_folder

            processor = Processor.from_pretrained(checkpoint_folder(model))
    if adapter is not None and isinstance(engine, LLMEngine) and adapter not in engine.adapters:
        loaded = ", ".join(engine.adapters) or "none"
        raise ValueError(f"adapter {adapter!r} is not loaded in the engine; loaded: {loaded}")
    if adapter is not None and engine is None and adapter not in (engine_kwargs.get("adapters") or {}):
        raise ValueError(f"adapter {adapter!r}: pass its folder in adapters={{name: folder}}")
    label = model_label(model, adapter)
    prompt = prompt or default_prompt(processor.media_kinds)
    prep = Preprocessor(processor, prompt, template, video_strategy)
    source = _source(inputs, tuple(media) if media else native_media(processor.media_kinds), allow_urls)
    writer = open_writer(output, CAPTION_SCHEMA, overwrite, chunk_rows, chunk_seconds) if output is not None else None

    if ray:
        from .ray_caption import ray_rows

        if isinstance(engine, LLMEngine):
            raise ValueError("ray=True builds one engine per actor: pass a model name or an engine factory, "
                             "not a loaded engine")

        def rows(items):
            return ray_rows(items, model=str(model), factory=engine, prep=prep, params=params, adapter=adapter,
                            dtype=dtype, device=device, address=ray_address, actors=ray_actors,
                            gpus_per_actor=ray_gpus_per_actor, batch_size=ray_batch_size, engine_kwargs=engine_kwargs)
    else:
        try:
            if engine is None:
                engine = LLMEngine.from_pretrained(model, dtype, device, **engine_kwargs)
            elif not isinstance(engine, LLMEngine):
                engine = engine()
        except BaseException:
            if writer is not None:
                writer.close()
            raise

        def rows(items):
            from .driver import drive

            for r in drive(engine, items, prep, params, workers, lookahead, adapter):
                yield result_row(r.item, prep, label, r.output, r.error, r.seconds)
    return Job(source, rows, writer, source.total)


def _source(inputs, kinds: tuple[str, ...], allow_urls: bool) -> Source:
    if isinstance(inputs, (str, os.PathLike)):
        return open_source(inputs, kinds, allow_urls)
    items = []
    for x in inputs:
        if isinstance(x, Item):
            items.append(x)
            continue
        kind = media_kind(os.fspath(x))
        items.append(Item(id=os.fspath(x), path=os.fspath(x), **{kind: os.fspath(x)}) if kind else
                     Item(id=os.fspath(x), path=os.fspath(x), error=f"{x}: unknown media type (extension)"))
    return Source("items", lambda: iter(items), len(items))

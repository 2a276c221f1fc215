"""Captioning at scale: `cogvlm2.caption` end to end from files on disk, against the engine alone.

Full-size architectures with random bf16 weights (as engine_gpu.py), 128 new tokens per item (ignore_eos):

  --only image  N JPEGs (default 1,000; 1600x1200, a photo's size) written to disk; cogvlm2-llama3-chat-19B.
                img/s of caption() (worker-pool decode + preprocessing feeding the engine) next to the
                engine alone on pre-processed images (engine_gpu.py's captioning figure, measured here).
                Goal: >= 95%.
  --only video  mp4 files of 24 s (640x360, 8 fps; 24 frames at 224^2 per video, chat strategy);
                cogvlm2-llama3-caption's architecture: videos/s end to end and for the engine alone.
  --only ray    (2-GPU machine) the same JPEGs through Ray Data with 2 engine actors, one per GPU, against
                one GPU in one process. Goal: >= 1.9x. Each engine is built before its clock starts: the
                one-GPU run times caption() on a built engine, the Ray run from the moment the first
                actor's engine is up (the second actor's later start counts against Ray) to the last row;
                the whole run with Ray's start-up is reported beside it. Every engine logs when it is ready and
                when each request comes and goes: per actor, its start lag, its tail and its own rate.
                --pair: also one caption() process per GPU at once, no Ray (the host's share of the gap).
                --tp N: each actor a tensor-parallel group of N GPUs (GPUs / N actors), same one-GPU reference.
  --dry-run     the ray mode's mechanics with the tiny model on the CPU (tests/test_caption.py runs it).

Each mode fits one device call of 8 minutes on an H200 (the ray mode on nvidia-h200-x2):

    PYTHONPATH=. python benchmarks/caption_gpu.py --only image --out $OUT/caption_image.json
    PYTHONPATH=. python benchmarks/caption_gpu.py --only video --out $OUT/caption_video.json
    PYTHONPATH=. python benchmarks/caption_gpu.py --only ray --num-images 400 --out $OUT/caption_ray.json
    PYTHONPATH=. python benchmarks/caption_gpu.py --only ray --pair --num-images 600 --out ...  (~8 min, estimated)
    PYTHONPATH=. python benchmarks/caption_gpu.py --only ray --num-images 1000 --one-gpu-rate R --out ...
                  (R: the img/s of an `--only image` run of 1,000 JPEGs; the pair does not fit one call)
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import full_size_config, random_model, report
from cogvlm2.batch.caption import caption
from cogvlm2.engine.config import EngineConfig
from cogvlm2.llm import LLMEngine
from cogvlm2.processing import Processor
from cogvlm2.processing.tokenizer import Tokenizer, bundled_tokenizer_path
from cogvlm2.sampling_params import SamplingParams

PARAMS = SamplingParams(max_new_tokens=128, temperature=0, ignore_eos=True)
ENGINE = dict(max_num_seqs=64, max_num_batched_tokens=8192, gpu_memory_utilization=0.9)
IMAGE_MODEL, VIDEO_MODEL = "cogvlm2-llama3-chat-19B", "cogvlm2-llama3-caption"


def write_jpeg(path: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    small.resize((1600, 1200), Image.BICUBIC).save(path, quality=90)


def write_mp4(path: str, seed: int, seconds: int = 24, fps: int = 8, size=(640, 360)) -> None:
    import av

    rng = np.random.default_rng(seed)
    with av.open(path, "w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        for i in range(seconds * fps):
            frame = np.roll(base, i, axis=1).repeat(8, 0).repeat(8, 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_files(folder: Path, n: int, kind: str, seed: int = 0) -> float:
    """n media files (content from seeds seed, seed+1, ...) written in parallel; their total size in MB."""
    folder.mkdir(parents=True, exist_ok=True)
    write, ext = (write_jpeg, "jpg") if kind == "image" else (write_mp4, "mp4")
    paths = [str(folder / f"{i:05d}.{ext}") for i in range(n)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, paths, range(seed, seed + n), chunksize=8))
    return sum(os.path.getsize(p) for p in paths) / 1e6


def dry() -> bool:
    """--dry-run (inherited by the Ray actors and the pair processes): the tiny model on the CPU, to check the
    benchmark's mechanics anywhere."""
    return os.environ.get("CAPTION_BENCH_DRY") == "1"


def image_processor() -> Processor:
    if dry():
        from cogvlm2.llm import load_processor

        return load_processor("tiny")
    return Processor(full_size_config(IMAGE_MODEL), Tokenizer(bundled_tokenizer_path()))


def tensor_parallel() -> int:
    """--tp (inherited by the Ray actors): each engine a tensor-parallel group of this many GPUs."""
    return int(os.environ.get("CAPTION_BENCH_TP") or 1)


def build_engine(name: str) -> LLMEngine:
    """The full-size architecture `name` with random weights on this process's GPU (a Ray actor's too), or
    on its `tensor_parallel()` GPUs (this process is rank 0 and spawns the others, each building its shard)."""
    tp = tensor_parallel()
    if dry():
        return LLMEngine.from_pretrained("tiny", "float32", "cpu", max_num_seqs=8, max_model_len=1024,
                                         tensor_parallel_size=tp)
    cfg = full_size_config(name)
    processor = Processor(cfg, Tokenizer(bundled_tokenizer_path()))
    if tp > 1:
        from benchmarks.common import RandomModel
        from cogvlm2.engine.worker import ModelSpec

        return LLMEngine(ModelSpec(RandomModel(name), "bfloat16", "cuda", tensor_parallel_size=tp),
                         EngineConfig(**ENGINE), processor)
    return LLMEngine(random_model(cfg), EngineConfig(**ENGINE), processor)


def engine_alone(engine: LLMEngine, inputs: list) -> float:
    """Items/s of the engine on inputs already pre-processed in memory (all queued at once)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, x in enumerate(inputs):
        engine.add_request(f"alone-{i}-{start}", x, PARAMS)
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    return len(inputs) / (time.perf_counter() - start)


def end_to_end(folder: Path, out: Path, **kwargs) -> tuple[float, float, int]:
    """(items/s over the whole run, wall-clock time.time() of the last row, failures) of caption()."""
    job = caption(folder, kwargs.pop("model"), out, sampling_params=PARAMS, overwrite=True, **kwargs)
    for _ in job:
        pass
    print(f"  {job.summary('items')}")
    return (job.succeeded + job.failed) / job.seconds, time.time(), job.failed


def bench_local(kind: str, n: int, n_alone: int, workers: int | None, tmp: Path) -> list[dict]:
    name = IMAGE_MODEL if kind == "image" else VIDEO_MODEL
    folder = tmp / kind
    t0 = time.perf_counter()
    mb = write_files(folder, n, kind)
    print(f"{n} {kind} files, {mb:.0f} MB written in {time.perf_counter() - t0:.1f} s")
    write_files(tmp / "alone", n_alone + 8, kind, seed=10**6)  # other content: no prefix-cache hits later
    engine = build_engine(name)
    prep_start = time.perf_counter()
    arg = "image" if kind == "image" else "video"
    inputs = [engine.processor(caption_prompt(kind), **{arg: str(f)}) for f in sorted((tmp / "alone").iterdir())]
    prep_rate = len(inputs) / (time.perf_counter() - prep_start)
    engine_alone(engine, inputs[:8])  # warm-up: cuDNN plans, allocator
    alone = engine_alone(engine, inputs[8:])
    del inputs
    rate, _, failed = end_to_end(folder, tmp / f"{kind}.parquet", model=name, engine=engine, workers=workers)
    assert failed == 0, "benchmark items failed"
    unit = "img/s" if kind == "image" else "videos/s"
    what = f"{n} {'JPEGs (1600x1200)' if kind == 'image' else 'mp4s (24 s, 640x360, 24 frames)'} x 128 new tokens"
    return [
        dict(name=f"caption() end to end, {what}", value=rate, unit=unit, floor=alone,
             floor_how=f"the engine alone on {n_alone} pre-processed inputs (goal >= 95%)"),
        dict(name="  preprocessing in one thread (reference)", value=prep_rate, unit=unit, floor=alone,
             floor_how="what one thread must beat to feed the engine alone"),
    ]


def caption_prompt(kind: str) -> str:
    from cogvlm2.batch.caption import IMAGE_PROMPT, VIDEO_PROMPT

    return IMAGE_PROMPT if kind == "image" else VIDEO_PROMPT


def log_timeline(engine: LLMEngine, path: str) -> None:
    """The benchmark's own instrumentation of one engine: a line "pid event time.time()" appended to `path` when
    it is ready, for each request added and for each request finished (the engines share the driver's host and
    its disk). `timelines` reads them back per process."""
    f = open(path, "a", buffering=1)  # noqa: SIM115 - open for the engine's life
    pid = os.getpid()
    add, step = engine.add_request, engine.step

    def note(event: str) -> None:
        f.write(f"{pid} {event} {time.time()}\n")

    def add_request(*args, **kwargs):
        note("add")
        return add(*args, **kwargs)

    def step_(*args, **kwargs):
        outputs = step(*args, **kwargs)
        for o in outputs:
            if o.finished:
                note("done")
        return outputs

    engine.add_request, engine.step = add_request, step_  # AsyncLLM and drive() call them through the instance
    note("ready")


def timelines(path: Path) -> dict[int, dict]:
    """Per process of `log_timeline`: ready, first add, last done (time.time()) and requests finished."""
    out: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        pid, event, t = line.split()
        d = out.setdefault(int(pid), {"ready": None, "first": None, "last": None, "done": 0})
        t = float(t)
        if event == "ready":
            d["ready"] = t
        elif event == "add":
            d["first"] = t if d["first"] is None else min(d["first"], t)
        else:
            d["last"], d["done"] = t if d["last"] is None else max(d["last"], t), d["done"] + 1
    return out


def print_timelines(lines: dict[int, dict], t0: float, what: str) -> None:
    for pid, d in sorted(lines.items(), key=lambda kv: kv[1]["ready"] or 0):
        if not d["done"]:
            print(f"  {what} {pid}: ready {d['ready'] - t0:6.1f} s, finished no request")
            continue
        busy = d["last"] - d["first"]
        print(f"  {what} {pid}: ready {d['ready'] - t0:6.1f} s, first request {d['first'] - t0:6.1f} s, last row "
              f"{d['last'] - t0:6.1f} s: {d['done']} items, {d['done'] / busy:.2f} img/s from its first request")


def _image_engine() -> LLMEngine:  # picklable by value (defined in __main__): built inside each Ray actor
    engine = build_engine(IMAGE_MODEL)
    log = os.environ.get("CAPTION_BENCH_LOG")
    if log:
        log_timeline(engine, log)
    return engine


def one_gpu(folder: Path, tmp: Path, workers: int | None) -> tuple[float, float]:
    """(img/s of caption() on a built engine, the same from its first request to its last row) on this
    process's GPU."""
    gc.collect()
    engine = build_engine(IMAGE_MODEL)  # built before the clock starts, like an actor's engine
    log = tmp / "one_timeline.txt"
    log_timeline(engine, str(log))
    rate, _, failed = end_to_end(folder, tmp / "one.parquet", model=IMAGE_MODEL, engine=engine, workers=workers)
    assert failed == 0
    (d,) = timelines(log).values()
    print_timelines({0: d}, d["ready"], "one GPU")
    return rate, d["done"] / (d["last"] - d["first"])


def _pair_child(gpu: int, manifest: str, out: str, log: str, go: str, workers: int | None) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before this process's first CUDA call
    engine = build_engine(IMAGE_MODEL)
    log_timeline(engine, log)
    while not os.path.exists(go):
        time.sleep(0.01)
    _, _, failed = end_to_end(Path(manifest), Path(out), model=IMAGE_MODEL, engine=engine, workers=workers)
    assert failed == 0


def bench_pair(folder: Path, tmp: Path, workers: int | None) -> float:
    """img/s of one caption() process per GPU, all at once, each on its share of the files (no Ray), from a
    common start once every engine is built to the last row: what the host lets the GPUs do together, the
    ceiling for Ray that `2 x one GPU alone` may overstate (the GPUs share the host's CPUs, memory and power)."""
    import multiprocessing as mp

    gpus = 2 if dry() else torch.cuda.device_count()
    files = sorted(str(p) for p in folder.iterdir())
    log, go = tmp / "pair_timeline.txt", tmp / "pair_go"
    procs = []
    for g in range(gpus):
        manifest = tmp / f"pair_{g}.txt"
        manifest.write_text("\n".join(files[g::gpus]) + "\n")
        procs.append(mp.get_context("spawn").Process(target=_pair_child, args=(
            g, str(manifest), str(tmp / f"pair_{g}.parquet"), str(log), str(go), workers)))
    for p in procs:
        p.start()
    while not log.exists() or sum(d["ready"] is not None for d in timelines(log).values()) < gpus:
        assert all(p.is_alive() for p in procs), "a pair process died while building its engine"
        time.sleep(0.1)
    t_go = time.time()
    go.touch()
    for p in procs:
        p.join()
        assert p.exitcode == 0, "a pair process failed"
    lines = timelines(log)
    print_timelines(lines, t_go, "pair process")
    return len(files) / (max(d["last"] for d in lines.values() if d["done"]) - t_go)


def bench_ray(n: int, workers: int | None, tmp: Path, one_rate: float | None = None, batch_size: int = 8,
              pair: bool = False, tp: int = 1) -> list[dict]:
    import ray

    folder = tmp / "image"
    write_files(folder, n, "image")
    gpus = 2 if dry() else torch.cuda.device_count()
    log = tmp / "ray_timeline.txt"
    paths = [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(paths), "CAPTION_BENCH_LOG": str(log),
           "CAPTION_BENCH_DRY": os.environ.get("CAPTION_BENCH_DRY", ""), "CAPTION_BENCH_TP": str(tp)}
    actors = gpus // tp  # each a tensor-parallel group of tp GPUs (the one-GPU reference below stays one GPU)
    assert actors >= 1, f"--tp {tp} needs {tp} GPUs, this machine has {gpus}"
    ray.init(num_gpus=0 if dry() else gpus, num_cpus=6 if dry() else None, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": env})
    try:
        t_start = time.time()
        ray_rate, t_end, failed = end_to_end(folder, tmp / "ray.parquet", model=IMAGE_MODEL, engine=_image_engine,
                                             processor=image_processor(), ray=True, ray_actors=actors,
                                             ray_gpus_per_actor=0 if dry() else tp,
                                             ray_batch_size=batch_size, dtype=None if dry() else "bfloat16",
                                             max_num_seqs=ENGINE["max_num_seqs"])
        assert failed == 0
    finally:
        ray.shutdown()
    lines = timelines(log)
    assert 1 <= len(lines) <= actors, lines
    print(f"  Ray: last row at {t_end - t_start:.1f} s after the start; per engine actor:")
    print_timelines(lines, t_start, "actor")
    if len(lines) < actors:  # a short run (the dry run's few items) can end before a later actor's engine is built
        print(f"  {actors - len(lines)} actor(s) not ready before the last row")
    # every item is captioned after the first engine is up: from then to the last row, with the
    # later actor's start-up counted against Ray
    first_ready = min(d["ready"] for d in lines.values())
    ray_up = n / (t_end - first_ready)
    worked = [d for d in lines.values() if d["done"]]
    ray_busy = n / (max(d["last"] for d in worked) - min(d["first"] for d in worked))
    pair_rate = bench_pair(folder, tmp, workers) if pair else None  # before this process builds an engine
    one_busy = None
    if one_rate is None:
        one_rate, one_busy = one_gpu(folder, tmp, workers)
    else:
        print(f"  one GPU: {one_rate:.2f} img/s, given (--one-gpu-rate: an `--only image` run of the same images)")
    rows = [
        dict(name=f"Ray, {actors} engine actors" + (f" of TP={tp}" if tp > 1 else "")
             + f", {n} JPEGs x 128 tokens, from the first engine up to the last row",
             value=ray_up, unit="img/s", floor=gpus * one_rate,
             floor_how=f"{gpus} x one GPU in one process, engine built ({one_rate:.2f} img/s); goal >= 95% (1.9x)"),
        dict(name="  same, whole run (Ray start-up and the engines' builds included)", value=ray_rate, unit="img/s",
             floor=gpus * one_rate, floor_how=f"{gpus} x one GPU in one process"),
    ]
    if one_busy is not None:
        rows.append(dict(name="  Ray from the first request any actor got to the last row", value=ray_busy,
                         unit="img/s", floor=gpus * one_busy,
                         floor_how=f"{gpus} x one GPU from its first request to its last row ({one_busy:.2f})"))
    if pair_rate is not None:
        rows.append(dict(name=f"  {gpus} one-GPU caption() processes at once (no Ray), common start to last row",
                         value=pair_rate, unit="img/s", floor=gpus * one_rate,
                         floor_how=f"{gpus} x one GPU alone: what the shared host leaves of it"))
        rows.append(dict(name="  Ray against those processes at once", value=ray_up, unit="img/s", floor=pair_rate,
                         floor_how="Ray's own cost, the host's share taken out"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="image", choices=["image", "video", "ray"])
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--num-videos", type=int, default=128)
    ap.add_argument("--engine-alone", type=int, default=128, help="pre-processed items for the engine-alone figure")
    ap.add_argument("--workers", type=int, default=None, help="preprocessing threads (default: caption()'s)")
    ap.add_argument("--one-gpu-rate", type=float, default=None,
                    help="ray: the one-GPU img/s of an `--only image` run on the same number of JPEGs (measured "
                         "on this machine kind) instead of measuring it after the Ray run; lets 1,000 JPEGs fit "
                         "one device call")
    ap.add_argument("--ray-batch-size", type=int, default=8,
                    help="items per engine call (default: caption()'s; with preprocessing in tasks of 16 items, "
                         "4, 8 and 16 gave 1.87x, 1.89x, 1.88x)")
    ap.add_argument("--tp", type=int, default=1, help="ray: each engine actor a tensor-parallel group of this many "
                    "GPUs (the one-GPU reference stays one GPU)")
    ap.add_argument("--pair", action="store_true",
                    help="ray: also one caption() process per GPU at once without Ray, on the same files")
    ap.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU: the mechanics, no figures")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["CAPTION_BENCH_DRY"] = "1"
    with tempfile.TemporaryDirectory(prefix="caption-bench-") as tmp:
        tmp = Path(tmp)
        if args.only == "image":
            rows = bench_local("image", args.num_images, args.engine_alone, args.workers, tmp)
        elif args.only == "video":
            rows = bench_local("video", args.num_videos, min(args.engine_alone, args.num_videos), args.workers, tmp)
        else:
            rows = bench_ray(args.num_images, args.workers, tmp, args.one_gpu_rate, args.ray_batch_size,
                             args.pair, args.tp)
    report(rows, args.out)


if __name__ == "__main__":
    main()

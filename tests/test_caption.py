"""`cogvlm2 caption` / `cogvlm2.caption(...)`: folders, manifests, WebDataset; JSONL and Parquet; resume; kill;
the Ray path against the single-process path."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import re
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import cogvlm2
from cogvlm2.batch.caption import CAPTION_SCHEMA, IMAGE_PROMPT, VIDEO_PROMPT
from cogvlm2.batch.sources import write_shard
from cogvlm2.cli import main
from cogvlm2.llm import LLMEngine
from cogvlm2.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_new_tokens=4, temperature=0)
ENGINE = {"max_num_seqs": 4}


def png(seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def mp4(path: Path, seconds: int = 2, fps: int = 4, size=(48, 32)) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(seconds * fps):
            rgb = np.full((size[1], size[0], 3), (i * 30 % 256, 200, 80), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 images (one in a subfolder), 2 mp4s, a corrupt JPEG, and files that are not media."""
    root = tmp_path_factory.mktemp("media")
    (root / "sub").mkdir()
    (root / "a.png").write_bytes(png(0))
    (root / "b.jpg").write_bytes(png(1, "JPEG"))
    (root / "sub" / "c.png").write_bytes(png(2))
    mp4(root / "clip1.mp4")
    mp4(root / "sub" / "clip2.mp4", seconds=3)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (root / "notes.txt").write_text("not media")
    (root / ".hidden.png").write_bytes(png(3))
    return root


@pytest.fixture(scope="module")
def image_engine():
    return LLMEngine.from_pretrained("tiny", "float32", "cpu", **ENGINE)


@pytest.fixture(scope="module")
def video_engine():
    return LLMEngine.from_pretrained("tiny-video", "float32", "cpu", **ENGINE)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def comparable(rows) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in rows), key=lambda r: str(r["id"]))


def test_folder_of_images_and_videos_jsonl_then_resume(folder, video_engine, tmp_path):
    out = tmp_path / "captions.jsonl"
    job = cogvlm2.caption(folder, "tiny-video", out, engine=video_engine, sampling_params=GREEDY)
    rows = {r["id"]: r for r in job}
    assert sorted(rows) == ["a.png", "b.jpg", "broken.jpg", "clip1.mp4", "sub/c.png", "sub/clip2.mp4"]
    for item_id, r in rows.items():
        if item_id == "broken.jpg":
            assert r["caption"] is None and "cannot decode image" in r["error"] and r["tokens"] == 0
        else:
            assert r["error"] is None and isinstance(r["caption"], str) and 1 <= r["tokens"] <= 4
            assert r["finish_reason"] in ("stop", "length") and r["seconds"] > 0
        assert r["prompt"] == VIDEO_PROMPT and r["template"] == "chat" and r["model"] == "tiny-video"
        assert r["path"] == str(folder / item_id)
    assert rows["sub/clip2.mp4"]["prompt_tokens"] > rows["clip1.mp4"]["prompt_tokens"] > rows["a.png"]["prompt_tokens"]
    assert (job.succeeded, job.failed, job.skipped) == (5, 1, 0)
    assert comparable(jsonl(out)) == comparable(rows.values())

    again = cogvlm2.caption(folder, "tiny-video", out, engine=video_engine, sampling_params=GREEDY)
    assert list(again) == [] and (again.succeeded, again.failed, again.skipped) == (0, 0, 6)
    assert len(jsonl(out)) == 6


def test_parquet_output_reads_back_and_equals_jsonl(folder, image_engine, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "captions.parquet"
    rows = list(cogvlm2.caption(folder, "tiny", out, engine=image_engine, sampling_params=GREEDY, chunk_rows=2))
    assert sorted(r["id"] for r in rows) == ["a.png", "b.jpg", "broken.jpg", "sub/c.png"]  # image model: no videos
    assert len(list(out.glob("part-*.parquet"))) == 2 and not list(out.glob(".*"))
    table = pq.read_table(out)
    assert table.schema.names == list(CAPTION_SCHEMA)
    assert comparable(table.to_pylist()) == comparable(rows)
    assert {r["prompt"] for r in rows} == {IMAGE_PROMPT}
    assert list(cogvlm2.caption(folder, "tiny", out, engine=image_engine, sampling_params=GREEDY)) == []

    single = tmp_path / "captions.jsonl"
    list(cogvlm2.caption(folder, "tiny", single, engine=image_engine, sampling_params=GREEDY))
    assert comparable(jsonl(single)) == comparable(rows)


def test_manifests_and_webdataset(folder, image_engine, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "list.txt").write_text(f"# images\n{folder}/a.png\n{folder}/sub/c.png\n")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": "x", "image": str(folder / "a.png"), "prompt": "What is it?"}) + "\n"
        + json.dumps({"path": "https://example.com/a.png"}) + "\n{oops\n" + json.dumps(str(folder / "b.jpg")) + "\n")
    (tmp_path / "m.csv").write_text(f"id,path\nk1,{folder}/a.png\nk2,{folder}/missing.png\n")
    pq.write_table(pa.table({"path": [str(folder / "b.jpg")], "id": ["p1"]}), tmp_path / "m.parquet")
    write_shard(tmp_path / "shard-000.tar", [("s0", {"jpg": png(5, "JPEG"), "txt": b"an old caption"}),
                                              ("s1", {"png": png(6), "prompt": b"Short caption?"}),
                                              ("s2", {"json": b"{}"})])
    write_shard(tmp_path / "shard-001.tar", [("s0", {"png": png(7)})])

    def run(spec):
        return {str(r["id"]): r for r in cogvlm2.caption(spec, "tiny", engine=image_engine, sampling_params=GREEDY)}

    assert sorted(run(tmp_path / "list.txt")) == [f"{folder}/a.png", f"{folder}/sub/c.png"]
    m = run(tmp_path / "m.jsonl")
    assert m["x"]["prompt"] == "What is it?" and m["x"]["error"] is None
    assert "--allow-urls" in m["https://example.com/a.png"]["error"]
    assert "invalid JSON" in m["m.jsonl:3"]["error"] and m[str(folder / "b.jpg")]["error"] is None
    c = run(tmp_path / "m.csv")
    assert c["k1"]["error"] is None and "missing.png" in c["k2"]["error"]
    assert run(tmp_path / "m.parquet")["p1"]["error"] is None
    w = run(str(tmp_path / "shard-{000..001}.tar"))
    assert sorted(w) == ["shard-000/s0", "shard-000/s1", "shard-000/s2", "shard-001/s0"]
    assert w["shard-000/s1"]["prompt"] == "Short caption?" and w["shard-000/s1"]["path"] == "shard-000.tar/s1.png"
    assert "no image or video" in w["shard-000/s2"]["error"] and w["shard-001/s0"]["error"] is None
    shards = tmp_path / "shards.txt"
    shards.write_text("shard-000.tar\nshard-001.tar\n")
    assert sorted(run(shards)) == sorted(w)


def test_cli_caption_summary_and_errors(folder, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    args = ["caption", str(folder), "-o", str(out), "--device", "cpu", "--max-new-tokens", "3", "--no-progress"]
    assert main(args) == 0
    assert "3 done, 0 skipped (already in the output), 1 failed" in capsys.readouterr().err
    assert main(args) == 0
    assert "0 done, 4 skipped" in capsys.readouterr().err
    out.write_text(out.read_text() + "garbage\n")
    assert main(args) == 1
    assert "c.jsonl:5: not an output row" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "nope"), "-o", str(out), "--no-progress"]) == 1
    assert "input not found" in capsys.readouterr().err


def test_caption_sigterm_kill_and_resume_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    data = tmp_path / "imgs"
    data.mkdir()
    n = 24
    for i in range(n):
        (data / f"{i:03d}.png").write_bytes(png(100 + i))
    out = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "cogvlm2.cli", "caption", str(data), "-o", str(out), "--device", "cpu",
           "--max-new-tokens", "24", "--max-num-seqs", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def start_and_stop(extra: list[str], sig: int, ready) -> tuple[int, str]:
        """Run the command, send `sig` once ready(stderr so far) holds, return (exit code, stderr)."""
        proc = subprocess.Popen(cmd + extra, env=env, stderr=subprocess.PIPE)
        err = bytearray()

        def pump():
            while chunk := os.read(proc.stderr.fileno(), 4096):
                err.extend(chunk)

        reader = threading.Thread(target=pump)
        reader.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not ready(err.decode(errors="replace")):
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait()
        reader.join()
        return proc.returncode, err.decode(errors="replace")

    # SIGTERM: the chunk in flight (fewer rows than --chunk-rows) is written before exiting
    code, err = start_and_stop(["--chunk-rows", "1000"], signal.SIGTERM,
                               lambda err: re.search(r"\b[1-9]\d*/24\b", err))
    assert code == 130 and "interrupted:" in err and "rerun the command to resume" in err, err
    after_term = pq.read_table(out).column("id").to_pylist()
    assert 1 <= len(after_term) < n

    # SIGKILL: whole parts survive, the part being written does not appear
    parts = len(list(out.glob("part-*.parquet")))
    code, _ = start_and_stop(["--chunk-rows", "2", "--no-progress"], signal.SIGKILL,
                             lambda err: len(list(out.glob("part-*.parquet"))) >= parts + 2)
    assert code == -signal.SIGKILL
    first = pq.read_table(out).column("id").to_pylist()
    assert len(after_term) + 4 <= len(first) < n
    assert main(cmd[3:] + ["--max-num-seqs", "8", "--no-progress"]) == 0  # the same command, resumed (here: faster)
    ids = pq.read_table(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == n and set(first) <= set(ids)
    assert not list(out.glob(".*.tmp"))


def test_ray_path_equals_single_process(folder, video_engine, tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    single = comparable(cogvlm2.caption(folder, "tiny-video", engine=video_engine, sampling_params=GREEDY))
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)  # 2 CPU actors x 2 + preprocessing
    try:
        out = tmp_path / "ray.jsonl"
        # the engine built in each actor: by an engine factory (as benchmarks/caption_gpu.py), or by name
        factory = functools.partial(LLMEngine.from_pretrained, "tiny-video", "float32", "cpu", **ENGINE)
        rows = list(cogvlm2.caption(folder, "tiny-video", out, engine=factory, ray=True, ray_actors=(1, 2),
                                    ray_batch_size=2, sampling_params=GREEDY))
        assert comparable(rows) == single
        assert comparable(jsonl(out)) == single
        (out.parent / "clip1.jsonl").write_text("".join(line + "\n" for line in out.read_text().splitlines()
                                                       if '"clip1.mp4"' not in line))
        redo = list(cogvlm2.caption(folder, "tiny-video", out.parent / "clip1.jsonl", ray=True, ray_actors=2,
                                    sampling_params=GREEDY, **ENGINE))
        assert comparable(redo) == [r for r in single if r["id"] == "clip1.mp4"]
        again = cogvlm2.caption(folder, "tiny-video", out, ray=True, ray_actors=2, sampling_params=GREEDY)
        assert list(again) == [] and again.skipped == 6
    finally:
        ray.shutdown()


def test_ray_actor_can_be_a_tensor_parallel_group(folder, video_engine):
    """ray_gpus_per_actor=N with tensor_parallel_size=N: each actor's engine is a TP group (the actor is rank
    0 and spawns the other ranks; on the CPU they meet over gloo), same greedy rows as one process."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    single = comparable(cogvlm2.caption(folder, "tiny-video", engine=video_engine, sampling_params=GREEDY))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        rows = list(cogvlm2.caption(folder, "tiny-video", ray=True, ray_actors=1, tensor_parallel_size=2,
                                    dtype="float32", device="cpu", sampling_params=GREEDY, **ENGINE))
        assert comparable(rows) == single
        with pytest.raises(Exception, match="tensor parallel size 3"):  # the size reaches the actors' engines
            list(cogvlm2.caption(folder, "tiny-video", ray=True, ray_actors=1, tensor_parallel_size=3,
                                 dtype="float32", device="cpu", sampling_params=GREEDY, **ENGINE))
    finally:
        ray.shutdown()


def test_ray_actor_cpus_leave_room_for_preprocessing():
    from cogvlm2.batch.ray_caption import _actor_cpus

    assert _actor_cpus(on_gpu=True, max_actors=2, cluster_cpus=32) == 1
    assert _actor_cpus(on_gpu=False, max_actors=2, cluster_cpus=8) == 2  # distinct from a task's 1: no fusion
    assert _actor_cpus(on_gpu=False, max_actors=1, cluster_cpus=2) == 1  # a 2-core laptop: one CPU stays free
    assert 2 * _actor_cpus(on_gpu=True, max_actors=2, cluster_cpus=2) < 2


def test_ray_pixels_travel_in_the_engines_16bit_dtype():
    """A named 16-bit dtype sends the pixels to the Ray actors in it (half the bytes): the engine casts pixels
    to its dtype first thing, so the tokens are those of float32 pixels; a dtype that is not the engine's is
    refused at the actor's start instead of losing precision on the way; unknown dtypes keep float32."""
    import pickle

    import torch

    from cogvlm2.batch.items import Item
    from cogvlm2.batch.preprocess import Preprocessor
    from cogvlm2.batch.ray_caption import _EngineActor, _prepare, transfer_dtype
    from cogvlm2.generation import generate_ids

    assert transfer_dtype("bfloat16") is torch.bfloat16 and transfer_dtype(torch.float16) is torch.float16
    assert transfer_dtype(None) is None and transfer_dtype("auto") is None and transfer_dtype("float32") is None
    engine = LLMEngine.from_pretrained("tiny", "bfloat16", "cpu", **ENGINE)
    prep = Preprocessor(engine.processor, IMAGE_PROMPT)
    item = Item("a", image=png(5))
    sent = pickle.loads(_prepare({"item": [pickle.dumps(item)]}, prep, torch.bfloat16)["inputs"][0])
    full = prep(item)
    assert full.pixel_values.dtype == torch.float32 and sent.pixel_values.dtype == torch.bfloat16
    assert torch.equal(sent.pixel_values, full.pixel_values.to(torch.bfloat16))
    assert sent.pixels_known_finite  # still the Processor's pixels, cast: the engine need not sum them
    kept = pickle.loads(_prepare({"item": [pickle.dumps(item)]}, prep)["inputs"][0])
    assert torch.equal(kept.pixel_values, full.pixel_values)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    assert list(generate_ids(engine.model, [sent], params)) == list(generate_ids(engine.model, [full], params))
    factory = functools.partial(LLMEngine.from_pretrained, "tiny", "float32", "cpu", **ENGINE)
    with pytest.raises(ValueError, match="computes in torch.float32"):
        _EngineActor("tiny", factory, "bfloat16", "cpu", {}, params, prep)


def test_ray_benchmark_mechanics_on_the_tiny_model(tmp_path):
    """benchmarks/caption_gpu.py --only ray --pair --dry-run: Ray's actors, the one-process-per-GPU pair and the
    one-GPU run each caption every JPEG with the tiny model on the CPU, and the per-engine timelines (ready, first
    request, last row) the GPU run explains its ratio with come out for every engine that worked."""
    pytest.importorskip("ray.data")
    root = Path(__file__).parents[1]
    out = tmp_path / "ray.json"
    run = subprocess.run([sys.executable, "benchmarks/caption_gpu.py", "--only", "ray", "--pair", "--dry-run",
                          "--num-images", "4", "--ray-batch-size", "2", "--out", str(out)], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ready = len(re.findall(r"^  actor \d+: ready", run.stdout, re.M))
    # two actors; on a busy machine the four items can all be done before the second one's engine is built
    assert ready == 2 or (ready == 1 and "1 actor(s) not ready before the last row" in run.stdout), run.stdout
    pair = re.findall(r"^  pair process \d+: .* (\d+) items", run.stdout, re.M)
    assert sorted(map(int, pair)) == [2, 2]  # the files split over the two processes
    assert re.search(r"^  one GPU 0: .* 4 items", run.stdout, re.M)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 and all(r["value"] > 0 and r["floor"] > 0 for r in rows)

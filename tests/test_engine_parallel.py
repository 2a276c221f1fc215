"""The engine over several devices: tensor parallelism (2 gloo ranks on the CPU, 2 NCCL ranks with 2 GPUs) and
pipeline stages, against the one-device engine, on tiny-random in float32.

The same schedule (staggered arrivals, an image prompt, a prefix-cache hit, an abort mid-decode, async
scheduling's lookahead steps) gives the same greedy tokens with TP=2 (vision tower sharded, the default, or
replicated) and PP=2 as with one device; a rank that dies stops the group with an error naming it, not a hang.

tiny-random's greedy choices are near ties (see `test_two_gpus_equal_one`), so every comparison is of like
with like: the same attention kernels and, on GPUs, the same decode path (CUDA graphs or eager) on both sides.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cogvlm2.engine import LLMEngine
from cogvlm2.engine.worker_group import WorkerGroupError
from cogvlm2.sampling_params import SamplingParams

MODEL = "tiny-random"
ENGINE = dict(device="cpu", max_model_len=512, num_kv_blocks=96, block_size=16, max_num_batched_tokens=256)


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (120, 160, 3), dtype=torch.uint8, generator=g).numpy())


def schedule(engine: LLMEngine) -> list[tuple[int, str, object, SamplingParams]]:
    """(arrival step, id, inputs, params): text and image prompts, a seeded sampled one; 'again' repeats 'img'
    once it is cached, 'ask' asks another question about its image."""
    p = engine.processor
    greedy = lambda n: SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)  # noqa: E731
    return [
        (0, "img", p("Describe the picture in detail.", image=image(1)), greedy(14)),
        (0, "text", p("Tell me a long story about a red circle."), greedy(20)),
        (1, "aborted", p("Count to one hundred."), greedy(30)),
        (2, "other", p("What is in this image?", image=image(2)), greedy(10)),
        # a seeded sampled row: every rank draws it with its own generator of that seed, so the ids (and what a
        # lookahead step feeds back on each rank) equal one device's
        (3, "seeded", p("Say random words."), SamplingParams(temperature=1.0, top_p=0.95, seed=5, max_new_tokens=12,
                                                             ignore_eos=True)),
        (6, "again", p("Describe the picture in detail.", image=image(1)), greedy(12)),
        # another question over the cached image: the image's last rows come from a tail hit, whose K/V copy every
        # rank makes in its own cache
        (7, "ask", p("What colour is it?", image=image(1)), greedy(8)),
    ]


def run(engine: LLMEngine) -> dict:
    """Step the schedule to the end (aborting 'aborted' at step 4); per request: (token ids, cached tokens)."""
    pending, done, step = schedule(engine), {}, 0
    while pending or engine.has_unfinished():
        for arrival, rid, inputs, params in [r for r in pending if r[0] <= step]:
            engine.add_request(rid, inputs, params)
            pending.remove((arrival, rid, inputs, params))
        if step == 4:
            assert engine.abort("aborted")
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                done[out.request_id] = out.token_ids
        step += 1
        assert step < 200
    return done


@pytest.fixture(scope="module")
def reference():
    engine = LLMEngine.from_pretrained(MODEL, **ENGINE)
    out = run(engine)
    assert len(out["img"]) == 14 and 0 < len(out["aborted"]) < 30
    assert out["img"] != out["other"][:10] and len(set(out["text"])) > 5  # not degenerate
    return out


def check_equal(got: dict, reference: dict) -> None:
    assert got.keys() == reference.keys()
    for rid, ids in reference.items():
        assert got[rid] == ids, rid  # the abort too: the same steps run, so it stops after the same tokens


def test_tp2_engine_equals_one_device(reference):
    engine = LLMEngine.from_pretrained(MODEL, tensor_parallel_size=2, **ENGINE)  # vision sharded by default
    try:
        cfg = engine.model.config
        assert engine.worker.spec.shard_vision is True
        assert engine.runner.kv.kv.shape[-2] == cfg.num_key_value_heads // 2  # the driver holds half the KV heads
        assert engine.model.lm_head.weight.shape[0] == cfg.vocab_size // 2
        vision_qkv = engine.model.model.vision.transformer.layers[0].attention.query_key_value.weight
        assert vision_qkv.shape[0] == 3 * cfg.vision.hidden_size // 2
        check_equal(run(engine), reference)
        # the second image request hit the prefix cache: its prompt's KV came from the first one's blocks
        engine.add_request("cached", engine.processor("Describe the picture in detail.", image=image(1)),
                           SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
        seq = engine.seqs["cached"]
        while engine.has_unfinished():
            engine.step()
        assert seq.num_cached_tokens > 0
    finally:
        engine.shutdown()


def test_tp2_replicated_vision_equals_one_device_and_a_dead_rank_is_an_error(reference):
    engine = LLMEngine.from_pretrained(MODEL, tensor_parallel_size=2, shard_vision=False, **ENGINE)
    try:
        vision_qkv = engine.model.model.vision.transformer.layers[0].attention.query_key_value.weight
        assert vision_qkv.shape[0] == 3 * engine.model.config.vision.hidden_size  # the whole tower on each rank
        check_equal(run(engine), reference)
        rank1 = engine.worker.procs[0]
        kill_rank_mid_generation(engine)
    finally:
        engine.shutdown()
    assert not rank1.is_alive()


def lora_adapter(folder, seed: int, targets: tuple[str, ...]):
    """A random LoRA adapter for tiny-random (both factors non-zero, so it changes the answers)."""
    from cogvlm2.finetune.lora import apply_lora, save_adapter
    from cogvlm2.model import load_model
    from cogvlm2.tiny import checkpoint_folder

    model = load_model(checkpoint_folder(MODEL), progress=False)
    apply_lora(model, targets, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(model, folder)


def lora_run(engine: LLMEngine, names: list[str | None]) -> list[list[int]]:
    """An image and a text prompt per adapter name (None: the base model), all in one batch."""
    p, greedy = engine.processor, SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    prompts = [p("Describe the picture.", image=image(3)), p("Tell me about circles.")]
    ids = []
    for name in names:
        for i, x in enumerate(prompts):
            ids.append(f"{name}-{i}")
            engine.add_request(ids[-1], x, greedy, adapter=name)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                done[out.request_id] = out.token_ids
    return [done[i] for i in ids]


def test_tp2_lora_adapters_equal_one_device(tmp_path):
    """LoRA under TP=2: each rank holds its part of A and B (column-parallel QKV and gate / up: rows of B;
    row-parallel dense and down_proj: columns of A, whose partial products join the layer's all-reduce),
    adapters mixed with the base model in one batch, one loaded at start-up and one added later on every rank:
    the tokens of one device. A folder that does not fit is refused with the group intact."""
    pytest.importorskip("peft")
    a = lora_adapter(tmp_path / "a", 1, ("language_expert_qkv", "vision_expert_qkv", "language_expert_mlp",
                                         "vision_expert_dense"))
    b = lora_adapter(tmp_path / "b", 2, ("language_expert_dense", "vision_expert_mlp", "lm_head"))
    one = LLMEngine.from_pretrained(MODEL, adapters={"a": a}, **ENGINE)
    one.core.add_adapter("b", b)
    want = lora_run(one, [None, "a", "b"])
    assert want[0] != want[2] and want[1] != want[3] and want[2] != want[4]  # the adapters change the answers
    engine = LLMEngine.from_pretrained(MODEL, adapters={"a": a}, tensor_parallel_size=2, **ENGINE)
    try:
        lm_qkv = engine.model.model.layers[0].self_attn.language_expert_query_key_value
        assert lm_qkv.lora_B.shape[1] == lm_qkv.base.out_features  # this rank's rows of B
        engine.core.add_adapter("b", b)
        assert engine.worker.adapters.keys() == {"a", "b"}
        assert lora_run(engine, [None, "a", "b"]) == want
        with pytest.raises(ValueError, match="does not fit"):
            engine.core.add_adapter("c", lora_adapter_for_other_shapes(tmp_path / "c"))
        engine.core.remove_adapter("b")
        with pytest.raises(ValueError, match="unknown LoRA adapter"):
            engine.add_request("gone", engine.processor("Hi"), adapter="b")
        assert lora_run(engine, ["a"]) == want[2:4]
    finally:
        engine.shutdown()


def test_chat_with_tensor_parallelism_and_lora(tmp_path):
    """`cogvlm2 chat --tensor-parallel-size 2 --lora PATH` answers as the one-device chat with the same adapter."""
    pytest.importorskip("peft")
    import io

    from cogvlm2.cli import build_parser, run_chat

    folder = lora_adapter(tmp_path / "adapter", 4, ("language_expert_qkv", "language_expert_mlp"))
    image(5).save(tmp_path / "a.png")
    answers = {}
    for tp in (1, 2):
        argv = ["chat", "--model", MODEL, "--device", "cpu", "--lora", str(folder), "--image", str(tmp_path / "a.png"),
                "--query", "What is in the image?", "--max-new-tokens", "8", "--tensor-parallel-size", str(tp)]
        out = io.StringIO()
        assert run_chat(build_parser().parse_args(argv), stdout=out) == 0
        answers[tp] = out.getvalue()
    assert answers[1] == answers[2] and answers[1].strip()


def lora_adapter_for_other_shapes(folder):
    """A peft-format folder whose QKV factors have the wrong input width for tiny-random."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    key = "base_model.model.model.layers.0.self_attn.language_expert_query_key_value"
    save_file({f"{key}.lora_A.weight": torch.zeros(2, 7), f"{key}.lora_B.weight": torch.zeros(5, 2)},
              str(folder / "adapter_model.safetensors"))
    return folder


def kill_rank_mid_generation(engine: LLMEngine, limit_s: int = 30) -> None:
    """Rank 1 dies mid-generation: the step's request fails with an error naming it (within limit_s, not a
    hang), and so does every later call."""
    engine.add_request("victim", engine.processor("Keep talking."),
                       SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True))
    engine.step()
    engine.step()
    os.kill(engine.worker.procs[0].pid, signal.SIGKILL)

    def hung(*_):
        raise TimeoutError("the engine hung after a rank died")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(limit_s)
    try:
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    (failed,) = [o for o in outputs if o.request_id == "victim"]
    assert failed.finished and failed.finish_reason == "abort" and len(failed.token_ids) < 200
    assert "tensor-parallel rank 1" in failed.error and "died" in failed.error, failed.error
    with pytest.raises(WorkerGroupError, match="rank 1"):
        engine.worker.launch(None)


def test_a_reset_pipe_before_the_exit_is_seen_names_the_dead_rank():
    """On 2 H200s a SIGKILLed rank's pipe reset (ConnectionResetError) while the process still looked alive:
    the raw error escaped and the request failed with "EOFError". Now the group waits for the death and
    names it (a rank process and its pipe stood in by fakes: the race cannot be forced otherwise)."""
    import time

    from cogvlm2.engine.worker_group import TensorParallelGroup

    class DyingRank:
        pid, exitcode = 4242, None
        gone = time.monotonic() + 0.3  # the exit is seen a moment after the pipe reset

        def is_alive(self):
            if time.monotonic() < self.gone:
                return True
            self.exitcode = -9
            return False

        def join(self, timeout=None):
            pass

    class ResetPipe:
        def poll(self, timeout=0):
            return True

        def recv(self):
            raise ConnectionResetError(104, "Connection reset by peer")

    group = object.__new__(TensorParallelGroup)
    group.procs, group.conns, group.size = [DyingRank()], [ResetPipe()], 2
    group._error, group._closing, group.shutdown = None, False, lambda: None
    with pytest.raises(WorkerGroupError, match=r"tensor-parallel rank 1 \(pid 4242\) died \(exit code -9\)"):
        group._check()
    with pytest.raises(WorkerGroupError, match="died"):  # and every later call
        group._check()


def test_pp2_engine_equals_one_device(reference):
    engine = LLMEngine.from_pretrained(MODEL, pipeline_parallel_size=2, **ENGINE)
    stages = engine.model.stages
    assert len(stages.plan.devices) == 2 and stages.plan.stage_of["vision"] == 0
    check_equal(run(engine), reference)


def test_parallel_sizes_are_checked():
    from cogvlm2.engine.worker import ModelSpec

    with pytest.raises(ValueError, match="cannot be combined"):
        ModelSpec(MODEL, tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match=">= 1"):
        ModelSpec(MODEL, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="shard_vision"):
        ModelSpec(MODEL, shard_vision=True)
    # the vision tower is sharded under TP unless asked otherwise (faster TTFT and captioning: docs/parallel.md)
    assert ModelSpec(MODEL, tensor_parallel_size=2).shard_vision is True
    assert ModelSpec(MODEL, tensor_parallel_size=2, shard_vision=False).shard_vision is False
    assert ModelSpec(MODEL).shard_vision is False and ModelSpec(MODEL, shard_vision=False).shard_vision is False
    with pytest.raises(ValueError, match="quantized"):
        ModelSpec(MODEL, quant="int8", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="must divide"):  # tiny-random has 2 KV heads
        LLMEngine.from_pretrained(MODEL, tensor_parallel_size=4, **ENGINE)


def test_vision_parallel_flag():
    """--vision-parallel {sharded,replicated} chooses the tower's layout (absent: sharded under TP); sharded without
    --tensor-parallel-size is refused before anything loads."""
    import argparse

    from cogvlm2.arguments import add_model_arguments, shard_vision
    from cogvlm2.launch import load_from_args

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert shard_vision(parser.parse_args([])) is None
    assert shard_vision(parser.parse_args(["--vision-parallel", "sharded"])) is True
    assert shard_vision(parser.parse_args(["--vision-parallel", "replicated"])) is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--vision-parallel", "halved"])
    args = parser.parse_args(["--model", MODEL, "--device", "cpu", "--vision-parallel", "sharded"])
    with pytest.raises(ValueError, match="--vision-parallel sharded needs --tensor-parallel-size"):
        load_from_args(args)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(tensor_parallel_size=2, shard_vision=False),
                                      dict(pipeline_parallel_size=2)])
def test_two_gpus_equal_one(parallel):
    """On 2 GPUs, float32: the same greedy tokens as one GPU running the same decode path.

    TP decodes in CUDA graphs (NCCL captured), so its reference is one GPU with graphs. PP runs eagerly (a graph
    cannot span the GPUs), so its reference is one GPU with enforce_eager. A graph replays a batch padded to its
    bucket (5 rows run as 8) over the max_model_len grid: the Triton decode kernel then splits each context in
    512-token parts (32 per iteration) where the eager 5-row step splits it in 128-token parts (64 per
    iteration), and cuBLAS may pick another float32 GEMM for 8 rows than for 5: the sums are ordered
    differently, and tiny-random's greedy choices are near ties that such rounding flips."""
    kw = dict(ENGINE, device="cuda", dtype="float32", enforce_eager="pipeline_parallel_size" in parallel)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    one_gpu = LLMEngine.from_pretrained(MODEL, **kw)
    one = run(one_gpu)
    del one_gpu
    engine = LLMEngine.from_pretrained(MODEL, **parallel, **kw)
    try:
        assert (engine.runner.graphs is None) == kw["enforce_eager"]
        check_equal(run(engine), one)
    finally:
        engine.shutdown()


PEER_LIMIT_S = 150  # three TP=2 engines, one after the other (spawn, NCCL, symmetric memory, graph capture)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_peer_all_reduce_equals_nccl():
    """TP=2 with the one-shot peer-to-peer all-reduce for decode's small messages (ModelSpec.peer_all_reduce;
    prefill's large ones stay on NCCL) gives NCCL's greedy tokens, in CUDA graphs, float32. A later peer engine in
    the same process (whose ranks are spawned afresh) falls back to NCCL instead of hanging in torch's
    symmetric-memory rendezvous, and gives the same tokens.

    It runs in a process of its own: which engine is a process's first must not depend on which tests ran before."""
    out = _run_script(["peer-equals-nccl"], PEER_LIMIT_S, "peer equals nccl")
    assert "NCCL does every all-reduce" in out  # the third engine said why it fell back


def _run_script(args: list[str], limit_s: float, success: str) -> str:
    """Run this file as a script with `args` in a session of its own; its output, which must end well (exit code 0
    and `success` printed) within limit_s. On a timeout the whole group (the child and its ranks) is killed."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"`{' '.join(args)}` did not finish within {limit_s} s:\n{out[-6000:]}")
    assert proc.returncode == 0 and success in out, out[-6000:]
    return out


def _peer_equals_nccl_main() -> None:
    """`python tests/test_engine_parallel.py peer-equals-nccl`: NCCL, then peer (this process's first symmetric-memory
    rendezvous), then peer asked for again (refused: NCCL), all equal."""
    import faulthandler

    from cogvlm2.engine.config import EngineConfig
    from cogvlm2.engine.worker import ModelSpec
    from cogvlm2.llm import load_processor

    faulthandler.dump_traceback_later(PEER_LIMIT_S - 10, exit=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = {k: v for k, v in ENGINE.items() if k != "device"}
    results = []
    for peer, expect in ((False, False), (True, True), (True, False)):
        spec = ModelSpec(MODEL, "float32", "cuda", tensor_parallel_size=2, peer_all_reduce=peer)
        engine = LLMEngine(spec, EngineConfig(**config), load_processor(MODEL))
        try:
            assert (engine.worker.ctx.peer is not None) == expect and engine.runner.graphs is not None
            results.append(run(engine))
        finally:
            engine.shutdown()
    check_equal(results[1], results[0])
    check_equal(results[2], results[0])
    print("peer equals nccl", flush=True)


DEAD_RANK_LIMIT_S = 55  # the whole test: start-up (spawn, NCCL, graph capture), the kill and the error


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("all_reduce", ["nccl", "peer"])
def test_two_gpus_dead_rank_is_an_error(all_reduce):
    """Over NCCL (decode in CUDA graphs) a dead rank's collectives never complete: the driver's watchdog sees
    the death, aborts the communicator, and the request fails with an error naming the rank.

    It runs in its own process (this file as a script), bounded from outside: an in-process alarm cannot
    interrupt a call blocked inside CUDA or NCCL. The child dumps every thread's stack shortly before the
    limit, so a hang fails with where it hung. With the peer-to-peer all-reduce, whose barrier has no timeout,
    the driver's kernels waiting for the dead rank are released by `PeerAllReduce.unblock`."""
    _run_script(["dead-rank", str(DEAD_RANK_LIMIT_S - 8), all_reduce], DEAD_RANK_LIMIT_S, "dead rank reported")


def _dead_rank_main(dump_after_s: int, all_reduce: str) -> None:
    """`python tests/test_engine_parallel.py dead-rank S nccl|peer`: the dead-rank scenario on GPUs, stacks
    dumped after S s."""
    import faulthandler

    from cogvlm2.engine.config import EngineConfig
    from cogvlm2.engine.worker import ModelSpec
    from cogvlm2.llm import load_processor

    faulthandler.dump_traceback_later(dump_after_s, exit=True)
    config = {k: v for k, v in ENGINE.items() if k != "device"}
    spec = ModelSpec(MODEL, device="cuda", tensor_parallel_size=2, peer_all_reduce=all_reduce == "peer")
    engine = LLMEngine(spec, EngineConfig(**config, max_num_seqs=8, cuda_graph_batch_sizes=(1, 2, 4, 8)),
                       load_processor(MODEL))
    try:
        kill_rank_mid_generation(engine, limit_s=20)
    finally:
        engine.shutdown()
    print("dead rank reported", flush=True)


def test_generate_cli_with_tensor_parallelism(tmp_path):
    """`cogvlm2 generate --tensor-parallel-size 2` writes the rows the one-device run writes (image and text)."""
    import json

    from cogvlm2.cli import main

    image(3).save(tmp_path / "a.png")
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "i", "query": "What is it?", "image": "a.png"}) + "\n"
                                       + json.dumps("Tell me a story.") + "\n")
    rows = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.jsonl"
        argv = ["generate", str(tmp_path / "in.jsonl"), "-o", str(out), "--model", MODEL, "--device", "cpu",
                "--max-model-len", "512", "--max-new-tokens", "8", "--no-progress", "--tensor-parallel-size", str(tp)]
        assert main(argv) == 0
        rows[tp] = {r["id"]: r["token_ids"] for r in map(json.loads, out.read_text().splitlines())}
    assert rows[1] == rows[2] and len(rows[1]) == 2 and all(len(ids) == 8 for ids in rows[1].values())
    with pytest.raises(ValueError, match="tensor-parallel-size needs the engine"):
        from argparse import Namespace

        from cogvlm2.launch import load_from_args

        load_from_args(Namespace(model=MODEL, device="cpu", dtype="auto", tensor_parallel_size=2, command="eval"))


if __name__ == "__main__" and sys.argv[1:2] == ["dead-rank"]:
    _dead_rank_main(int(sys.argv[2]), sys.argv[3])
elif __name__ == "__main__" and sys.argv[1:2] == ["peer-equals-nccl"]:
    _peer_equals_nccl_main()

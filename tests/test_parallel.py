"""Tensor parallelism on the CPU: 2 gloo ranks (torchrun-style environment) against the unsharded model.

TP=2 decodes the same greedy tokens with the same logits (float32 reduction order aside) as TP=1, for an
image prompt routed through the sharded visual expert, a padded text row and a video model; each rank reads
only its slices of the sharded tensors; unseeded sampling agrees across ranks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvlm2.checkpoint import TensorSlice, load_weights
from cogvlm2.config import ModelConfig
from cogvlm2.model import ParallelContext, load_model
from cogvlm2.model.cogvlm import CogVLM2ForCausalLM
from cogvlm2.model.parallel import qkv_ranges, shard_slicer
from cogvlm2.tiny import checkpoint_folder, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_cases import run_cases  # noqa: E402

WORKER = Path(__file__).resolve().parent / "parallel_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, out: Path, device: str = "cpu", timeout: float = 240) -> list[dict]:
    """Run parallel_worker.py on `world_size` ranks as torchrun would; each rank's results."""
    for name in ("tiny", "tiny-video"):
        checkpoint_folder(name)  # build the tiny checkpoints once, before the ranks race for them
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), "--device", device], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world_size)]


@pytest.fixture(scope="module")
def reference():
    models = {name: load_model(checkpoint_folder(name), progress=False) for name in ("tiny", "tiny-video")}
    return run_cases(models)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    return launch(2, tmp_path_factory.mktemp("tp2"))


def test_tp2_equals_tp1(reference, tp2):
    for rank in tp2:
        assert rank["cases"].keys() == reference.keys()
        for name, (tokens, logits) in reference.items():
            got_tokens, got_logits = rank["cases"][name]
            assert got_tokens == tokens, name
            assert got_logits.shape == logits.shape
            torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4, msg=name)
    # the cases are not degenerate: the image row's answer differs from the text row's
    tokens = reference["image+text"][0]
    assert [t[0] for t in tokens] != [t[1] for t in tokens]


def test_tp2_ranks_hold_and_read_only_their_shards(tp2):
    cfg = tiny_config("tiny")
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = tp2[0]["shapes"]
    assert shapes["model.embed_tokens.weight"] == (cfg.vocab_size // 2, cfg.hidden_size)
    assert shapes["lm_head.weight"] == (cfg.vocab_size // 2, cfg.hidden_size)
    attn, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    assert shapes[attn + "vision_expert_query_key_value.weight"] == ((hq + 2 * hkv) * d // 2, cfg.hidden_size)
    assert shapes[attn + "vision_expert_query_key_value.bias"] == ((hq + 2 * hkv) * d // 2,)
    assert shapes[attn + "language_expert_dense.weight"] == (cfg.hidden_size, cfg.hidden_size // 2)
    assert shapes[mlp + "vision_mlp.gate_proj.weight"] == (cfg.intermediate_size // 2, cfg.hidden_size)
    assert shapes[mlp + "language_mlp.down_proj.weight"] == (cfg.hidden_size, cfg.intermediate_size // 2)
    assert shapes["model.vision.transformer.layers.0.attention.query_key_value.weight"] == \
        (3 * cfg.vision.hidden_size, cfg.vision.hidden_size)  # the vision tower is replicated
    for rank in tp2:
        assert rank["shard_model_equal"]
        whole = set(rank["whole_reads"])
        assert whole and all(k.startswith("model.vision.") or "norm" in k for k in whole), sorted(whole)[:5]


def test_ranks_see_whether_a_value_is_the_same_everywhere(tp2):
    """The check that keeps ranks whose processes made different numbers of symmetric-memory rendezvous from
    waiting on each other's keys (`peer_all_reduce._same_everywhere`): equal on every rank or not."""
    assert [rank["same_everywhere"] for rank in tp2] == [[True, False, False]] * 2


def test_unseeded_sampling_agrees_across_ranks(tp2):
    assert tp2[0]["sampled"] == tp2[1]["sampled"]
    assert len(set(tp2[0]["sampled"])) > 1


def test_qkv_slices_keep_gqa_groups():
    """Rank r's query heads all use KV heads that rank r holds, and the slices cover QKV exactly once."""
    cfg = ModelConfig.from_dict({**tiny_config().to_dict(), "num_attention_heads": 8, "num_multi_query_heads": 4,
                                 "hidden_size": 64})
    d, hq, hkv, group = cfg.head_dim, 8, 4, 2
    rows = []
    for world in (1, 2, 4):
        covered = []
        for r in range(world):
            (qa, qb), (ka, kb), (va, vb) = qkv_ranges(cfg, _ctx(r, world))
            q_heads = range(qa // d, qb // d)
            kv_heads = range((ka - hq * d) // d, (kb - hq * d) // d)
            assert {h // group for h in q_heads} == set(kv_heads)
            assert (va - (hq + hkv) * d, vb - (hq + hkv) * d) == (ka - hq * d, kb - hq * d)
            covered += [*range(qa, qb), *range(ka, kb), *range(va, vb)]
        rows.append(sorted(covered))
    assert all(r == list(range((hq + 2 * hkv) * d)) for r in rows)
    with pytest.raises(ValueError, match="KV heads"):
        shard_slicer(cfg, _ctx(0, 8))


def _ctx(rank: int, world: int) -> ParallelContext:
    """A context that only describes rank `rank` of `world` (no process group): enough for shapes and slices,
    which never communicate."""
    ctx = object.__new__(ParallelContext)
    object.__setattr__(ctx, "rank", rank)
    object.__setattr__(ctx, "world_size", world)
    object.__setattr__(ctx, "group", None)
    return ctx


def test_sliced_loading_equals_slicing_the_full_tensor():
    """The loader's per-key hook: each rank's slice equals the same rows / columns of the full weights."""
    folder = checkpoint_folder("tiny")
    cfg = ModelConfig.from_file(folder)
    full = load_model(checkpoint_folder("tiny"), progress=False).state_dict()
    for rank in (0, 1):
        ctx = _ctx(rank, 2)
        with torch.device("meta"):
            model = CogVLM2ForCausalLM(cfg, tp=ctx)
        load_weights(model, folder, progress=False, slicer=shard_slicer(cfg, ctx))
        got = model.state_dict()
        assert got.keys() == full.keys()
        half = cfg.vocab_size // 2
        assert torch.equal(got["lm_head.weight"], full["lm_head.weight"][rank * half:(rank + 1) * half])
        key = "model.layers.0.self_attn.vision_expert_query_key_value.bias"
        assert torch.equal(got[key], torch.cat([full[key][a:b] for a, b in qkv_ranges(cfg, ctx)]))
        key = "model.layers.1.mlp.vision_mlp.down_proj.weight"
        n = cfg.intermediate_size // 2
        assert torch.equal(got[key], full[key][:, rank * n:(rank + 1) * n])
        key = "model.vision.linear_proj.dense_4h_to_h.weight"
        assert torch.equal(got[key], full[key])


def test_bad_shard_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="must divide the number of KV heads"):
        CogVLM2ForCausalLM(tiny_config(), tp=_ctx(0, 4))  # the tiny model has 2 KV heads
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ParallelContext(0, 2)
    with pytest.raises(ValueError, match="invalid tensor-parallel rank"):
        ParallelContext(2, 2)
    assert TensorSlice(1, [(0, 2), (4, 6)]).shape((3, 8, 5)) == (3, 4, 5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_tp2_nccl_equals_tp1(reference, tmp_path):
    """The same ranks on 2 GPUs with NCCL: greedy tokens equal the CPU float32 reference, logits close, and a
    forward captured in a CUDA graph replays to the eager result."""
    for rank in launch(2, tmp_path, device="cuda"):
        assert rank["graph_equal"]  # NCCL collectives captured in a CUDA graph
        for name, (tokens, logits) in reference.items():
            assert rank["cases"][name][0] == tokens, name
            torch.testing.assert_close(rank["cases"][name][1], logits, rtol=1e-3, atol=1e-3, msg=name)


def test_from_env_needs_the_launcher_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        ParallelContext.from_env()


def test_tp1_context_is_the_plain_model(reference):
    """A one-rank context takes the sharded code path (vocab-parallel embedding, reduces) with nothing to
    reduce: the same tokens and bit-identical logits."""
    ctx = ParallelContext(0, 1)
    models = {name: load_model(checkpoint_folder(name), progress=False, tensor_parallel=ctx) for name in ("tiny", "tiny-video")}
    got = run_cases(models)
    for name, (tokens, logits) in reference.items():
        assert got[name][0] == tokens and torch.equal(got[name][1], logits), name


def test_peer_all_reduce_is_for_gpu_groups_only():
    """The one-shot peer-to-peer all-reduce needs GPUs that map each other's memory: a one-rank context or a CPU
    (gloo) group keeps torch.distributed's all-reduce (the GPU twin: test_two_gpus_peer_all_reduce_equals_nccl)."""
    ctx = ParallelContext(0, 1)
    assert ctx.use_peer_all_reduce(torch.bfloat16) is False and ctx.peer is None
    x = torch.ones(3)
    assert ctx.all_reduce(x) is x and torch.equal(x, torch.ones(3))

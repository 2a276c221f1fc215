"""Pipeline stages: the balanced split (vision tower counted) and PP == one device, token for token.

On the CPU every stage is "cpu", so the hand-overs are counted through `PipelineStages.move` (the one place
activations cross stages); with a GPU, a CPU + GPU pipeline runs real transfers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cogvlm2.config import ModelConfig
from cogvlm2.model import load_model
from cogvlm2.tiny import checkpoint_folder
from cogvlm2.model.cogvlm import CogVLM2ForCausalLM
from cogvlm2.model.pipeline import PipelineStages, place, plan_stages

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_cases import run_cases  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "fixtures" / "configs"


def _meta(name: str) -> CogVLM2ForCausalLM:
    with torch.device("meta"):
        return CogVLM2ForCausalLM(ModelConfig.from_file(CONFIGS / f"{name}.json"))


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_split_of_the_19b_model_counts_the_vision_tower():
    model = _meta("cogvlm2-llama3-chat-19B")
    plan = plan_stages(model, ["meta", "meta"])
    assert plan.stage_of["vision"] == plan.stage_of["embed"] == 0 and plan.stage_of["head"] == 1
    first, second = plan.layers_of(0), plan.layers_of(1)
    assert first + second == list(range(32)) and first  # consecutive, every layer once
    assert len(first) < len(second) / 1.5  # the 4.4B-parameter tower takes the place of layers on stage 0
    layer = _bytes(model.model.layers[0])
    assert sum(plan.bytes_per_stage) == _bytes(model)
    assert abs(plan.bytes_per_stage[0] - plan.bytes_per_stage[1]) <= layer  # balanced to within one layer
    bf16 = [b / model.dtype.itemsize * 2 for b in plan.bytes_per_stage]
    assert max(bf16) < 20 * 2**30  # each bf16 half leaves a 24 GB card room for its KV cache
    # a twice larger first card takes about twice the bytes
    weighted = plan_stages(model, ["meta", "meta"], capacities=[2, 1])
    assert abs(weighted.bytes_per_stage[0] - 2 * weighted.bytes_per_stage[1]) <= 2 * layer
    # on 8 cards the tower (the largest unit) is a stage of its own and the others are even
    eight = plan_stages(model, ["meta"] * 8)
    assert eight.layers_of(0) == [] and eight.stage_of["vision"] == 0 and eight.stage_of["embed"] == 1
    rest = eight.bytes_per_stage[1:]
    assert max(rest) - min(rest) <= 2 * layer
    assert "layers 0-" in plan.describe() and "norm + lm_head" in plan.describe()


def test_split_errors():
    model = _meta("cogvlm2-video-llama3-chat")
    with pytest.raises(ValueError, match="only 35 units"):
        plan_stages(model, ["cpu"] * 36)
    with pytest.raises(ValueError, match="capacity"):
        plan_stages(model, ["cpu", "cpu"], capacities=[1])
    with pytest.raises(ValueError, match="cannot be combined"):
        load_model(checkpoint_folder("tiny"), pipeline_devices=["cpu", "cpu"], tensor_parallel=object())


@pytest.fixture(scope="module")
def reference():
    return run_cases({name: load_model(checkpoint_folder(name), progress=False) for name in ("tiny", "tiny-video")})


def _count_moves(monkeypatch) -> list[torch.device]:
    moves: list[torch.device] = []
    real = PipelineStages.move

    def spy(x, device):
        if x is not None:
            moves.append(device)
        return real(x, device)

    monkeypatch.setattr(PipelineStages, "move", staticmethod(spy))
    return moves


def test_pp2_equals_pp1(reference, monkeypatch):
    models = {name: load_model(checkpoint_folder(name), progress=False, pipeline_devices=["cpu", "cpu"])
              for name in ("tiny", "tiny-video")}
    # vision + embed + layer 0 | layers 1-2 + head (the 128k-row embedding and head weigh the most)
    assert models["tiny"].stages.boundaries == {1: torch.device("cpu")}
    moves = _count_moves(monkeypatch)
    got = run_cases(models)
    assert moves
    for name, (tokens, logits) in reference.items():
        assert got[name][0] == tokens, name
        assert torch.equal(got[name][1], logits), name


def test_every_boundary_hands_over(reference, monkeypatch):
    """Five stages on the tiny model: vision | embed | layer 0 | layer 1 | head, so every hand-over runs."""
    model = load_model(checkpoint_folder("tiny"), progress=False)
    plan = plan_stages(model, ["cpu"] * 5)
    assert [plan.stage_of[u] for u in ("vision", "embed", "layer0", "layer1", "head")] == [0, 1, 2, 3, 4]
    place(model, plan)
    assert sorted(model.stages.boundaries) == [0, 1] and model.stages.head_boundary
    moves = _count_moves(monkeypatch)
    tokens, logits = run_cases({"tiny": model, "tiny-video": load_model(checkpoint_folder("tiny-video"), progress=False)})["image+text"]
    assert tokens == reference["image+text"][0] and torch.equal(logits, reference["image+text"][1])
    # prefill: pixels to the tower, 4 batch tensors to embed (ids, positions, vision embeddings and their slots;
    # routing is a host list), at each of 2 layer boundaries h, cos, sin and the 4 batch tensors, h to the head;
    # a decode step: 2 batch tensors (ids, positions), 2 x (3 + 2), 1
    assert len(moves) == (1 + 4 + 2 * 7 + 1) + (len(tokens) - 1) * (2 + 2 * 5 + 1)  # the video model is unstaged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a CPU + GPU pipeline")
def test_cpu_gpu_pipeline_equals_one_device(reference):
    """Real transfers: the tower and first stage on the CPU, the rest on the GPU (float32, so close, not equal:
    GPU kernels round differently)."""
    models = {name: load_model(checkpoint_folder(name), progress=False, pipeline_devices=["cpu", "cuda"])
              for name in ("tiny", "tiny-video")}
    assert models["tiny"].lm_head.weight.is_cuda and not models["tiny"].model.vision.conv.weight.is_cuda
    got = run_cases(models)
    for name, (tokens, logits) in reference.items():
        assert got[name][0] == tokens, name
        torch.testing.assert_close(got[name][1], logits, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_pipeline_equals_one_gpu():
    """The same kernels on two GPUs of one kind as on one: equal, not close (a kernel of stage 1 launched on
    GPU 0 raced GPU 1's stream and broke this)."""
    one = {name: load_model(checkpoint_folder(name), progress=False, device="cuda:0") for name in ("tiny", "tiny-video")}
    two = {name: load_model(checkpoint_folder(name), progress=False, pipeline_devices=["cuda:0", "cuda:1"])
           for name in ("tiny", "tiny-video")}
    ref, got = run_cases(one), run_cases(two)
    for name, (tokens, logits) in ref.items():
        assert got[name][0] == tokens, name
        assert torch.equal(got[name][1], logits), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fused_ops_run_on_their_tensors_gpu():
    """Triton launches on the current device: the fused RMSNorm / SiLU-mul / rotary of a tensor on cuda:1 while
    cuda:0 is current must run on cuda:1, after the torch ops that produced its input on cuda:1's stream."""
    from cogvlm2.model import ops, triton_ops

    torch.cuda.set_device(0)
    x = torch.randn(4096, 512, device="cuda:1")
    weight = torch.randn(512, device="cuda:1")
    for _ in range(50):  # a queue of work on cuda:1's stream: a kernel launched elsewhere would not wait for it
        x = x * 1.0001 + 1e-4
    with torch.inference_mode():
        torch.testing.assert_close(triton_ops.rms_norm(x, weight, 1e-5), ops._rms_norm(x, weight, 1e-5))
        torch.testing.assert_close(triton_ops.silu_mul(x, x * 0.5), ops._silu_mul(x, x * 0.5))
        head_dim, cos, sin = 64, torch.randn(4096, 32, device="cuda:1"), torch.randn(4096, 32, device="cuda:1")
        qkv = x[:, :3 * head_dim * 2].contiguous()
        expected = qkv.clone().view(4096, 6, head_dim)
        expected[:, :4] = ops.apply_rotary(expected[:, :4], cos, sin)
        triton_ops.rotary_(qkv, cos, sin, 4, head_dim)
        torch.testing.assert_close(qkv.view(4096, 6, head_dim), expected)
    assert torch.cuda.current_device() == 0  # the launches put the current device back

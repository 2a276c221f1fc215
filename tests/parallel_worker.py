"""One rank of the tensor-parallel tests (tests/test_parallel.py), launched torchrun-style: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment, gloo on the CPU (NCCL on GPUs with --device cuda).

    python tests/parallel_worker.py OUT_DIR [--device cpu|cuda]

Writes OUT_DIR/rank<R>.pt: the greedy tokens and logits of every case in `cases.py`-style order, the keys the
loader read whole, and the shapes of the rank's shard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cogvlm2.checkpoint as checkpoint  # noqa: E402
from cogvlm2.generation import generate_ids  # noqa: E402
from cogvlm2.model import ParallelContext, load_model, shard_model  # noqa: E402
from cogvlm2.tiny import checkpoint_folder  # noqa: E402
from parallel_cases import run_cases  # noqa: E402


class _Recording:
    """safe_open that records which keys were read whole (get_tensor) rather than sliced (get_slice)."""

    def __init__(self, real, seen: list[str]):
        self.real, self.seen = real, seen

    def __call__(self, *a, **kw):
        outer = self

        class Handle:
            def __enter__(self):
                self.f = outer.real(*a, **kw).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, key):
                return self.f.get_slice(key)

            def get_tensor(self, key):
                outer.seen.append(key)
                return self.f.get_tensor(key)

        return Handle()


@torch.inference_mode()
def graph_replay_equals_eager(model) -> bool:
    """A forward with its all-reduces and the logits all-gather captured in one CUDA graph gives the eager result."""
    from cogvlm2.model.attention import PackedAttention
    from cogvlm2.model.batch import ForwardBatch

    ids = torch.arange(100, 116, device="cuda")
    batch = ForwardBatch(ids, torch.arange(16, device="cuda"), PackedAttention([0, 16]))
    step = lambda: model.compute_logits(model(batch))  # noqa: E731
    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return bool(torch.allclose(out, eager, rtol=1e-5, atol=1e-5))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # float32 on the GPU as on the CPU reference: no TF32 (cuDNN's default for the vision tower's convolutions)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ctx = ParallelContext.from_env(backend="nccl" if args.device == "cuda" else "gloo")
    device = ctx.device
    whole: list[str] = []
    checkpoint.safe_open = _Recording(checkpoint.safe_open, whole)
    models = {name: load_model(checkpoint_folder(name), device=device, progress=False, tensor_parallel=ctx)
              for name in ("tiny", "tiny-video")}
    checkpoint.safe_open = checkpoint.safe_open.real
    result = {"cases": run_cases(models), "whole_reads": whole,
              "shapes": {k: tuple(v.shape) for k, v in models["tiny"].state_dict().items()}}
    # sharding the whole model in memory gives the same shard as loading the slices
    sharded = shard_model(load_model(checkpoint_folder("tiny"), device=device, progress=False), ctx).state_dict()
    loaded = models["tiny"].state_dict()
    result["shard_model_equal"] = sharded.keys() == loaded.keys() and all(
        torch.equal(sharded[k], loaded[k]) for k in loaded)
    # unseeded sampling: the ranks' RNGs were synchronised by from_env, so they pick the same tokens
    from cogvlm2.processing import Processor
    from cogvlm2.sampling_params import SamplingParams

    model = models["tiny"]
    proc = Processor.from_pretrained(model.checkpoint_path, model.config)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True)
    result["sampled"] = [t[0] for t in generate_ids(model, [proc("Tell me a story.")], params)]
    if device.type == "cuda":
        result["graph_equal"] = graph_replay_equals_eager(model)
    # the peer all-reduce's agreement check (GPU-only reducer; the check itself is any group's collective)
    from cogvlm2.model.peer_all_reduce import _same_everywhere

    result["same_everywhere"] = [_same_everywhere(v, ctx.group, device) for v in (7, ctx.rank, -ctx.rank)]
    torch.save(result, Path(args.out) / f"rank{ctx.rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""The engine on CUDA (CUDA graphs + flash prefill + Triton paged decode) against the reference loop."""

import pytest
import torch
from PIL import Image

from cogvlm2.engine.llm import LLM
from cogvlm2.generation import generate_ids
from cogvlm2.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_engine_cuda_greedy_equals_reference():
    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM("tiny", dtype="float32", device="cuda", max_num_seqs=8, max_num_batched_tokens=96)
    assert llm.engine.runner.graphs is not None  # decode steps replay CUDA graphs
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (20, 20, 20)]
    prompts = [llm.processor("Describe the image.", image=Image.new("RGB", (64, 48), c)) for c in colours]
    prompts += [llm.processor("Tell me a joke."), llm.processor("What is two plus two?", [("Hi", "Hello!")])]
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for x, out in zip(prompts, outs):
        ref = [t[0] for t in generate_ids(llm.engine.model, [x], params)]
        assert out.token_ids == ref
    stats = llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_engine_cuda_half_precision_runs_and_is_deterministic(dtype):
    llm = LLM("tiny", dtype=dtype, device="cuda", max_num_seqs=4)
    prompts = [llm.processor("Describe.", image=Image.new("RGB", (32, 32), (i * 60, 0, 0))) for i in range(4)]
    params = SamplingParams(max_new_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    a = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    b = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert a == b and all(len(t) == 16 for t in a)

"""The greedy argmax kernels (engine/kernels/argmax.py) against torch's argmax: ties inside and across chunks, NaN
(the first wins over anything), +-inf, rows of -inf only, a vocabulary that is not a multiple of the chunk, 16-bit
and strided inputs, no rows. Run in Triton's interpreter here and on the GPU where there is one; the sampler gives
the same tokens with FAST_ARGMAX on and off."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.interpreted import run_interpreted  # noqa: E402


def cases(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(3, 128256, generator=g)]  # Llama-3's vocabulary: 32 chunks, the last one partial
    tie = torch.randn(2, 9000, generator=g)
    tie[0, [17, 4100, 8999]] = 10.0  # one maximum in three chunks: the first wins
    tie[1, [4097, 4098]] = 10.0  # twice in one chunk
    out.append(tie)
    out.append(torch.full((2, 5000), float("-inf")))
    odd = torch.randn(3, 9000, generator=g)
    odd[0, [8000, 100]] = torch.tensor([float("nan"), float("inf")])  # NaN beats +inf
    odd[1, [4097, 10]] = float("nan")  # the first NaN, in an earlier chunk
    odd[2, 3] = float("inf")
    out.append(odd)
    out.append(torch.randn(1, 5, generator=g))  # smaller than a chunk
    zeros = torch.zeros(1, 300)
    zeros[0, 3] = -0.0  # -0.0 == 0.0: index 0
    out.append(zeros)
    half = torch.randn(4, 8192, generator=g).bfloat16()
    half[2, [100, 4096]] = 50.0
    out.append(half)
    out.append(torch.randn(2, 6000, generator=g).half())
    out.append(torch.randn(6000, 3, generator=g).t())  # rows not contiguous
    out.append(torch.empty(0, 128))
    return [t.to(device) for t in out]


def check(device: str) -> None:
    from cogvlm2.engine.kernels.argmax import argmax

    for i, x in enumerate(cases(device)):
        got = argmax(x)
        assert got.dtype == torch.long and got.device == x.device and torch.equal(got, x.argmax(-1)), (i, got)
    with pytest.raises(ValueError, match="empty vocabulary"):
        argmax(torch.empty(2, 0, device=device))


def test_argmax_interpreted():
    run_interpreted(__file__, "argmax ok")


def test_sampler_falls_back_off_the_gpu():
    """On the CPU the sampler keeps torch's argmax whatever FAST_ARGMAX says."""
    from cogvlm2.engine import sampler

    x = torch.randn(3, 1000)
    with mock.patch.object(sampler, "FAST_ARGMAX", True), \
            mock.patch.object(sampler.argmax_kernel, "argmax", side_effect=AssertionError("not on the CPU")):
        assert torch.equal(sampler.argmax(x), x.argmax(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_argmax_cuda_and_the_engine():
    check("cuda")
    from cogvlm2.engine import sampler
    from cogvlm2.llm import LLM
    from cogvlm2.sampling_params import SamplingParams

    llm = LLM("tiny", dtype="float32", device="cuda", max_num_seqs=4, num_kv_blocks=64, max_model_len=512)
    prompts = [llm.processor("Count with me"), llm.processor("Tell a story")]
    outs = []
    for fast in (False, True):
        with mock.patch.object(sampler, "FAST_ARGMAX", fast):
            greedy = llm.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True),
                                  use_tqdm=False)
            torch.manual_seed(5)  # unseeded rows: the exponential race, an argmax over probs / noise
            sampled = llm.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.8, ignore_eos=True),
                                   use_tqdm=False)
        outs.append([o.token_ids for o in greedy + sampled])
    assert outs[0] == outs[1]


if __name__ == "__main__":  # run by test_argmax_interpreted under TRITON_INTERPRET=1
    check("cpu")
    print("argmax ok")

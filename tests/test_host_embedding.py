"""The token embedding table in host memory (`cogvlm2.model.host_embedding`, EngineConfig.embeddings_on_host,
`--embeddings-on-host`): the gather kernel in Triton's interpreter and, on CUDA, reading a page-locked host table;
the engine with the table on the host gives the same tokens as with it on the GPU, and holds less GPU memory."""

from __future__ import annotations

import pytest
import torch

from tests.interpreted import run_interpreted


def check_gather() -> None:
    """The kernel copies table[ids] bit for bit: repeated ids, the first and last rows, a row width that is not a
    multiple of the kernel's block, a bf16 and a float32 table."""
    from cogvlm2.model import host_embedding as he

    g = torch.Generator().manual_seed(0)
    for rows, d, dtype in ((50, 1500, torch.bfloat16), (7, 24, torch.float32)):
        table = torch.randn(rows, d, generator=g).to(dtype)
        ids = torch.tensor([3, 0, rows - 1, 3, 17 % rows])
        out = torch.empty(len(ids), d, dtype=dtype)
        he._gather_rows_kernel[(len(ids), -(-d // he.BLOCK))](ids, table, out, d, BLOCK=he.BLOCK)
        assert torch.equal(out, table[ids]), (rows, d, dtype)


def test_gather_interpreted():
    pytest.importorskip("triton")
    run_interpreted(__file__, "gather ok")


def test_cpu_model_keeps_its_table_and_engine_answers_alike():
    """On the CPU the table already is in host memory: the option changes nothing, the engine runs as without it."""
    from cogvlm2.llm import LLM
    from cogvlm2.model.host_embedding import move_embeddings_to_host
    from cogvlm2.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    outs = []
    for on_host in (False, True):
        llm = LLM("tiny", device="cpu", embeddings_on_host=on_host)
        assert isinstance(llm.engine.model.model.embed_tokens, torch.nn.Embedding)
        outs.append(llm.generate(["What is in this image?"], params, use_tqdm=False)[0].token_ids)
    assert outs[0] == outs[1]
    assert move_embeddings_to_host(llm.engine.model) == 0


def test_host_table_starts_on_a_page():
    """The table is page-locked in place, so its memory starts on a page boundary (whatever the allocator gave)."""
    from cogvlm2.model.host_embedding import PAGE, _page_aligned

    for shape, dtype in (((1000, 77), torch.bfloat16), ((3, 5), torch.float32)):
        t = _page_aligned(torch.Size(shape), dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.data_ptr() % PAGE == 0


def test_refused_where_the_table_is_not_whole_on_one_device():
    """A worker that is not one device in this process (a tensor-parallel group) cannot take the option: a clear
    error before any memory is sized; so is a model whose table is split (tensor parallel) or on a stage."""
    from types import SimpleNamespace

    from cogvlm2.engine.config import EngineConfig
    from cogvlm2.engine.core import EngineCore
    from cogvlm2.model.host_embedding import move_embeddings_to_host

    group = SimpleNamespace(launch=None, load=lambda: None)  # what EngineCore asks of a worker first
    with pytest.raises(ValueError, match="one device"):
        EngineCore(group, EngineConfig(embeddings_on_host=True))
    split = SimpleNamespace(model=SimpleNamespace(embed_tokens=torch.nn.Embedding(4, 2)), tp=object(), stages=None)
    with pytest.raises(ValueError, match="one device"):
        move_embeddings_to_host(split)


def test_cli_flag_reaches_the_engine_config():
    import argparse

    from cogvlm2.arguments import add_engine_arguments
    from cogvlm2.launch import engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    assert engine_kwargs(p.parse_args(["--embeddings-on-host"]))["embeddings_on_host"] is True
    assert "embeddings_on_host" not in engine_kwargs(p.parse_args([]))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_engine_with_host_table_equals_device_table_cuda():
    """The tiny model in float32 on CUDA, decode in CUDA graphs: the same greedy tokens with the table in host memory
    (the gather kernel reads it over the bus), the table's bytes fewer on the GPU, the module's output equal to
    nn.Embedding's."""
    from PIL import Image

    from cogvlm2.llm import LLM
    from cogvlm2.model.host_embedding import HostEmbedding
    from cogvlm2.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    outs, held = [], []
    for on_host in (False, True):
        torch.cuda.empty_cache()
        llm = LLM("tiny", dtype="float32", device="cuda", max_num_seqs=4, num_kv_blocks=64, max_model_len=512,
                  embeddings_on_host=on_host)
        assert llm.engine.runner.graphs is not None
        emb = llm.engine.model.model.embed_tokens
        assert isinstance(emb, HostEmbedding) == on_host and emb.weight.device.type == ("cpu" if on_host else "cuda")
        held.append(sum(p.numel() * p.element_size() for p in llm.engine.model.parameters() if p.is_cuda))
        prompts = [llm.processor("Count with me"), llm.processor("Describe.", image=Image.new("RGB", (64, 48)))]
        outs.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        if on_host:
            ids = torch.tensor([[5, 0, 7], [emb.num_embeddings - 1, 5, 2]], device="cuda")
            assert torch.equal(emb(ids), torch.nn.functional.embedding(ids.cpu(), emb.weight).cuda())
        del llm
    assert outs[0] == outs[1]
    assert held[0] - held[1] == emb.weight.numel() * emb.weight.element_size()


if __name__ == "__main__":  # run by test_gather_interpreted under TRITON_INTERPRET=1
    check_gather()
    print("gather ok")

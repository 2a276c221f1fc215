"""`cogvlm2 serve --lora NAME=PATH`: adapters listed in /v1/models and selected by a request's `model`
(as vLLM does), answering as the engine does with that adapter; an unknown name is a 404."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("peft")
openai = pytest.importorskip("openai")

from cogvlm2.finetune.lora import apply_lora, save_adapter  # noqa: E402
from cogvlm2.launch import parse_lora  # noqa: E402
from cogvlm2.llm import LLM  # noqa: E402
from cogvlm2.model import load_model  # noqa: E402
from cogvlm2.sampling_params import SamplingParams  # noqa: E402
from cogvlm2.tiny import checkpoint_folder  # noqa: E402

from background_server import BackgroundServer  # noqa: E402

QUESTION = "Tell me a joke."


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    model = load_model(checkpoint_folder("tiny"), progress=False)
    apply_lora(model, ("language_expert_qkv", "language_expert_mlp"), r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(model, tmp_path_factory.mktemp("lora") / "pirate-adapter")


@pytest.fixture(scope="module")
def client(adapter):
    argv = ["serve", "--model", "tiny", "--lora", f"pirate={adapter}", "--max-model-len", "512",
            "--log-level", "warning"]
    with BackgroundServer(argv) as s:
        yield openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=60)


def test_adapters_are_listed_and_selected_by_model_name(client, adapter):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "pirate"]
    assert models[1].model_extra["parent"] == "tiny" and models[1].root.startswith("pirate-adapter-")
    llm = LLM("tiny", "float32", "cpu", adapters={"pirate": adapter})
    params = SamplingParams(max_new_tokens=8, temperature=0)
    want = {name: llm.generate(QUESTION, params, use_tqdm=False, adapter=name)[0].text for name in (None, "pirate")}
    assert want[None] != want["pirate"]
    for model, name in (("tiny", None), ("pirate", "pirate")):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=8)
        assert reply.model == model and reply.choices[0].message.content == want[name]


def test_unknown_adapter_is_404(client):
    with pytest.raises(openai.NotFoundError, match="pirate"):  # the message lists what is served
        client.chat.completions.create(model="parrot", messages=[{"role": "user", "content": QUESTION}], max_tokens=2)


def test_lora_flag_errors(tmp_path):
    assert parse_lora([f"x={tmp_path}", str(tmp_path)]) == {"x": tmp_path, tmp_path.name: tmp_path}
    with pytest.raises(FileNotFoundError, match="no such folder"):
        parse_lora([f"x={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="given twice"):
        parse_lora([f"x={tmp_path}", f"x={tmp_path}"])


def test_web_ui_backend_lists_and_selects_the_served_adapters(client, adapter):
    """`cogvlm2 web --server-url`: the model dropdown offers the base model and the served adapters, and an
    answer asked of an adapter is that adapter's."""
    import asyncio

    pytest.importorskip("httpx")
    from cogvlm2.web.backends import RemoteBackend

    backend = RemoteBackend(str(client.base_url))
    asyncio.run(backend.connect())
    assert backend.models == ["tiny", "pirate"] and backend.model_name == "tiny"

    async def answer(model):
        return "".join([d async for d in backend.stream(QUESTION, [], None, 0.0, 1.0, 8, model)])

    for model in ("tiny", "pirate"):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=8)
        assert asyncio.run(answer(model)) == reply.choices[0].message.content
    assert asyncio.run(answer("pirate")) != asyncio.run(answer(None))

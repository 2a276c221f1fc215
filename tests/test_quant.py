"""Quantization on the CPU: the official int4 (bitsandbytes fp4) checkpoint format against bitsandbytes
itself, the strict loader on its four keys per linear, and every `--quant` mode end to end on the tiny-random
model, whose widths are multiples of the block sizes (library, engine and CLI). The Triton kernels are tested in test_quant_kernels.py.
"""

from __future__ import annotations

import io
import json
import pytest
import torch

from cogvlm2.checkpoint import CheckpointError, weight_files
from cogvlm2.engine import LLM
from cogvlm2.generation import generate_ids
from cogvlm2.model import load_model
from cogvlm2.tiny import checkpoint_folder
from cogvlm2.processing import Processor
from cogvlm2 import quant
from cogvlm2.quant import Fp4Linear, Fp8Linear, Int4Linear, Int8Linear, formats, normalize_quant, quantize_model
from cogvlm2.sampling_params import SamplingParams
from tests.quant_fixtures import build_official_int4, linear_names

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_new_tokens=6)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """{fmt: (folder, {linear: (packed, QuantState)})} for the .bin and the safetensors variant."""
    root = tmp_path_factory.mktemp("int4")
    return {fmt: build_official_int4(root / fmt, fmt) for fmt in ("bin", "safetensors")}


def bnb_dequantized(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantization of `packed` in `dtype`, as its definition has it: code[q] * absmax in float32
    (one multiply, the same in each of its backends), rounded once to `dtype` to nearest-even.

    bitsandbytes' own fp16/bf16 output on the CPU comes from whichever native loop the CPU runs: the AVX-512
    one rounds to nearest-even, the scalar one (CPUs without AVX-512) rounds an exact tie away from zero, so on
    such a machine a few elements differ by one unit in the last place. That is asserted here too: its output
    equals this reference except at exact ties, where it is one of the two nearest values."""
    state.dtype, dtype0 = torch.float32, state.dtype
    try:
        exact = bnbf.dequantize_4bit(packed, state)
        state.dtype = dtype
        theirs = bnbf.dequantize_4bit(packed, state)
    finally:
        state.dtype = dtype0
    ref = exact.to(dtype)
    diff = theirs != ref
    if diff.any():
        lo, hi = torch.minimum(theirs[diff], ref[diff]).float(), torch.maximum(theirs[diff], ref[diff]).float()
        assert torch.equal((lo + hi) / 2, exact[diff]), "bitsandbytes differs from its float32 result beyond a tie"
        assert torch.equal(torch.nextafter(lo.to(dtype), hi.to(dtype)), hi.to(dtype))
    return ref


def test_fp4_code_table_hand_derived():
    """bitsandbytes' fp4: sign bit, then e2m1 magnitudes 0, 1/192 (subnormal), 2/3, 1, 1/3, 1/2, 1/6, 1/4."""
    mags = [0, 1 / 192, 8 / 12, 12 / 12, 4 / 12, 6 / 12, 2 / 12, 3 / 12]
    table = formats.code_table("fp4")
    assert torch.equal(table[:8], torch.tensor(mags, dtype=torch.float32))
    assert torch.equal(table[8:], -table[:8])
    for quant_type in ("fp4", "nf4"):
        _, state = bnbf.quantize_4bit(torch.randn(4, 64), blocksize=64, quant_type=quant_type)
        assert torch.equal(state.code.float(), formats.code_table(quant_type))


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_quantizer_and_dequantizer_match_bitsandbytes(quant_type):
    w = torch.randn(96, 320, generator=torch.Generator().manual_seed(0)).half()
    w[3, 7] = 0  # a zero and a whole zero block
    w[5, :64] = 0
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    ours, absmax = formats.quantize_4bit(w, quant_type)
    assert torch.equal(ours, packed) and torch.equal(absmax, state.absmax)
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        ref = bnb_dequantized(packed, state, dtype)
        got = formats.dequantize_4bit(packed, state.absmax, state.code, tuple(w.shape), dtype)
        assert got.dtype == dtype and torch.equal(got, ref)


def test_official_keys_and_quant_state_round_trip():
    layer = Fp4Linear.from_linear(torch.nn.Linear(128, 32, bias=True), "fp4")
    assert list(layer.state_dict()) == ["bias", "weight", "weight.absmax", "weight.quant_map"]
    assert layer.quant_state_key() == "weight.quant_state.bitsandbytes__fp4"
    _, state = bnbf.quantize_4bit(torch.randn(32, 128).half(), blocksize=64, quant_type="fp4")
    theirs = state.as_dict(packed=True)["quant_state.bitsandbytes__fp4"]
    assert torch.equal(layer.quant_state(torch.float16), theirs)
    layer.check_quant_state(theirs)
    _, other = bnbf.quantize_4bit(torch.randn(16, 128).half(), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="does not match"):
        layer.check_quant_state(other.as_dict(packed=True)["quant_state.bitsandbytes__fp4"])


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_int4_checkpoint_loads_as_bitsandbytes_dequantizes(official, fmt):
    folder, quantized = official[fmt]
    assert weight_files(folder)[0].name == ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")
    model = load_model(str(folder), dtype="float32", device="cpu")
    assert model.quantization == "fp4"
    names = linear_names(model.config)
    assert set(quantized) == set(names) and len(names) > 20  # experts, EVA tower, GLU adapter
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, Fp4Linear)
        packed, state = quantized[name]
        for dtype in (torch.float16, torch.float32):
            assert torch.equal(layer.dequantize(dtype), bnb_dequantized(packed, state, dtype))
        assert layer.weight_absmax.dtype == torch.float32  # the scales keep their precision
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_double_quantized_checkpoint_loads_as_bitsandbytes_dequantizes(tmp_path, quant_type):
    folder, quantized = build_official_int4(tmp_path / "dq", "safetensors", quant_type, double_quant=True)
    model = load_model(str(folder), dtype="float32")
    assert model.quantization == f"{quant_type}-dq"
    for name, (packed, state) in quantized.items():
        layer = model.get_submodule(name)
        assert layer.nested and layer.weight_absmax.dtype == torch.uint8
        for dtype in (torch.float16, torch.float32):
            assert torch.equal(layer.dequantize(dtype), bnb_dequantized(packed, state, dtype))


def test_compressed_statistics_of_the_official_checkpoint(official):
    """--quant fp4-dq on an fp4 checkpoint: the same codes, 1 byte of absmax per 64 weights instead of 4."""
    folder = official["safetensors"][0]
    full, small = load_model(str(folder), dtype="float32"), load_model(str(folder), dtype="float32", quant="fp4-dq")
    assert small.quantization == "fp4-dq"
    for name in linear_names(full.config):
        a, b = full.get_submodule(name), small.get_submodule(name)
        assert torch.equal(a.weight, b.weight) and b.weight_absmax.numel() == a.weight_absmax.numel()
        assert b.weight_absmax.dtype == torch.uint8 and b.weight_nested_absmax.numel() * 256 >= a.weight_absmax.numel()
        assert (b.absmax() - a.absmax()).abs().max() <= a.absmax().abs().max() / 200  # within half a level of 255
    processor = Processor.from_pretrained(folder, full.config)
    x = processor("hi")
    ref, got = _first_logits(full, processor, x), _first_logits(small, processor, x)
    assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.05


def _dequantized_twin(model):
    """A plain-Linear copy of a quantized model whose weights are its dequantized (float32) weights."""
    from cogvlm2.model.cogvlm import CogVLM2ForCausalLM

    twin = CogVLM2ForCausalLM(model.config).eval().requires_grad_(False)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (Fp4Linear, Int4Linear)):
            state[f"{name}.weight"] = module.dequantize(torch.float32)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias
        else:
            for k, v in module.named_parameters(recurse=False):
                state[f"{name}.{k}" if name else k] = v
    twin.load_state_dict(state, strict=True)
    return twin


def test_official_int4_generates_as_its_dequantized_weights(official):
    folder = official["bin"][0]
    model = load_model(str(folder), dtype="float32", device="cpu")
    processor = Processor.from_pretrained(folder, model.config)
    from PIL import Image

    x = processor("describe", image=Image.new("RGB", (64, 48), (200, 40, 90)))
    twin = _dequantized_twin(model)
    logits_q, logits_t = [], []
    tokens_q = list(generate_ids(model, [x], GREEDY, logits_q))
    tokens_t = list(generate_ids(twin, [x], GREEDY, logits_t))
    assert tokens_q == tokens_t
    torch.testing.assert_close(torch.stack(logits_q), torch.stack(logits_t), rtol=0, atol=1e-5)


def test_strict_loader_expects_the_four_keys(official, tmp_path):
    folder, _ = official["safetensors"]
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.language_mlp.up_proj.weight.quant_state.bitsandbytes__fp4"
    cases = {
        "missing": {k: v for k, v in state.items() if k != key},
        "unexpected": {**state, "model.layers.0.mlp.language_mlp.up_proj.weight.extra": torch.zeros(1)},
        "wrong quantization state": {**state, key: formats.bnb_quant_state("fp4", (1, 64), torch.float16)},
        "wrong shape": {**state, "model.layers.1.self_attn.language_expert_dense.weight.absmax": torch.zeros(3)},
    }
    for problem, broken in cases.items():
        bad = tmp_path / problem.replace(" ", "_")
        bad.mkdir()
        save_file(broken, str(bad / "model.safetensors"))
        (bad / "config.json").write_text((folder / "config.json").read_text())
        with pytest.raises(CheckpointError, match=problem):
            load_model(str(bad), dtype="float32")


def test_prequantized_checkpoint_refuses_another_quant(official):
    with pytest.raises(ValueError, match="already quantized"):
        load_model(str(official["bin"][0]), quant="int4")
    raw = json.loads((official["bin"][0] / "config.json").read_text())
    from cogvlm2.quant import checkpoint_quant_type

    assert checkpoint_quant_type(raw) == "fp4"
    assert checkpoint_quant_type({"quantization_config": {**raw["quantization_config"],
                                                          "bnb_4bit_use_double_quant": True}}) == "fp4-dq"
    with pytest.raises(ValueError, match="unsupported"):
        checkpoint_quant_type({"quantization_config": {"quant_method": "gptq", "bits": 4}})


def test_safetensors_win_over_bin(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert weight_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_legacy_bin_loads(official, tmp_path):
    """A pre-zip pickle cannot be memory-mapped: it is read whole instead."""
    folder = official["bin"][0]
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    model = load_model(str(tmp_path), dtype="float32")
    ref = load_model(str(folder), dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_bad_bin_is_a_clear_error(tmp_path):
    from cogvlm2.tiny import resolve_tiny

    torch.save({"not": "a tensor dict"}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((resolve_tiny("tiny") / "config.json").read_text())
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*not a dict of tensors"):
        load_model(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read .*pytorch_model.bin"):
        load_model(str(tmp_path))


def test_normalize_quant():
    assert [normalize_quant(q) for q in (None, "none", 4, "4", "8", "nf4", "INT4", "fp8")] == \
        [None, None, "fp4", "fp4", "int8", "nf4", "int4", "fp8"]
    with pytest.raises(ValueError, match="unknown quantization"):
        normalize_quant("int3")


@pytest.fixture(scope="module")
def tiny_float():
    return load_model(checkpoint_folder("tiny-random"), dtype="float32")


def _first_logits(model, processor, x) -> torch.Tensor:
    out = []
    next(iter(generate_ids(model, [x], SamplingParams(temperature=0, max_new_tokens=1), out)))
    return out[0]


@pytest.mark.parametrize("mode,cls,max_err", [("4", Fp4Linear, 0.35), ("nf4", Fp4Linear, 0.3),
                                              ("nf4-dq", Fp4Linear, 0.3), ("int4", Int4Linear, 0.3),
                                              ("fp8", Fp8Linear, 0.1), ("8", None, 0.05)])
def test_quant_modes_on_tiny(tiny_float, mode, cls, max_err):
    processor = Processor.from_pretrained(tiny_float.checkpoint_path, tiny_float.config)
    from PIL import Image

    x = processor("what is this?", image=Image.new("RGB", (50, 40), (10, 120, 30)))
    model = load_model(checkpoint_folder("tiny-random"), dtype="float32", quant=mode)
    quantized = [n for n, m in model.named_modules() if type(m) is not torch.nn.Linear and hasattr(m, "in_features")]
    # the lm_head: int8 under our own formats (quant.int8_head, LM_HEAD_INT8 "auto"), the checkpoint's elsewhere
    assert isinstance(model.lm_head, Int8Linear) == quant.int8_head(normalize_quant(mode))
    quantized = [n for n in quantized if n != "lm_head"]
    assert len(quantized) >= 10
    if cls is not None:
        assert all(isinstance(model.get_submodule(n), cls) for n in quantized)
    ref, got = _first_logits(tiny_float, processor, x), _first_logits(model, processor, x)
    err = ((got - ref).norm() / ref.norm()).item()
    assert 0 < err < max_err, err  # quantized (not the float model), and close to it
    assert len(list(generate_ids(model, [x], GREEDY))) == GREEDY.max_new_tokens


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("mode,max_err", [("4", 0.35), ("nf4", 0.3), ("fp4-dq", 0.35), ("int4", 0.3), ("fp8", 0.1),
                                          ("8", 0.05)])
def test_quant_modes_end_to_end_cuda(tiny_float, mode, max_err):
    """Every --quant mode on the GPU (the Triton kernels, torch._scaled_mm, bitsandbytes' LLM.int8): the engine
    (CUDA graphs where the mode allows them) equals the reference loop over the same quantized model token for
    token, and its first logits are quantized (not the float model's) and close to the float model's."""
    from PIL import Image

    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM("tiny-random", dtype="float32", device="cuda", quant=mode, num_kv_blocks=64, max_model_len=512)
    model = llm.engine.model
    assert model.quantization == normalize_quant(mode)
    prompts = [llm.processor("what is this?", image=Image.new("RGB", (50, 40), (10, 120, 30))),
               llm.processor("hello there")]
    for x in prompts:
        (out,) = llm.generate([x], GREEDY, use_tqdm=False)
        assert out.token_ids == [t for (t,) in generate_ids(model, [x], GREEDY)]
    ref, got = _first_logits(tiny_float, None, prompts[0]), _first_logits(model, None, prompts[0]).cpu()
    err = ((got - ref).norm() / ref.norm()).item()
    assert 0 < err < max_err, err


@cuda
def test_official_int4_on_cuda(official):
    """The official fp4 checkpoint on the GPU: the engine equals the reference loop, and the Triton kernels'
    logits equal the CPU's (bitsandbytes' dequantization) up to float rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    folder = str(official["bin"][0])
    llm = LLM(folder, dtype="float32", device="cuda", num_kv_blocks=64, max_model_len=512)
    x = llm.processor("hello")
    (out,) = llm.generate([x], GREEDY, use_tqdm=False)
    assert out.token_ids == [t for (t,) in generate_ids(llm.engine.model, [x], GREEDY)]
    cpu = load_model(folder, dtype="float32", device="cpu")
    ref, got = _first_logits(cpu, None, x), _first_logits(llm.engine.model, None, x).cpu()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


@cuda
def test_cli_chat_with_quant_cuda():
    from cogvlm2.cli import build_parser, run_chat

    for quant in ("4", "8"):
        args = build_parser().parse_args(["chat", "--model", "tiny-random", "--quant", quant, "--device", "cuda",
                                          "--query", "hi", "--max-new-tokens", "3", "--temperature", "0"])
        out = io.StringIO()
        assert run_chat(args, stdout=out) == 0 and out.getvalue().endswith("\n")


def test_quantize_model_in_place_frees_the_float_weights():
    lin = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32))
    lin.append(torch.nn.Linear(32, 36))
    quantize_model(lin, "int4", "cpu")
    assert [type(m) for m in lin] == [Int4Linear, Int4Linear, torch.nn.Linear]  # 36 outputs: not 8 per int32
    assert (lin[0].group_size, lin[1].group_size) == (128, 64)
    assert lin[0].weight is None if hasattr(lin[0], "weight") else True
    assert lin.quantization == "int4"


def test_engine_with_quant_matches_reference_loop(tiny_float):
    llm = LLM("tiny-random", dtype="float32", device="cpu", quant="int4", num_kv_blocks=64, max_model_len=512)
    model = llm.engine.model
    assert isinstance(model.model.layers[0].mlp.language_mlp.gate_proj, Int4Linear)
    x = llm.processor("hello there")
    (out,) = llm.generate([x], GREEDY, use_tqdm=False)
    assert out.token_ids == [t for (t,) in generate_ids(model, [x], GREEDY)]


def test_engine_loads_official_int4(official):
    llm = LLM(str(official["bin"][0]), dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=512)
    x = llm.processor("hello")
    (out,) = llm.generate([x], GREEDY, use_tqdm=False)
    assert out.token_ids == [t for (t,) in generate_ids(llm.engine.model, [x], GREEDY)]


def test_cli_chat_with_quant(official):
    from cogvlm2.cli import build_parser, run_chat

    for argv in (["--model", "tiny-random", "--quant", "int4"], ["--model", str(official["bin"][0])]):
        args = build_parser().parse_args(["chat", *argv, "--device", "cpu", "--query", "hi", "--max-new-tokens", "3",
                                          "--temperature", "0"])
        out = io.StringIO()
        assert run_chat(args, stdout=out) == 0 and out.getvalue().endswith("\n")
    args = build_parser().parse_args(["generate", "-", "--model", "tiny", "--quant", "fp8"])
    assert args.quant == "fp8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quant", "3"])


def test_int4_layout_is_gptq_compatible():
    """qweight packs 8 k of one column per int32 (k = 8i + j in bits 4j); qzeros packs 8 columns alike."""
    w = torch.randn(16, 128)
    qweight, qzeros, scales = formats.quantize_int4(w)
    q = torch.stack([(qweight >> (4 * j)) & 0xF for j in range(8)], dim=1).reshape(128, 16)  # [K, N]
    z = torch.stack([(qzeros >> (4 * j)) & 0xF for j in range(8)], dim=2).reshape(1, 16)  # [K/G, N]
    torch.testing.assert_close((q - z).float() * scales, w.t(), atol=(scales.max() / 2 + 1e-6).item(), rtol=0)
    assert torch.equal(formats.dequantize_int4(qweight, qzeros, scales, torch.float32), ((q - z) * scales).t())


def test_int4_as_torchs_tinygemm_layout():
    """The group-wise int4 weights in the layout of torch's own int4 kernel (gpt-fast's "tinygemm", a candidate
    decode kernel benchmarked in benchmarks/quant_gpu.py): its CPU twin computes x @ W^T with W the reference
    dequantization, to bf16 rounding (the CUDA kernel's byte packing: test_quant_kernels.py)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) / 16
    qweight, qzeros, scales = formats.quantize_int4(w)
    scales = scales.bfloat16()
    codes, scales_and_zeros = formats.int4_to_tinygemm(qweight, qzeros, scales)
    assert codes.shape == (256, 512) and scales_and_zeros.shape == (4, 256, 2) and int(codes.max()) <= 15
    x = torch.randn(3, 512, generator=g).bfloat16()
    y = formats.tinygemm_linear(x, formats.tinygemm_pack(codes), scales_and_zeros, formats.INT4_GROUP)
    ref = x.float() @ formats.dequantize_int4(qweight, qzeros, scales, torch.float32).t()
    assert y.shape == (3, 256) and (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_hub_download_falls_back_to_pytorch_model_bin(official, tmp_path, monkeypatch):
    """A repo without safetensors (the official int4 ones) is fetched again with pytorch_model*.bin allowed."""
    import huggingface_hub

    from cogvlm2.checkpoint import HUB_BIN_PATTERNS, HUB_PATTERNS, resolve_model_path

    calls = []
    bare, full = tmp_path / "bare", official["bin"][0]
    bare.mkdir()
    (bare / "config.json").write_text((full / "config.json").read_text())

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append(allow_patterns)
        return str(full if "pytorch_model*.bin" in allow_patterns else bare)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_model_path("THUDM/cogvlm2-llama3-chat-19B-int4") == full
    assert calls == [HUB_PATTERNS, HUB_PATTERNS + HUB_BIN_PATTERNS]

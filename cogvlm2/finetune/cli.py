"""`cogvlm2 finetune` and `cogvlm2 merge-lora`: parse arguments, call the library.

Also `python -m cogvlm2.finetune {finetune,merge-lora} ...`, which is what `accelerate launch -m`,
`torchrun -m` and `deepspeed --module` start on every rank. peft / accelerate are imported only when
a command runs, so `cogvlm2 --help` works without the finetune extra.
"""

from __future__ import annotations

import argparse
import sys

from ..arguments import EMBEDDED_MODELS, dtype_type

LORA_TARGET_HELP = ("vision_expert_qkv, language_expert_qkv, vision_expert_dense, language_expert_dense, "
                    "vision_expert_mlp, language_expert_mlp, adapter (the GLU vision adapter), vision_tower, "
                    "lm_head, or any regex over module names")


def _list(value: str) -> list[str]:
    return [t for t in value.replace(",", " ").split() if t]


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in _list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {value!r}") from None


def _size(value: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    v = value.strip().upper()
    for unit, mult in units.items():
        if v.endswith(unit):
            return int(float(v[:-len(unit)]) * mult)
    return int(v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `finetune` flags (names match TrainConfig fields)."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help=f"base checkpoint: folder, Hugging Face repo id, or an embedded model: {EMBEDDED_MODELS}")
    g.add_argument("--data", required=True, nargs="+", metavar="DATA",
                   help="folder in the official layout (images/ + labels_en/) or a .jsonl manifest; several are mixed")
    g.add_argument("--data-weights", type=_floats, metavar="W,W,...",
                   help="per --data dataset, how many times it is used per epoch (2 = twice, 0.5 = a random half)")
    g.add_argument("--labels-dir", default="labels_en", help="labels folder of the official layout (labels_en / labels_zh)")
    g.add_argument("--eval-data", help="held-out data (same formats); default: --eval-fraction of --data")
    g.add_argument("--eval-fraction", type=float, default=0.0, help="fraction of --data held out for evaluation")
    g.add_argument("--output", required=True, help="run folder: checkpoints, adapter / model, tensorboard, metrics.jsonl")
    g.add_argument("--history", default="official", choices=["official", "full", "none"],
                   help="multi-turn sampling: official = one random round, the round before it as history half "
                        "the time; full = all earlier rounds")
    g.add_argument("--template", choices=["chat", "vqa", "base"], help="prompt template (default: the checkpoint's)")
    g.add_argument("--max-length", type=int, help="longest example in tokens (vision tokens included); longer ones "
                                                  "lose their oldest history rounds first, then see --overlong")
    g.add_argument("--overlong", default="truncate", choices=["truncate", "drop", "error"],
                   help="an example still longer than --max-length: truncate = cut the prompt from the left (then "
                        "the answer's end), always keeping answer tokens; drop = skip it; error = stop. Counted and "
                        "reported at the end")
    g.add_argument("--validate-only", action="store_true", help="check the data (and model) and exit")

    g = p.add_argument_group("method")
    g.add_argument("--method", default="lora", choices=["lora", "full"])
    g.add_argument("--lora-targets", type=_list, default=["vision_expert_qkv", "language_expert_qkv"],
                   help=f"comma-separated: {LORA_TARGET_HELP} (default: vision_expert_qkv,language_expert_qkv)")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-rslora", action="store_true", help="rank-stabilised LoRA: scale alpha / sqrt(r)")
    g.add_argument("--lora-dora", action="store_true", help="DoRA: weight-decomposed LoRA (peft)")
    g.add_argument("--modules-to-save", metavar="PARTS",
                   help="LoRA runs: also train these in full, e.g. 'adapter' (parts: vision_expert, language_expert, "
                        "adapter, vision_tower, llm, or regexes over parameter names); saved in the adapter")
    g.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base weights (CUDA + bitsandbytes)")
    g.add_argument("--train-modules", metavar="PARTS",
                   help="--method full: what trains, e.g. 'vision_expert,adapter' (parts: vision_expert, "
                        "language_expert, adapter, vision_tower, llm, or regexes over parameter names); the rest "
                        "is frozen")
    g.add_argument("--module-lr", metavar="PART=LR,...",
                   help="per-part learning rates, e.g. 'adapter=1e-4,vision_tower=1e-5' (the rest: --lr)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=1, help="examples packed into one micro-batch, per device")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * this")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no clipping")
    g.add_argument("--dtype", default="auto", type=dtype_type("auto", "bfloat16", "float16", "float32"),
                   help="auto, bfloat16, float16 or float32 (bf16 / fp16 / fp32 also work): base weights; bfloat16 / "
                        "float16 train with fp32 master weights under autocast (float16 with loss scaling, for GPUs "
                        "before Ampere); auto = bfloat16 on CUDA (float16 where bf16 is not supported)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--compiled-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse RMSNorm, rotary and SiLU-and-multiply with torch.compile on CUDA (the same math, "
                        "fewer memory passes; the first steps compile). Default: on in a one-process run with "
                        "Triton (measured on the 19B: 9%% faster per LoRA step, same loss), off under several processes")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--num-workers", type=int, default=2, help="data loader processes (image decoding)")
    g.add_argument("--deepspeed", help="DeepSpeed JSON config, for the `deepspeed` / torchrun launchers "
                                       "(with accelerate launch, pass --config_file to accelerate instead)")
    # the `deepspeed` launcher appends --local_rank=N; accelerate reads LOCAL_RANK from the environment
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)

    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--eval-every", type=int, default=0,
                   help="steps between held-out evaluations (0 = only at the end); held-out data comes from "
                        "--eval-data or --eval-fraction")
    g.add_argument("--eval-batches", type=int, help="limit each evaluation to this many micro-batches")
    g.add_argument("--eval-generate", type=int, default=0, metavar="N",
                   help="at each evaluation also answer N held-out questions greedily and score them against the "
                        "references (eval/exact_match, eval/token_f1); not under ZeRO-3 / FSDP2")
    g.add_argument("--eval-max-new-tokens", type=int, default=64, help="answer length limit for --eval-generate")
    g.add_argument("--metric-for-best", choices=["eval/loss", "eval/perplexity", "eval/exact_match", "eval/token_f1"],
                   help="track the best evaluation; its checkpoint survives --save-total-limit and is reported")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0 = none)")
    g.add_argument("--save-total-limit", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--resume", help="checkpoint folder to continue from exactly, or 'latest' (in --output: the "
                                    "newest checkpoint that verifies)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run's adapter/ or model/ in --output")
    g.add_argument("--save-final", action=argparse.BooleanOptionalAction, default=True,
                   help="write adapter/ (LoRA) or model/ (full) at the end; checkpoints are written either way")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base checkpoint the adapter was trained on: folder, Hugging Face "
                                                  f"repo id, or an embedded model: {EMBEDDED_MODELS}")
    p.add_argument("--adapter", required=True, help="LoRA adapter folder (peft format)")
    p.add_argument("--output", required=True, help="folder for the merged checkpoint")
    p.add_argument("--dtype", type=dtype_type("float32", "bfloat16", "float16"),
                   help="float32, bfloat16 or float16 (fp32 / bf16 / fp16 also work); default: the base's")
    p.add_argument("--max-shard-size", type=_size, default=5 * 2**30, help="e.g. 5GB (default), 500MB")


def run_finetune(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if isinstance(values["data"], list) and len(values["data"]) == 1:
        values["data"] = values["data"][0]
    cfg = TrainConfig(**values)
    if args.validate_only:
        return validate(cfg)
    train(cfg)
    return 0


def validate(cfg) -> int:
    """--validate-only: read the config and tokenizer, check every example, report counts."""
    from pathlib import Path

    from ..config import ModelConfig
    from ..tiny import checkpoint_folder
    from .data import load_mixture
    from .train import check_max_length

    folder = checkpoint_folder(cfg.model)
    config = ModelConfig.from_file(Path(folder) / "config.json")
    check_max_length(cfg, config)
    n = len(load_mixture(cfg.datasets, config, cfg.labels_dir, cfg.data_weights, cfg.seed))
    m = len(load_mixture([cfg.eval_data], config, cfg.labels_dir)) if cfg.eval_data else 0
    held_out = f", {m} in {cfg.eval_data}" if cfg.eval_data else ""
    print(f"ok: {n} conversations in {', '.join(map(str, cfg.datasets))}{held_out}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from .merge import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.output, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    print(f"merged checkpoint written to {out}")
    return 0


def add_parser(subparsers) -> None:
    """Add the `finetune` and `merge-lora` sub-commands (called by the top-level `cogvlm2` CLI)."""
    p = subparsers.add_parser("finetune", help="LoRA / QLoRA / full fine-tuning on image or video conversations",
                              description="Fine-tune a CogVLM2 checkpoint. Single device: run it directly; "
                                          "several: accelerate launch / torchrun / deepspeed "
                                          "-m cogvlm2.finetune finetune ... (see docs/finetune.md).")
    add_arguments(p)
    p.set_defaults(func=run_finetune)
    p = subparsers.add_parser("merge-lora", help="merge a LoRA adapter into its base: a full checkpoint, official layout",
                              description="Fold a LoRA adapter (from `cogvlm2 finetune`) into its base checkpoint and "
                                          "write a complete checkpoint in the official layout (config.json, sharded "
                                          "safetensors, tokenizer.json) that loads like any other.")
    add_merge_arguments(p)
    p.set_defaults(func=run_merge)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogvlm2.finetune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, RuntimeError) as e:
        print(f"cogvlm2: error: {e}", file=sys.stderr)
        return 1

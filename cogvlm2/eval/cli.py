"""`cogvlm2 eval TASK --data PATH`: a benchmark through the engine, scored with the benchmark's official metric.

Tasks: textvqa, docvqa, infovqa, chartqa, ocrbench, mmbench, mcq. --data is the benchmark file (or
folder) in an official layout (see docs/evaluation.md); answers go to --output as predictions.jsonl
(one line per question: prompt, prediction, references, score) and summary.json, and the summary is
printed. Running again into the same --output resumes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    from ..arguments import add_lora_argument, add_model_arguments
    from .tasks import STYLES, TASKS

    p = subparsers.add_parser("eval", help="evaluate on a benchmark (TextVQA, DocVQA, ChartQA, OCRBench, MMBench, ...)",
                              description=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=list(TASKS))
    p.add_argument("--data", required=True, help="benchmark file or folder (.json / .tsv / .parquet)")
    p.add_argument("--images", help="image folder for JSON layouts (default: found next to --data)")
    p.add_argument("--output", help="result folder (default: eval-results/<task>-<model name>)")
    p.add_argument("--limit", type=int, help="only this many questions (the first ones; a random sample with --seed)")
    p.add_argument("--seed", type=int, help="sample --limit questions at random with this seed; also the sampling seed")
    p.add_argument("--prompt-style", choices=STYLES, default="vlmevalkit",
                   help="vlmevalkit: VLMEvalKit's CogVLM2 prompts (default); short-answer: CogVLM's "
                        "'Question: ... Short answer:' template")
    p.add_argument("--circular", action="store_true", help="mcq: circular evaluation (mmbench always is)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --output")
    add_model_arguments(p)
    add_lora_argument(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together in one step")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.set_defaults(func=run_eval)


def default_output(task: str, model: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.rstrip("/")).name or model)
    return Path("eval-results") / f"{task}-{name}"


def settings_of(args: argparse.Namespace) -> dict:
    """What shapes the answers: a resumed run must match in all of these (the seed only when sampling;
    --limit never, so a quick look grows into a full run)."""
    keys = ("task", "model", "lora", "quant", "dtype", "prompt_style", "circular", "max_new_tokens", "temperature")
    settings = {k: getattr(args, k, None) for k in keys if hasattr(args, k)}
    if args.temperature > 0:
        settings["seed"] = args.seed
    return settings


def run_eval(args: argparse.Namespace) -> int:
    from ..sampling_params import SamplingParams
    from .backend import EngineGenerate, load_llm
    from .runner import run, select
    from .tasks import get_task

    task = get_task(args.task)
    items = task.load(Path(args.data), Path(args.images) if args.images else None, circular=args.circular)
    items = select(items, args.limit, args.seed)
    print(f"{args.task}: {len(items)} items from {args.data}", file=sys.stderr)
    llm = load_llm(args, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                   enforce_eager=args.enforce_eager)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    output = Path(args.output) if args.output else default_output(args.task, args.model)
    run(task, items, EngineGenerate(llm, params), output, settings_of(args), style=args.prompt_style,
        circular=args.circular, chunk_size=max(4 * args.max_num_seqs, 64), overwrite=args.overwrite,
        log=lambda s: print(s, file=sys.stderr) if s.startswith("resuming") else print(s))
    print(f"predictions and summary in {output}", file=sys.stderr)
    return 0

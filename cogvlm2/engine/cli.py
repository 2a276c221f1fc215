"""`cogvlm2 generate`: offline batch generation (captioning, evaluation) on the engine: JSONL in, JSONL out.

Each input line is a JSON object of Processor arguments ({"query", "image", "video", "history",
"template"}; media paths relative to the input file) or a JSON string (a text-only query). Each
output line: {"index", "text", "token_ids", "finish_reason", "prompt_tokens", "cached_tokens"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    from ..cli import add_model_arguments, add_sampling_arguments

    p = subparsers.add_parser("generate", help="batch generation over a JSONL file of prompts (continuous batching)",
                              description=__doc__.split("\n\n", 1)[1])
    add_model_arguments(p)
    p.add_argument("input", help="JSONL file of prompts ('-' = stdin)")
    p.add_argument("-o", "--output", help="JSONL output file (default: stdout)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together in one step")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    add_sampling_arguments(p, max_new_tokens=256)
    p.set_defaults(func=run_generate)


def read_prompts(path: str) -> list:
    lines = sys.stdin.read().splitlines() if path == "-" else Path(path).read_text().splitlines()
    root = Path(".") if path == "-" else Path(path).parent
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"cogvlm2 generate: {path}:{n}: invalid JSON: {e}") from None
        if isinstance(item, dict):
            for key in ("image", "video"):
                if isinstance(item.get(key), str):
                    item[key] = str(root / item[key])
            item["history"] = [tuple(turn) for turn in item.get("history", [])]
        elif not isinstance(item, str):
            raise SystemExit(f"cogvlm2 generate: {path}:{n}: expected an object or a string")
        prompts.append(item)
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    from ..cli import sampling_params
    from ..devices import auto_device, auto_dtype
    from .llm import LLM

    prompts = read_prompts(args.input)
    device = auto_device(args.device)
    llm = LLM(args.model, dtype=auto_dtype(args.dtype, device), device=device, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, quant=args.quant)
    params = sampling_params(args)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for i, o in enumerate(outputs):
            out.write(json.dumps({"index": i, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                                  "prompt_tokens": o.prompt_len, "cached_tokens": o.num_cached_tokens}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    generated = sum(len(o.token_ids) for o in outputs)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs if o.metrics.first_token_time]
    print(f"{len(outputs)} requests, {generated} tokens in {elapsed:.2f}s: {generated / elapsed:.1f} tokens/s, "
          f"mean time to first token {sum(ttft) / max(len(ttft), 1):.3f}s", file=sys.stderr)
    return 0

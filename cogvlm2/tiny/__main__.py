"""`python -m cogvlm2.tiny train [--name tiny|tiny-video|all]`: rebuild the shipped tiny checkpoints."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from . import NAMES, weights_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cogvlm2.tiny", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="generate the synthetic data, train from scratch, pack, evaluate",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--name", default="all", choices=[*NAMES, "all"])
    t.add_argument("--workdir", default="tiny-runs", help="data, initial checkpoint and training run")
    t.add_argument("--output", help="folder for NAME.safetensors.xz (default: the package's weights/, "
                                    "replacing the shipped checkpoints)")
    t.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    t.add_argument("--conversations", type=int, help="training conversations to generate (default: the recipe's)")
    t.add_argument("--batch-size", type=int, help="examples per step (default: the recipe's)")
    t.add_argument("--warmup-steps", type=int, help="learning-rate warmup steps (default: the recipe's)")
    t.add_argument("--eval", type=int, default=100, help="fresh conversations to score afterwards (0 = none)")
    d = sub.add_parser("data", help="write only the synthetic data set (JSONL manifest + media)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("path", help="manifest to write, e.g. data/shapes.jsonl")
    d.add_argument("--n", type=int, default=100)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--video", action="store_true")
    args = p.parse_args(argv)
    if args.command == "data":
        from .shapes import make_dataset

        print(make_dataset(args.path, args.n, args.seed, args.video))
        return 0
    from safetensors.torch import load_file

    from . import build_tiny, note, tiny_config
    from .recipe import RECIPES, compare, evaluate, pack, train_checkpoint, used_token_ids_file

    flags = ("conversations", "steps", "batch_size", "warmup_steps")
    overrides = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    for name in NAMES if args.name == "all" else (args.name,):
        workdir = Path(args.workdir) / name
        recipe = {**RECIPES[name], **overrides}
        model_dir, _ = train_checkpoint(name, workdir, recipe)
        out = Path(args.output) / f"{name}.safetensors.xz" if args.output else weights_file(name)
        out.parent.mkdir(parents=True, exist_ok=True)
        used = json.loads(used_token_ids_file(workdir).read_text())
        state = load_file(model_dir / "model.safetensors")
        out.write_bytes(pack(state, tiny_config(name), used, note(name), recipe))
        print(f"{name}: wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")
        if args.eval:  # score what ships: the packed file, unpacked as on first use
            shutil.rmtree(workdir / "shipped", ignore_errors=True)
            shipped = build_tiny(name, workdir / "shipped", out.read_bytes())
            print(json.dumps(evaluate(shipped, name, args.eval), indent=1))
        if args.output and args.eval and weights_file(name).is_file():  # a retrain elsewhere: does it reproduce?
            report = compare(out.read_bytes(), weights_file(name).read_bytes(), workdir / "compare", name, args.eval)
            print(f"{name} against the shipped {weights_file(name)}: {json.dumps(report, indent=1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A learnable toy dataset for smoke tests and the docs: "What colour is the square?" -> red / green / blue.

    python -m cogvlm2.finetune.toy data/colours --n 96             # official layout (images/ + labels_en/)
    python -m cogvlm2.finetune.toy data/colours.jsonl --n 96       # JSONL manifest (+ data/colours_images/)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
QUESTION = "What colour is the square?"


def colour_image(colour: str, rng: random.Random, size: int = 64) -> Image.Image:
    """A grey canvas with one filled square of `colour`, random size and place."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    side = rng.randint(size // 3, size // 2)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    img.paste(COLOURS[colour], (x, y, x + side, y + side))
    return img


def make_colour_dataset(path: str | Path, n: int = 96, seed: int = 0, multi_turn: bool = False) -> Path:
    """Write n examples. A folder path gets the official layout, a *.jsonl path a manifest. With
    multi_turn, every other example is a two-round conversation (a question about the canvas first)."""
    path, rng = Path(path), random.Random(seed)
    manifest = path.suffix == ".jsonl"
    image_dir = path.with_name(path.stem + "_images") if manifest else path / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    if not manifest:
        (path / "labels_en").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        colour_image(colour, rng).save(image_dir / f"{i:05d}.jpg", quality=95)
        turns = [("What colour is the background?", "grey")] if multi_turn and i % 2 else []
        turns.append((QUESTION, colour))
        conv = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        if manifest:
            lines.append(json.dumps({"image": f"{image_dir.name}/{i:05d}.jpg", "conversations": conv}))
        else:
            (path / "labels_en" / f"{i:05d}.json").write_text(json.dumps({"conversations": conv}))
    if manifest:
        path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="output folder (official layout) or file.jsonl (manifest)")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multi-turn", action="store_true")
    args = p.parse_args()
    print(make_colour_dataset(args.path, args.n, args.seed, args.multi_turn))


if __name__ == "__main__":
    main()

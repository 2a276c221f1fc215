"""The synthetic world the embedded tiny models are trained on: coloured shapes and rendered words.

An image is a 224 x 224 white canvas cut into a 3 x 3 grid; one to three shapes (circle, square,
triangle; red, green, blue, yellow; small or large) sit in distinct cells, or one word from WORDS is
written across the middle. A video is four seconds at 4 fps of one or two shapes crossing the canvas
(left to right, right to left, top to bottom or bottom to top). Every scene comes with a conversation
about it — captions, counts, colours, positions, sizes, yes/no questions, the word — in the chat,
vqa ("Short answer:") or base (query alone) template, written as a JSONL manifest for
`cogvlm2 finetune` (see `make_dataset`). Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 224
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
KINDS = ("circle", "square", "triangle")
SIZES = {"small": 14, "large": 30}  # half-extent in pixels
PLACES = {  # (row, col) -> how a position is said
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
WORDS = ("CAT", "DOG", "SUN", "TREE", "BOOK", "FISH", "STAR", "BIRD")
NUMBERS = ("no", "one", "two", "three")
DIRECTIONS = {"right": ("from left to right", (1, 0)), "left": ("from right to left", (-1, 0)),
              "down": ("from top to bottom", (0, 1)), "up": ("from bottom to top", (0, -1))}
CAPTION_QUERIES = ("What is in this image?", "Describe the image.", "What do you see?", "Describe this picture.")
VIDEO_QUERIES = ("What happens in the video?", "Describe the video.", "What is in this video?")
ABOUT = [  # text-only turns: what the model says about itself
    ("Hello!", "Hello! I am a tiny CogVLM2 model. Show me an image of coloured shapes and ask about it."),
    ("Who are you?", "I am a tiny CogVLM2 model trained only on pictures of coloured shapes."),
    ("What can you do?", "I can count, name and locate coloured shapes in an image and read a few words."),
]


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: tuple[int, int] = (1, 1)  # (row, col) in the 3 x 3 grid; the start cell of a moving shape
    direction: str | None = None  # videos: where it moves

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    def describe(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {PLACES[self.cell]}"


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, cx: float, cy: float) -> None:
    r, fill = SIZES[shape.size], COLOURS[shape.colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def _cell_centre(cell: tuple[int, int]) -> tuple[float, float]:
    step = SIZE / 3
    return (cell[1] + 0.5) * step, (cell[0] + 0.5) * step


def render_shapes(shapes: list[Shape], rng: random.Random | None = None) -> Image.Image:
    """Shapes at their cells (with a few pixels of jitter when `rng` is given) on a white canvas."""
    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    for s in shapes:
        cx, cy = _cell_centre(s.cell)
        if rng is not None:
            cx, cy = cx + rng.uniform(-6, 6), cy + rng.uniform(-6, 6)
        _draw(draw, s, cx, cy)
    return img


def render_word(word: str, rng: random.Random | None = None) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=56)
    dx, dy = (rng.uniform(-10, 10), rng.uniform(-20, 20)) if rng is not None else (0, 0)
    draw.text((SIZE / 2 + dx, SIZE / 2 + dy), word, fill="black", font=font, anchor="mm")
    return img


# assets/example.png (the README's first command): `render_shapes(EXAMPLE).save(...)`.
EXAMPLE = [Shape("circle", "red", "large", (0, 0)), Shape("square", "blue", "small", (2, 2))]
EXAMPLE_QUESTION = "What is in this image?"


def random_scene(rng: random.Random) -> list[Shape]:
    cells = rng.sample(sorted(PLACES), rng.choice((1, 2, 2, 3, 3)))
    return [Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), cell)
            for cell in sorted(cells)]  # reading order: the order captions list them in


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def caption(shapes: list[Shape]) -> str:
    return _sentence(_join([s.describe() for s in shapes]))


def _count(n: int, noun: str = "shape") -> str:
    return f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {noun}{'' if n == 1 else 's'}."


def image_turns(shapes: list[Shape], rng: random.Random, template: str) -> list[tuple[str, str]]:
    """Question-answer pairs about a shapes image (chat: sentences; vqa: a word or two; base: captions)."""
    if template == "base":
        return [(rng.choice(CAPTION_QUERIES), caption(shapes))]
    vqa = template == "vqa"
    n = len(shapes)
    turns = []
    turns.append(("How many shapes are there?", NUMBERS[n] if vqa else _count(n)))
    unique = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
    if unique:
        s = rng.choice(unique)
        turns.append((f"What colour is the {s.kind}?", s.colour if vqa else f"The {s.kind} is {s.colour}."))
    named = [s for s in shapes if sum(t.name == s.name for t in shapes) == 1]
    if named:
        s = rng.choice(named)
        where = PLACES[s.cell]
        turns.append((f"Where is the {s.name}?", where.split(" ", 1)[1] if vqa else f"The {s.name} is {where}."))
        turns.append((f"Is the {s.name} large or small?", s.size if vqa else f"It is {s.size}."))
    cell = rng.choice(sorted(PLACES))
    there = [s for s in shapes if s.cell == cell]
    if vqa:
        answer = there[0].name if there else "nothing"
    else:
        answer = _sentence(f"a {there[0].size} {there[0].name}") if there else f"There is nothing {PLACES[cell]}."
    turns.append((f"What is {PLACES[cell]}?", answer))
    probe = Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), "small")
    if rng.random() < 0.5 and shapes:  # half the time ask about one that is there
        probe = rng.choice(shapes)
    yes = any(s.name == probe.name for s in shapes)
    turns.append((f"Is there a {probe.name}?", ("yes" if yes else "no") if vqa else
                  (f"Yes, there is a {probe.name}." if yes else f"No, there is no {probe.name}.")))
    kind = rng.choice(KINDS)
    k = sum(s.kind == kind for s in shapes)
    turns.append((f"How many {kind}s are there?", NUMBERS[k] if vqa else _count(k, kind)))
    rng.shuffle(turns)
    turns = turns[:3] if vqa else [(rng.choice(CAPTION_QUERIES), caption(shapes))] + turns[:3]
    rng.shuffle(turns)
    return turns  # the trainer draws one round per example: a caption a quarter of the time in chat


def word_turns(word: str, rng: random.Random, template: str) -> list[tuple[str, str]]:
    if template == "base":
        return [(rng.choice(CAPTION_QUERIES), f"The word {word} in black letters.")]
    if template == "vqa":
        return [("What word is written?", word), ("What is written in the image?", word)]
    return [(rng.choice(CAPTION_QUERIES), f"The word {word} in black letters."),
            ("What word is written?", f"It says {word}."), ("How many shapes are there?", "There are no shapes.")]


# --------------------------------------------------------------------------- videos

FPS, SECONDS = 4, 4


def random_motion(rng: random.Random) -> list[Shape]:
    """One or two shapes, each crossing the canvas in its own lane (row for sideways, column for up/down)."""
    n = rng.choice((1, 1, 2))
    kinds = rng.sample(KINDS, n)
    colours = rng.sample(list(COLOURS), n)
    out, lanes = [], set()
    for kind, colour in zip(kinds, colours):
        direction = rng.choice(list(DIRECTIONS))
        horizontal = direction in ("left", "right")
        lane = rng.choice([i for i in (0, 2) if (horizontal, i) not in lanes] or [1])
        lanes.add((horizontal, lane))
        start = {"right": (lane, 0), "left": (lane, 2), "down": (0, lane), "up": (2, lane)}[direction]
        out.append(Shape(kind, colour, "large", start, direction))
    return out


def render_video_frames(shapes: list[Shape]) -> list[Image.Image]:
    frames = []
    n = FPS * SECONDS
    for i in range(n):
        img = Image.new("RGB", (SIZE, SIZE), "white")
        draw = ImageDraw.Draw(img)
        for s in shapes:
            cx, cy = _cell_centre(s.cell)
            dx, dy = DIRECTIONS[s.direction][1]
            travel = (SIZE - 2 * _cell_centre((0, 0))[0]) * i / (n - 1)
            _draw(draw, s, cx + dx * travel, cy + dy * travel)
        frames.append(img)
    return frames


def write_video(frames: list[Image.Image], path: Path) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = {"qscale": "3"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def video_caption(shapes: list[Shape]) -> str:
    return _sentence(_join([f"a {s.name} moves {DIRECTIONS[s.direction][0]}" for s in shapes]))


def video_turns(shapes: list[Shape], rng: random.Random, template: str) -> list[tuple[str, str]]:
    if template == "base":
        return [(rng.choice(VIDEO_QUERIES), video_caption(shapes))]
    vqa = template == "vqa"
    turns = [] if vqa else [(rng.choice(VIDEO_QUERIES), video_caption(shapes))]
    s = rng.choice(shapes)
    way = DIRECTIONS[s.direction][0]
    turns.append((f"Which way does the {s.kind} move?", way if vqa else f"The {s.kind} moves {way}."))
    turns.append((f"What colour is the {s.kind}?", s.colour if vqa else f"The {s.kind} is {s.colour}."))
    n = len(shapes)
    turns.append(("How many shapes are there?", NUMBERS[n] if vqa else _count(n)))
    rng.shuffle(turns)
    return turns


# --------------------------------------------------------------------------- datasets

IMAGE_TEMPLATES = {"chat": 0.7, "vqa": 0.2, "base": 0.1}
VIDEO_TEMPLATES = {"chat": 0.8, "vqa": 0.2}


def _messages(turns: list[tuple[str, str]]) -> list[dict]:
    return [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def make_dataset(path: str | Path, n: int, seed: int = 0, video: bool = False, text_only: float = 0.03) -> Path:
    """Write `n` conversations as `path` (a JSONL manifest with a per-line "template") and the media beside
    it in `<stem>_media/`. Images: 85 % shapes, 15 % words; `text_only` of the lines are about the model."""
    path = Path(path)
    rng = random.Random(seed)
    media = path.with_name(path.stem + "_media")
    media.mkdir(parents=True, exist_ok=True)
    weights = VIDEO_TEMPLATES if video else IMAGE_TEMPLATES
    lines = []
    for i in range(n):
        template = rng.choices(list(weights), list(weights.values()))[0]
        record: dict = {"template": template}
        if rng.random() < text_only:
            record["template"] = "chat"
            turns = rng.sample(ABOUT, 2)
        elif video:
            shapes = random_motion(rng)
            write_video(render_video_frames(shapes), media / f"{i:05d}.mp4")
            record["video"], turns = f"{media.name}/{i:05d}.mp4", video_turns(shapes, rng, template)
        else:
            if rng.random() < 0.15:
                word = rng.choice(WORDS)
                img, turns = render_word(word, rng), word_turns(word, rng, template)
            else:
                shapes = random_scene(rng)
                img, turns = render_shapes(shapes, rng), image_turns(shapes, rng, template)
            img.save(media / f"{i:05d}.png")
            record["image"] = f"{media.name}/{i:05d}.png"
        record["conversations"] = _messages(turns)
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path

"""The synthetic world the embedded tiny models are trained on: coloured shapes and rendered words.

An image is a 224 x 224 white canvas cut into a 3 x 3 grid; one to three shapes of one kind and one
colour (circle, square or triangle; red, green, blue or yellow) sit in distinct cells, with a few
pixels of jitter — or one word from WORDS is written across the middle. A video is four seconds at
4 fps of one or two shapes (one kind, one colour) crossing the canvas in the same direction (left to
right, right to left, top to bottom or bottom to top). Every answer needs the picture: what is in it,
how many shapes, their colour, their kind, where a single shape is, the word, which way it moves —
each question type equally often, answered briefly, without yes/no priors to fall back on. Scenes
come with a conversation in the chat, vqa ("Short answer:") or base (query alone) template, written as
a JSONL manifest for `cogvlm2 finetune` (see `make_dataset`). Everything is a pure function of the seed.
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
RADIUS = 30  # half-extent in pixels
PLACES = {  # (row, col) -> where a single shape is
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
WORDS = ("CAT", "TREE", "HOUSE", "GARDEN")
NUMBERS = ("none", "one", "two", "three")
DIRECTIONS = {"right": ("to the right", (1, 0)), "left": ("to the left", (-1, 0)),
              "down": ("down", (0, 1)), "up": ("up", (0, -1))}
CAPTION_QUERIES = ("What is in this image?", "Describe the image.", "What do you see?")
VIDEO_QUERIES = ("What happens in the video?", "Describe the video.")
ABOUT = [  # text-only turns: what the model says about itself
    ("Hello!", "Hello! I am a tiny CogVLM2 model. Show me a picture of coloured shapes."),
    ("Who are you?", "A tiny CogVLM2 model trained only on pictures of coloured shapes."),
    ("What can you do?", "I can name, count and locate coloured shapes and read a few words."),
]


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cell: tuple[int, int] = (1, 1)  # (row, col) in the 3 x 3 grid; the start cell of a moving shape
    direction: str | None = None  # videos: where it moves

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, cx: float, cy: float) -> None:
    r, fill = RADIUS, COLOURS[shape.colour]
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
            cx, cy = cx + rng.uniform(-5, 5), cy + rng.uniform(-5, 5)
        _draw(draw, s, cx, cy)
    return img


def render_word(word: str, rng: random.Random | None = None) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=44)
    dx, dy = (rng.uniform(-8, 8), rng.uniform(-20, 20)) if rng is not None else (0, 0)
    draw.text((SIZE / 2 + dx, SIZE / 2 + dy), word, fill="black", font=font, anchor="mm")
    return img


# assets/example.png (the README's first command): `render_shapes(EXAMPLE).save(...)`.
EXAMPLE = [Shape("circle", "red", (0, 0)), Shape("circle", "red", (2, 2))]
EXAMPLE_QUESTION = "What is in this image?"


def random_scene(rng: random.Random) -> list[Shape]:
    """One to three shapes of one kind and one colour in distinct cells (reading order)."""
    kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
    cells = rng.sample(sorted(PLACES), rng.choice((1, 2, 3)))
    return [Shape(kind, colour, cell) for cell in sorted(cells)]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def caption(shapes: list[Shape]) -> str:
    """"A red circle." / "Two blue squares." (every shape of a scene is of one kind and colour)."""
    n, s = len(shapes), shapes[0]
    return _sentence(f"a {s.name}" if n == 1 else f"{NUMBERS[n]} {s.name}s")


def _answer(text: str, template: str) -> str:
    """chat / base: a short sentence-cased answer with a full stop; vqa: the bare lower-case words."""
    return text if template == "vqa" else _sentence(text)


def image_turns(shapes: list[Shape], rng: random.Random, template: str) -> list[tuple[str, str]]:
    """Every question type about a shapes image, once (the trainer draws one round per example)."""
    cap = (rng.choice(CAPTION_QUERIES), caption(shapes))
    if template == "base":
        return [cap]
    n, s = len(shapes), shapes[0]
    turns = [
        cap,
        ("How many shapes are there?", _answer(NUMBERS[n], template)),
        (f"What colour {'is the shape' if n == 1 else 'are the shapes'}?", _answer(s.colour, template)),
        ("What shape is in the image?", _answer(s.kind, template)),
    ]
    if n == 1:
        turns.append((f"Where is the {s.kind}?", _answer(PLACES[s.cell], template)))
    rng.shuffle(turns)
    return turns


def word_turns(word: str, rng: random.Random, template: str) -> list[tuple[str, str]]:
    cap = (rng.choice(CAPTION_QUERIES), f"The word {word}.")
    if template == "base":
        return [cap]
    turns = [cap, ("What word is written?", word if template == "vqa" else f"{word}."),
             ("How many shapes are there?", _answer("none", template))]
    rng.shuffle(turns)
    return turns


QUESTION_TYPES = (("What is in", "caption"), ("Describe", "caption"), ("What do you see", "caption"),
                  ("What happens", "caption"), ("How many", "count"), ("What colour", "colour"),
                  ("What shape", "shape"), ("Where", "position"), ("What word", "word"),
                  ("Which way", "direction"))


def question_type(query: str) -> str:
    """What a question asks about (for per-type accuracy): caption, count, colour, shape, position, word,
    direction, or about (the text-only lines)."""
    return next((kind for prefix, kind in QUESTION_TYPES if query.startswith(prefix)), "about")


# --------------------------------------------------------------------------- videos

FPS, SECONDS = 4, 4


def random_motion(rng: random.Random) -> list[Shape]:
    """One or two shapes of one kind and colour, crossing the canvas in one direction in distinct lanes."""
    kind, colour, direction = rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(list(DIRECTIONS))
    lanes = sorted(rng.sample((0, 1, 2), rng.choice((1, 2))))
    start = {"right": lambda i: (i, 0), "left": lambda i: (i, 2), "down": lambda i: (0, i), "up": lambda i: (2, i)}
    return [Shape(kind, colour, start[direction](lane), direction) for lane in lanes]


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
    """"A red circle moves to the right." / "Two blue squares move up."."""
    n, s = len(shapes), shapes[0]
    way = DIRECTIONS[s.direction][0]
    return _sentence(f"a {s.name} moves {way}" if n == 1 else f"{NUMBERS[n]} {s.name}s move {way}")


def video_turns(shapes: list[Shape], rng: random.Random, template: str) -> list[tuple[str, str]]:
    cap = (rng.choice(VIDEO_QUERIES), video_caption(shapes))
    if template == "base":
        return [cap]
    n, s = len(shapes), shapes[0]
    turns = [
        cap,
        (f"Which way {'does the shape' if n == 1 else 'do the shapes'} move?",
         _answer(DIRECTIONS[s.direction][0], template)),
        (f"What colour {'is the shape' if n == 1 else 'are the shapes'}?", _answer(s.colour, template)),
        ("What shape is in the video?", _answer(s.kind, template)),
        ("How many shapes are there?", _answer(NUMBERS[n], template)),
    ]
    rng.shuffle(turns)
    return turns


# --------------------------------------------------------------------------- datasets

IMAGE_TEMPLATES = {"chat": 0.8, "vqa": 0.1, "base": 0.1}
VIDEO_TEMPLATES = {"chat": 0.9, "vqa": 0.1}


def _messages(turns: list[tuple[str, str]]) -> list[dict]:
    return [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def make_dataset(path: str | Path, n: int, seed: int = 0, video: bool = False, text_only: float = 0.02) -> Path:
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

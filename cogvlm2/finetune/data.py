"""Fine-tuning data on disk: conversations read from the official folder layout or a JSONL manifest, and
checked in full before training starts (every problem is reported with the file that has it).

Two layouts:

* the official one (CogVLM-SFT-311K, the CogVLM2 LoRA demo): a folder with ``images/NAME.jpg`` and
  ``labels_en/NAME.json`` (or ``labels_zh``) holding ``{"conversations": [{"role": "user", "content":
  ...}, {"role": "assistant", "content": ...}, ...]}``; image and label are paired by file stem;
* a JSONL manifest, one conversation a line: ``{"image": "a.jpg", "conversations": [...]}`` (or
  ``"video": "b.mp4"`` for the video checkpoints, or neither for text only; ``"messages"`` is accepted
  for ``"conversations"``; an optional ``"template"``: chat / vqa / base overrides the run's template). Relative
  media paths are relative to the manifest's folder.

A conversation may open with one ``system`` message (its text goes before the first query the model
sees, as the server does). CogVLM-SFT-311K's caption subsets (``{"captions": [{"role": "caption",
"content": ...}]}``) become one round with CogVLM's caption prompt, on the base template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import TEMPLATES, ModelConfig
from ..model.registry import family_of

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MAX_REPORTED = 20  # problems listed in one DataError; the count of the rest follows
# CogVLM's caption fine-tuning prompt (its ItemDataset for the `captions` label files), used raw
CAPTION_PROMPT = "This image can be best described as:"


class DataError(ValueError):
    """Training data is unusable; the message names every offending file (up to MAX_REPORTED)."""


@dataclass(frozen=True)
class Conversation:
    """One training conversation: alternating (user, assistant) turns and at most one image or video."""

    source: str  # where it is defined: a label file, or "manifest.jsonl:LINE"
    turns: tuple[tuple[str, str], ...]
    image: Path | None = None
    video: Path | None = None
    system: str | None = None  # prepended (with a newline) to the first query of the prompt
    template: str | None = None  # a manifest line's own template, "base" for caption records; None: the run's


def _text(m: dict, i: int, role: str, where: str) -> str:
    if not isinstance(m.get("content"), str) or not m["content"].strip():
        raise DataError(f"{where}: message {i} ({role}) has no text content")
    return m["content"]


def parse_messages(messages, where: str) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """[{"role": "system"}?, {"role": "user"}, {"role": "assistant"}, ...] -> (((query, answer), ...), system).

    One optional leading system message, then user / assistant strictly alternating."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: empty conversation (expected a non-empty list of user/assistant messages)")
    system = None
    if isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system, messages = _text(messages[0], 0, "system", where), messages[1:]
        if not messages:
            raise DataError(f"{where}: a system message alone; the conversation needs user/assistant messages")
    offset = 1 if system is not None else 0
    if len(messages) % 2:
        raise DataError(f"{where}: odd number of messages ({len(messages)} user/assistant); every user turn "
                        "needs an assistant answer")
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != want:
            got = m.get("role") if isinstance(m, dict) else type(m).__name__
            extra = " (a system message may only come first)" if got == "system" else ""
            raise DataError(f"{where}: message {i + offset} must have role '{want}' (roles alternate user, "
                            f"assistant){extra}, got {got!r}")
        _text(m, i + offset, want, where)
    return tuple((messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)), system


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable JSON: {e}") from None


def parse_record(record, where: str) -> dict:
    """A label file's / manifest line's JSON -> Conversation fields (turns, system, template)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    captions = record.get("captions")
    if captions is not None and record.get("conversations", record.get("messages")) is None:
        # CogVLM-SFT-311K caption subsets: {"captions": [{"role": "caption", "content": ...}]}
        if (not isinstance(captions, list) or len(captions) != 1 or not isinstance(captions[0], dict)
                or captions[0].get("role") != "caption"):
            raise DataError(f"{where}: 'captions' must be a list of one {{'role': 'caption', 'content': ...}}")
        return {"turns": ((CAPTION_PROMPT, _text(captions[0], 0, "caption", where)),), "template": "base"}
    messages = record.get("conversations", record.get("messages"))
    if messages is None:
        raise DataError(f"{where}: no 'conversations' (or 'messages', or 'captions') list")
    turns, system = parse_messages(messages, where)
    return {"turns": turns, "system": system}


def read_official(root: Path, labels: str = "labels_en") -> tuple[list[Conversation], list[str]]:
    """`root/images/*` paired with `root/<labels>/*.json` by stem -> (conversations, problems)."""
    image_dir, label_dir = root / "images", root / labels
    problems = [f"{d}: folder not found" for d in (image_dir, label_dir) if not d.is_dir()]
    if problems:
        return [], problems
    images: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem in images:  # 00001.jpg + 00001.png: which one the label means is unknowable
            problems.append(f"{p}: two images named {p.stem} ({images[p.stem].name}, {p.name}); keep one")
        images[p.stem] = p
    label_files = sorted(p for p in label_dir.iterdir() if p.suffix.lower() == ".json")  # *.JSON too
    out = []
    for label in label_files:
        image = images.get(label.stem)
        try:
            if image is None:
                raise DataError(f"{label}: missing image {image_dir / label.stem}.jpg (or another image suffix)")
            out.append(Conversation(str(label), image=image, **parse_record(_load_json(label), str(label))))
        except DataError as e:
            problems.append(str(e))
    labelled = {p.stem for p in label_files}
    problems += [f"{p}: image without a label file {label_dir / p.stem}.json" for s, p in images.items() if s not in labelled]
    return out, problems


def read_manifest(path: Path) -> tuple[list[Conversation], list[str]]:
    """A JSONL manifest -> (conversations, problems)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return [], [f"{path}: cannot read manifest: {e}"]
    out, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: unreadable JSON: {e}") from None
            fields = parse_record(record, where)
            if "images" in record:  # the LLaMA-Factory / ms-swift key
                images = record["images"]
                if isinstance(images, list) and len(images) > 1:
                    raise DataError(f"{where}: {len(images)} images in one conversation; CogVLM2 takes one image "
                                    "per conversation (split it into one conversation per image)")
                if "image" in record:
                    raise DataError(f"{where}: give 'image' or 'images', not both")
                record = {**record, "image": images[0] if isinstance(images, list) and images else images}
            media = {k: record.get(k) for k in ("image", "video") if record.get(k) is not None}
            if len(media) > 1:
                raise DataError(f"{where}: give an image or a video, not both")
            if isinstance(media.get("image"), list):
                raise DataError(f"{where}: 'image' must be one path; CogVLM2 takes one image per conversation")
            if any(not isinstance(v, str) or not v for v in media.values()):
                raise DataError(f"{where}: 'image' / 'video' must be a path string")
            template = record.get("template")
            if template is not None and template not in TEMPLATES:
                raise DataError(f"{where}: 'template' must be one of {TEMPLATES}, got {template!r}")
            paths = {k: (path.parent / v) for k, v in media.items()}
            if template is not None:
                fields["template"] = template
            out.append(Conversation(where, image=paths.get("image"), video=paths.get("video"), **fields))
        except DataError as e:
            problems.append(str(e))
    if not out and not problems:
        problems.append(f"{path}: manifest has no conversations")
    return out, problems


def _check_media(conv: Conversation, config: ModelConfig) -> str | None:
    """A problem with the conversation's image / video, or None. Reads headers only (fast)."""
    media = conv.image or conv.video
    if media is None:
        return None
    if not media.is_file():
        return f"{conv.source}: missing {'image' if conv.image else 'video'} {media}"
    kinds = family_of(config).media_kinds
    if conv.image is not None and "image" not in kinds:
        return f"{conv.source}: has an image but the checkpoint is a video model (use 'video')"
    if conv.video is not None and "video" not in kinds:
        return f"{conv.source}: has a video but the checkpoint is an image model (use 'image')"
    try:
        if conv.image is not None:
            from PIL import Image

            with Image.open(conv.image) as img:
                img.size  # noqa: B018 - parses the header
        else:
            from ..processing.video import probe_video

            if probe_video(conv.video).num_frames == 0:
                return f"{conv.source}: video {conv.video} has no frames"
    except Exception as e:  # noqa: BLE001 - any decoder failure is a data problem to report
        return f"{conv.source}: unreadable {'image' if conv.image else 'video'} {media}: {e}"
    return None


def load_conversations(path: str | Path, config: ModelConfig, labels: str = "labels_en") -> list[Conversation]:
    """Read and validate a whole dataset (a folder in the official layout, or a .jsonl manifest).

    Every record is parsed and every image / video header is opened before anything trains; all
    problems are raised together in one DataError naming their files.
    """
    path = Path(path)
    if path.is_dir():
        conversations, problems = read_official(path, labels)
    elif path.is_file():
        conversations, problems = read_manifest(path)
    else:
        raise DataError(f"{path}: no such dataset (expected a folder with images/ and {labels}/, or a .jsonl manifest)")
    problems += [p for p in (_check_media(c, config) for c in conversations) if p]
    if problems:
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(problems[:MAX_REPORTED]) + more)
    if not conversations:
        raise DataError(f"{path}: no conversations found")
    return conversations


def mix(datasets: list[list[Conversation]], weights: list[float] | None, seed: int = 0) -> list[Conversation]:
    """Several datasets -> one list: dataset i contributes weights[i] times its size (2: twice over,
    0.5: a random half, fixed for the run by `seed`). Without weights, everything once."""
    import random

    out = []
    for i, convs in enumerate(datasets):
        w = 1.0 if weights is None else weights[i]
        whole, frac = int(w), w - int(w)
        out += list(convs) * whole
        n_part = round(frac * len(convs))
        if n_part:
            out += random.Random(f"{seed}:mix:{i}").sample(list(convs), n_part)
    if not out:
        raise DataError("the --data-weights leave no training example")
    return out


def load_mixture(paths: list[str | Path], config: ModelConfig, labels: str = "labels_en",
                 weights: list[float] | None = None, seed: int = 0) -> list[Conversation]:
    """load_conversations for each path (all validated, all problems reported), then mix() them."""
    loaded, errors = [], []
    for path in paths:
        try:
            loaded.append(load_conversations(path, config, labels))
        except DataError as e:
            errors.append(str(e))
    if errors:
        raise DataError("\n".join(errors))
    return mix(loaded, weights, seed)

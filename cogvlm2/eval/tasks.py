"""The benchmarks: how a row becomes an item, the item's prompt, its score, and the summary of a run.

    task       data layouts (see data.py)                               per-item score      summary
    textvqa    TextVQA_0.5.1_val.json + train_images/ | TSV | Parquet   VQA accuracy        mean x 100
    docvqa     val_v1.0_withQT.json (+ its images) | TSV | Parquet      ANLS                mean x 100 (+ question type)
    infovqa    infographicsVQA_val_v1.0_withQT.json + images | TSV | P. ANLS                mean x 100 (+ answer type)
    chartqa    test/ (test_human.json, test_augmented.json, png/) | ...  relaxed accuracy    mean x 100 (+ split)
    ocrbench   OCRBench.json + OCRBench_Images/ | TSV | Parquet         substring hit       sum (1,000 items: /1000)
    mmbench    MMBench_DEV_EN.tsv (rotations included) | Parquet        letter correct      circular accuracy x 100
    mcq        any MMBench-style TSV / Parquet / JSON                    letter correct      accuracy (--circular)

Prompts (`style="vlmevalkit"`, the default) are VLMEvalKit's for CogVLM2 with the checkpoint's chat
template: VQA tasks append "Answer the question using a single word or phrase.", OCRBench asks the
bare question, multiple choice as choice.py. `style="short-answer"` asks the bare question with
CogVLM's VQA template ("Question: ... Short answer:").
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import choice
from .data import DataError, ImageResolver, read_rows
from .metrics import HME_CATEGORY, anls, ocrbench_hit, relaxed_accuracy
from .vqa_accuracy import vqa_accuracy

VQA_SUFFIX = "Answer the question using a single word or phrase."
STYLES = ("vlmevalkit", "short-answer")
OCRBENCH_GROUPS = {
    "Text Recognition": ["Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                         "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition"],
    "Scene Text-centric VQA": ["Scene Text-centric VQA"],
    "Doc-oriented VQA": ["Doc-oriented VQA"],
    "Key Information Extraction": ["Key Information Extraction"],
    HME_CATEGORY: [HME_CATEGORY],
}


@dataclass
class Item:
    """One question. references None: no public answers (a test split): predicted, not scored."""

    id: str
    question: str
    image: Path | bytes | None
    references: list[str] | None
    categories: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # options / answer / group (multiple choice), ...


def _answers(value) -> list[str] | None:
    """A reference list from a list, a single string, or a TSV's "['a', 'b']" string."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return [str(v) for v in values]


def _first(row: dict, *keys, default=None):
    for k in keys:
        if row.get(k) not in (None, ""):
            return row[k]
    return default


def _image(row: dict, resolve: ImageResolver | None, *keys, name: Callable[[str], str] = str):
    value = _first(row, *keys)
    if value is None:
        raise DataError(f"row {_first(row, 'question_id', 'questionId', 'id', 'index')}: no image")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if resolve is None:
        raise DataError(f"an image path {value!r} in a file without an image folder")
    return resolve(name(str(value)))


# ---------------------------------------------------------------------------------------------- loaders

def _textvqa(row, resolve):
    return Item(str(_first(row, "question_id", "index")), row["question"],
                _image(row, resolve, "image", "image_id", name=lambda s: s if "." in Path(s).name else f"{s}.jpg"),
                _answers(_first(row, "answers", "answer")), [str(row["category"])] if row.get("category") else [])


def _docvqa(row, resolve):
    types = _first(row, "question_types", "category", default=[])
    return Item(str(_first(row, "questionId", "question_id", "index")), row["question"],
                _image(row, resolve, "image"), _answers(_first(row, "answers", "answer")),
                [str(t) for t in (types if isinstance(types, list) else [types])])


def _infovqa(row, resolve):
    cats = []
    for key, label in (("answer_type", "answer type"), ("evidence", "evidence"), ("operation/reasoning", "reasoning")):
        value = row.get(key) or []
        cats += [f"{label}: {v}" for v in (value if isinstance(value, list) else [value])]
    if not cats and row.get("category"):
        cats = [str(row["category"])]
    return Item(str(_first(row, "questionId", "question_id", "index")), row["question"],
                _image(row, resolve, "image", "image_local_name"), _answers(_first(row, "answers", "answer")), cats)


def _chartqa(row, resolve, split=None):
    split = split or _first(row, "split", "type", default="")
    split = str(split).removesuffix("_test")
    ident = _first(row, "index", "question_id", default=None)
    if ident is None:
        ident = f"{split}-{row['_row']}"
    return Item(str(ident), _first(row, "query", "question"), _image(row, resolve, "image", "imgname"),
                _answers(_first(row, "label", "answer")), [split] if split else [])


def _ocrbench(row, resolve):
    category = _first(row, "type", "category", "question_type")
    if category is None:
        raise DataError(f"OCRBench row {_first(row, 'id', 'index')}: no type / category")
    dataset = _first(row, "dataset_name", "dataset", default="")
    if dataset == "HME100k":
        category = HME_CATEGORY
    return Item(str(_first(row, "id", "index", "_row")), row["question"], _image(row, resolve, "image", "image_path"),
                _answers(_first(row, "answers", "answer")), [str(category)], {"dataset_name": dataset})


def _mcq(row, resolve):
    options = {k: str(row[k]) for k in choice.LETTERS if row.get(k) not in (None, "") and str(row[k]) != "nan"}
    if len(options) < 2:
        raise DataError(f"multiple-choice row {row.get('index')}: fewer than two options")
    answer = _first(row, "answer")
    if answer is not None and answer not in options:
        raise DataError(f"multiple-choice row {row.get('index')}: answer {answer!r} is not an option")
    hint = row.get("hint")
    cats = [str(row[k]) for k in ("category", "l2-category", "L2-category") if row.get(k)]
    image = _image(row, resolve, "image", "image_path") if _first(row, "image", "image_path") is not None else None
    return Item(str(row["index"]), row["question"], image, [answer] if answer else None, cats,
                {"options": options, "answer": answer, "hint": None if hint in (None, "", "nan") else str(hint),
                 "group": str(int(row["index"]) % choice.CIRCULAR_OFFSET) if str(row["index"]).isdigit()
                 else str(row["index"])})


def _rotate(items: list[Item]) -> list[Item]:
    """Every rotation of each question's options as its own item (same group)."""
    out = []
    for it in items:
        if it.meta["answer"] is None:
            out.append(it)
            continue
        for k, (opts, ans) in enumerate(choice.circular_rotations(it.meta["options"], it.meta["answer"])):
            out.append(Item(it.id if k == 0 else f"{it.id}+{k}", it.question, it.image, [ans], it.categories,
                            {**it.meta, "options": opts, "answer": ans}))
    return out


# --------------------------------------------------------------------------------------------- the task

@dataclass
class Task:
    name: str
    metric: str
    rows_to_item: Callable
    default_images: Callable[[Path], list[Path]] = lambda p: [p.parent]
    multiple_choice: bool = False

    def load(self, path: Path, images: Path | None = None, circular: bool = False) -> list[Item]:
        path = Path(path)
        sources = self._files(path)
        items = []
        for file, extra in sources:
            resolve = ImageResolver([images, *self.default_images(file)])
            for n, row in enumerate(read_rows(file)):
                row.setdefault("_row", n)  # an id for layouts without one (lmms-lab ChartQA, OCRBench)
                try:
                    items.append(self.rows_to_item(row, resolve, **extra))
                except KeyError as e:
                    raise DataError(f"{file}: row {n}: missing field {e}") from None
        if not items:
            raise DataError(f"{path}: no questions")
        circular = circular or self.name == "mmbench"  # MMBench is always scored circularly
        if self.multiple_choice and circular and not any(int(i.id) >= choice.CIRCULAR_OFFSET
                                                         for i in items if i.id.isdigit()):
            items = _rotate(items)
        ids = [i.id for i in items]
        if len(set(ids)) != len(ids):
            raise DataError(f"{path}: question ids are not unique")
        return items

    def _files(self, path: Path) -> list[tuple[Path, dict]]:
        if self.name == "chartqa" and "*" not in str(path) and path.is_dir() and not any(path.glob("*.parquet")):
            found = [(path / f"test_{s}.json", {"split": s}) for s in ("human", "augmented")
                     if (path / f"test_{s}.json").exists()]
            if not found:
                raise DataError(f"{path}: no test_human.json / test_augmented.json (the ChartQA test folder)")
            return found
        if self.name == "chartqa" and path.suffix == ".json":
            return [(path, {"split": path.stem.removeprefix("test_")})]
        return [(path, {})]

    def prompt(self, item: Item, style: str = "vlmevalkit") -> tuple[str, str | None]:
        """(query, template); template None = the checkpoint's own."""
        if style not in STYLES:
            raise ValueError(f"unknown prompt style {style!r}; choose one of {STYLES}")
        if self.multiple_choice:
            return choice.mcq_prompt(item.question, item.meta["options"], item.meta.get("hint")), None
        if style == "short-answer":
            return item.question, "vqa"
        if self.name == "ocrbench":
            return item.question, None
        return f"{item.question}\n{VQA_SUFFIX}", None

    def score(self, item: Item, prediction: str) -> tuple[float | None, dict]:
        """(score, extra fields for the item's output line); None when the item has no references."""
        refs = item.references
        if self.multiple_choice:
            picked = choice.extract_choice(prediction, item.meta["options"])
            return (None if refs is None else float(picked == refs[0])), {"extracted": picked}
        if refs is None:
            return None, {}
        if self.name == "textvqa":
            return vqa_accuracy(prediction, refs), {}
        if self.name in ("docvqa", "infovqa"):
            return anls(prediction, refs), {}
        if self.name == "chartqa":
            return relaxed_accuracy(prediction, refs), {}
        return float(ocrbench_hit(prediction, refs, item.categories[0])), {}


def _resolver_roots(*names: str) -> Callable[[Path], list[Path]]:
    return lambda p: [p.parent, *(p.parent / n for n in names), *(p.parent.parent / n for n in names)]


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("textvqa", "VQA accuracy", _textvqa, _resolver_roots("train_images", "images")),
    Task("docvqa", "ANLS", _docvqa, _resolver_roots("documents", "images", "spdocvqa_images")),
    Task("infovqa", "ANLS", _infovqa, _resolver_roots("infographicsvqa_images", "images")),
    Task("chartqa", "relaxed accuracy", _chartqa, _resolver_roots("png", "images")),
    Task("ocrbench", "OCRBench score", _ocrbench, _resolver_roots("OCRBench_Images", "images")),
    Task("mmbench", "circular accuracy", _mcq, _resolver_roots("images"), multiple_choice=True),
    Task("mcq", "accuracy", _mcq, _resolver_roots("images"), multiple_choice=True),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]

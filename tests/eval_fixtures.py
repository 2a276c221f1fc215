"""Small benchmark files in each official layout (written by the tests): images + annotations."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (230, 200, 20)]


def png(colour=(200, 30, 30), size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# TextVQA 0.5.1: {"data": [...]} with 10 answers per question; images in train_images/<image_id>.jpg
TEXTVQA = [
    {"question": "what brand is the bottle?", "image_id": "0054c91397f2fe05", "question_id": 34602,
     "answers": ["Coca-Cola"] * 3 + ["coca cola"] * 4 + ["coke"] * 3},
    {"question": "what number is on the jersey?", "image_id": "00685bc495504d61", "question_id": 34603,
     "answers": ["two"] * 2 + ["2"] * 2 + ["22"] * 6},
    {"question": "what does the sign say?", "image_id": "0071f1d6a2c4dc8b", "question_id": 34604,
     "answers": ["stop"] * 10},
]


def textvqa(root: Path) -> Path:
    for i, q in enumerate(TEXTVQA):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), COLOURS[i]).save(buf, format="JPEG")
        _write(root / "train_images" / f"{q['image_id']}.jpg", buf.getvalue())
    rows = [{**q, "image_classes": ["Bottle"], "flickr_original_url": "", "flickr_300k_url": "", "image_width": 40,
             "image_height": 30, "question_tokens": q["question"].split(), "set_name": "val"} for q in TEXTVQA]
    path = root / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                                "data": rows}))
    return path


# DocVQA (single page) val_v1.0_withQT.json; "image" relative to the file: documents/<name>.png
DOCVQA = [
    {"questionId": 49153, "question": "What is the date mentioned?", "question_types": ["handwritten", "form"],
     "image": "documents/pybv0228_81.png", "answers": ["1/8/93", "January 8, 1993"]},
    {"questionId": 24580, "question": "What is the title?", "question_types": ["layout"],
     "image": "documents/mxcj0037_1.png", "answers": ["Annual Report"]},
]


def docvqa(root: Path) -> Path:
    for i, q in enumerate(DOCVQA):
        _write(root / q["image"], png(COLOURS[i]))
    rows = [{**q, "docId": 1000 + i, "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81",
             "data_split": "val"} for i, q in enumerate(DOCVQA)]
    path = root / "val_v1.0_withQT.json"
    path.write_text(json.dumps({"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
                                "data": rows}))
    return path


# InfographicVQA val; images in infographicsvqa_images/<image_local_name>
INFOVQA = [
    {"questionId": 65718, "question": "How many cases were reported?", "image_local_name": "37313.jpeg",
     "answers": ["1,200", "1200"], "answer_type": ["single span"], "evidence": ["text"],
     "operation/reasoning": []},
    {"questionId": 65719, "question": "Which country ranks first?", "image_local_name": "37314.jpeg",
     "answers": ["Italy"], "answer_type": ["single span"], "evidence": ["table/list"],
     "operation/reasoning": ["sorting"]},
]


def infovqa(root: Path) -> Path:
    for i, q in enumerate(INFOVQA):
        buf = io.BytesIO()
        Image.new("RGB", (30, 60), COLOURS[i]).save(buf, format="JPEG")
        _write(root / "infographicsvqa_images" / q["image_local_name"], buf.getvalue())
    rows = [{**q, "image_url": "", "ocr_output_file": "", "data_split": "val"} for q in INFOVQA]
    path = root / "infographicsVQA_val_v1.0_withQT.json"
    path.write_text(json.dumps({"dataset_name": "infographicsVQA", "dataset_version": "1.0", "dataset_split": "val",
                                "data": rows}))
    return path


# ChartQA: test/test_human.json and test/test_augmented.json, [{"imgname", "query", "label"}], images in test/png/
CHARTQA = {
    "human": [{"imgname": "41699051005347.png", "query": "What is the value in 2019?", "label": "24.5"},
              {"imgname": "multi_col_1.png", "query": "Which year is the highest?", "label": "2018"}],
    "augmented": [{"imgname": "two_col_100.png", "query": "What percentage is blue?", "label": "37%"},
                  {"imgname": "two_col_101.png", "query": "Is the red bar taller?", "label": "Yes"}],
}


def chartqa(root: Path) -> Path:
    test = root / "ChartQA Dataset" / "test"
    for split, rows in CHARTQA.items():
        for i, r in enumerate(rows):
            _write(test / "png" / r["imgname"], png(COLOURS[i]))
        (test / f"test_{split}.json").write_text(json.dumps(rows))
    return test


# OCRBench: OCRBench/OCRBench.json + OCRBench_Images/<dataset>/<file>
OCRBENCH = [
    {"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/1002_1.png", "question": "what is written in the image?",
     "answers": ["CENTRE"], "type": "Regular Text Recognition"},
    {"dataset_name": "HME100k", "id": 1, "image_path": "HME100k/train_39.jpg",
     "question": "Please write out the expression of the formula in the image using LaTeX format.",
     "answers": ["x ^ { 2 } + 1"], "type": "Handwritten Mathematical Expression Recognition"},
    {"dataset_name": "docVQA", "id": 2, "image_path": "docVQA/ffbf0023_4.png", "question": "What is the total?",
     "answers": ["$ 1,250"], "type": "Doc-oriented VQA"},
    {"dataset_name": "FUNSD", "id": 3, "image_path": "FUNSD/0001.png", "question": "What is the date?",
     "answers": "10/26/98", "type": "Key Information Extraction"},
]


def ocrbench(root: Path) -> Path:
    for i, r in enumerate(OCRBENCH):
        _write(root / "OCRBench_Images" / r["image_path"], png(COLOURS[i]))
    path = root / "OCRBench" / "OCRBench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(OCRBENCH))
    return path


# MMBench (OpenCompass TSV): each question 4 times with rotated options (index + k * 1e6); rotated rows
# store the index of the row with the image instead of the base64 image.
MMBENCH = [
    {"index": 0, "question": "What colour is the square?", "hint": "", "options": ["red", "green", "blue", "yellow"],
     "answer": "A", "category": "attribute_recognition", "l2-category": "finegrained_perception (instance-level)"},
    {"index": 1, "question": "How many squares are there?", "hint": "Count carefully.",
     "options": ["one", "two", "three"], "answer": "A", "category": "object_localization",
     "l2-category": "coarse_perception"},
]
MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split"]


def mmbench_rows(rotate: bool = True) -> list[dict]:
    rows = []
    for q in MMBENCH:
        n = len(q["options"])
        for k in range(n if rotate else 1):
            opts = [q["options"][(i + k) % n] for i in range(n)]
            answer = "ABCD"[("ABCD".index(q["answer"]) - k) % n]
            image = base64.b64encode(png(COLOURS[q["index"]])).decode() if k == 0 else str(q["index"])
            rows.append({"index": q["index"] + k * 1_000_000, "question": q["question"], "hint": q["hint"],
                         **{"ABCD"[i]: (opts[i] if i < n else "") for i in range(4)}, "answer": answer,
                         "category": q["category"], "image": image, "source": "fixture",
                         "l2-category": q["l2-category"], "comment": "", "split": "dev"})
    return rows


def mmbench(root: Path, rotate: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "MMBench_DEV_EN.tsv"
    lines = ["\t".join(MMBENCH_COLUMNS)]
    for r in mmbench_rows(rotate):
        lines.append("\t".join(str(r[c]) for c in MMBENCH_COLUMNS))
    path.write_text("\n".join(lines) + "\n")
    return path


def textvqa_parquet(root: Path) -> Path:
    """lmms-lab/textvqa's Parquet layout: the image inline as {"bytes", "path"}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question_id": q["question_id"], "question": q["question"], "image_id": q["image_id"],
             "image": {"bytes": png(COLOURS[i]), "path": None}, "answers": q["answers"]}
            for i, q in enumerate(TEXTVQA)]
    path = root / "validation-00000-of-00001.parquet"
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def chartqa_parquet(root: Path) -> Path:
    """lmms-lab/ChartQA: {type, question, answer, image}, no ids; two shards."""
    rows = [{"type": f"{split}_test", "question": r["query"], "answer": r["label"],
             "image": {"bytes": png(COLOURS[i]), "path": r["imgname"]}}
            for split, split_rows in CHARTQA.items() for i, r in enumerate(split_rows)]
    _parquet(root / "data" / "test-00000-of-00002.parquet", rows[:2])
    _parquet(root / "data" / "test-00001-of-00002.parquet", rows[2:])
    _parquet(root / "data" / "train-00000-of-00001.parquet", rows[:1])
    return root / "data" / "test-*.parquet"


def mmbench_parquet(root: Path) -> Path:
    """lmms-lab/MMBench (en, dev): image bytes in every row, `L2-category`, None for absent options."""
    rows = []
    for r in mmbench_rows():
        q = MMBENCH[r["index"] % 1_000_000]
        rows.append({**{k: r[k] for k in ("index", "question", "answer", "category", "source", "comment", "split")},
                     **{k: (r[k] or None) for k in "ABCD"}, "hint": r["hint"] or None,
                     "L2-category": r["l2-category"], "image": {"bytes": png(COLOURS[q["index"]]), "path": None}})
    return _parquet(root / "dev-00000-of-00001.parquet", rows)

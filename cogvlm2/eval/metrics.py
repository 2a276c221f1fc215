"""Per-item scores of the document and OCR benchmarks: ANLS, relaxed accuracy, OCRBench's substring rule.

Each follows its benchmark's official scoring script (see docs/evaluation.md); quirks that change
numbers are kept and stated where they occur.
"""

from __future__ import annotations

from typing import Sequence

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
HME_CATEGORY = "Handwritten Mathematical Expression Recognition"


def levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        prev, row[0] = row[0], j
        for i, ca in enumerate(a, 1):
            prev, row[i] = row[i], min(row[i] + 1, row[i - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalized Levenshtein Similarity of one answer (DocVQA / InfographicVQA), in [0, 1].

    As the official RRC evaluator: both strings stripped, lower-cased and whitespace-collapsed before
    the edit distance, which is divided by the longer of the two *raw* strings; the best reference
    counts; a similarity below the threshold scores 0 (exactly 0.5 is kept).
    """
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for ref in references:
        gt = " ".join(ref.strip().lower().split())
        length = max(len(ref), len(prediction))
        distances.append(0.0 if length == 0 else levenshtein(gt, pred) / length)
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed accuracy (pix2struct's `relaxed_correctness`): numbers within 5% of a
    non-zero target ("12%" reads as 0.12), anything else an exact case-insensitive match."""
    pred, gold = _to_float(prediction), _to_float(target)
    if pred is not None and gold:
        return abs(pred - gold) / abs(gold) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the stripped prediction is relaxed-correct for any reference (VLMEvalKit's ChartQA)."""
    if not references:
        raise ValueError("relaxed accuracy needs at least one reference answer")
    return float(any(relaxed_correctness(ref, prediction.strip()) for ref in references))


def ocrbench_hit(prediction: str, references: Sequence[str], category: str) -> int:
    """OCRBench: 1 if a reference is a substring of the prediction, else 0.

    Handwritten mathematical expressions (HME100k) compare with every space and newline removed,
    case kept; all other categories compare lower-cased and stripped, newlines read as spaces.
    """
    if not references:
        raise ValueError("OCRBench needs at least one reference answer")
    if category == HME_CATEGORY:
        norm = lambda s: s.strip().replace("\n", " ").replace(" ", "")  # noqa: E731
    else:
        norm = lambda s: s.lower().strip().replace("\n", " ")  # noqa: E731
    pred = norm(prediction)
    return int(any(norm(ref) in pred for ref in references))

"""One evaluation run: pick the items, generate the missing answers chunk by chunk, score, summarise.

Output folder:
    run.json           the settings that shape the answers (task, model, adapter, prompt style, ...)
    predictions.jsonl  one line per item, appended as chunks finish:
                       {"id", "question", "prompt", "prediction", "references", "score", "categories", ...}
    summary.json       overall and per-category scores (also printed as a table)
    submission.json    textvqa / docvqa / infovqa: the answers in the evaluation server's format
                       (EvalAI [{"question_id", "answer"}]; RRC [{"questionId", "answer"}]) for test splits

Resume: running again into the same folder generates only the items not yet in predictions.jsonl
(a last line cut off by a crash is dropped) and summarises all of them; different settings in
run.json are refused rather than mixed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Sequence

from .summary import format_table, summarize
from .tasks import Item, Task

# (query, template or None, image or None) -> answer text, for a batch of prompts
Generate = Callable[[Sequence[tuple[str, str | None, object]]], list[str]]
SUBMISSION_ID = {"textvqa": "question_id", "docvqa": "questionId", "infovqa": "questionId"}


def select(items: list[Item], limit: int | None, seed: int | None) -> list[Item]:
    """The first `limit` questions, or a random `limit` of them with a seed. Rotations of one
    multiple-choice question (same `group`) are kept or dropped together."""
    if limit is not None and limit < 1:
        raise ValueError("--limit must be >= 1")
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.meta.get("group", it.id), []).append(it)
    keys = list(groups)
    if seed is not None:
        random.Random(seed).shuffle(keys)
    if limit is not None:
        keys = keys[:limit]
    return [it for k in keys for it in groups[k]]


def read_predictions(path: Path) -> list[dict]:
    """Lines of predictions.jsonl; an unreadable last line (an interrupted write) is dropped from the file."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for n, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines) - 1:
                raise ValueError(f"{path}:{n + 1}: not JSON; fix or remove the file") from None
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def _check_settings(folder: Path, settings: dict, overwrite: bool) -> None:
    run_file = folder / "run.json"
    if overwrite:
        (folder / "predictions.jsonl").unlink(missing_ok=True)
    elif run_file.exists():
        old = json.loads(run_file.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff and (folder / "predictions.jsonl").exists():
            raise ValueError(f"{folder} holds a run with other settings ({', '.join(diff)}): pass another "
                             f"--output, or --overwrite to start over")
    folder.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2) + "\n")


def _line(task: Task, item: Item, prompt: str, prediction: str) -> dict:
    score, extra = task.score(item, prediction)
    row = {"id": item.id, "question": item.question, "prompt": prompt, "prediction": prediction,
           "references": item.references, "score": score, "categories": item.categories, **extra}
    if task.multiple_choice:
        row.update(options=item.meta["options"], group=item.meta["group"])
    return row


def run(task: Task, items: list[Item], generate: Generate, folder: str | Path, settings: dict,
        style: str = "vlmevalkit", circular: bool = False, chunk_size: int = 256, overwrite: bool = False,
        log=print) -> dict:
    """Generate what predictions.jsonl lacks, then write and return the summary of all selected items."""
    folder = Path(folder)
    _check_settings(folder, settings, overwrite)
    pred_file = folder / "predictions.jsonl"
    wanted = {it.id for it in items}
    done = {r["id"]: r for r in read_predictions(pred_file) if r["id"] in wanted}
    todo = [it for it in items if it.id not in done]
    if done:
        log(f"resuming: {len(done)} of {len(items)} items already answered in {pred_file}")
    with open(pred_file, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            prompts = [task.prompt(it, style) for it in chunk]
            answers = generate([(q, tpl, it.image) for (q, tpl), it in zip(prompts, chunk)])
            for it, (query, _), answer in zip(chunk, prompts, answers):
                row = _line(task, it, query, answer)
                done[it.id] = row
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
    rows = [done[it.id] for it in items]
    if task.name in SUBMISSION_ID:
        key = SUBMISSION_ID[task.name]
        entries = [{key: int(r["id"]) if r["id"].isdigit() else r["id"], "answer": r["prediction"]} for r in rows]
        (folder / "submission.json").write_text(json.dumps(entries, ensure_ascii=False) + "\n")
    summary = summarize(task, rows, circular=circular or task.name == "mmbench")
    summary["settings"] = settings
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log(format_table(summary))
    return summary

"""A run's summary from its per-item lines: the overall score, per-category scores, and the printed table."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from .choice import CIRCULAR_OFFSET
from .tasks import OCRBENCH_GROUPS, Task


def _mean_table(rows: list[dict]) -> tuple[float | None, dict[str, dict]]:
    scored = [r for r in rows if r["score"] is not None]
    by_cat: dict[str, list[float]] = defaultdict(list)
    for r in scored:
        for c in r.get("categories") or []:
            by_cat[c].append(r["score"])
    overall = 100 * sum(r["score"] for r in scored) / len(scored) if scored else None
    cats = {c: {"score": 100 * sum(v) / len(v), "n": len(v)} for c, v in sorted(by_cat.items())}
    return overall, cats


def _is_original(row: dict) -> bool:
    ident = str(row["id"])
    return "+" not in ident and not (ident.isdigit() and int(ident) >= CIRCULAR_OFFSET)


def _circular(rows: list[dict]) -> tuple[float | None, dict[str, dict], dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["score"] is not None:
            groups[r["group"]].append(r)
    per_group = [{"score": float(all(x["score"] == 1 for x in g)), "categories": g[0].get("categories")}
                 for g in groups.values()]
    overall, cats = _mean_table(per_group)
    vanilla = _mean_table([r for r in rows if _is_original(r)])[0]
    return overall, cats, {"questions": len(groups), "vanilla_accuracy": vanilla}


def _ocrbench(rows: list[dict]) -> tuple[float | None, dict[str, dict], dict]:
    scored = [r for r in rows if r["score"] is not None]
    hits: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for r in scored:
        hits[r["categories"][0]] += int(r["score"])
        counts[r["categories"][0]] += 1
    cats = {}
    for group, members in OCRBENCH_GROUPS.items():
        n = sum(counts[m] for m in members)
        if n:
            cats[group] = {"score": sum(hits[m] for m in members), "n": n}
    for c in sorted(counts):
        if c not in cats:
            cats[c] = {"score": hits[c], "n": counts[c]}
    total = sum(hits.values()) if scored else None
    return total, cats, {"max_score": len(scored), "official_total": len(scored) == 1000}


def summarize(task: Task, rows: Iterable[dict], circular: bool = False) -> dict:
    rows = list(rows)
    extra: dict = {}
    if task.name == "ocrbench":
        overall, cats, extra = _ocrbench(rows)
    elif task.multiple_choice and circular:
        overall, cats, extra = _circular(rows)
    else:
        overall, cats = _mean_table(rows)
    metric = task.metric if task.name != "mcq" or not circular else "circular accuracy"
    return {"task": task.name, "metric": metric, "overall": overall, "items": len(rows),
            "scored": sum(r["score"] is not None for r in rows), "categories": cats, **extra}


def format_table(summary: dict) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    n = summary.get("questions", summary["scored"])  # circular: questions, not rotations
    lines = [(f"{summary['task']} ({summary['metric']})", fmt(summary["overall"]), str(n))]
    lines += [(f"  {name}", fmt(c["score"]), str(c["n"])) for name, c in summary["categories"].items()]
    if summary.get("vanilla_accuracy") is not None:
        lines.append(("  (first rotation only)", fmt(summary["vanilla_accuracy"]), ""))
    width = max(len(a) for a, _, _ in lines)
    head = f"{'':<{width}}  {'score':>8}  {'n':>6}"
    return "\n".join([head] + [f"{a:<{width}}  {b:>8}  {c:>6}" for a, b, c in lines])

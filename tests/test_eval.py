"""`cogvlm2 eval`: every task on fixture files in its official layout, scored from known predictions,
plus the whole path through the engine with the tiny model, resume, --limit / --seed and bad input."""

import json
import re

import pytest
import torch

import eval_fixtures as F
from cogvlm2.cli import main
from cogvlm2.eval.data import DataError
from cogvlm2.eval.runner import run, select
from cogvlm2.eval.tasks import VQA_SUFFIX, get_task


def canned(answers: dict[str, str]):
    """A generator answering each prompt by the first key found in it (and recording the prompts)."""
    seen = []

    def generate(prompts):
        seen.extend(prompts)
        return [next((a for k, a in answers.items() if k in q), "") for q, _, _ in prompts]

    generate.seen = seen
    return generate


def evaluate(tmp_path, task, data, answers, **kw):
    t = get_task(task)
    gen = canned(answers)
    summary = run(t, t.load(data, circular=kw.pop("circular", False)), gen, tmp_path / "out", {"task": task},
                  log=lambda s: None, **kw)
    return summary, gen


def test_textvqa(tmp_path):
    summary, gen = evaluate(tmp_path, "textvqa", F.textvqa(tmp_path / "d"),
                            {"brand": "coke", "jersey": "2", "sign": "go"})
    # 0.9 (3 of 10 said coke) + 1.0 + 0.0, hand-worked in test_eval_metrics
    assert summary["overall"] == pytest.approx(100 * 1.9 / 3)
    assert summary["items"] == summary["scored"] == 3
    query, template, image = gen.seen[0]
    assert query == f"what brand is the bottle?\n{VQA_SUFFIX}" and template is None
    assert image.name == "0054c91397f2fe05.jpg" and image.is_file()
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["34602", "34603", "34604"]
    assert lines[0]["prediction"] == "coke" and lines[0]["score"] == pytest.approx(0.9)
    assert lines[0]["references"] == F.TEXTVQA[0]["answers"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["overall"] == summary["overall"]
    submission = json.loads((tmp_path / "out" / "submission.json").read_text())  # EvalAI's format
    assert submission == [{"question_id": 34602, "answer": "coke"}, {"question_id": 34603, "answer": "2"},
                          {"question_id": 34604, "answer": "go"}]


def test_textvqa_parquet_and_short_answer_style(tmp_path):
    summary, gen = evaluate(tmp_path, "textvqa", F.textvqa_parquet(tmp_path / "pq"),
                            {"brand": "Coca Cola", "jersey": "22", "sign": "STOP"}, style="short-answer")
    assert summary["overall"] == 100.0
    query, template, image = gen.seen[0]
    assert (query, template) == ("what brand is the bottle?", "vqa") and image == F.png(F.COLOURS[0])


def test_docvqa(tmp_path):
    summary, _ = evaluate(tmp_path, "docvqa", F.docvqa(tmp_path / "d"),
                          {"date": "January 8 1993", "title": "Annual Reprt"})
    assert json.loads((tmp_path / "out" / "submission.json").read_text())[0] == {"questionId": 49153,
                                                                                  "answer": "January 8 1993"}
    a, b = 1 - 1 / 15, 1 - 1 / 13  # ANLS, hand-worked (test_eval_metrics)
    assert summary["overall"] == pytest.approx(100 * (a + b) / 2)
    assert summary["categories"]["handwritten"]["score"] == pytest.approx(100 * a)
    assert summary["categories"]["layout"] == {"score": pytest.approx(100 * b), "n": 1}


def test_infovqa(tmp_path):
    summary, _ = evaluate(tmp_path, "infovqa", F.infovqa(tmp_path / "d"), {"cases": "1200", "country": "Spain"})
    assert summary["overall"] == 50.0
    assert summary["categories"]["evidence: text"]["score"] == 100.0
    assert summary["categories"]["reasoning: sorting"]["score"] == 0.0
    assert summary["categories"]["answer type: single span"] == {"score": 50.0, "n": 2}


def test_chartqa_both_splits(tmp_path):
    summary, gen = evaluate(tmp_path, "chartqa", F.chartqa(tmp_path / "d"),
                            {"2019": "25", "highest": "2019", "blue": "38%", "red bar": "No"})
    assert summary["overall"] == 75.0
    assert summary["categories"] == {"augmented": {"score": 50.0, "n": 2}, "human": {"score": 100.0, "n": 2}}
    assert {img.name for _, _, img in gen.seen} == {r["imgname"] for rows in F.CHARTQA.values() for r in rows}


def test_ocrbench(tmp_path):
    summary, gen = evaluate(tmp_path, "ocrbench", F.ocrbench(tmp_path / "d"),
                            {"written": "The word is centre.", "LaTeX": "x^{2} + 1", "total": "$1,250",
                             "date": "Date: 10/26/98"})
    assert summary["overall"] == 3 and summary["max_score"] == 4 and not summary["official_total"]
    assert summary["categories"]["Text Recognition"] == {"score": 1, "n": 1}
    assert summary["categories"]["Doc-oriented VQA"] == {"score": 0, "n": 1}
    assert gen.seen[0][0] == "what is written in the image?"  # OCRBench asks the bare question


def _pick(colour_answer: str):
    """Answers the colour question by its option text; the counting question always with 'A'."""
    def answer(prompt):
        if "colour" in prompt:
            return re.search(rf"\n([A-D])\. {colour_answer}\n", prompt).group(1)
        return "A"
    return answer


def test_mmbench_circular(tmp_path):
    t = get_task("mmbench")
    items = t.load(F.mmbench(tmp_path / "d"))
    assert len(items) == 7  # 4 + 3 rotations in the TSV; rotated rows point at the first row's image
    assert items[1].image == items[0].image
    pick = _pick("red")
    summary = run(t, items, lambda ps: [pick(q) for q, _, _ in ps], tmp_path / "out", {}, log=lambda s: None)
    # colour question right in all 4 rotations; counting question right only where A is correct
    assert summary["overall"] == 50.0 and summary["questions"] == 2
    assert summary["vanilla_accuracy"] == 100.0
    assert summary["categories"]["attribute_recognition"]["score"] == 100.0
    assert summary["categories"]["object_localization"]["score"] == 0.0
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [x["score"] for x in lines if x["group"] == "1"] == [1.0, 0.0, 0.0]
    assert lines[1]["extracted"] == "D" and lines[1]["options"]["D"] == "red"


def test_mcq_rotations_made_when_missing(tmp_path):
    t = get_task("mcq")
    data = F.mmbench(tmp_path / "d", rotate=False)
    assert len(t.load(data)) == 2
    assert len(get_task("mmbench").load(data)) == 7  # mmbench always rotates
    items = t.load(data, circular=True)
    assert [i.id for i in items] == ["0", "0+1", "0+2", "0+3", "1", "1+1", "1+2"]
    pick = _pick("red")
    plain = run(t, t.load(data), lambda ps: [pick(q) for q, _, _ in ps], tmp_path / "a", {}, log=lambda s: None)
    assert plain["overall"] == 100.0 and plain["metric"] == "accuracy"
    circ = run(t, items, lambda ps: [pick(q) for q, _, _ in ps], tmp_path / "b", {}, circular=True, log=lambda s: None)
    assert circ["overall"] == 50.0 and circ["metric"] == "circular accuracy"


def test_select_limit_seed_keeps_rotations_together(tmp_path):
    items = get_task("mmbench").load(F.mmbench(tmp_path / "d"))
    assert [i.id for i in select(items, 1, None)] == ["0", "1000000", "2000000", "3000000"]
    for seed in range(5):
        picked = select(items, 1, seed)
        assert len({i.meta["group"] for i in picked}) == 1 and len(picked) in (3, 4)
    assert [i.id for i in select(items, 1, 3)] == [i.id for i in select(items, 1, 3)]
    with pytest.raises(ValueError):
        select(items, 0, None)


def test_resume(tmp_path):
    t = get_task("textvqa")
    items = t.load(F.textvqa(tmp_path / "d"))
    first = canned({"brand": "coke", "jersey": "2", "sign": "go"})
    run(t, items[:2], first, tmp_path / "out", {"task": "textvqa"}, log=lambda s: None)
    pred = tmp_path / "out" / "predictions.jsonl"
    pred.write_text(pred.read_text() + '{"id": "34604", "predic')  # a write cut off by a crash
    second = canned({"brand": "WRONG", "jersey": "WRONG", "sign": "go"})
    logs = []
    summary = run(t, items, second, tmp_path / "out", {"task": "textvqa"}, log=logs.append)
    assert [q for q, _, _ in second.seen] == [f"what does the sign say?\n{VQA_SUFFIX}"]  # only the missing one
    assert summary["overall"] == pytest.approx(100 * 1.9 / 3) and logs[0].startswith("resuming: 2 of 3")
    assert len(pred.read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="other settings"):
        run(t, items, second, tmp_path / "out", {"task": "textvqa", "model": "other"}, log=lambda s: None)
    run(t, items, second, tmp_path / "out", {"task": "textvqa", "model": "other"}, overwrite=True, log=lambda s: None)
    assert len(second.seen) == 4


def test_bad_data(tmp_path):
    t = get_task("docvqa")
    path = F.docvqa(tmp_path / "d")
    (tmp_path / "d" / "documents" / "mxcj0037_1.png").unlink()
    with pytest.raises(DataError, match="mxcj0037_1.png.*--images"):
        t.load(path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        t.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="expected a .json, .tsv or .parquet"):
        t.load(tmp_path / "d" / "documents" / "pybv0228_81.png")
    (tmp_path / "nofield.json").write_text(json.dumps([{"question": "q?", "image": "x.png"}]))
    with pytest.raises(DataError):
        get_task("textvqa").load(tmp_path / "nofield.json")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("vqav9")


ALL_TASKS = [("textvqa", F.textvqa), ("docvqa", F.docvqa), ("infovqa", F.infovqa), ("chartqa", F.chartqa),
             ("ocrbench", F.ocrbench), ("mmbench", F.mmbench)]


@pytest.mark.parametrize("task, write", ALL_TASKS, ids=[t for t, _ in ALL_TASKS])
def test_cli_on_engine_with_tiny_model(tmp_path, capsys, task, write):
    """The whole path: official files -> engine (tiny model, greedy) -> predictions.jsonl + summary.json."""
    data = write(tmp_path / "data")
    out = tmp_path / "out"
    args = ["eval", task, "--data", str(data), "--output", str(out), "--max-new-tokens", "3", "--device", "cpu"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[1].startswith(task)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(lines) == summary["items"] == len(get_task(task).load(data))
    assert all(isinstance(x["prediction"], str) and x["score"] is not None for x in lines)
    assert summary["settings"]["model"] == "tiny" and summary["settings"]["max_new_tokens"] == 3
    before = (out / "predictions.jsonl").read_text()
    assert main(args) == 0  # a second run resumes: nothing left to generate, same lines
    assert (out / "predictions.jsonl").read_text() == before


def test_cli_limit_and_errors(tmp_path, capsys):
    data = F.textvqa(tmp_path / "data")
    assert main(["eval", "textvqa", "--data", str(data), "--output", str(tmp_path / "o"), "--limit", "2",
                 "--seed", "0", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert len((tmp_path / "o" / "predictions.jsonl").read_text().splitlines()) == 2
    # the whole set into the same folder (greedy: the seed does not matter) answers only the third question
    assert main(["eval", "textvqa", "--data", str(data), "--output", str(tmp_path / "o"), "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    assert "resuming: 2 of 3" in capsys.readouterr().err
    assert len((tmp_path / "o" / "predictions.jsonl").read_text().splitlines()) == 3
    assert main(["eval", "textvqa", "--data", str(tmp_path / "missing.json"), "--device", "cpu"]) == 1
    assert "missing.json: no such file" in capsys.readouterr().err


def test_parquet_layouts(tmp_path):
    summary, gen = evaluate(tmp_path / "c", "chartqa", F.chartqa_parquet(tmp_path / "chartqa"),
                            {"2019": "25", "highest": "2019", "blue": "38%", "red bar": "No"})
    assert summary["overall"] == 75.0 and summary["items"] == 4  # the glob skips the train shard
    assert summary["categories"] == {"augmented": {"score": 50.0, "n": 2}, "human": {"score": 100.0, "n": 2}}
    items = get_task("mmbench").load(F.mmbench_parquet(tmp_path / "mmb"))
    assert len(items) == 7 and items[4].meta["hint"] == "Count carefully." and "C" in items[4].meta["options"]
    assert "D" not in items[4].meta["options"] and items[0].categories[1].startswith("finegrained")
    with pytest.raises(DataError, match="must match .parquet"):
        get_task("chartqa").load(tmp_path / "nothing-*.parquet")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_on_cuda_engine(tmp_path, capsys):
    """The CUDA engine (CUDA graphs, paged attention kernels) behind `cogvlm2 eval`, and packed scoring on CUDA."""
    data = F.mmbench(tmp_path / "data")
    assert main(["eval", "mmbench", "--data", str(data), "--output", str(tmp_path / "o"), "--max-new-tokens", "4",
                 "--device", "cuda", "--dtype", "float32"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and all(x["score"] is not None for x in lines)

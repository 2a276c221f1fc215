"""The lmms-eval plugin: `lmms-eval --model cogvlm2` runs local tasks through our engine, and the
packed loglikelihood scorer agrees with the reference generation loop.

lmms-eval is installed in CI as `pip install --no-deps lmms-eval` + the `lmms` extra (README,
"Evaluate"); the lmms-eval tests skip only where it is not installed.
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from cogvlm2.eval.loglikelihood import loglikelihoods
from cogvlm2.generation import generate_ids
from cogvlm2.model import load_model
from cogvlm2.tiny import checkpoint_folder
from cogvlm2.processing import Processor
from cogvlm2.sampling_params import SamplingParams

import eval_fixtures as F

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    model = load_model(checkpoint_folder("tiny"), dtype="float32", device="cpu")
    return model, Processor.from_pretrained(model.checkpoint_path, model.config)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_loglikelihood_matches_reference_loop(tiny, tmp_path, device):
    """Teacher-forced log-probabilities of the greedy continuation equal the reference loop's logits."""
    model, proc = tiny
    if device != "cpu":
        model = load_model(checkpoint_folder("tiny"), dtype="float32", device=device)
    (tmp_path / "a.png").write_bytes(F.png(F.COLOURS[0]))
    prompts = [proc("What colour is it?", image=tmp_path / "a.png"), proc("Say something.")]
    requests, expected = [], []
    for x in prompts:
        logits = []
        tokens = [t for (t,) in generate_ids(model, [x], SamplingParams(max_new_tokens=4, temperature=0), logits)]
        steps = torch.cat(logits).log_softmax(-1)  # [4, V]
        expected.append(float(steps[torch.arange(len(tokens)), torch.tensor(tokens)].sum()))
        requests.append((x, tokens))
    first = requests[0][1][0]
    other = next(t for t in proc.tokenizer.encode(" purple elephants") if t != first)
    requests += [(prompts[0], [other]), (prompts[0], [first])]
    got = loglikelihoods(model, requests, max_batch_tokens=1)  # one request per packed batch
    together = loglikelihoods(model, requests)                 # all in one packed batch, image encoded once
    for (lp, greedy), want in zip(got[:2], expected):
        assert lp == pytest.approx(want, abs=1e-4) and greedy
    assert not got[2][1] and got[3][1] and got[2][0] < got[3][0]  # one token: the greedy one is likelier
    for (a, ga), (b, gb) in zip(got, together):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    with pytest.raises(ValueError, match="empty"):
        loglikelihoods(model, [(prompts[0], [])])


@pytest.fixture(scope="module")
def lmms_eval():
    return pytest.importorskip("lmms_eval", reason="lmms-eval not installed (CI installs it: .ci/run)")

UTILS = '''
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]

def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''

GEN_TASK = """task: cogvlm2_fixture_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
  temperature: 0
  until: ["zzzz"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """task: cogvlm2_fixture_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: ["red", "green", "blue"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _entry_point_dist(folder: Path) -> Path:
    """A distribution declaring pyproject.toml's lmms_eval.models entry point (the editable install of
    another checkout may not carry it)."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    dist = folder / "cogvlm2_entry_points-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cogvlm2-entry-points\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return folder


def test_lmms_eval_runs_through_our_engine(lmms_eval, tiny, tmp_path):
    model, proc = tiny
    docs = []
    for i, (q, colour) in enumerate([("What colour is this?", "red"), ("Name the colour.", "green"),
                                     ("Which colour?", "blue")]):
        img = tmp_path / f"{i}.png"
        img.write_bytes(F.png(F.COLOURS[i]))
        docs.append({"question": q, "image": str(img), "answer": colour, "label": i})
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=data))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_entry_point_dist(tmp_path / "ep")), str(ROOT),
                                                         os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "cogvlm2",
           "--model_args", "pretrained=tiny,device=cpu,dtype=float32,max_num_seqs=4",
           "--tasks", "cogvlm2_fixture_vqa,cogvlm2_fixture_mc", "--include_path", str(tasks),
           "--output_path", str(out), "--log_samples", "--batch_size", "2"]
    proc_run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc_run.returncode == 0, proc_run.stdout[-3000:] + proc_run.stderr[-3000:]
    results = next(out.rglob("*_results.json"))
    res = json.loads(results.read_text())["results"]
    assert set(res) >= {"cogvlm2_fixture_vqa", "cogvlm2_fixture_mc"}
    samples = {p.name: [json.loads(x) for x in p.read_text().splitlines()] for p in out.rglob("*_samples_*.jsonl")}
    gen = next(v for k, v in samples.items() if "vqa" in k)
    mc = next(v for k, v in samples.items() if "_mc" in k)
    # generate_until: the engine's greedy answer to the same prompt (chat template, first image)
    from cogvlm2.llm import LLM

    llm = LLM(model, max_num_seqs=4)
    want = llm.generate([{"query": d["question"], "image": d["image"]} for d in docs],
                        SamplingParams(max_new_tokens=5, temperature=0), use_tqdm=False)
    got = {s["doc_id"]: s["filtered_resps"][0] for s in gen}
    assert [got[i] for i in range(3)] == [o.text.strip() for o in want]
    # loglikelihood: the plugin reports each choice's mean negative log-likelihood per token (the loss
    # lmms-eval's models report); lmms-eval picks the lowest
    for s in mc:
        d = docs[s["doc_id"]]
        prompt = proc(d["question"], image=d["image"])
        conts = [proc.tokenizer.encode(f" {c}") for c in ("red", "green", "blue")]
        scores = loglikelihoods(model, [(prompt, c) for c in conts])
        losses = [float(x) for x, _ in s["filtered_resps"]]  # logged as strings
        assert losses == pytest.approx([-lp / len(c) for (lp, _), c in zip(scores, conts)], abs=1e-3)
        assert s["acc"] == float(min(range(3), key=lambda i: losses[i]) == d["label"])
    assert res["cogvlm2_fixture_mc"]["acc,none"] == pytest.approx(sum(s["acc"] for s in mc) / 3)


def _instance(request_type, args, doc_id):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=args, idx=0,
                    metadata={"task": "fixture", "doc_id": doc_id, "repeats": 1})


def test_plugin_in_process(lmms_eval, tmp_path):
    from cogvlm2.eval.lmms_plugin import CogVLM2, manifest

    assert manifest().simple_class_path == "cogvlm2.eval.lmms_plugin.CogVLM2"
    with pytest.raises(ValueError, match="unknown model_args"):
        CogVLM2(pretrained="tiny", device="cpu", colour="blue")
    lm = CogVLM2(pretrained="tiny", device="cpu", dtype="float32", max_num_seqs=2, batch_size=8)
    (tmp_path / "a.png").write_bytes(F.png())
    from PIL import Image

    docs = [{"q": "What is this?"}, {"q": "And this?"}]
    lm.task_dict = {"fixture": {"test": docs}}
    visual = lambda doc: [Image.open(tmp_path / "a.png")]  # noqa: E731

    gen = [_instance("generate_until", ("<image>What is this?", {"max_new_tokens": 3, "until": ["\n\n"]}, visual, 0,
                                        "fixture", "test"), 0)]
    want = lm.llm.generate([{"query": "What is this?", "image": tmp_path / "a.png"}],
                           SamplingParams(max_new_tokens=3, temperature=0, stop=["\n\n"]), use_tqdm=False)[0]
    assert lm.generate_until(gen) == [want.text.strip()]
    with pytest.raises(ValueError, match="beam search"):
        lm.generate_until([_instance("generate_until", ("q", {"num_beams": 3}, visual, 0, "fixture", "test"), 0)])

    calls = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        calls.append((doc["q"], list(previous_output), round_idx))
        done = round_idx == (2 if doc["q"] == "What is this?" else 1)
        return None, f"round {round_idx}: {doc['q']}", done, previous_output, {"r": round_idx}

    multi = [_instance("generate_until_multi_round", (d["q"], {"max_new_tokens": 2}, visual, doc_to_text, i,
                                                      "fixture", "test"), i) for i, d in enumerate(docs)]
    out = lm.generate_until_multi_round(multi)
    assert [len(o) for o in out] == [2, 1] and all(isinstance(t, str) for o in out for t in o)
    assert [c[2] for c in calls] == [1, 1, 2]  # both docs answer round 0 together; only the first goes on

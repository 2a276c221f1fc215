"""The lmms-eval model `cogvlm2`: any lmms-eval task through this package's engine.

Registered through the `lmms_eval.models` entry point (pyproject.toml), which replaces lmms-eval's
own transformers-based `cogvlm2` class:

    lmms-eval --model cogvlm2 --model_args pretrained=THUDM/cogvlm2-llama3-chat-19B --tasks textvqa_val

model_args: pretrained (checkpoint folder, hub id or "tiny"), dtype, device, lora, template
(chat / vqa / base; default the checkpoint's), max_num_seqs, max_model_len, enforce_eager,
max_new_tokens (default when a task sets none), and any other shared model argument of
`cogvlm2 chat` (e.g. quant, where the installed version has it). batch_size is accepted and unused:
the engine batches every request of a call continuously.

generate_until: all requests in one continuous-batching pass (per-request stop strings, token
budgets, temperature). loglikelihood: packed teacher-forced scoring (loglikelihood.py), reported as
lmms-eval's model classes report it: the continuation's mean negative log-likelihood per token (a
loss; lmms-eval's multiple_choice takes the argmin), and whether greedy decoding would produce it.
generate_until_multi_round: each round of every document batched together; every round is asked
as the task's doc_to_text builds it (the task carries the conversation). CogVLM2 sees one image per
conversation: a document with several images uses its first (a warning says so once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v"}


def manifest():
    """Entry-point payload: lmms-eval's model registry entry for `cogvlm2`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="cogvlm2", simple_class_path="cogvlm2.eval.lmms_plugin.CogVLM2")


def _model_namespace(pretrained: str, overrides: dict) -> argparse.Namespace:
    """The shared model arguments of `cogvlm2 chat` with their defaults, overridden by model_args."""
    from ..arguments import add_lora_argument, add_model_arguments

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    add_lora_argument(p)
    args = p.parse_args([])
    unknown = sorted(k for k in overrides if not hasattr(args, k))
    if unknown:
        raise ValueError(f"cogvlm2: unknown model_args {unknown}")
    for k, v in overrides.items():
        setattr(args, k, v)
    args.model = str(pretrained)
    return args


class CogVLM2(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "THUDM/cogvlm2-llama3-chat-19B", template: str | None = None,
                 max_num_seqs: int = 64, max_model_len: int | None = None, enforce_eager: bool = False,
                 max_new_tokens: int = 1024, batch_size=None, max_batch_size=None, **model_args):
        super().__init__()
        from .backend import load_llm

        if model_args.get("device") is None:
            model_args.pop("device", None)
        self.llm = load_llm(_model_namespace(pretrained, model_args), max_num_seqs=int(max_num_seqs),
                            max_model_len=None if max_model_len is None else int(max_model_len),
                            enforce_eager=bool(enforce_eager))
        self.template = template
        self.max_new_tokens = int(max_new_tokens)
        self._warned_images = False

    # ------------------------------------------------------------------------------------------ inputs

    def _media(self, visuals) -> dict:
        visuals = [v for v in (visuals or []) if v is not None]
        if not visuals:
            return {}
        if len(visuals) > 1 and not self._warned_images:
            print(f"cogvlm2: a document has {len(visuals)} images; CogVLM2 sees one per conversation: the first",
                  file=sys.stderr)
            self._warned_images = True
        v = visuals[0]
        if isinstance(v, (str, Path)) and Path(v).suffix.lower() in VIDEO_SUFFIXES:
            return {"video": str(v)}
        return {"image": v.convert("RGB") if hasattr(v, "convert") else v}

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _inputs(self, context: str, visuals):
        query = context.replace("<image>", "").strip()
        return self.llm.processor(query, template=self.template, **self._media(visuals))

    def _params(self, gen_kwargs: dict):
        from ..sampling_params import SamplingParams

        kw = dict(gen_kwargs or {})
        if int(kw.get("num_beams") or 1) > 1:
            raise ValueError("cogvlm2: beam search (num_beams > 1) is not supported; use greedy or sampling")
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kw.get("temperature") or 0.0)
        if kw.get("do_sample") is False:
            temperature = 0.0
        top_p = kw.get("top_p")
        return SamplingParams(max_new_tokens=int(kw.get("max_new_tokens") or self.max_new_tokens),
                              temperature=temperature, top_p=float(top_p) if top_p else 1.0,
                              stop=[s for s in until if s])

    # ------------------------------------------------------------------------------------- lmms-eval API

    def generate_until(self, requests: list[Instance]) -> list[str]:
        inputs, params = [], []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            inputs.append(self._inputs(context, doc_to_visual(self._doc(task, split, doc_id))))
            params.append(self._params(gen_kwargs))
        outputs = self.llm.generate(inputs, params, use_tqdm=self.rank == 0)
        texts = [o.text.strip() for o in outputs]
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", (req.args[0], req.args[1]), text)
        return texts

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from .loglikelihood import loglikelihoods

        scored = []
        for req in requests:
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            if callable(continuation):
                continuation = continuation(doc)
            if isinstance(continuation, list):
                continuation = continuation[0]
            ids = self.llm.tokenizer.encode(str(continuation))
            scored.append((self._inputs(context, doc_to_visual(doc) if doc_to_visual else None), ids))
        # lmms-eval's models return a loss and its multiple_choice picks the argmin, so the value is the
        # mean negative log-likelihood per continuation token (HF's loss), not the log-probability
        results = loglikelihoods(self.llm.engine.model, scored)
        return [(-lp / len(ids), greedy) for (lp, greedy), (_, ids) in zip(results, scored)]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        states = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            states.append({"doc": doc, "visuals": doc_to_visual(doc), "context": context, "next": doc_to_text,
                           "params": self._params(gen_kwargs), "outputs": [], "info": None,
                           "result": None})
        round_idx = 0
        active = states
        while active:
            inputs = [self._inputs(s["context"], s["visuals"]) for s in active]
            outputs = self.llm.generate(inputs, [s["params"] for s in active], use_tqdm=self.rank == 0)
            round_idx += 1
            for s, out in zip(active, outputs):
                text = out.text.strip()
                s["outputs"].append(text)
                visuals, context, terminal, round_res, info = s["next"](
                    s["doc"], previous_output=list(s["outputs"]), round_idx=round_idx, previous_round_info=s["info"])
                if terminal:
                    s["result"] = list(round_res) if round_res is not None else list(s["outputs"])
                else:
                    s["visuals"] = visuals if visuals else s["visuals"]
                    s["context"], s["info"] = context, info
            active = [s for s in active if s["result"] is None]
        return [s["result"] for s in states]

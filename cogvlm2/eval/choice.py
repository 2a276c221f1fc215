"""Multiple choice (MMBench and friends): the prompt, the option-letter extraction, circular evaluation.

Prompt as VLMEvalKit's CogVLM2 wrapper builds it: hint, question, one "X. option" line per option,
"Answer with the option's letter from the given choices directly." (Chinese text: "请直接回答选项字母。"),
then "Short Answer." on its own line.

Extraction as VLMEvalKit's exact-matching mode (no LLM judge): the answer with . ( ) [ ] , : ; ! * # { }
read as spaces is split into words; exactly one option letter among them, within the last five
words, is the choice; else the option whose text (lower-cased) alone occurs in the answer, when
the answer is at most twice as long as all option texts together; else nothing (counted wrong).

Circular evaluation (MMBench): the official TSVs carry each question N times with the options rotated,
rows `index + k * 1_000_000`; a question counts as correct only if every rotation is answered right.
For a file without rotations, `circular_rotations` makes them.
"""

from __future__ import annotations

import re
import string
from typing import Mapping

LETTERS = string.ascii_uppercase
CIRCULAR_OFFSET = 1_000_000
_SEPARATORS = ".()[],:;!*#{}"
_CHINESE = re.compile(r"[\u4e00-\u9fa5]")
EN_INSTRUCTION = "Answer with the option's letter from the given choices directly."
ZH_INSTRUCTION = "请直接回答选项字母。"
SHORT_ANSWER = "Short Answer."


def mcq_prompt(question: str, options: Mapping[str, str], hint: str | None = None) -> str:
    text = f"{hint}\n{question}" if hint else question
    text += "".join(f"\n{k}. {v}" for k, v in options.items())
    instruction = ZH_INSTRUCTION if _CHINESE.search(text) else EN_INSTRUCTION
    return f"{text}\n{instruction}\n{SHORT_ANSWER}"


def _letter(answer: str, options: Mapping[str, str]) -> str | None:
    for c in _SEPARATORS:
        answer = answer.replace(c, " ")
    words = answer.split()
    found = [k for k in options if k in words]
    if len(found) == 1 and words.index(found[0]) > len(words) - 5:
        return found[0]
    return None


def _by_text(answer: str, options: Mapping[str, str]) -> str | None:
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    found = [k for k, v in options.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


def extract_choice(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter an answer picks, or None when it cannot be told."""
    return _letter(answer, options) or _by_text(answer, options)


def circular_rotations(options: Mapping[str, str], answer: str) -> list[tuple[dict[str, str], str]]:
    """All N rotations of N options (the first is the original) with the answer letter moved along."""
    keys, values = list(options), list(options.values())
    n, at = len(keys), keys.index(answer)
    return [({keys[i]: values[(i + k) % n] for i in range(n)}, keys[(at - k) % n]) for k in range(n)]
